//! The `Profiler` a capture starts, and its two modes.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use onsite_core::{CaptureError, ProfileKind, Profiler, Stopper};

use crate::{always_on, dhat_mode, sampled};

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
///
/// With [`MemoryProfiler::sample_always`], sampling runs from that call on, and each capture's
/// `inuse_*` counts every sampled block live at its end, whatever its age (Go's heap profile);
/// `alloc_*` always counts the capture's own allocations.
#[derive(Debug, Clone)]
pub struct MemoryProfiler {
    mode: MemoryMode,
    sample_bytes: u64,
    /// Always-on sampling, while this profiler or a clone of it lives.
    always_on: Option<Arc<always_on::Sampler>>,
}

impl MemoryProfiler {
    /// A profiler in `mode`; `sample_bytes` is the sampled mode's mean interval (at least 1, at
    /// most 1 TiB).
    pub fn new(mode: MemoryMode, sample_bytes: u64) -> Self {
        MemoryProfiler { mode, sample_bytes: sample_bytes.max(1), always_on: None }
    }

    /// The mode captures run in.
    pub fn mode(&self) -> MemoryMode {
        self.mode
    }

    /// Starts always-on sampling now, at this profiler's mean, until this profiler and every
    /// clone of it are dropped; its captures then report what holds the memory whatever its age.
    /// Fails (and nothing runs) in dhat mode, when onsite's allocator is not the global
    /// allocator, when another memory capture or always-on sampling runs, or in a process forked
    /// from one that was capturing memory.
    pub fn sample_always(&mut self) -> Result<(), CaptureError> {
        if self.always_on.is_some() {
            return Ok(());
        }
        if self.mode == MemoryMode::Dhat {
            return Err(CaptureError::new(
                ProfileKind::Memory,
                "always-on sampling needs the sampled mode: under dhat, frees bypass the sampler's tables",
            ));
        }
        let inner = claim()?;
        self.always_on = Some(Arc::new(always_on::start(self.sample_bytes, inner)));
        Ok(())
    }

    /// Whether this profiler runs always-on sampling.
    pub fn samples_always(&self) -> bool {
        self.always_on.is_some()
    }
}

impl Default for MemoryProfiler {
    fn default() -> Self {
        MemoryProfiler::new(MemoryMode::default(), DEFAULT_SAMPLE_BYTES)
    }
}

/// Claims the allocator for a capture or for always-on sampling (the mode is `PROBE` after)
/// and returns the inner allocator the probe found under it, or says why it cannot.
fn claim() -> Result<&'static crate::Inner, CaptureError> {
    use crate::registry::{Unclaimed, claim_and_probe, current_mode};
    let reason = match claim_and_probe() {
        Ok(inner) => return Ok(inner),
        Err(Unclaimed::Taken) if current_mode() == crate::mode::FORKED => {
            "this process was forked while its parent captured memory: memory captures are off in it"
        }
        Err(Unclaimed::Taken) if crate::mode::of(current_mode()) == crate::mode::SAMPLED && always_on::running() => {
            "always-on sampling runs in this process: its profiler takes the memory captures, and no other mode \
             can start (the sampler must see every free)"
        }
        Err(Unclaimed::Taken) => "a memory capture is already running",
        Err(Unclaimed::NotGlobal { full: false }) => {
            "onsite's allocator is not this program's global allocator: install \
             onsite::memory::Allocator as #[global_allocator] to capture memory"
        }
        Err(Unclaimed::NotGlobal { full: true }) => {
            "onsite's allocator is not this program's global allocator, or more other \
             onsite::memory::Allocator instances were used before it than it can tell apart: install \
             onsite::memory::Allocator as #[global_allocator], and call no other instance directly, to capture memory"
        }
    };
    Err(CaptureError::new(ProfileKind::Memory, reason))
}

impl Profiler for MemoryProfiler {
    fn kind(&self) -> ProfileKind {
        ProfileKind::Memory
    }

    fn start(&mut self) -> Result<Box<dyn Stopper>, CaptureError> {
        if let Some(sampler) = &self.always_on {
            return Ok(Box::new(always_on::start_capture(sampler)?));
        }
        let inner = claim()?;
        // The mode is PROBE here and this capture owns it.
        Ok(match self.mode {
            MemoryMode::Dhat if !inner.is_system() => {
                crate::registry::release_claim();
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
