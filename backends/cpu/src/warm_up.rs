//! pprof-rs's first-use setup, done ahead of the first capture.
//!
//! The first `ProfilerGuard` of a process takes a few hundred milliseconds before it samples
//! anything: it resolves a backtrace (loading the executable's debug information) and
//! allocates its sample table (~18 MB). A capture is wanted *now*, so a short-lived thread of
//! onsite's does this once when the CPU profiler is created: it builds a guard and drops it at
//! once (no sample is taken; SIGPROF is left ignored, as after every capture). A capture's
//! start waits for it if it is still running, which is never longer than it would have taken.
//! What stays afterwards is what any capture leaves: pprof-rs's table and backtrace's cache.

use std::sync::{Mutex, Once, PoisonError};
use std::thread::JoinHandle;

static RUNNING: Mutex<Option<JoinHandle<()>>> = Mutex::new(None);

/// Starts the warm-up, once per process.
pub(crate) fn begin() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let spawned = std::thread::Builder::new().name("onsite-cpu-warm".into()).spawn(|| {
            let _own = onsite_core::own_work::OwnThread::register();
            // `Running`: the service runs a pprof-rs profiler of its own, which is warm anyway.
            drop(pprof::ProfilerGuardBuilder::default().frequency(1).build());
            // The guard left SIGPROF ignored; a flight recorder started meanwhile needs it back.
            crate::recorder::after_capture();
        });
        match spawned {
            Ok(handle) => *RUNNING.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle),
            Err(e) => tracing::debug!(error = %e, "onsite: no CPU warm-up thread; the first capture starts cold"),
        }
    });
}

/// Waits for the warm-up if it still runs (a capture is about to build its own guard).
pub(crate) fn finish() {
    let handle = RUNNING.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(handle) = handle {
        let _ = handle.join();
    }
}
