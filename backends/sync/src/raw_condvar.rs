//! The raw condition variable: parking_lot's, for onsite's [`RawMutex`], with its waits
//! recorded (block profile) while a capture runs.
//!
//! Ported from parking_lot 0.13's `src/raw_condvar.rs` (Amanieu d'Antras, MIT OR Apache-2.0);
//! the algorithm and the reasoning in its comments are parking_lot's. It cannot be wrapped:
//! parking_lot's condvar works only with parking_lot's own raw mutex, whose state it reads and
//! marks while requeuing waiters onto it.

use std::ptr;
use std::sync::atomic::AtomicPtr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use parking_lot::lock_api::{self, GuardNoSend};
use parking_lot_core::{DEFAULT_PARK_TOKEN, ParkResult, RequeueOp, UnparkResult};

use crate::caller_frame;
use crate::raw_mutex::{RawMutex, TOKEN_HANDOFF, TOKEN_NORMAL, deadline};
use crate::record;

/// A raw condition variable.
///
/// Waits never return spuriously. [`notify_one`](lock_api::RawCondvar::notify_one)
/// returns exactly whether a waiting thread was selected for notification, and
/// [`notify_all`](lock_api::RawCondvar::notify_all) returns the exact number of
/// waiting threads selected. A thread requeued directly onto the associated
/// mutex is considered notified.
pub struct RawCondvar {
    state: AtomicPtr<RawMutex>,
}

impl std::fmt::Debug for RawCondvar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawCondvar").finish_non_exhaustive()
    }
}

// SAFETY: Waiting atomically releases and re-acquires the mutex, does not wake
// spuriously, and safely panics if used with distinct mutexes simultaneously.
unsafe impl lock_api::RawCondvar for RawCondvar {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawCondvar { state: AtomicPtr::new(ptr::null_mut()) };

    type RawMutex = RawMutex;

    unsafe fn wait(&self, mutex: &RawMutex, _guard: &mut GuardNoSend) {
        self.wait_recorded(mutex, None);
    }

    #[inline]
    fn notify_one(&self) -> bool {
        // Nothing to do if there are no waiting threads
        let state = self.state.load(Relaxed);
        if state.is_null() {
            return false;
        }

        let woken = self.notify_one_slow(state);
        caller_frame::after_slow_call();
        woken
    }

    #[inline]
    fn notify_all(&self) -> usize {
        // Nothing to do if there are no waiting threads
        let state = self.state.load(Relaxed);
        if state.is_null() {
            return 0;
        }

        let woken = self.notify_all_slow(state);
        caller_frame::after_slow_call();
        woken
    }
}

// SAFETY: The timed waits uphold the same requirements as the untimed wait and
// accurately distinguish notification from timeout.
unsafe impl lock_api::RawCondvarTimed for RawCondvar {
    fn checked_duration_to_instant(timeout: &Duration) -> Option<Instant> {
        deadline(*timeout)
    }

    unsafe fn wait_for(&self, mutex: &RawMutex, _guard: &mut GuardNoSend, timeout: &Duration) -> bool {
        self.wait_recorded(mutex, deadline(*timeout))
    }

    unsafe fn wait_until(&self, mutex: &RawMutex, _guard: &mut GuardNoSend, timeout: &Instant) -> bool {
        self.wait_recorded(mutex, Some(*timeout))
    }
}

impl RawCondvar {
    fn addr(&self) -> usize {
        ptr::from_ref(self).addr()
    }

    /// parking_lot's wait, recorded when a capture runs. `true` when it timed out.
    fn wait_recorded(&self, mutex: &RawMutex, timeout: Option<Instant>) -> bool {
        if record::active() == 0 {
            return self.wait_until_internal(mutex, timeout);
        }
        // Waiting on a condvar ends the critical section: whoever queued behind it has waited
        // for this thread.
        record::record_contention(mutex.charge_waiters());
        let noted = record::begin_wait(self.addr(), None);
        let timed_out = self.wait_until_internal(mutex, timeout);
        if let Some(noted) = noted {
            record::end_wait(noted, self.addr(), None);
        }
        timed_out
    }

    #[cold]
    fn notify_one_slow(&self, mutex: *mut RawMutex) -> bool {
        // Unpark one thread or requeue it onto the mutex
        let from = self.addr();
        let to = mutex.addr();
        let validate = || {
            // Make sure that our atomic state still points to the same
            // mutex. If not then it means that all threads on the current
            // mutex were woken up and a new waiting thread switched to a
            // different mutex. In that case we can get away with doing
            // nothing.
            if self.state.load(Relaxed) != mutex {
                return RequeueOp::Abort;
            }

            // Unpark one thread if the mutex is unlocked, otherwise
            // requeue it onto the mutex. This is safe to do here
            // since unlocking the mutex when the parked bit is set requires
            // locking the queue. There is the possibility of a race if the
            // mutex gets locked after we check, but that doesn't matter in
            // this case.
            // SAFETY: `state` points to the mutex a thread is waiting with (it set it while
            // queued on our address, and it is cleared before the last waiter leaves), which
            // outlives that wait.
            if unsafe { (*mutex).mark_parked_if_locked() } { RequeueOp::RequeueOne } else { RequeueOp::UnparkOne }
        };
        let callback = |_op, result: UnparkResult| {
            // Clear our state if there are no more waiting threads
            if !result.have_more_threads {
                self.state.store(ptr::null_mut(), Relaxed);
            }
            TOKEN_NORMAL
        };
        // SAFETY: both addresses are ours (this condvar's and its mutex's), and the callbacks
        // neither panic nor call into parking_lot.
        let res = unsafe { parking_lot_core::unpark_requeue(from, to, validate, callback) };

        res.unparked_threads + res.requeued_threads != 0
    }

    #[cold]
    fn notify_all_slow(&self, mutex: *mut RawMutex) -> usize {
        // Unpark one thread and requeue the rest onto the mutex
        let from = self.addr();
        let to = mutex.addr();
        let validate = || {
            // Make sure that our atomic state still points to the same
            // mutex. If not then it means that all threads on the current
            // mutex were woken up and a new waiting thread switched to a
            // different mutex. In that case we can get away with doing
            // nothing.
            if self.state.load(Relaxed) != mutex {
                return RequeueOp::Abort;
            }

            // Clear our state since we are going to unpark or requeue all
            // threads.
            self.state.store(ptr::null_mut(), Relaxed);

            // Unpark one thread if the mutex is unlocked, otherwise just
            // requeue everything to the mutex. This is safe to do here
            // since unlocking the mutex when the parked bit is set requires
            // locking the queue. There is the possibility of a race if the
            // mutex gets locked after we check, but that doesn't matter in
            // this case.
            // SAFETY: as in `notify_one_slow`.
            if unsafe { (*mutex).mark_parked_if_locked() } {
                RequeueOp::RequeueAll
            } else {
                RequeueOp::UnparkOneRequeueRest
            }
        };
        let callback = |op, result: UnparkResult| {
            // If we requeued threads to the mutex, mark it as having
            // parked threads. The RequeueAll case is already handled above.
            if op == RequeueOp::UnparkOneRequeueRest && result.requeued_threads != 0 {
                // SAFETY: as in `notify_one_slow`.
                unsafe { (*mutex).mark_parked() };
            }
            TOKEN_NORMAL
        };
        // SAFETY: as in `notify_one_slow`.
        let res = unsafe { parking_lot_core::unpark_requeue(from, to, validate, callback) };

        res.unparked_threads + res.requeued_threads
    }

    // This is a non-generic function to reduce the monomorphization cost of
    // using `wait_until`.
    fn wait_until_internal(&self, mutex: &RawMutex, timeout: Option<Instant>) -> bool {
        let result;
        let mut requeued = false;

        {
            let addr = self.addr();
            let lock_addr = ptr::from_ref(mutex).cast_mut();
            let validate = || {
                // Ensure we don't use two different mutexes with the same
                // Condvar at the same time. This is done while locked to
                // avoid races with notify_one
                let state = self.state.load(Relaxed);
                if state.is_null() {
                    self.state.store(lock_addr, Relaxed);
                } else if state != lock_addr {
                    return false;
                }
                true
            };
            let before_sleep = || {
                // Unlock the mutex before sleeping...
                // SAFETY: the caller of `wait` holds the mutex.
                unsafe { mutex.unlock_inner() };
            };
            let timed_out = |k, was_last_thread| {
                // If we were requeued to a mutex, then we did not time out.
                // We'll just park ourselves on the mutex again when we try
                // to lock it later.
                requeued = k != addr;

                // If we were the last thread on the queue then we need to
                // clear our state. This is normally done by the
                // notify_{one,all} functions when not timing out.
                if !requeued && was_last_thread {
                    self.state.store(ptr::null_mut(), Relaxed);
                }
            };
            // SAFETY: `addr` is ours; `validate`/`timed_out` neither panic nor call into
            // parking_lot; `before_sleep` only unlocks (which may unpark, never park).
            result =
                unsafe { parking_lot_core::park(addr, validate, before_sleep, timed_out, DEFAULT_PARK_TOKEN, timeout) };
        }

        // Panic if we tried to use multiple mutexes with a Condvar. Note
        // that at this point the MutexGuard is still locked. It will be
        // unlocked by the unwinding logic.
        if result == ParkResult::Invalid {
            panic!("attempted to use a condition variable with more than one mutex");
        }

        // ... and re-lock it once we are done sleeping
        if result != ParkResult::Unparked(TOKEN_HANDOFF) {
            mutex.lock_unrecorded();
        }

        !(result.is_unparked() || requeued)
    }
}
