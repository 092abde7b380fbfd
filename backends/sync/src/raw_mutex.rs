//! The raw mutex: parking_lot's algorithm on `parking_lot_core`, with the recording folded into
//! its slow paths.
//!
//! Ported from parking_lot 0.13's `src/raw_mutex.rs` (Amanieu d'Antras, MIT OR Apache-2.0);
//! the algorithm and the reasoning in its comments are parking_lot's. Why a port and not a
//! wrapper: parking_lot's fast paths cannot be told that a capture wants to see a wait or an
//! unlock, so a wrapper pays a load and a branch around each of them. Here the mutex profile's
//! registered waiters live in the lock's own state word, so the fast paths are parking_lot's
//! single atomic operation each (lock: `0 -> LOCKED`; unlock: `LOCKED -> 0`), and whatever a
//! capture needs happens on paths that were slow already (the lock was taken, or someone is
//! queued behind the unlock).
//!
//! Not carried over: parking_lot's optional deadlock detection (its `deadlock_detection`
//! feature) does not see these locks.

use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::{Duration, Instant};

use parking_lot::lock_api::{self, GuardNoSend};
use parking_lot_core::{DEFAULT_PARK_TOKEN, ParkResult, SpinWait, UnparkResult, UnparkToken};

use crate::caller_frame;
use crate::record::{self, MUTEX, WaiterCount};

// UnparkToken used to indicate that the target thread should attempt to
// lock the mutex again as soon as it is unparked.
pub(crate) const TOKEN_NORMAL: UnparkToken = UnparkToken(0);

// UnparkToken used to indicate that the mutex is being handed off to the target
// thread directly without unlocking it.
pub(crate) const TOKEN_HANDOFF: UnparkToken = UnparkToken(1);

/// This bit is set in the `state` of a `RawMutex` when that mutex is locked by some thread.
const LOCKED_BIT: u32 = 0b01;
/// This bit is set in the `state` of a `RawMutex` just before parking a thread. A thread is being
/// parked if it wants to lock the mutex, but it is currently being held by some other thread.
const PARKED_BIT: u32 = 0b10;
/// One thread registered with the running mutex capture as waiting for this lock; the bits
/// above `PARKED_BIT` count them.
const WAITER: u32 = 0b100;
/// The registered-waiter count.
const WAITERS_MASK: u32 = !(LOCKED_BIT | PARKED_BIT);

/// The guard state the lock hands out: not `Send`, as parking_lot's (by default).
type Guard = GuardNoSend;

/// A deadline `timeout` from now, `None` when it cannot be represented (wait forever, as
/// parking_lot does).
pub(crate) fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// parking_lot's raw mutex, recording contention while a capture runs.
pub struct RawMutex {
    /// The two lowest bits are parking_lot's: see `LOCKED_BIT` and `PARKED_BIT`. The bits above
    /// count the waiters registered with a running mutex capture (`WAITER` each); any of them
    /// set makes the unlock fast path fail, so the unlock that ends the critical section they
    /// wait behind charges them.
    ///
    /// # State table (of the two lowest bits):
    ///
    /// PARKED_BIT | LOCKED_BIT | Description
    ///     0      |     0      | The mutex is not locked, nor is anyone waiting for it.
    /// -----------+------------+------------------------------------------------------------------
    ///     0      |     1      | The mutex is locked by exactly one thread. No other thread is
    ///            |            | waiting for it.
    /// -----------+------------+------------------------------------------------------------------
    ///     1      |     0      | The mutex is not locked. One or more threads are parked or about to
    ///            |            | park. At least one of the parked threads is just about to be
    ///            |            | unparked, or a thread heading for parking might abort the park.
    /// -----------+------------+------------------------------------------------------------------
    ///     1      |     1      | The mutex is locked by exactly one thread. One or more threads are
    ///            |            | parked or about to park, waiting for the lock to become available.
    ///            |            | In this state, PARKED_BIT is only ever cleared when a bucket lock
    ///            |            | is held (i.e. in a parking_lot_core callback). This ensures that
    ///            |            | we never end up in a situation where there are parked threads but
    ///            |            | PARKED_BIT is not set (which would result in those threads
    ///            |            | potentially never getting woken up).
    ///
    /// The waiter count changes outside the bucket lock (a waiter registers before it spins or
    /// parks), so every write here that is a plain store in parking_lot is a read-modify-write
    /// that keeps the count.
    state: AtomicU32,
}

impl std::fmt::Debug for RawMutex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawMutex").field("locked", &lock_api::RawMutex::is_locked(self)).finish_non_exhaustive()
    }
}

// SAFETY: parking_lot's mutex algorithm: `LOCKED_BIT` is set by exactly one thread at a time
// (with acquire ordering) and cleared by that thread (with release ordering) or handed to a
// parked thread, and the waiter count bits never change `LOCKED_BIT` or `PARKED_BIT`.
unsafe impl lock_api::RawMutex for RawMutex {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: RawMutex = RawMutex { state: AtomicU32::new(0) };

    type Guard = Guard;

    #[inline]
    fn lock(&self) -> Guard {
        if self.state.compare_exchange_weak(0, LOCKED_BIT, Acquire, Relaxed).is_err() {
            self.lock_contended(None);
        }
        Guard::new()
    }

    #[inline]
    fn try_lock(&self) -> Option<Guard> {
        self.try_acquire().then(Guard::new)
    }

    #[inline]
    unsafe fn unlock(&self, _guard: Guard) {
        if self.state.compare_exchange(LOCKED_BIT, 0, Release, Relaxed).is_err() {
            self.unlock_contended(false);
            caller_frame::after_slow_call();
        }
    }

    #[inline]
    fn is_locked(&self) -> bool {
        let state = self.state.load(Relaxed);
        state & LOCKED_BIT != 0
    }
}

// SAFETY: as for `RawMutex`: parking_lot's fair unlock and bump.
unsafe impl lock_api::RawMutexFair for RawMutex {
    #[inline]
    unsafe fn unlock_fair(&self, _guard: Guard) {
        if self.state.compare_exchange(LOCKED_BIT, 0, Release, Relaxed).is_err() {
            self.unlock_contended(true);
            caller_frame::after_slow_call();
        }
    }

    #[inline]
    unsafe fn bump(&self, _guard: &mut Guard) {
        if self.state.load(Relaxed) & !LOCKED_BIT != 0 {
            self.bump_slow();
        }
    }
}

// SAFETY: as for `RawMutex`: parking_lot's timed acquisitions.
unsafe impl lock_api::RawMutexTimed for RawMutex {
    type Duration = Duration;
    type Instant = Instant;

    #[inline]
    fn try_lock_until(&self, timeout: Instant) -> Option<Guard> {
        let locked = self.state.compare_exchange_weak(0, LOCKED_BIT, Acquire, Relaxed).is_ok()
            || self.lock_contended(Some(timeout));
        locked.then(Guard::new)
    }

    #[inline]
    fn try_lock_for(&self, timeout: Duration) -> Option<Guard> {
        let locked = self.state.compare_exchange_weak(0, LOCKED_BIT, Acquire, Relaxed).is_ok()
            || self.lock_contended(deadline(timeout));
        locked.then(Guard::new)
    }
}

impl RawMutex {
    fn addr(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    fn waiter_count(&self) -> WaiterCount<'_> {
        WaiterCount { word: &self.state, unit: WAITER }
    }

    /// Takes the lock if it is not locked, whoever is queued on it.
    #[inline]
    fn try_acquire(&self) -> bool {
        self.state.try_update(Acquire, Relaxed, |state| (state & LOCKED_BIT == 0).then_some(state | LOCKED_BIT)).is_ok()
    }

    /// The lock fast path failed: wait for the lock (until `timeout`), as a recorded wait when
    /// a capture runs. `false` when the timeout expired.
    #[cold]
    #[inline(never)]
    fn lock_contended(&self, timeout: Option<Instant>) -> bool {
        // A capture only cares about real waits: the fast path also fails on a free lock whose
        // state holds registered waiters or the parked bit.
        if record::active() == 0 {
            return self.lock_slow(timeout);
        }
        if self.try_acquire() {
            return true;
        }
        let wait = record::begin_wait(self.addr(), Some(self.waiter_count()));
        let locked = self.lock_slow(timeout);
        if let Some(wait) = wait {
            record::end_wait(wait, self.addr(), Some(self.waiter_count()));
        }
        locked
    }

    /// Locks without recording the wait (the re-lock of a `Condvar` wait, whose block event
    /// already spans it).
    #[inline]
    pub(crate) fn lock_unrecorded(&self) {
        if self.state.compare_exchange_weak(0, LOCKED_BIT, Acquire, Relaxed).is_err() {
            self.lock_slow(None);
        }
    }

    /// The unlock fast path failed (a thread is parked, or waiters are registered with a mutex
    /// capture): charge the registered waiters to this critical section, release the lock,
    /// then record the charge (the stack walk is not part of the critical section).
    #[cold]
    #[inline(never)]
    fn unlock_contended(&self, fair: bool) {
        let charge = self.charge_waiters();
        if fair {
            self.unlock_fair_slow();
        } else {
            // SAFETY: the caller of `unlock` holds the lock.
            unsafe { self.unlock_inner() };
        }
        record::record_contention(charge);
    }

    /// The waiting time of the waiters registered behind this critical section, when the
    /// mutex profile is being captured.
    pub(crate) fn charge_waiters(&self) -> Option<record::Charge> {
        if self.state.load(Relaxed) & WAITERS_MASK != 0 && record::active() & MUTEX != 0 {
            record::charge_waiters(self.addr())
        } else {
            None
        }
    }

    /// Unlocks the mutex (parking_lot's `unlock_inner`: clear the locked bit, and wake a
    /// parked thread if there is one).
    ///
    /// # Safety
    ///
    /// The caller must own the mutex.
    #[inline]
    pub(crate) unsafe fn unlock_inner(&self) {
        let state = self.state.fetch_sub(LOCKED_BIT, Release);
        if state & PARKED_BIT != 0 {
            self.unlock_slow();
        }
    }

    // Used by Condvar when requeuing threads to us, must be called while
    // holding the queue lock.
    #[inline]
    pub(crate) fn mark_parked_if_locked(&self) -> bool {
        self.state.try_update(Relaxed, Relaxed, |state| (state & LOCKED_BIT != 0).then_some(state | PARKED_BIT)).is_ok()
    }

    // Used by Condvar when requeuing threads to us, must be called while
    // holding the queue lock.
    #[inline]
    pub(crate) fn mark_parked(&self) {
        self.state.fetch_or(PARKED_BIT, Relaxed);
    }

    #[cold]
    fn lock_slow(&self, timeout: Option<Instant>) -> bool {
        let mut spinwait = SpinWait::new();
        let mut state = self.state.load(Relaxed);
        loop {
            // Grab the lock if it isn't locked, even if there is a queue on it
            if state & LOCKED_BIT == 0 {
                match self.state.compare_exchange_weak(state, state | LOCKED_BIT, Acquire, Relaxed) {
                    Ok(_) => return true,
                    Err(x) => state = x,
                }
                continue;
            }

            // If there is no queue, try spinning a few times
            if state & PARKED_BIT == 0 && spinwait.spin() {
                state = self.state.load(Relaxed);
                continue;
            }

            // Set the parked bit
            if state & PARKED_BIT == 0
                && let Err(x) = self.state.compare_exchange_weak(state, state | PARKED_BIT, Relaxed, Relaxed)
            {
                state = x;
                continue;
            }

            // Park our thread until we are woken up by an unlock
            let addr = self.addr();
            let validate = || self.state.load(Relaxed) & (LOCKED_BIT | PARKED_BIT) == LOCKED_BIT | PARKED_BIT;
            let before_sleep = || {};
            let timed_out = |_, was_last_thread| {
                // Clear the parked bit if we were the last parked thread
                if was_last_thread {
                    self.state.fetch_and(!PARKED_BIT, Relaxed);
                }
            };
            // SAFETY:
            //   * `addr` is an address we control.
            //   * `validate`/`timed_out` does not panic or call into any function of `parking_lot`.
            //   * `before_sleep` does not call `park`, nor does it panic.
            match unsafe {
                parking_lot_core::park(addr, validate, before_sleep, timed_out, DEFAULT_PARK_TOKEN, timeout)
            } {
                // The thread that unparked us passed the lock on to us
                // directly without unlocking it.
                ParkResult::Unparked(TOKEN_HANDOFF) => return true,

                // We were unparked normally, try acquiring the lock again
                ParkResult::Unparked(_) => (),

                // The validation function failed, try locking again
                ParkResult::Invalid => (),

                // Timeout expired
                ParkResult::TimedOut => return false,
            }

            // Loop back and try locking again
            spinwait.reset();
            state = self.state.load(Relaxed);
        }
    }

    #[cold]
    fn unlock_slow(&self) {
        let addr = self.addr();
        let callback = |result: UnparkResult| {
            // Ownership has already been released. Preserve LOCKED_BIT since
            // another thread may have acquired the mutex in the meantime.
            if !result.have_more_threads {
                self.state.fetch_and(!PARKED_BIT, Relaxed);
            }
            TOKEN_NORMAL
        };
        // SAFETY:
        //   * `addr` is an address we control.
        //   * `callback` does not panic or call into any function of `parking_lot`.
        unsafe {
            parking_lot_core::unpark_one(addr, callback);
        }
    }

    #[cold]
    fn unlock_fair_slow(&self) {
        // Unpark one thread and leave the parked bit set if there might
        // still be parked threads on this address.
        let addr = self.addr();
        let callback = |result: UnparkResult| {
            // If we are using a fair unlock then we should keep the
            // mutex locked and hand it off to the unparked thread.
            if result.unparked_threads != 0 {
                // Clear the parked bit if there are no more parked
                // threads.
                if !result.have_more_threads {
                    self.state.fetch_and(!PARKED_BIT, Relaxed);
                }
                return TOKEN_HANDOFF;
            }

            // Clear the locked bit, and the parked bit as well if there
            // are no more parked threads (keeping the registered waiters).
            let parked = if result.have_more_threads { PARKED_BIT } else { 0 };
            self.state.update(Release, Relaxed, |state| (state & WAITERS_MASK) | parked);
            TOKEN_NORMAL
        };
        // SAFETY:
        //   * `addr` is an address we control.
        //   * `callback` does not panic or call into any function of `parking_lot`.
        unsafe {
            parking_lot_core::unpark_one(addr, callback);
        }
    }

    /// A bump others are waiting for: charge the registered waiters, and (parking_lot's
    /// `bump_slow`) hand the lock to a parked thread and queue for it again.
    #[cold]
    #[inline(never)]
    fn bump_slow(&self) {
        let charge = self.charge_waiters();
        if self.state.load(Relaxed) & PARKED_BIT != 0 {
            self.unlock_fair_slow();
            record::record_contention(charge);
            lock_api::RawMutex::lock(self);
        } else {
            record::record_contention(charge);
        }
    }
}
