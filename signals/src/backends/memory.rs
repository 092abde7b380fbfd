//! The memory backend's settings and profilers (see `onsite-memory`).
//!
//! `ONSITE_MEMORY_MODE` = `sampled` (default) or `dhat`; `ONSITE_MEMORY_SAMPLE_BYTES` = the
//! sampled mode's mean interval in bytes (default 524288, Go's `MemProfileRate`);
//! `ONSITE_MEMORY_ALWAYS` = `on` to sample from install on, so a capture's heap says what holds
//! the memory whatever its age (default `off`).

use onsite_core::{ConfigError, Profiler};
use onsite_memory::{DEFAULT_SAMPLE_BYTES, MemoryMode, MemoryProfiler};

use crate::env;

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) mode: MemoryMode,
    pub(crate) sample_bytes: u64,
    pub(crate) always: bool,
}

pub(crate) const ALWAYS_VAR: &str = "ONSITE_MEMORY_ALWAYS";

impl Default for Settings {
    fn default() -> Self {
        Settings { mode: MemoryMode::default(), sample_bytes: DEFAULT_SAMPLE_BYTES, always: false }
    }
}

impl Settings {
    pub(crate) fn apply_env(&mut self, env: &mut env::Reader) {
        env.set("ONSITE_MEMORY_MODE", &mut self.mode, |text| text.parse::<MemoryMode>().map_err(|e| e.to_string()));
        env.set("ONSITE_MEMORY_SAMPLE_BYTES", &mut self.sample_bytes, env::parse_in_range(1..=1u64 << 30));
        env.set(ALWAYS_VAR, &mut self.always, env::parse_bool);
        if self.always && self.mode == MemoryMode::Dhat {
            let reason = "needs ONSITE_MEMORY_MODE=sampled: under dhat, frees bypass the sampler's tables";
            env.reject(ConfigError::new(ALWAYS_VAR, "on", reason), "off (dhat captures)");
            self.always = false;
        }
    }

    /// The memory profiler; with `always`, sampling starts here, at install, and runs until
    /// the profiler is dropped at shutdown. If it cannot start, the error is logged and
    /// captures record their own window only.
    pub(crate) fn profilers(&self) -> Vec<Box<dyn Profiler>> {
        let mut profiler = MemoryProfiler::new(self.mode, self.sample_bytes);
        if self.always
            && let Err(e) = profiler.sample_always()
        {
            tracing::error!(
                variable = ALWAYS_VAR,
                "onsite: always-on heap sampling did not start: {e}; memory captures see only their own window"
            );
        }
        vec![Box::new(profiler)]
    }
}

impl crate::Builder {
    /// How memory captures record allocations: [`MemoryMode::Sampled`] (default, cheap) or
    /// [`MemoryMode::Dhat`] (exact, very slow while it runs). `ONSITE_MEMORY_MODE` overrides it.
    pub fn memory_mode(mut self, mode: MemoryMode) -> Self {
        self.backends.memory.mode = mode;
        self
    }

    /// Samples the heap from install on (default `false`), so that a capture's memory profile
    /// has `inuse_*` for every sampled block live at its end, whatever its age (Go's heap
    /// profile), not only those allocated during it. Needs the sampled mode; costs the sampled
    /// mode's price on every allocation all the time. `ONSITE_MEMORY_ALWAYS` overrides it.
    pub fn memory_always(mut self, on: bool) -> Self {
        self.backends.memory.always = on;
        self
    }

    /// The sampled mode's mean interval: on average one sampled allocation per `bytes`
    /// allocated (default 512 KiB). `ONSITE_MEMORY_SAMPLE_BYTES` overrides it.
    pub fn memory_sample_bytes(mut self, bytes: u64) -> Self {
        self.backends.memory.sample_bytes = bytes.max(1);
        self
    }
}
