//! Always-on sampling: the sampled mode, running from the moment it is started until its
//! [`Sampler`] is dropped, so that a capture's heap profile says what holds the memory *now*,
//! however long ago it was allocated (Go's heap profile).
//!
//! - **Running**: the mode word is one sampled generation for the sampler's whole life, so
//!   per-thread budgets carry on across captures and nothing is reset at a capture's start;
//!   the tables, the walker and the sampling paths are exactly the sampled capture's.
//! - **A capture** ([`WindowStopper`]) changes no mode: it snapshots the per-stack counters at
//!   its start and refreshes the stack walker (code loaded since the last build is walked by the
//!   caching walker again); its stop reads the tables while sampling goes on (`read_live`
//!   reads each slot between two reads of its address). `inuse_*`: every sampled block live at
//!   the stop, whatever its age; `alloc_*`: what was sampled between the start and the stop.
//! - **Frees are never missed**: a sampled block freed while no sampling path looked would stay
//!   in the live table for good, and be reported in use for ever. So nothing may move the mode
//!   away from the sampled generation while the sampler lives: a dhat capture refuses to start
//!   (`registry::claim_and_probe` finds the mode taken), and only the sampler's drop ends it.
//! - **Bounded**: the tables are fixed statics (`sampled::table_limits`); when the stack table
//!   is full, a new stack's samples are still counted and tracked under one named pseudo-frame,
//!   and a sample the live table cannot hold is counted under another (alloc only).
//! - **fork**: the child handler moves the mode to `FORKED` as for a capture: the child's
//!   allocations all go to the inner allocator, and its copy of the sampler does nothing when dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use onsite_core::{CaptureError, CaptureOutput, ProfileKind, Stopper};

use crate::{ForkGuard, sampled, stack_walk};

/// Always-on sampling, running while this lives (see the module docs).
#[derive(Debug)]
pub(crate) struct Sampler {
    mean_bytes: u64,
    /// The inner allocator the probe found when sampling started.
    inner: &'static crate::Inner,
    since: Instant,
    /// Whether a capture ([`WindowStopper`]) is running: one at a time.
    capturing: AtomicBool,
    fork: ForkGuard,
}

/// Whether a [`Sampler`] lives in this process.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Whether always-on sampling runs in this process.
pub(crate) fn running() -> bool {
    RUNNING.load(Ordering::SeqCst)
}

/// Starts always-on sampling over the global allocator's `inner` allocator; the caller has
/// claimed the mode (it is `PROBE`), and the probe found `inner`.
pub(crate) fn start(mean_bytes: u64, inner: &'static crate::Inner) -> Sampler {
    RUNNING.store(true, Ordering::SeqCst);
    let since = Instant::now();
    let mean_bytes = sampled::begin(mean_bytes);
    tracing::info!(
        mean_bytes,
        allocator = inner.name(),
        table_bytes = sampled::table_bytes(),
        "onsite: always-on heap sampling started: one sample per {mean_bytes} bytes allocated on average; \
         its tables are fixed ({})",
        sampled::table_limits()
    );
    Sampler { mean_bytes, inner, since, capturing: AtomicBool::new(false), fork: ForkGuard::new() }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        if !self.fork.in_forked_child() {
            sampled::end();
            sampled::release();
            RUNNING.store(false, Ordering::SeqCst);
            tracing::info!("onsite: always-on heap sampling stopped");
        }
    }
}

/// Starts a capture of the heap that `sampler` samples.
pub(crate) fn start_capture(sampler: &Arc<Sampler>) -> Result<WindowStopper, CaptureError> {
    if sampler.fork.in_forked_child() {
        return Err(sampled::forked_child_error());
    }
    if sampler.capturing.swap(true, Ordering::AcqRel) {
        return Err(CaptureError::new(ProfileKind::Memory, "a memory capture is already running"));
    }
    let started = SystemTime::now();
    let clock = Instant::now();
    stack_walk::refresh();
    Ok(WindowStopper { sampler: Arc::clone(sampler), baseline: sampled::Baseline::now(), started, clock })
}

/// A capture taken while always-on sampling runs.
#[derive(Debug)]
pub(crate) struct WindowStopper {
    /// Keeps sampling running until this capture is written.
    sampler: Arc<Sampler>,
    baseline: sampled::Baseline,
    started: SystemTime,
    clock: Instant,
}

impl Drop for WindowStopper {
    fn drop(&mut self) {
        self.sampler.capturing.store(false, Ordering::Release);
    }
}

impl Stopper for WindowStopper {
    fn stop(self: Box<Self>, out: &CaptureOutput) -> Result<(), CaptureError> {
        if self.sampler.fork.in_forked_child() {
            return Err(sampled::forked_child_error());
        }
        let window = sampled::Window {
            mean_bytes: self.sampler.mean_bytes,
            inner: self.sampler.inner,
            started: self.started,
            duration: self.clock.elapsed(),
            baseline: &self.baseline,
            always_on_for: Some(self.sampler.since.elapsed()),
        };
        sampled::write_profile(out, &window)
    }
}
