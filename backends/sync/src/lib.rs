//! onsite-sync: drop-in replacements for parking_lot's `Mutex`, `RwLock` and `Condvar` that
//! record Go's **mutex** and **block** profiles while an onsite capture runs.
//!
//! Switch a service by changing one line:
//!
//! ```
//! // use parking_lot::{Condvar, Mutex, RwLock};
//! use onsite_sync::{Condvar, Mutex, RwLock};
//!
//! static QUEUE: Mutex<Vec<u64>> = Mutex::new(Vec::new());
//! QUEUE.lock().push(1);
//! let cache = RwLock::new(0);
//! *cache.write() += 1;
//! let ready = Condvar::new();
//! ready.notify_all();
//! ```
//!
//! The types are `lock_api` types over parking_lot's raw locks ([`RawRwLock`] wraps
//! parking_lot's; [`RawMutex`] and [`RawCondvar`] are parking_lot's algorithm ported onto
//! `parking_lot_core`), so every method, guard and mapped guard parking_lot has is here with
//! the same behaviour: no poisoning, `try_lock_for`, upgradable reads, fair unlocks.
//!
//! While no capture runs, a `Mutex` lock or unlock is one atomic operation, as parking_lot's;
//! an `RwLock` one costs parking_lot's plus one relaxed load. During a capture
//! ([`MutexProfiler`], [`BlockProfiler`]) only contended operations do more: they time the
//! wait, and (sampled) walk the stack as raw addresses, which are symbolised when the profile
//! is written.

mod caller_frame;
mod profiler;
mod raw;
mod raw_condvar;
mod raw_mutex;
mod record;

pub use parking_lot::lock_api;
pub use profiler::{BlockProfiler, DEFAULT_BLOCK_RATE, DEFAULT_MUTEX_FRACTION, MutexProfiler};
pub use raw::RawRwLock;
pub use raw_condvar::RawCondvar;
pub use raw_mutex::RawMutex;

/// A mutual exclusion lock (parking_lot's, recorded while a capture runs).
pub type Mutex<T> = lock_api::Mutex<RawMutex, T>;
/// The guard of a locked [`Mutex`].
pub type MutexGuard<'a, T> = lock_api::MutexGuard<'a, RawMutex, T>;
/// A [`MutexGuard`] mapped to a part of the protected data.
pub type MappedMutexGuard<'a, T> = lock_api::MappedMutexGuard<'a, RawMutex, T>;

/// A reader-writer lock (parking_lot's, recorded while a capture runs).
pub type RwLock<T> = lock_api::RwLock<RawRwLock, T>;
/// The guard of a read-locked [`RwLock`].
pub type RwLockReadGuard<'a, T> = lock_api::RwLockReadGuard<'a, RawRwLock, T>;
/// The guard of a write-locked [`RwLock`].
pub type RwLockWriteGuard<'a, T> = lock_api::RwLockWriteGuard<'a, RawRwLock, T>;
/// The guard of an upgradable read lock on a [`RwLock`].
pub type RwLockUpgradableReadGuard<'a, T> = lock_api::RwLockUpgradableReadGuard<'a, RawRwLock, T>;
/// A [`RwLockReadGuard`] mapped to a part of the protected data.
pub type MappedRwLockReadGuard<'a, T> = lock_api::MappedRwLockReadGuard<'a, RawRwLock, T>;
/// A [`RwLockWriteGuard`] mapped to a part of the protected data.
pub type MappedRwLockWriteGuard<'a, T> = lock_api::MappedRwLockWriteGuard<'a, RawRwLock, T>;

/// A condition variable for [`Mutex`] (parking_lot's; its waits are in the block profile).
pub type Condvar = lock_api::Condvar<RawCondvar>;
/// Whether a timed [`Condvar`] wait timed out.
pub use lock_api::WaitTimeoutResult;
