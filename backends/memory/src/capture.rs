//! The `Profiler` a capture starts, and its two modes.

use std::fmt;
use std::str::FromStr;

use onsite_core::{CaptureError, ProfileKind, Profiler, Stopper};

use crate::{dhat_mode, sampled};

/// Go's `runtime.MemProfileRate`: on average one sample per this many bytes allocated.
pub const DEFAULT_SAMPLE_BYTES: u64 = 512 * 1024;

/// How a memory capture records allocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryMode {
    /// Sampling by bytes allocated (cheap; estimates, like Go's heap profile).
    #[default]
    Sampled,
    /// Every allocation through dhat (exact; very slow while it runs), plus dhat's JSON.
    Dhat,
}

impl MemoryMode {
    /// The name used in `ONSITE_MEMORY_MODE`.
    pub const fn as_str(self) -> &'static str {
        match self {
            MemoryMode::Sampled => "sampled",
            MemoryMode::Dhat => "dhat",
        }
    }
}

impl fmt::Display for MemoryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that names no [`MemoryMode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownMode(pub String);

impl fmt::Display for UnknownMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown memory mode {:?} (known: sampled, dhat)", self.0)
    }
}

impl std::error::Error for UnknownMode {}

impl FromStr for MemoryMode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sampled" => Ok(MemoryMode::Sampled),
            "dhat" => Ok(MemoryMode::Dhat),
            _ => Err(UnknownMode(s.trim().to_owned())),
        }
    }
}

/// Starts memory captures. Only one memory capture runs at a time in a process.
#[derive(Debug, Clone)]
pub struct MemoryProfiler {
    mode: MemoryMode,
    sample_bytes: u64,
}

impl MemoryProfiler {
    /// A profiler in `mode`; `sample_bytes` is the sampled mode's mean interval (at least 1, at
    /// most 1 TiB).
    pub fn new(mode: MemoryMode, sample_bytes: u64) -> Self {
        MemoryProfiler { mode, sample_bytes: sample_bytes.max(1) }
    }

    /// The mode captures run in.
    pub fn mode(&self) -> MemoryMode {
        self.mode
    }
}

impl Default for MemoryProfiler {
    fn default() -> Self {
        MemoryProfiler::new(MemoryMode::default(), DEFAULT_SAMPLE_BYTES)
    }
}

impl Profiler for MemoryProfiler {
    fn kind(&self) -> ProfileKind {
        ProfileKind::Memory
    }

    fn start(&mut self) -> Result<Box<dyn Stopper>, CaptureError> {
        let inner = match crate::claim_and_probe() {
            Ok(inner) => inner,
            Err(true) if crate::MODE.load(std::sync::atomic::Ordering::SeqCst) == crate::mode::FORKED => {
                return Err(CaptureError::new(
                    ProfileKind::Memory,
                    "this process was forked while its parent captured memory: memory captures are off in it",
                ));
            }
            Err(true) => return Err(CaptureError::new(ProfileKind::Memory, "a memory capture is already running")),
            Err(false) => {
                return Err(CaptureError::new(
                    ProfileKind::Memory,
                    "onsite's allocator is not this program's global allocator: install \
                     onsite::memory::Allocator as #[global_allocator] to capture memory",
                ));
            }
        };
        // The mode is PROBE here and this capture owns it.
        Ok(match self.mode {
            MemoryMode::Dhat if !inner.is_system() => {
                crate::release_claim();
                return Err(dhat_needs_system(inner.name()));
            }
            MemoryMode::Dhat => Box::new(dhat_mode::start()),
            MemoryMode::Sampled => Box::new(sampled::start(self.sample_bytes, inner)),
        })
    }
}

/// Why a dhat capture refuses to start over `inner`: dhat allocates and frees through `System`,
/// so a block the inner allocator handed out before the capture would be freed through
/// `System` during it (and a block dhat handed out freed through the inner one after it).
fn dhat_needs_system(inner: &str) -> CaptureError {
    CaptureError::new(
        ProfileKind::Memory,
        format!(
            "the dhat memory mode needs onsite::memory::Allocator over std::alloc::System (dhat allocates \
             and frees through it), but this program's global allocator is onsite::memory::Allocator over \
             {inner}: no memory capture; use ONSITE_MEMORY_MODE=sampled, which works over {inner}"
        ),
    )
}
