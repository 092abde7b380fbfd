//! onsite's own work, told apart from the service's.
//!
//! A profile is evidence about the service. What onsite itself does while a capture runs — its
//! control thread symbolising and writing files, the trace writer thread encoding events, the
//! trace layer's bookkeeping on a service thread — must not be charged to the service. Two
//! marks say what is onsite's:
//!
//! - **onsite's threads** call [`OwnThread::register`] once, first thing. Everything they do is
//!   onsite's: the memory sampler never samples their allocations, and the CPU profile puts
//!   their samples under one `[onsite]` root (it finds them by `pthread_t`, as pprof-rs names
//!   threads).
//! - **onsite's work on a service thread** runs inside an [`OwnWork`] scope (the trace layer
//!   forwarding a span to tracing-chrome, say): allocations made inside it are not sampled.
//!
//! [`is_own_work`] reads one const-initialised thread-local without a destructor, so it is safe
//! to call from an allocator and from a signal handler: it never allocates, never locks, and
//! works during thread teardown.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// How many of onsite's threads can be registered at once (it runs two or three).
const MAX_OWN_THREADS: usize = 16;

/// The kernel thread ids of onsite's registered threads; 0 = free slot.
static OWN_THREAD_IDS: [AtomicI32; MAX_OWN_THREADS] = [const { AtomicI32::new(0) }; MAX_OWN_THREADS];

/// The `pthread_self()` of the same threads, slot for slot (pprof-rs names a sampled thread so);
/// 0 = free slot.
static OWN_PTHREADS: [AtomicU64; MAX_OWN_THREADS] = [const { AtomicU64::new(0) }; MAX_OWN_THREADS];

/// Bit set in [`DEPTH`] for a registered thread; the low bits count open [`OwnWork`] scopes.
const THREAD_BIT: u32 = 1 << 31;

thread_local! {
    /// This thread's mark: [`THREAD_BIT`] if it is onsite's, plus open [`OwnWork`] scopes.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Whether what this thread does now is onsite's own work: it is one of onsite's threads, or
/// inside an [`OwnWork`] scope. Allocation-free and lock-free (see the module docs).
#[inline]
pub fn is_own_work() -> bool {
    DEPTH.with(|d| d.get() != 0)
}

/// Whether the kernel thread `tid` is one of onsite's registered threads.
pub fn is_own_thread_id(tid: i32) -> bool {
    tid != 0 && OWN_THREAD_IDS.iter().any(|slot| slot.load(Ordering::Relaxed) == tid)
}

/// Whether the thread whose `pthread_self()` is `thread` is one of onsite's registered threads
/// (pprof-rs records samples by that value, not by kernel id).
pub fn is_own_pthread(thread: u64) -> bool {
    thread != 0 && OWN_PTHREADS.iter().any(|slot| slot.load(Ordering::Relaxed) == thread)
}

/// The calling thread's kernel thread id.
pub fn current_thread_id() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// One of onsite's threads, registered for as long as this value lives. Create it on the thread
/// itself; drop it (from any thread) when that thread is done, so that a later thread given the
/// same id by the kernel is the service's again.
#[derive(Debug)]
pub struct OwnThread {
    tid: i32,
    slot: Option<usize>,
}

impl OwnThread {
    /// Marks the calling thread as onsite's, for good (the thread-local mark stays even after
    /// this value is dropped: the thread is onsite's for its whole life).
    pub fn register() -> OwnThread {
        DEPTH.with(|d| d.set(d.get() | THREAD_BIT));
        let tid = current_thread_id();
        let slot = OWN_THREAD_IDS
            .iter()
            .position(|slot| slot.compare_exchange(0, tid, Ordering::Relaxed, Ordering::Relaxed).is_ok());
        if let Some(slot) = slot {
            // SAFETY: pthread_self has no preconditions.
            OWN_PTHREADS[slot].store(unsafe { libc::pthread_self() } as u64, Ordering::Relaxed);
        } else {
            tracing::debug!(tid, "onsite: no slot left to register one of onsite's threads by id");
        }
        OwnThread { tid, slot }
    }

    /// The registered thread's kernel id.
    pub fn thread_id(&self) -> i32 {
        self.tid
    }
}

impl Drop for OwnThread {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            OWN_PTHREADS[slot].store(0, Ordering::Relaxed);
            OWN_THREAD_IDS[slot].store(0, Ordering::Relaxed);
        }
    }
}

/// A scope of onsite's own work on whatever thread runs it (see the module docs). Not `Send`:
/// it must end on the thread that started it.
#[derive(Debug)]
pub struct OwnWork {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl OwnWork {
    /// Starts a scope; it ends when the value is dropped. Scopes nest.
    #[inline]
    pub fn enter() -> OwnWork {
        DEPTH.with(|d| d.set(d.get().wrapping_add(1)));
        OwnWork { _not_send: std::marker::PhantomData }
    }
}

impl Drop for OwnWork {
    #[inline]
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().wrapping_sub(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_end() {
        std::thread::spawn(|| {
            assert!(!is_own_work());
            let outer = OwnWork::enter();
            let inner = OwnWork::enter();
            drop(inner);
            assert!(is_own_work());
            drop(outer);
            assert!(!is_own_work());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_registered_thread_is_found_by_id_until_dropped() {
        let (tid, registration) = std::thread::spawn(|| {
            let registration = OwnThread::register();
            assert!(is_own_work());
            (current_thread_id(), registration)
        })
        .join()
        .unwrap();
        assert!(is_own_thread_id(tid));
        assert!(!is_own_thread_id(current_thread_id()));
        // SAFETY: pthread_self has no preconditions.
        assert!(!is_own_pthread(unsafe { libc::pthread_self() } as u64));
        assert!(OWN_PTHREADS.iter().any(|p| p.load(Ordering::Relaxed) != 0));
        drop(registration);
        assert!(!is_own_thread_id(tid));
    }
}
