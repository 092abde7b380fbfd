//! The memory backend's settings and profilers (see `onsite-memory`).
//!
//! `ONSITE_MEMORY_MODE` = `sampled` (default) or `dhat`; `ONSITE_MEMORY_SAMPLE_BYTES` = the
//! sampled mode's mean interval in bytes (default 524288, Go's `MemProfileRate`).

use onsite_core::Profiler;
use onsite_memory::{DEFAULT_SAMPLE_BYTES, MemoryMode, MemoryProfiler};

use crate::env;

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) mode: MemoryMode,
    pub(crate) sample_bytes: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { mode: MemoryMode::default(), sample_bytes: DEFAULT_SAMPLE_BYTES }
    }
}

impl Settings {
    pub(crate) fn apply_env(&mut self, env: &mut env::Reader) {
        env.set("ONSITE_MEMORY_MODE", &mut self.mode, |text| text.parse::<MemoryMode>().map_err(|e| e.to_string()));
        env.set("ONSITE_MEMORY_SAMPLE_BYTES", &mut self.sample_bytes, env::parse_in_range(1..=1u64 << 30));
    }

    pub(crate) fn profilers(&self) -> Vec<Box<dyn Profiler>> {
        vec![Box::new(MemoryProfiler::new(self.mode, self.sample_bytes))]
    }
}

impl crate::Builder {
    /// How memory captures record allocations: [`MemoryMode::Sampled`] (default, cheap) or
    /// [`MemoryMode::Dhat`] (exact, very slow while it runs). `ONSITE_MEMORY_MODE` overrides it.
    pub fn memory_mode(mut self, mode: MemoryMode) -> Self {
        self.backends.memory.mode = mode;
        self
    }

    /// The sampled mode's mean interval: on average one sampled allocation per `bytes`
    /// allocated (default 512 KiB). `ONSITE_MEMORY_SAMPLE_BYTES` overrides it.
    pub fn memory_sample_bytes(mut self, bytes: u64) -> Self {
        self.backends.memory.sample_bytes = bytes.max(1);
        self
    }
}
