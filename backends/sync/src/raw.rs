//! The raw reader-writer lock: parking_lot's, plus a waiter count and the recording slow paths.
//!
//! Every fast path is parking_lot's own, behind one relaxed load of [`record::active`]; the
//! recording starts only when that says a capture runs and the lock was not free (or, on an
//! unlock, when a registered waiter is queued behind it). (The mutex does better, with no
//! load at all: see `raw_mutex.rs`.)

use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use parking_lot::lock_api::{
    self, RawRwLock as _, RawRwLockTimed as _, RawRwLockUpgrade as _, RawRwLockUpgradeTimed as _,
};

use crate::caller_frame;
use crate::raw_mutex::deadline;
use crate::record::{self, MUTEX, WaiterCount};

/// How many threads registered for the mutex profile are waiting for one lock.
#[derive(Debug)]
struct Waiters(AtomicU32);

impl Waiters {
    const fn new() -> Self {
        Waiters(AtomicU32::new(0))
    }

    fn count(&self) -> WaiterCount<'_> {
        WaiterCount { word: &self.0, unit: 1 }
    }

    /// Runs `acquire` (which may block) as a recorded wait for the lock at `lock`.
    #[cold]
    #[inline(never)]
    fn wait<R>(&self, lock: usize, acquire: impl FnOnce() -> R) -> R {
        let wait = record::begin_wait(lock, Some(self.count()));
        let result = acquire();
        if let Some(wait) = wait {
            record::end_wait(wait, lock, Some(self.count()));
        }
        result
    }

    /// Runs `release` (an unlock), charging the waiters queued behind it first when the
    /// mutex profile is being captured.
    ///
    /// The fast path reads only the lock's own waiter count (on the cache line the unlock
    /// writes anyway); it is non-zero only while a mutex capture has waiters registered.
    #[inline(always)]
    fn release<R>(&self, lock: usize, release: impl FnOnce() -> R) -> R {
        if self.0.load(Relaxed) != 0 {
            let result = self.release_charging(lock, release);
            caller_frame::after_slow_call();
            result
        } else {
            release()
        }
    }

    #[cold]
    #[inline(never)]
    fn release_charging<R>(&self, lock: usize, release: impl FnOnce() -> R) -> R {
        if record::active() & MUTEX == 0 {
            return release();
        }
        let charge = record::charge_waiters(lock);
        let result = release();
        record::record_contention(charge);
        result
    }
}

/// parking_lot's raw reader-writer lock, recording contention while a capture runs.
pub struct RawRwLock {
    inner: parking_lot::RawRwLock,
    waiters: Waiters,
}

impl std::fmt::Debug for RawRwLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRwLock").field("locked", &self.inner.is_locked()).finish_non_exhaustive()
    }
}

type SharedGuard = <parking_lot::RawRwLock as lock_api::RawRwLock>::SharedGuard;
type ExclusiveGuard = <parking_lot::RawRwLock as lock_api::RawRwLock>::ExclusiveGuard;
type UpgradableGuard = <parking_lot::RawRwLock as lock_api::RawRwLockUpgrade>::UpgradableGuard;

impl RawRwLock {
    fn addr(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    /// parking_lot's `fast` when no capture runs; otherwise `try_first`, and `blocking` as a
    /// recorded wait when that fails.
    #[inline(always)]
    fn acquire<G>(
        &self,
        try_first: impl FnOnce() -> Option<G>,
        blocking: impl FnOnce() -> Option<G>,
        fast: impl FnOnce() -> Option<G>,
    ) -> Option<G> {
        if record::active() == 0 {
            return fast();
        }
        try_first().or_else(|| self.waiters.wait(self.addr(), blocking))
    }
}

// SAFETY: every operation is parking_lot's `RawRwLock` operation on `inner`; the recording
// around them never touches the lock state.
unsafe impl lock_api::RawRwLock for RawRwLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawRwLock { inner: parking_lot::RawRwLock::INIT, waiters: Waiters::new() };

    type SharedGuard = SharedGuard;
    type ExclusiveGuard = ExclusiveGuard;

    #[inline]
    fn lock_shared(&self) -> SharedGuard {
        let i = &self.inner;
        self.acquire(|| i.try_lock_shared(), || Some(i.lock_shared()), || Some(i.lock_shared()))
            .expect("an untimed lock returns a guard")
    }

    #[inline]
    fn try_lock_shared(&self) -> Option<SharedGuard> {
        self.inner.try_lock_shared()
    }

    #[inline]
    unsafe fn unlock_shared(&self, guard: SharedGuard) {
        // SAFETY: the caller holds a shared lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.unlock_shared(guard) })
    }

    #[inline]
    fn lock_exclusive(&self) -> ExclusiveGuard {
        let i = &self.inner;
        self.acquire(|| i.try_lock_exclusive(), || Some(i.lock_exclusive()), || Some(i.lock_exclusive()))
            .expect("an untimed lock returns a guard")
    }

    #[inline]
    fn try_lock_exclusive(&self) -> Option<ExclusiveGuard> {
        self.inner.try_lock_exclusive()
    }

    #[inline]
    unsafe fn unlock_exclusive(&self, guard: ExclusiveGuard) {
        // SAFETY: the caller holds the exclusive lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.unlock_exclusive(guard) })
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.inner.is_locked()
    }

    #[inline]
    fn is_locked_exclusive(&self) -> bool {
        self.inner.is_locked_exclusive()
    }
}

// SAFETY: as for `RawRwLock`: parking_lot's fair unlocks and bumps on `inner`.
unsafe impl lock_api::RawRwLockFair for RawRwLock {
    #[inline]
    unsafe fn unlock_shared_fair(&self, guard: SharedGuard) {
        // SAFETY: the caller holds a shared lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.unlock_shared_fair(guard) })
    }

    #[inline]
    unsafe fn unlock_exclusive_fair(&self, guard: ExclusiveGuard) {
        // SAFETY: the caller holds the exclusive lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.unlock_exclusive_fair(guard) })
    }

    #[inline]
    unsafe fn bump_shared(&self, guard: &mut SharedGuard) {
        // SAFETY: the caller holds a shared lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.bump_shared(guard) })
    }

    #[inline]
    unsafe fn bump_exclusive(&self, guard: &mut ExclusiveGuard) {
        // SAFETY: the caller holds the exclusive lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.bump_exclusive(guard) })
    }
}

// SAFETY: as for `RawRwLock`: parking_lot's downgrade on `inner` (it ends the exclusive
// critical section, so queued waiters are charged to it).
unsafe impl lock_api::RawRwLockDowngrade for RawRwLock {
    #[inline]
    unsafe fn downgrade(&self, guard: ExclusiveGuard) -> SharedGuard {
        // SAFETY: the caller holds the exclusive lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.downgrade(guard) })
    }
}

// SAFETY: as for `RawRwLock`: parking_lot's timed acquisitions on `inner`.
unsafe impl lock_api::RawRwLockTimed for RawRwLock {
    type Duration = Duration;
    type Instant = Instant;

    #[inline]
    fn try_lock_shared_for(&self, timeout: Duration) -> Option<SharedGuard> {
        if record::active() == 0 {
            return self.inner.try_lock_shared_for(timeout);
        }
        self.try_lock_shared_until_opt(deadline(timeout))
    }

    #[inline]
    fn try_lock_shared_until(&self, timeout: Instant) -> Option<SharedGuard> {
        self.try_lock_shared_until_opt(Some(timeout))
    }

    #[inline]
    fn try_lock_exclusive_for(&self, timeout: Duration) -> Option<ExclusiveGuard> {
        if record::active() == 0 {
            return self.inner.try_lock_exclusive_for(timeout);
        }
        self.try_lock_exclusive_until_opt(deadline(timeout))
    }

    #[inline]
    fn try_lock_exclusive_until(&self, timeout: Instant) -> Option<ExclusiveGuard> {
        self.try_lock_exclusive_until_opt(Some(timeout))
    }
}

impl RawRwLock {
    fn try_lock_shared_until_opt(&self, deadline: Option<Instant>) -> Option<SharedGuard> {
        let i = &self.inner;
        let blocking = || match deadline {
            Some(d) => i.try_lock_shared_until(d),
            None => Some(i.lock_shared()),
        };
        self.acquire(|| i.try_lock_shared(), blocking, blocking)
    }

    fn try_lock_exclusive_until_opt(&self, deadline: Option<Instant>) -> Option<ExclusiveGuard> {
        let i = &self.inner;
        let blocking = || match deadline {
            Some(d) => i.try_lock_exclusive_until(d),
            None => Some(i.lock_exclusive()),
        };
        self.acquire(|| i.try_lock_exclusive(), blocking, blocking)
    }

    fn try_lock_upgradable_until_opt(&self, deadline: Option<Instant>) -> Option<UpgradableGuard> {
        let i = &self.inner;
        let blocking = || match deadline {
            Some(d) => i.try_lock_upgradable_until(d),
            None => Some(i.lock_upgradable()),
        };
        self.acquire(|| i.try_lock_upgradable(), blocking, blocking)
    }

    /// Upgrades, waiting until `deadline` (forever when `None`) for the readers to leave.
    ///
    /// # Safety
    ///
    /// The caller holds the upgradable lock with `guard`.
    unsafe fn upgrade_until(
        &self,
        guard: UpgradableGuard,
        deadline: Option<Instant>,
    ) -> Result<ExclusiveGuard, UpgradableGuard> {
        let i = &self.inner;
        // The caller holds the upgradable lock with `guard` (this function's contract), and
        // every branch below hands it back on failure.
        let blocking = |guard| match deadline {
            // SAFETY: see above.
            Some(d) => unsafe { i.try_upgrade_until(guard, d) },
            // SAFETY: see above.
            None => Ok(unsafe { i.upgrade(guard) }),
        };
        if record::active() == 0 {
            return blocking(guard);
        }
        // SAFETY: see above.
        match unsafe { i.try_upgrade(guard) } {
            Ok(exclusive) => Ok(exclusive),
            Err(guard) => self.waiters.wait(self.addr(), || blocking(guard)),
        }
    }
}

// SAFETY: as for `RawRwLock`: parking_lot's upgradable locks on `inner`.
unsafe impl lock_api::RawRwLockUpgrade for RawRwLock {
    type UpgradableGuard = UpgradableGuard;

    #[inline]
    fn lock_upgradable(&self) -> UpgradableGuard {
        self.try_lock_upgradable_until_opt(None).expect("an untimed lock returns a guard")
    }

    #[inline]
    fn try_lock_upgradable(&self) -> Option<UpgradableGuard> {
        self.inner.try_lock_upgradable()
    }

    #[inline]
    unsafe fn unlock_upgradable(&self, guard: UpgradableGuard) {
        // SAFETY: the caller holds the upgradable lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.unlock_upgradable(guard) })
    }

    #[inline]
    unsafe fn upgrade(&self, guard: UpgradableGuard) -> ExclusiveGuard {
        // SAFETY: the caller holds the upgradable lock with `guard`; without a deadline the
        // upgrade cannot fail.
        match unsafe { self.upgrade_until(guard, None) } {
            Ok(exclusive) => exclusive,
            Err(_) => unreachable!("an upgrade without a deadline does not time out"),
        }
    }

    #[inline]
    unsafe fn try_upgrade(&self, guard: UpgradableGuard) -> Result<ExclusiveGuard, UpgradableGuard> {
        // SAFETY: the caller holds the upgradable lock with `guard`.
        unsafe { self.inner.try_upgrade(guard) }
    }
}

// SAFETY: as for `RawRwLock`: parking_lot's fair upgradable unlock and bump on `inner`.
unsafe impl lock_api::RawRwLockUpgradeFair for RawRwLock {
    #[inline]
    unsafe fn unlock_upgradable_fair(&self, guard: UpgradableGuard) {
        // SAFETY: the caller holds the upgradable lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.unlock_upgradable_fair(guard) })
    }

    #[inline]
    unsafe fn bump_upgradable(&self, guard: &mut UpgradableGuard) {
        // SAFETY: the caller holds the upgradable lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.bump_upgradable(guard) })
    }
}

// SAFETY: as for `RawRwLock`: parking_lot's downgrades on `inner`.
unsafe impl lock_api::RawRwLockUpgradeDowngrade for RawRwLock {
    #[inline]
    unsafe fn downgrade_upgradable(&self, guard: UpgradableGuard) -> SharedGuard {
        // SAFETY: the caller holds the upgradable lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.downgrade_upgradable(guard) })
    }

    #[inline]
    unsafe fn downgrade_to_upgradable(&self, guard: ExclusiveGuard) -> UpgradableGuard {
        // SAFETY: the caller holds the exclusive lock with `guard`.
        self.waiters.release(self.addr(), || unsafe { self.inner.downgrade_to_upgradable(guard) })
    }
}

// SAFETY: as for `RawRwLock`: parking_lot's timed upgradable locks and upgrades on `inner`.
unsafe impl lock_api::RawRwLockUpgradeTimed for RawRwLock {
    #[inline]
    fn try_lock_upgradable_for(&self, timeout: Duration) -> Option<UpgradableGuard> {
        if record::active() == 0 {
            return self.inner.try_lock_upgradable_for(timeout);
        }
        self.try_lock_upgradable_until_opt(deadline(timeout))
    }

    #[inline]
    fn try_lock_upgradable_until(&self, timeout: Instant) -> Option<UpgradableGuard> {
        self.try_lock_upgradable_until_opt(Some(timeout))
    }

    #[inline]
    unsafe fn try_upgrade_for(
        &self,
        guard: UpgradableGuard,
        timeout: Duration,
    ) -> Result<ExclusiveGuard, UpgradableGuard> {
        if record::active() == 0 {
            // SAFETY: the caller holds the upgradable lock with `guard`.
            return unsafe { self.inner.try_upgrade_for(guard, timeout) };
        }
        // SAFETY: the caller holds the upgradable lock with `guard`.
        unsafe { self.upgrade_until(guard, deadline(timeout)) }
    }

    #[inline]
    unsafe fn try_upgrade_until(
        &self,
        guard: UpgradableGuard,
        timeout: Instant,
    ) -> Result<ExclusiveGuard, UpgradableGuard> {
        // SAFETY: the caller holds the upgradable lock with `guard`.
        unsafe { self.upgrade_until(guard, Some(timeout)) }
    }
}
