//! A service that forks (a pre-fork server, `fork` + `exec`) while a dump or a capture runs: the
//! child has only the forking thread, and whatever onsite's other threads held at the fork
//! (the dump's one-at-a-time flag and slots, creations inside the hook's table, a compaction)
//! stays held there for ever. The child handler lets go of all of it, so the child never waits
//! on a parent's thread and inherits no dump. It runs in the child right after `fork`, where
//! only async-signal-safe work is allowed: atomic stores and `sigaction`.

use std::sync::Once;

/// Registers the child handler once per process (at install, the first dump or the first
/// threadcreate capture, whichever comes first).
pub(crate) fn register_child_handler() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: registers a handler that only does async-signal-safe work (see the module
        // docs); it stays valid for the life of the process (a static function).
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if rc != 0 {
            tracing::warn!(rc, "onsite: pthread_atfork failed: a forked child may inherit a threads dump");
        }
    });
}

extern "C" fn in_child() {
    crate::dump::forget_in_fork_child();
    crate::hook::forget_in_fork_child();
}
