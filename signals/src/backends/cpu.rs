//! The cpu backend's settings: `ONSITE_CPU_HZ` and `ONSITE_CPU_FLAMEGRAPH`.

use onsite_core::Profiler;

use crate::env;

/// `ONSITE_CPU_HZ`: samples per second per CPU-busy thread (1–1000; default 99).
pub const HZ_VAR: &str = "ONSITE_CPU_HZ";
/// `ONSITE_CPU_FLAMEGRAPH`: also write an SVG flamegraph (default true).
pub const FLAMEGRAPH_VAR: &str = "ONSITE_CPU_FLAMEGRAPH";

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    frequency_hz: u32,
    flamegraph: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { frequency_hz: onsite_cpu::DEFAULT_FREQUENCY_HZ, flamegraph: true }
    }
}

impl Settings {
    pub(crate) fn apply_env(&mut self, env: &mut env::Reader) {
        env.set(HZ_VAR, &mut self.frequency_hz, env::parse_in_range(1..=1000));
        env.set(FLAMEGRAPH_VAR, &mut self.flamegraph, env::parse_bool);
    }

    pub(crate) fn profilers(&self) -> Vec<Box<dyn Profiler>> {
        let cpu = onsite_cpu::CpuProfiler::new(self.frequency_hz, self.flamegraph);
        vec![Box::new(super::cpu_temp_dir::UsableTempDir::wrap(cpu))]
    }
}

impl crate::Builder {
    /// CPU samples per second (1–1000, default 99). Rates far above 100 Hz mostly go
    /// undelivered (the kernel ticks at 250 Hz); the CPU file's comment says how many arrived.
    pub fn cpu_frequency(mut self, hz: u32) -> Self {
        self.backends.cpu.frequency_hz = hz.clamp(1, 1000);
        self
    }

    /// Whether a CPU capture also writes an SVG flamegraph (default true).
    pub fn cpu_flamegraph(mut self, on: bool) -> Self {
        self.backends.cpu.flamegraph = on;
        self
    }
}
