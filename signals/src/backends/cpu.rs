//! The cpu backend's settings: `ONSITE_CPU_HZ`, `ONSITE_CPU_FLAMEGRAPH`,
//! `ONSITE_CPU_PER_THREAD_TIMERS` and `ONSITE_CPU_RECORDER` (the flight recorder).

use std::time::Duration;

use onsite_core::Profiler;

use crate::env;

/// `ONSITE_CPU_HZ`: samples per second per CPU-busy thread (1–1000; default 99).
pub const HZ_VAR: &str = "ONSITE_CPU_HZ";
/// `ONSITE_CPU_FLAMEGRAPH`: also write an SVG flamegraph (default true).
pub const FLAMEGRAPH_VAR: &str = "ONSITE_CPU_FLAMEGRAPH";
/// `ONSITE_CPU_PER_THREAD_TIMERS`: sample on a CPU-time timer per thread (default true), or,
/// when false, on pprof-rs's process-wide `setitimer`.
pub const PER_THREAD_TIMERS_VAR: &str = "ONSITE_CPU_PER_THREAD_TIMERS";

/// `ONSITE_CPU_RECORDER`: the always-on CPU flight recorder, `off` (default), `on` (5 minutes
/// at 19 Hz), or a window and optionally a rate, e.g. `5m`, `2m@49Hz`.
pub const RECORDER_VAR: &str = "ONSITE_CPU_RECORDER";

/// The flight recorder's window and rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RecorderSpec {
    pub(crate) window: Duration,
    pub(crate) hz: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    frequency_hz: u32,
    flamegraph: bool,
    per_thread_timers: bool,
    recorder: Option<RecorderSpec>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            frequency_hz: onsite_cpu::DEFAULT_FREQUENCY_HZ,
            flamegraph: true,
            per_thread_timers: true,
            recorder: None,
        }
    }
}

const RECORDER_WINDOWS: std::ops::RangeInclusive<Duration> = Duration::from_secs(3)..=Duration::from_secs(24 * 3600);

/// `off`, `on`, `WINDOW` or `WINDOW@RATEHz`.
fn parse_recorder(text: &str) -> Result<Option<RecorderSpec>, String> {
    let default = RecorderSpec {
        window: onsite_cpu::flight_recorder::DEFAULT_WINDOW,
        hz: onsite_cpu::flight_recorder::DEFAULT_HZ,
    };
    match env::parse_bool(text) {
        Ok(false) => return Ok(None),
        Ok(true) => return Ok(Some(default)),
        Err(_) => {}
    }
    let (window, rate) = match text.split_once('@') {
        Some((window, rate)) => (window, Some(rate)),
        None => (text, None),
    };
    let window = env::parse_duration(window)?;
    if !RECORDER_WINDOWS.contains(&window) {
        return Err(format!("the window must be between 3s and 24h (got {window:?}); e.g. 5m@19Hz"));
    }
    let hz = match rate {
        None => default.hz,
        Some(rate) => {
            let number = rate.trim().strip_suffix("Hz").or_else(|| rate.trim().strip_suffix("hz")).unwrap_or(rate);
            env::parse_in_range(1..=1000)(number.trim())
                .map_err(|e| format!("rate {rate:?}: {e}; write it like 19Hz"))?
        }
    };
    Ok(Some(RecorderSpec { window, hz }))
}

/// The flight recorder of a running `Onsite`, if one was asked for and could start.
#[derive(Debug, Default)]
pub(crate) struct Recorder(Option<onsite_cpu::FlightRecorder>);

impl Recorder {
    /// The ring up to now, if the recorder runs.
    pub(crate) fn snapshot(&self) -> Option<onsite_cpu::BeforeSnapshot> {
        self.0.as_ref().map(onsite_cpu::FlightRecorder::snapshot)
    }
}

impl Settings {
    pub(crate) fn apply_env(&mut self, env: &mut env::Reader) {
        env.set(HZ_VAR, &mut self.frequency_hz, env::parse_in_range(1..=1000));
        env.set(FLAMEGRAPH_VAR, &mut self.flamegraph, env::parse_bool);
        env.set(PER_THREAD_TIMERS_VAR, &mut self.per_thread_timers, env::parse_bool);
        env.set(RECORDER_VAR, &mut self.recorder, parse_recorder);
    }

    /// Starts the flight recorder if one is configured; a recorder that cannot start is
    /// logged and the service carries on without it.
    pub(crate) fn start_recorder(&self) -> Recorder {
        let Some(spec) = self.recorder else { return Recorder(None) };
        match onsite_cpu::FlightRecorder::start(spec.window, spec.hz) {
            Ok(recorder) => Recorder(Some(recorder)),
            Err(e) => {
                tracing::error!(
                    var = RECORDER_VAR,
                    error = %e,
                    "onsite: the CPU flight recorder could not start; captures carry on without a cpu-before file"
                );
                Recorder(None)
            }
        }
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

    /// Runs the CPU flight recorder: every thread sampled at `hz` of its CPU time (1–1000;
    /// 19 is the recorder's default) into a ring of the last `window` (3 s to 24 h), in fixed
    /// memory. Every capture then also writes `…-cpu-before-….pprof`: the CPU of the window
    /// before it began. Off by default (`ONSITE_CPU_RECORDER`).
    pub fn cpu_recorder(mut self, window: Duration, hz: u32) -> Self {
        let window = window.clamp(*RECORDER_WINDOWS.start(), *RECORDER_WINDOWS.end());
        self.backends.cpu.recorder = Some(RecorderSpec { window, hz: hz.clamp(1, 1000) });
        self
    }

    /// Whether a CPU capture also writes an SVG flamegraph (default true).
    pub fn cpu_flamegraph(mut self, on: bool) -> Self {
        self.backends.cpu.flamegraph = on;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_settings_as_people_type_them() {
        let spec = |window: u64, hz: u32| Ok(Some(RecorderSpec { window: Duration::from_secs(window), hz }));
        assert_eq!(parse_recorder("off"), Ok(None));
        assert_eq!(parse_recorder("on"), spec(300, 19));
        assert_eq!(parse_recorder("5m@19Hz"), spec(300, 19));
        assert_eq!(parse_recorder("2m@49hz"), spec(120, 49));
        assert_eq!(parse_recorder("90s"), spec(90, 19));
        for wrong in ["5m@0Hz", "5m@fast", "1s", "48h", "often", "5@19Hz"] {
            assert!(parse_recorder(wrong).is_err(), "{wrong} was accepted");
        }
    }
}
