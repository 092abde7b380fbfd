//! The cpu backend's settings: `ONSITE_CPU_HZ`, `ONSITE_CPU_FLAMEGRAPH` and
//! `ONSITE_CPU_PER_THREAD_TIMERS`.

use onsite_core::Profiler;

use crate::env;

/// `ONSITE_CPU_HZ`: samples per second per CPU-busy thread (1–1000; default 99).
pub const HZ_VAR: &str = "ONSITE_CPU_HZ";
/// `ONSITE_CPU_FLAMEGRAPH`: also write an SVG flamegraph (default true).
pub const FLAMEGRAPH_VAR: &str = "ONSITE_CPU_FLAMEGRAPH";
/// `ONSITE_CPU_PER_THREAD_TIMERS`: sample on a CPU-time timer per thread (default true), or,
/// when false, on pprof-rs's process-wide `setitimer`.
pub const PER_THREAD_TIMERS_VAR: &str = "ONSITE_CPU_PER_THREAD_TIMERS";

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    frequency_hz: u32,
    flamegraph: bool,
    per_thread_timers: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { frequency_hz: onsite_cpu::DEFAULT_FREQUENCY_HZ, flamegraph: true, per_thread_timers: true }
    }
}

impl Settings {
    pub(crate) fn apply_env(&mut self, env: &mut env::Reader) {
        env.set(HZ_VAR, &mut self.frequency_hz, env::parse_in_range(1..=1000));
        env.set(FLAMEGRAPH_VAR, &mut self.flamegraph, env::parse_bool);
        env.set(PER_THREAD_TIMERS_VAR, &mut self.per_thread_timers, env::parse_bool);
    }

    pub(crate) fn profilers(&self) -> Vec<Box<dyn Profiler>> {
        let cpu =
            onsite_cpu::CpuProfiler::new(self.frequency_hz, self.flamegraph).per_thread_timers(self.per_thread_timers);
        vec![Box::new(super::cpu_temp_dir::UsableTempDir::wrap(cpu))]
    }
}

impl crate::Builder {
    /// CPU samples per second of each busy thread's CPU time (1–1000, default 99). The CPU
    /// file's comment says how many arrived and why any are missing.
    pub fn cpu_frequency(mut self, hz: u32) -> Self {
        self.backends.cpu.frequency_hz = hz.clamp(1, 1000);
        self
    }

    /// Whether CPU captures sample on a CPU-time timer per thread (default true) or on
    /// pprof-rs's process-wide `setitimer` (at most one sample per scheduler tick for the whole
    /// process; what onsite falls back to when per-thread timers cannot be made).
    pub fn cpu_per_thread_timers(mut self, on: bool) -> Self {
        self.backends.cpu.per_thread_timers = on;
        self
    }

    /// Whether a CPU capture also writes an SVG flamegraph (default true).
    pub fn cpu_flamegraph(mut self, on: bool) -> Self {
        self.backends.cpu.flamegraph = on;
        self
    }
}
