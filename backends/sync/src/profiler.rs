//! The two profilers a capture starts and stops through core's traits.

use std::time::{Duration, Instant, SystemTime};

use onsite_core::pprof::PprofBuilder;
use onsite_core::{CaptureError, CaptureOutput, ProfileKind, Profiler, Stopper};

use crate::record::{self, BLOCK_RECORDER, MUTEX_RECORDER, Recorder};

/// Default of [`MutexProfiler::new`]'s `fraction`: record 1 in 5 contention events (each
/// recorded event costs a stack walk of a few µs on the unlocking thread, after it unlocked).
pub const DEFAULT_MUTEX_FRACTION: u32 = 5;

/// Default of [`BlockProfiler::new`]'s `rate`: waits of 10 µs or more are always recorded,
/// shorter ones with probability `wait / 10 µs` (the stack walk then costs at most about half
/// the time the thread was blocked anyway).
pub const DEFAULT_BLOCK_RATE: Duration = Duration::from_micros(10);

/// The sample types of both profiles, as Go writes them.
const SAMPLE_TYPES: [(&str, &str); 2] = [("contentions", "count"), ("delay", "nanoseconds")];

/// Go's mutex profile for this crate's locks: the time threads waited for a lock, charged to
/// the stack of the thread whose unlock ended the critical section they waited behind.
/// Written as `…-mutex-….pprof`.
#[derive(Debug, Clone, Copy)]
pub struct MutexProfiler {
    fraction: u32,
}

impl MutexProfiler {
    /// Records 1 in `fraction` contention events and scales them by `fraction` (like Go's
    /// `runtime.SetMutexProfileFraction`); 0 counts as 1, every event.
    pub fn new(fraction: u32) -> Self {
        MutexProfiler { fraction: fraction.max(1) }
    }

    /// The sampling fraction.
    pub fn fraction(&self) -> u32 {
        self.fraction
    }
}

impl Default for MutexProfiler {
    fn default() -> Self {
        MutexProfiler::new(DEFAULT_MUTEX_FRACTION)
    }
}

impl Profiler for MutexProfiler {
    fn kind(&self) -> ProfileKind {
        ProfileKind::Mutex
    }

    fn start(&mut self) -> Result<Box<dyn Stopper>, CaptureError> {
        let comment = format!("onsite-sync mutex profile: 1 in {} contention events, scaled", self.fraction);
        CaptureStopper::start(ProfileKind::Mutex, &MUTEX_RECORDER, u64::from(self.fraction), comment)
    }
}

/// Go's block profile for this crate's locks and condition variables: how long each waiting
/// thread was blocked, at its own stack. Written as `…-block-….pprof`.
#[derive(Debug, Clone, Copy)]
pub struct BlockProfiler {
    rate: Duration,
}

impl BlockProfiler {
    /// Records every wait of at least `rate`, and a shorter wait of length `w` with
    /// probability `w / rate`, counted `rate / w` times (Go's `runtime.SetBlockProfileRate`
    /// rule, unbiased). A zero rate records every wait.
    pub fn new(rate: Duration) -> Self {
        BlockProfiler { rate }
    }

    /// The sampling rate.
    pub fn rate(&self) -> Duration {
        self.rate
    }
}

impl Default for BlockProfiler {
    fn default() -> Self {
        BlockProfiler::new(DEFAULT_BLOCK_RATE)
    }
}

impl Profiler for BlockProfiler {
    fn kind(&self) -> ProfileKind {
        ProfileKind::Block
    }

    fn start(&mut self) -> Result<Box<dyn Stopper>, CaptureError> {
        let rate_ns = u64::try_from(self.rate.as_nanos()).unwrap_or(u64::MAX).max(1);
        let comment = format!("onsite-sync block profile: waits under {rate_ns} ns sampled, debiased");
        CaptureStopper::start(ProfileKind::Block, &BLOCK_RECORDER, rate_ns, comment)
    }
}

/// One running capture of either kind. Dropping it without `stop` ends the recording (so a
/// lost stopper never leaves the locks recording), writing nothing.
struct CaptureStopper {
    kind: ProfileKind,
    recorder: &'static Recorder,
    started: SystemTime,
    clock: Instant,
    comment: String,
    stopped: bool,
}

impl CaptureStopper {
    fn start(
        kind: ProfileKind,
        recorder: &'static Recorder,
        setting: u64,
        comment: String,
    ) -> Result<Box<dyn Stopper>, CaptureError> {
        if !recorder.start(setting) {
            return Err(CaptureError::new(kind, "a capture of this kind is already running in this process"));
        }
        Ok(Box::new(CaptureStopper {
            kind,
            recorder,
            started: SystemTime::now(),
            clock: Instant::now(),
            comment,
            stopped: false,
        }))
    }
}

impl Stopper for CaptureStopper {
    fn stop(mut self: Box<Self>, out: &CaptureOutput) -> Result<(), CaptureError> {
        self.stopped = true;
        let records = self.recorder.stop().unwrap_or_default();
        let mut builder = PprofBuilder::new(&SAMPLE_TYPES, ("contentions", "count"), 1)
            .time_range(self.started, self.clock.elapsed())
            .skip_leaf_frames(record::is_own_frame)
            .drop_frames(record::OWN_FRAMES_REGEX);
        builder.comment(&self.comment);
        if records.dropped > 0 {
            builder.comment(&format!("{} events dropped: too many distinct stacks", records.dropped));
        }
        for (stack, totals) in &records.stacks {
            builder.add_addresses(stack, &[totals.count.round() as i64, totals.delay_ns.round() as i64], &[]);
        }
        tracing::debug!(kind = %self.kind, stacks = records.stacks.len(), "onsite-sync: writing profile");
        out.write(self.kind, "pprof", |w| builder.write_gzip(w))?;
        Ok(())
    }
}

impl Drop for CaptureStopper {
    fn drop(&mut self) {
        if !self.stopped {
            self.recorder.stop();
        }
    }
}
