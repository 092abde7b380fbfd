//! onsite-cpu: CPU profiles from pprof-rs, written as Go-compatible pprof plus a flamegraph.
//!
//! pprof-rs's SIGPROF handler walks the stack and its report holds the raw stacks. This crate
//! decides what drives it, how it is started and stopped, and turns its raw stacks into files
//! through core's shared pprof builder. Choices, each for a reason:
//!
//! - **Clock**: a CPU-time timer per thread (`thread_timers`), not pprof-rs's process-wide
//!   `setitimer`, which the kernel delivers at most once per scheduler tick for the whole
//!   process. pprof-rs's `setitimer` is the fallback where the timers cannot be made, or when
//!   [`CpuProfiler::per_thread_timers`] turns them off; the log and the profile say which ran.
//! - **Counting**: a SIGPROF handler in front of pprof-rs's (`sample_count`) counts what the
//!   kernel delivered and lets one thread at a time into pprof-rs, carrying an overlapping
//!   thread's sample to its next one instead of letting pprof-rs drop it.
//! - **Start latency**: pprof-rs's first-use setup is done when the profiler is created
//!   (`warm_up`), so a capture samples within a millisecond of its start.
//! - **Unwinder**: pprof-rs's default (`backtrace`, libgcc's DWARF unwinder). Its
//!   `frame-pointer` unwinder never records the interrupted instruction pointer, so a flat
//!   profile would blame every caller instead of the hot function. The stress
//!   test in `signals/tests/` (50 toggles while threads allocate and free) is what keeps this
//!   choice honest.
//! - **Blocklist**: samples that land inside the unwinder itself (libgcc_s), the dynamic loader
//!   and the vDSO are dropped rather than unwound, because unwinding from there is where
//!   deadlocks and crashes were reported. They are counted with the other missing samples.
//! - **Missing samples**: the stopper compares samples recorded with what the process's CPU
//!   time predicts, and writes into the profile's comments (`go tool pprof -comments`) how many
//!   the kernel never delivered and how many were dropped after delivery, and why.
//! - **The sampler's own frames**: every pprof-rs stack starts with its SIGPROF handler and the
//!   unwinder, up to the kernel's signal trampoline. They are cut by address, at the trampoline
//!   (the `sa_restorer` of SIGPROF's disposition), so a stripped binary keeps its real leaf;
//!   names are only the fallback where no trampoline address is known.
//! - **onsite's own threads** (the control thread symbolising and writing, the trace writer)
//!   are sampled like any other, and put under one `[onsite]` root frame, counted in the
//!   comments: never charged to the service's functions.
//! - **SIGPROF after stop**: pprof-rs leaves SIGPROF ignored when it stops, so a late tick cannot
//!   kill the process ("Profiling timer expired"). Nothing here restores SIG_DFL.

mod recorder;
mod sample_count;
mod sampling_clock;
mod thread_timers;
mod warm_up;

use std::time::{Duration, Instant};

use onsite_core::own_work::is_own_pthread;
use onsite_core::pprof::{PprofBuilder, decode, sample_stacks};
use onsite_core::{CaptureError, CaptureOutput, NoopStopper, ProfileKind, Profiler, Stopper};

/// The default sampling rate, per CPU-second of each thread (Go's is 100 Hz). Per-thread
/// timers deliver higher rates too (see BENCHMARKS.md); 99 Hz keeps the cost near 1-2% of a
/// busy thread and stays off the kernel's tick multiples.
pub use recorder::{BeforeSnapshot, FlightRecorder, RecorderError};

/// The flight recorder's constants and state, for configuration and tests.
pub mod flight_recorder {
    pub use crate::recorder::{
        DEFAULT_HZ, DEFAULT_WINDOW, DEPTH, RING_SLOTS, STACKS, forget_after_fork, is_running, memory_bytes,
        timers_armed,
    };
}

pub const DEFAULT_FREQUENCY_HZ: u32 = 99;

/// Shared libraries whose code is never unwound from (matched as substrings of their paths).
const BLOCKLIST: [&str; 4] = ["libgcc_s", "ld-linux", "linux-vdso", "vdso"];

/// Starts CPU captures.
#[derive(Debug, Clone)]
pub struct CpuProfiler {
    frequency_hz: u32,
    flamegraph: bool,
    per_thread_timers: bool,
}

impl CpuProfiler {
    /// A profiler sampling at `frequency_hz`, also writing an SVG flamegraph when `flamegraph`.
    pub fn new(frequency_hz: u32, flamegraph: bool) -> Self {
        warm_up::begin();
        CpuProfiler { frequency_hz, flamegraph, per_thread_timers: true }
    }

    /// Whether captures sample with a CPU-time timer per thread (the default) or with
    /// pprof-rs's process-wide `setitimer`, which delivers at most one sample per scheduler
    /// tick for the whole process (the fallback where per-thread timers cannot be made).
    pub fn per_thread_timers(mut self, on: bool) -> Self {
        self.per_thread_timers = on;
        self
    }
}

impl Default for CpuProfiler {
    fn default() -> Self {
        CpuProfiler::new(DEFAULT_FREQUENCY_HZ, true)
    }
}

impl Profiler for CpuProfiler {
    fn kind(&self) -> ProfileKind {
        ProfileKind::Cpu
    }

    fn start(&mut self) -> Result<Box<dyn Stopper>, CaptureError> {
        let begun_ns = thread_timers::monotonic_ns();
        warm_up::finish();
        let cpu_before = process_cpu_time();
        let guard = match pprof::ProfilerGuardBuilder::default()
            .frequency(self.frequency_hz as i32)
            .blocklist(&BLOCKLIST)
            .build()
        {
            Ok(guard) => guard,
            // pprof-rs has one profiler per process. If the service runs its own (a
            // /debug/pprof endpoint, say), that one is left alone: this capture just has no
            // CPU file, like go-zero's StartProfile handing back a no-op stopper.
            Err(pprof::Error::Running) => {
                tracing::warn!(
                    "onsite: a CPU profiler is already running in this process; this capture has no cpu file"
                );
                return Ok(Box::new(NoopStopper));
            }
            Err(e) => return Err(CaptureError::new(ProfileKind::Cpu, format!("pprof-rs could not start: {e}"))),
        };
        let clock = sampling_clock::SamplingClock::start(self.frequency_hz, self.per_thread_timers, begun_ns);
        Ok(Box::new(CpuStopper {
            clock,
            guard,
            trampoline: signal_trampoline(libc::SIGPROF),
            frequency_hz: self.frequency_hz,
            flamegraph: self.flamegraph,
            cpu_before,
            started: Instant::now(),
        }))
    }
}

struct CpuStopper {
    clock: sampling_clock::SamplingClock,
    guard: pprof::ProfilerGuard<'static>,
    trampoline: Option<usize>,
    frequency_hz: u32,
    flamegraph: bool,
    cpu_before: Duration,
    started: Instant,
}

impl Stopper for CpuStopper {
    fn stop(self: Box<Self>, out: &CaptureOutput) -> Result<(), CaptureError> {
        let err = |m: String| CaptureError::new(ProfileKind::Cpu, m);
        // No timer of the capture may outlive pprof-rs's guard (nor fire into the report).
        let clock = self.clock.stop();
        // Take the raw stacks before dropping the guard: dropping it resets pprof-rs's data.
        let report = self.guard.report().build_unresolved().map_err(|e| err(format!("pprof-rs report: {e}")));
        let wall = self.started.elapsed();
        let cpu_used = process_cpu_time().saturating_sub(self.cpu_before);
        drop(self.guard);
        recorder::after_capture();
        let report = report?;

        let period_ns = 1_000_000_000 / i64::from(self.frequency_hz);
        let mut builder =
            PprofBuilder::new(&[("samples", "count"), ("cpu", "nanoseconds")], ("cpu", "nanoseconds"), period_ns)
                .time_range(out.started_at(), wall)
                .skip_leaf_frames(is_sampler_frame)
                // Encoded before `out.write` (the flamegraph is derived from the same bytes), so
                // the output's deadline is passed on explicitly.
                .symbolize_until(out.symbolize_deadline());
        let mut received: i64 = 0;
        let mut own_samples: i64 = 0;
        for (frames, &count) in &report.data {
            let ips: Vec<usize> = frames.frames.iter().map(|f| f.ip() as usize).collect();
            let count = count as i64;
            received += count;
            let thread = String::from_utf8_lossy(&frames.thread_name[..frames.thread_name_length]);
            let values = [count, count * period_ns];
            let labels = [("thread", thread.as_ref())];
            let ips = match interrupted_frames(&ips, self.trampoline) {
                Ok(ips) => ips,
                Err(reason) => {
                    builder.add_not_walked(reason, &values, &labels);
                    continue;
                }
            };
            if is_own_pthread(frames.thread_id) {
                own_samples += count;
                builder.add_addresses_under("[onsite]", ips, &values, &labels);
            } else {
                builder.add_addresses(ips, &values, &labels);
            }
        }
        if own_samples > 0 {
            builder.comment(&format!(
                "onsite: {own_samples} samples on onsite's own threads, under the root frame [onsite]"
            ));
        }

        let expected = (cpu_used.as_secs_f64() * f64::from(self.frequency_hz)).round() as i64;
        builder.comment(&format!(
            "onsite: {} Hz over {:.1}s; the process used {:.2}s of CPU",
            self.frequency_hz,
            wall.as_secs_f64(),
            cpu_used.as_secs_f64()
        ));
        for line in clock.comments(received, expected) {
            builder.comment(&line);
        }

        let mut first_error = None;
        let mut pprof_bytes = Vec::new();
        let written = builder
            .write_gzip(&mut pprof_bytes)
            .map_err(|e| err(format!("encoding: {e}")))
            .and_then(|()| out.write(ProfileKind::Cpu, "pprof", |w| w.write_all(&pprof_bytes)).map(drop));
        if let Err(e) = written {
            first_error = Some(e);
        }
        if self.flamegraph
            && let Err(e) = write_flamegraph(&pprof_bytes, out)
        {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The frames of the interrupted code in one pprof-rs stack (leaf first): what follows the
/// signal trampoline, or, where its address is unknown, the whole stack (the builder then drops
/// the sampler's frames by name). An error says why nothing is left.
fn interrupted_frames(ips: &[usize], trampoline: Option<usize>) -> Result<&[usize], &'static str> {
    let end = ips.iter().position(|&ip| ip == 0).unwrap_or(ips.len());
    let ips = &ips[..end];
    if ips.is_empty() {
        return Err("the unwinder found no frame");
    }
    let Some(trampoline) = trampoline else { return Ok(ips) };
    // The handler returns into the trampoline, so the trampoline's frame is exactly its address
    // (a few bytes of slack for unwinders that report the call site).
    match ips.iter().position(|&ip| ip.wrapping_sub(trampoline) < 16) {
        Some(at) if at + 1 < ips.len() => Ok(&ips[at + 1..]),
        Some(_) => Err("the unwinder stopped at the signal frame"),
        None => Ok(ips),
    }
}

/// The address of the trampoline the kernel returns to from a handler of `signal` (glibc's
/// `__restore_rt`, its `sa_restorer`), while pprof-rs's handler is installed.
fn signal_trampoline(signal: libc::c_int) -> Option<usize> {
    let mut current = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a query (no new action) that fills the sigaction we own.
    let rc = unsafe { libc::sigaction(signal, std::ptr::null(), current.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: filled by the successful call (and zeroed before it).
    let current = unsafe { current.assume_init() };
    let restorer = current.sa_restorer.map_or(0, |f| f as usize);
    (restorer != 0).then_some(restorer)
}

/// Frames of the sampler itself, at the leaf end of a pprof-rs stack whose trampoline was not
/// found by address: its SIGPROF handler, the stack walker, and the kernel's signal trampoline.
fn is_sampler_frame(function: &str) -> bool {
    function.starts_with("pprof::")
        || function.starts_with("<pprof::")
        || function == "perf_signal_handler"
        || function.starts_with("backtrace::")
        || function.starts_with("<backtrace::")
        || function.starts_with("_Unwind_")
        || function == "__restore_rt"
        || function == "__kernel_rt_sigreturn"
}

/// An SVG flamegraph of the same samples, from the profile just encoded (one source of truth).
fn write_flamegraph(pprof_bytes: &[u8], out: &CaptureOutput) -> Result<(), CaptureError> {
    let err = |m: String| CaptureError::new(ProfileKind::Cpu, format!("flamegraph: {m}"));
    let profile = decode(pprof_bytes).map_err(|e| err(e.to_string()))?;
    let lines = folded_stacks(&profile);
    if lines.is_empty() {
        tracing::info!("onsite: no CPU samples, so no flamegraph was written");
        return Ok(());
    }
    let mut svg = Vec::new();
    let mut options = inferno::flamegraph::Options::default();
    options.title = format!("CPU {} ({} samples)", out.stamp(), profile.sample.iter().map(|s| s.value[0]).sum::<i64>());
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut svg)
        .map_err(|e| err(e.to_string()))?;
    out.write(ProfileKind::Cpu, "svg", |w| w.write_all(&svg)).map(drop)
}

/// `root;caller;leaf count` lines, one per sample, for inferno.
fn folded_stacks(profile: &onsite_core::pprof::proto::Profile) -> Vec<String> {
    sample_stacks(profile)
        .into_iter()
        .filter(|(_, sample)| sample.value[0] > 0)
        .map(|(stack, sample)| {
            // Stacks are leaf first; a flamegraph line is root first.
            let line: Vec<_> = stack.into_iter().rev().collect();
            format!("{} {}", line.join(";").replace(' ', "\u{a0}"), sample.value[0])
        })
        .collect()
}

/// CPU time (user + system) used by the whole process so far.
fn process_cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a complete rusage into the buffer we own.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return Duration::ZERO;
    }
    // SAFETY: initialised by the successful call above (and zeroed before it).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_cpu_capture_is_a_noop_that_leaves_the_first_running() {
        let dir = tempfile::tempdir().unwrap();
        let out = |stamp| CaptureOutput::new(onsite_core::DumpDir::new(dir.path()), stamp);
        let mut first = CpuProfiler::new(DEFAULT_FREQUENCY_HZ, false);
        let mut second = CpuProfiler::new(DEFAULT_FREQUENCY_HZ, false);
        let running = first.start().unwrap();
        let noop = second.start().unwrap();
        let noop_output = out(onsite_core::CaptureStamp::now());
        noop.stop(&noop_output).unwrap();
        assert!(noop_output.written().is_empty(), "the no-op stopper writes nothing");
        let output = out(onsite_core::CaptureStamp::now());
        running.stop(&output).unwrap();
        assert_eq!(output.written().len(), 1, "the first capture still writes its profile");
    }
}
