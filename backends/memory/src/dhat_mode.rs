//! The exact mode: every allocation through `dhat::Alloc` while the capture runs.
//!
//! The transitions, and why they are safe with dhat 0.3.3 (which must see the free of every
//! block it recorded before that address comes back to it, or an assert inside it fails):
//!
//! - **Start** (mode `PROBE` → `DHAT`): dhat's profiler is built first, then the mode flips.
//!   A thread that read `OFF` and is still inside `System::alloc` returns a block dhat never
//!   saw; when it is freed through dhat, dhat ignores it, and a realloc of it is recorded as a
//!   new allocation (it is one, of the new size). Blocks from before the capture are the same.
//! - **Stop** (`DHAT` → `DRAINING` → `OFF`): first every thread is sent to `System`, then the
//!   stop waits until no call is inside `dhat::Alloc` (see `routed::enter_dhat`), and only
//!   then lets dhat finish. While dhat finishes it holds its global lock, symbolises and
//!   `eprintln!`s its summary; since no other thread can be waiting on that lock, a thread that
//!   holds the stderr lock and allocates simply goes on in `System` (the dhat#33 deadlock
//!   cannot form). A block dhat recorded and a thread frees during `DRAINING` goes to
//!   `System`: dhat's record of it is stale but never consulted again (no thread enters dhat
//!   before it is reset), so the address can be reused safely. The capture's end is the switch
//!   to `DRAINING`: such a block was live at the end, and is reported so.
//! - **After**: blocks allocated under dhat are freed through `System`, where they came from.
//!   The next capture builds a fresh dhat profiler that has never seen them.

use std::time::{Instant, SystemTime};

use onsite_core::{CaptureError, CaptureOutput, ProfileKind, Stopper};

use crate::registry::mode_word;
use crate::{heap_pprof, in_flight, mode};

/// Frames dhat keeps per stack. dhat's default (10) often ends inside `Vec`'s growth code in a
/// debug build, before the service's own function.
const MAX_FRAMES: usize = 32;

/// A running dhat capture.
#[derive(Debug)]
pub(crate) struct DhatStopper {
    profiler: Option<dhat::Profiler>,
    started: SystemTime,
    clock: Instant,
    fork: crate::ForkGuard,
}

/// Starts a dhat capture; the caller has claimed the mode (it is `PROBE`).
pub(crate) fn start() -> DhatStopper {
    debug_assert!(in_flight::none());
    // Before dhat's session and the mode: a block dhat records is allocated after a thread saw
    // the mode (and took dhat's lock, which the session's start took after this), so its free
    // sees the filter marked.
    crate::sampled::mark_every_class();
    let profiler = dhat::Profiler::builder().trim_backtraces(Some(MAX_FRAMES)).build();
    let stopper = DhatStopper {
        profiler: Some(profiler),
        started: SystemTime::now(),
        clock: Instant::now(),
        fork: crate::ForkGuard::new(),
    };
    mode_word().store(mode::DHAT, std::sync::atomic::Ordering::SeqCst);
    stopper
}

impl DhatStopper {
    /// Ends the capture and returns dhat's JSON report; the mode is `OFF` afterwards.
    fn finish(&mut self) -> String {
        use std::sync::atomic::Ordering;
        mode_word().store(mode::DRAINING, Ordering::SeqCst);
        in_flight::wait_until_none();
        let report = match self.profiler.take() {
            Some(mut profiler) => {
                let report = profiler.drop_and_get_memory_output();
                // `drop_and_get_memory_output` has already ended the session; dropping the
                // handle would end it a second time, which dhat treats as unreachable.
                std::mem::forget(profiler);
                report
            }
            None => String::new(),
        };
        mode_word().store(mode::OFF, Ordering::SeqCst);
        report
    }
}

impl Drop for DhatStopper {
    /// A capture abandoned without `stop` still gives the allocator back.
    fn drop(&mut self) {
        if self.fork.in_forked_child() {
            // The parent's session: ending it here would take dhat's lock, which a parent's
            // thread may have held at the fork.
            std::mem::forget(self.profiler.take());
        } else if self.profiler.is_some() {
            drop(self.finish());
        }
    }
}

impl Stopper for DhatStopper {
    fn stop(mut self: Box<Self>, out: &CaptureOutput) -> Result<(), CaptureError> {
        if self.fork.in_forked_child() {
            return Err(crate::sampled::forked_child_error());
        }
        let report = self.finish();
        let duration = self.clock.elapsed();
        let kind = ProfileKind::Memory;
        let json: serde_json::Value = serde_json::from_str(&report)
            .map_err(|e| CaptureError::new(kind, format!("dhat's report is not JSON: {e}")))?;
        let dhat_written = out.write(kind, "dhat.json", |w| w.write_all(report.as_bytes()));
        drop(report);

        let mut builder = heap_pprof::builder(self.started, duration, 1);
        builder.comment("onsite memory capture, mode dhat: every allocation recorded");
        heap_pprof::add_dhat_report(&json, &mut builder)
            .map_err(|e| CaptureError::new(kind, format!("dhat's report has an unexpected shape: {e}")))?;
        drop(json);
        out.write(kind, "pprof", |w| builder.write_gzip(w))?;
        dhat_written.map(|_| ())
    }
}
