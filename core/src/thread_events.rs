//! Thread start and exit, as seen from inside the new thread: one listener slot per event.
//!
//! The `pthread_create` interposer (onsite-threads) runs [`run_thread`] as the first and last
//! thing of every thread it starts; a backend that must act on each thread *from its first
//! instruction of service code* (the CPU backend arms the thread's own CPU timer there) sets
//! the listeners once with [`set_listeners`]. Neither crate knows the other.
//!
//! Both calls run on a service thread, inside thread creation and teardown, so they take no
//! lock, allocate nothing and wait for nothing: a slot is one atomic function pointer, read
//! with one load. A listener must keep the same promise (it runs on every thread the service
//! starts, possibly while another thread holds any lock the service or libc has).

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

static ON_START: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());
static ON_EXIT: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());
/// Threads started through [`run_thread`] since the process started (only grows).
static STARTS: AtomicU64 = AtomicU64::new(0);

/// Sets the functions called on every thread started through [`run_thread`]: `on_start` on the
/// new thread before its start routine, `on_exit` on it after the routine returned or while it
/// unwinds (`pthread_exit`, cancellation). They replace any set before; set them once and keep
/// them (a listener that is switched off checks its own flag), so no thread ever calls a
/// listener that is being replaced.
pub fn set_listeners(on_start: fn(), on_exit: fn()) {
    ON_START.store(on_start as *mut (), Ordering::Release);
    ON_EXIT.store(on_exit as *mut (), Ordering::Release);
}

/// Runs a new thread's `body` between the start and exit listeners. Called by the
/// `pthread_create` interposer's trampoline, on the new thread.
#[inline]
pub fn run_thread<R>(body: impl FnOnce() -> R) -> R {
    STARTS.fetch_add(1, Ordering::Relaxed);
    call(&ON_START);
    // Runs on return and during a forced unwind (`pthread_exit`) through the caller's frame.
    struct Exit;
    impl Drop for Exit {
        fn drop(&mut self) {
            call(&ON_EXIT);
        }
    }
    let _exit = Exit;
    body()
}

/// Threads started through [`run_thread`] so far: more than zero once the interposer is in the
/// process's `pthread_create` path (it sees onsite's own control thread being created).
pub fn threads_started() -> u64 {
    STARTS.load(Ordering::Relaxed)
}

fn call(slot: &AtomicPtr<()>) {
    let f = slot.load(Ordering::Acquire);
    if !f.is_null() {
        // SAFETY: only `set_listeners` stores into the slots, and only `fn()` pointers.
        let f = unsafe { std::mem::transmute::<*mut (), fn()>(f) };
        f();
    }
}
