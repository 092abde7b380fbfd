//! What the locks record while a capture runs, and how little they do while none does.
//!
//! The mutex's fast paths read nothing here; the `RwLock` fast paths read one global byte,
//! [`active`], as do the mutex's slow paths. Everything else here runs only on a slow path (a thread about to wait, or an unlock that others are waiting for) of a lock
//! whose profile is being captured.
//!
//! Mutex profile bookkeeping: a thread that waits registers itself in [`WAITERS`] under the
//! lock's address and bumps the lock's own waiter count. An unlock that sees that count non
//! zero charges every registered waiter of that lock the time it waited since it was last
//! charged (or since it began waiting), to the unlocking thread's stack; so each waited
//! nanosecond is charged once, to the critical section it was spent behind.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64};
use std::time::Instant;

/// Bit of [`ACTIVE`]: a mutex profile is being captured.
pub(crate) const MUTEX: u8 = 1;
/// Bit of [`ACTIVE`]: a block profile is being captured.
pub(crate) const BLOCK: u8 = 2;

/// Which profiles are being captured: the only thing the `RwLock` fast paths read (the mutex
/// reads it only on its slow paths). On a cache line of its own, so no often-written
/// neighbour (another crate's counter, say) makes every lock operation miss the cache.
static ACTIVE: CacheLine = CacheLine(AtomicU8::new(0));

#[repr(align(64))]
struct CacheLine(AtomicU8);

/// The profiles being captured ([`MUTEX`], [`BLOCK`] bits). A relaxed load: a lock operation
/// that races with a capture starting or stopping is simply not recorded.
#[inline(always)]
pub(crate) fn active() -> u8 {
    ACTIVE.0.load(Relaxed)
}

/// Deepest stack recorded; deeper stacks keep their leaf-most frames.
const MAX_DEPTH: usize = 64;
/// Distinct stacks one capture keeps; events on further stacks are counted as dropped.
const MAX_STACKS: usize = 16 * 1024;

/// One capture kind's switch, setting and records.
#[derive(Debug)]
pub(crate) struct Recorder {
    bit: u8,
    /// When the running capture started ([`now_ns`]); events that began earlier are not
    /// part of it.
    since: AtomicU64,
    /// Mutex: the sampling fraction. Block: the rate in nanoseconds.
    setting: AtomicU64,
    records: parking_lot::Mutex<Option<Records>>,
}

/// What one capture recorded: totals per stack (raw instruction pointers, leaf first).
#[derive(Debug, Default)]
pub(crate) struct Records {
    since: u64,
    pub(crate) stacks: HashMap<Box<[usize]>, Totals>,
    pub(crate) dropped: u64,
}

/// Debiased totals of one stack.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    pub(crate) count: f64,
    pub(crate) delay_ns: f64,
}

pub(crate) static MUTEX_RECORDER: Recorder = Recorder::new(MUTEX);
pub(crate) static BLOCK_RECORDER: Recorder = Recorder::new(BLOCK);

impl Recorder {
    const fn new(bit: u8) -> Self {
        Recorder { bit, since: AtomicU64::new(0), setting: AtomicU64::new(1), records: parking_lot::Mutex::new(None) }
    }

    /// Starts a capture with `setting`; `false` when one of this kind already runs.
    pub(crate) fn start(&self, setting: u64) -> bool {
        register_fork_child_handler();
        // Built before the records are locked: building it takes the loader's lock, which a
        // thread running a library's constructor holds while it may record into these records.
        walker::acquire();
        let mut records = self.records.lock();
        if records.is_some() {
            drop(records);
            walker::release();
            return false;
        }
        let since = now_ns();
        *records = Some(Records { since, ..Records::default() });
        self.setting.store(setting.max(1), Relaxed);
        self.since.store(since, Relaxed);
        ACTIVE.0.fetch_or(self.bit, Relaxed);
        true
    }

    /// Ends the running capture and hands over what it recorded.
    pub(crate) fn stop(&self) -> Option<Records> {
        let mut records = self.records.lock();
        ACTIVE.0.fetch_and(!self.bit, Relaxed);
        let taken = records.take();
        // As in `start`: the walker goes after the records are unlocked.
        drop(records);
        if taken.is_some() {
            walker::release();
        }
        taken
    }

    /// Adds an event of the capture that started at `since` (dropped when that capture is
    /// over: nothing leaks into the next one).
    fn add(&self, since: u64, stack: &[usize], count: f64, delay_ns: f64) {
        let mut guard = self.records.lock();
        let Some(records) = guard.as_mut().filter(|r| r.since == since) else { return };
        if let Some(totals) = records.stacks.get_mut(stack) {
            totals.count += count;
            totals.delay_ns += delay_ns;
        } else if records.stacks.len() < MAX_STACKS {
            records.stacks.insert(stack.into(), Totals { count, delay_ns });
        } else {
            records.dropped += 1;
        }
    }
}

/// A service that forks while a lock profile is captured: in the child only the forking thread
/// exists, and a lock of onsite's that another thread held at the fork (a recorder's records, a
/// waiter shard) stays held there. The child handler (from `pthread_atfork`, registered at the
/// first capture) switches recording off, so the child's locks never reach those: their slow
/// paths read [`active`] first. Only an atomic store: async-signal-safe, as the child of a
/// multi-threaded fork requires.
fn register_fork_child_handler() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    extern "C" fn in_child() {
        ACTIVE.0.store(0, Relaxed);
    }
    REGISTERED.call_once(|| {
        // SAFETY: the handler only stores an atomic; it is a static function.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if rc != 0 {
            tracing::warn!(rc, "onsite: pthread_atfork failed: a forked child may inherit a lock profile");
        }
    });
}

/// Nanoseconds on a monotonic clock private to this crate.
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

thread_local! {
    /// Set while this thread runs recording code: a lock taken from in there (say, by a
    /// global allocator built on these locks) is not recorded, so recording never recurses.
    static RECORDING: Cell<bool> = const { Cell::new(false) };
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// Runs `f` unless this thread is already recording (or is being torn down).
fn recording<R>(f: impl FnOnce() -> R) -> Option<R> {
    if RECORDING.try_with(|r| r.replace(true)).unwrap_or(true) {
        return None;
    }
    let result = f();
    let _ = RECORDING.try_with(|r| r.set(false));
    Some(result)
}

/// A cheap per-thread pseudo-random number (xorshift64), for sampling decisions only.
fn random() -> u64 {
    static SEED: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    RNG.try_with(|state| {
        let mut x = state.get();
        if x == 0 {
            // splitmix64 of a per-thread value: distinct, well-mixed, never zero.
            let mut z = SEED.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed) ^ now_ns();
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x = (z ^ (z >> 31)) | 1;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
    .unwrap_or(0)
}

/// The current thread's stack as raw instruction pointers, leaf first; symbolised only when
/// the profile is written. With onsite-core's lock-free walker while a capture runs (no
/// loader lock taken inside a lock's slow path, and a tenth of libgcc's cost on repeated
/// stacks), libgcc's unwinder for a walk it cannot finish (code loaded since the start, every
/// cache slot claimed): an ordinary thread context, where waiting for the loader is libc's.
#[inline(never)]
fn capture_stack(ips: &mut [usize; MAX_DEPTH]) -> usize {
    if let Some(depth) = walker::walk(ips) {
        return depth;
    }
    onsite_core::stack_walk::libgcc_walk(ips)
}

/// The lock profiles' walker: built when the first of the mutex and block captures starts (on
/// the control thread), dropped when the last of them stops, after the walks in progress (each
/// bounded, none waits for anything) have finished.
mod walker {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

    use onsite_core::stack_walk::Walker;

    /// Walks that may run at once; more wait for nobody, they walk with libgcc.
    const CACHE_SLOTS: usize = 8;

    static WALKER: AtomicPtr<Walker> = AtomicPtr::new(std::ptr::null_mut());
    /// Walks that may be using [`WALKER`].
    static WALKS: AtomicUsize = AtomicUsize::new(0);
    /// Running captures that use the walker (changed by the control thread only).
    static USERS: parking_lot::Mutex<usize> = parking_lot::Mutex::new(0);
    static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        /// This thread's preferred cache slot, `usize::MAX` until asked.
        static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
    }

    pub(super) fn acquire() {
        let mut users = USERS.lock();
        if *users == 0 {
            let walker = Box::into_raw(Box::new(Walker::new(CACHE_SLOTS)));
            WALKER.store(walker, Ordering::SeqCst);
        }
        *users += 1;
    }

    pub(super) fn release() {
        let mut users = USERS.lock();
        *users = users.saturating_sub(1);
        if *users == 0 {
            let old = WALKER.swap(std::ptr::null_mut(), Ordering::SeqCst);
            // A walk counted before this swap may still use `old`; one counted after sees null.
            while WALKS.load(Ordering::SeqCst) != 0 {
                std::thread::yield_now();
            }
            if !old.is_null() {
                // SAFETY: from `Box::into_raw` in `acquire`, unpublished, and no walk is left
                // that loaded it.
                drop(unsafe { Box::from_raw(old) });
            }
        }
    }

    /// This thread's stack with the walker, if one is published and the walk finishes.
    #[inline(always)]
    pub(super) fn walk(ips: &mut [usize]) -> Option<usize> {
        WALKS.fetch_add(1, Ordering::SeqCst);
        let walker = WALKER.load(Ordering::SeqCst);
        let preferred = SLOT
            .try_with(|slot| {
                if slot.get() == usize::MAX {
                    slot.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
                }
                slot.get()
            })
            .unwrap_or(0);
        // SAFETY: `release` frees a walker only after unpublishing it and seeing no walk
        // counted, and this walk was counted before it loaded the pointer.
        let depth = if walker.is_null() { None } else { unsafe { &*walker }.walk_here(preferred, ips) };
        WALKS.fetch_sub(1, Ordering::SeqCst);
        depth
    }
}

/// A registered waiter of the mutex profile.
struct Waiter {
    lock: usize,
    id: u64,
    charged_until: u64,
}

const SHARDS: usize = 64;
/// The waiters of the mutex profile, by lock address (sharded: waiters of different locks
/// rarely meet on one shard lock).
static WAITERS: [parking_lot::Mutex<Vec<Waiter>>; SHARDS] = [const { parking_lot::Mutex::new(Vec::new()) }; SHARDS];

fn shard(lock: usize) -> &'static parking_lot::Mutex<Vec<Waiter>> {
    &WAITERS[((lock >> 4) ^ (lock >> 12)) % SHARDS]
}

/// Where a lock counts the waiters registered for the mutex profile: `unit` per waiter in
/// `word` (a lock can keep the count in the bits above its own state).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WaiterCount<'a> {
    pub(crate) word: &'a AtomicU32,
    pub(crate) unit: u32,
}

/// A wait in progress, as [`begin_wait`] noted it.
#[derive(Debug)]
pub(crate) struct Wait {
    start: u64,
    /// The block capture this wait is timed for.
    block_since: Option<u64>,
    /// This waiter's id in [`WAITERS`], when registered for the mutex profile.
    registered: Option<u64>,
}

/// Notes that this thread is about to wait for `lock`. `waiters` is the lock's waiter count,
/// `None` for waits the mutex profile does not charge (a `Condvar` wait).
#[cold]
#[inline(never)]
pub(crate) fn begin_wait(lock: usize, waiters: Option<WaiterCount<'_>>) -> Option<Wait> {
    let active = active();
    let register = active & MUTEX != 0 && waiters.is_some();
    let block = active & BLOCK != 0;
    if !register && !block {
        return None;
    }
    recording(|| {
        let start = now_ns();
        let registered = match waiters {
            Some(waiters) if register => {
                static NEXT_ID: AtomicU64 = AtomicU64::new(1);
                let id = NEXT_ID.fetch_add(1, Relaxed);
                shard(lock).lock().push(Waiter { lock, id, charged_until: start });
                waiters.word.fetch_add(waiters.unit, Relaxed);
                Some(id)
            }
            _ => None,
        };
        let block_since = block.then(|| BLOCK_RECORDER.since.load(Relaxed));
        Wait { start, block_since, registered }
    })
}

/// Notes that the wait `wait` (from [`begin_wait`]) for `lock` is over.
#[cold]
#[inline(never)]
pub(crate) fn end_wait(wait: Wait, lock: usize, waiters: Option<WaiterCount<'_>>) {
    let _ = recording(|| {
        let waited = now_ns().saturating_sub(wait.start).max(1);
        if let (Some(id), Some(waiters)) = (wait.registered, waiters) {
            shard(lock).lock().retain(|w| w.id != id);
            waiters.word.fetch_sub(waiters.unit, Relaxed);
        }
        if let Some(since) = wait.block_since {
            record_block(since, waited);
        }
    });
}

/// Go's block rule: a wait of at least `rate` ns is always kept; a shorter one with
/// probability `waited / rate`, and then counts `rate / waited` times with `rate` ns, so the
/// totals stay unbiased.
fn record_block(since: u64, waited: u64) {
    let rate = BLOCK_RECORDER.setting.load(Relaxed);
    if waited < rate && random() % rate > waited {
        return;
    }
    let (count, delay) = if waited < rate { (rate as f64 / waited as f64, rate as f64) } else { (1.0, waited as f64) };
    let mut ips = [0; MAX_DEPTH];
    let len = capture_stack(&mut ips);
    BLOCK_RECORDER.add(since, &ips[..len], count, delay);
}

/// Waiting time charged by one unlock, to be recorded once the lock is released.
#[derive(Debug)]
pub(crate) struct Charge {
    since: u64,
    delay_ns: u64,
}

/// The end of a critical section others waited for: charges every registered waiter of
/// `lock` the time it waited since it was last charged. Called before the lock is released,
/// while the waiter that will get it is still registered.
#[cold]
#[inline(never)]
pub(crate) fn charge_waiters(lock: usize) -> Option<Charge> {
    recording(|| {
        let since = MUTEX_RECORDER.since.load(Relaxed);
        let now = now_ns();
        let mut delay_ns = 0;
        for waiter in shard(lock).lock().iter_mut().filter(|w| w.lock == lock) {
            // A waiter that began before this capture is charged from the capture's start.
            delay_ns += now.saturating_sub(waiter.charged_until.max(since));
            waiter.charged_until = now;
        }
        Charge { since, delay_ns }
    })
}

/// Records `charge` against the current stack, 1 in `fraction` times and then scaled by
/// `fraction` (Go's mutex rule). Called after the lock is released, so the stack walk is not
/// part of the critical section.
#[cold]
#[inline(never)]
pub(crate) fn record_contention(charge: Option<Charge>) {
    let Some(charge) = charge.filter(|c| c.delay_ns > 0) else { return };
    let _ = recording(|| {
        let fraction = MUTEX_RECORDER.setting.load(Relaxed);
        if fraction > 1 && !random().is_multiple_of(fraction) {
            return;
        }
        let mut ips = [0; MAX_DEPTH];
        let len = capture_stack(&mut ips);
        let fraction = fraction as f64;
        MUTEX_RECORDER.add(charge.since, &ips[..len], fraction, fraction * charge.delay_ns as f64);
    });
}

/// This crate's own machinery as the profile's `drop_frames`, for a reader that names a stripped
/// service's frames later (`pprof` with `PPROF_BINARY_PATH`, or
/// `onsite_core::pprof::symbolize_offline`): it drops the first of these from the root and
/// everything it called, as [`is_own_frame`] does at the leaf end when the frames have names
/// while the profile is written.
pub(crate) const OWN_FRAMES_REGEX: &str = "<?onsite_sync::.*|<?lock_api::.*|<?parking_lot::.*|<?parking_lot_core::.*\
|<?backtrace::.*|<?onsite_core::stack_walk::.*|core::ptr::drop_in_place<lock_api::.*|core::mem::drop<lock_api::.*";

/// Whether a symbolised function is this crate's own machinery (or the lock_api / parking_lot
/// / stack-walker code it runs inside), never the service's: dropped from the leaf end of
/// every recorded stack.
pub(crate) fn is_own_frame(function: &str) -> bool {
    let name = function.trim_start_matches('<');
    [
        "onsite_sync::",
        "lock_api::",
        "parking_lot::",
        "parking_lot_core::",
        "backtrace::",
        "onsite_core::stack_walk::",
        "core::ptr::drop_in_place<lock_api::",
        "core::mem::drop<lock_api::",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
        // `drop(guard)` in the service: legacy-mangled symbols name a generic function without
        // its arguments, so the bare `core::mem::drop` between the service and the unlock is
        // drop plumbing too (drop glue of a service type keeps its name and stays).
        || name == "core::mem::drop"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_frames_are_recognised_and_the_services_are_not() {
        assert!(is_own_frame("<onsite_sync::raw::RawMutex as lock_api::mutex::RawMutex>::unlock"));
        assert!(is_own_frame("core::ptr::drop_in_place<lock_api::mutex::MutexGuard<onsite_sync::raw::RawMutex, u64>>"));
        assert!(is_own_frame("backtrace::backtrace::trace_unsynchronized"));
        assert!(!is_own_frame("demo_mq::store::append"));
        assert!(!is_own_frame("core::ptr::drop_in_place<demo_mq::Queue>"));
        assert!(is_own_frame("core::mem::drop"));
    }

    #[test]
    fn random_numbers_vary() {
        let a = random();
        let b = random();
        assert_ne!(a, b);
        assert_ne!(a, 0);
    }
}
