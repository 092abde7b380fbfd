//! onsite-memory: heap captures, exact (dhat) or sampled, written as Go-style heap pprof.
//!
//! A library cannot choose a program's global allocator, so a service opts in with one line:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: onsite::memory::Allocator = onsite::memory::Allocator::new();
//! ```
//!
//! [`Allocator`] costs one relaxed atomic load and a call to [`System`] while no capture runs.
//! A capture is started and stopped by [`MemoryProfiler`] (an `onsite_core::Profiler`) in one of
//! two [`MemoryMode`]s:
//!
//! - [`MemoryMode::Sampled`] (the default): one allocation per ~512 KiB allocated (per thread,
//!   exponential intervals like Go's `MemProfileRate`) records its stack; the rest cost a
//!   thread-local subtraction. Estimates are scaled back like Go's `scaleHeapSample`.
//! - [`MemoryMode::Dhat`]: every allocation goes through `dhat::Alloc` (a backtrace under a
//!   global lock each, roughly two orders of magnitude slower); exact counts, plus dhat's JSON
//!   for `dh_view.html`.
//!
//! Both write `…-memory-….pprof` with `alloc_objects`, `alloc_space`, `inuse_objects`,
//! `inuse_space` (default), where "in use" means allocated during the capture and still live
//! when it stopped. With [`MemoryProfiler::sample_always`] the sampled mode runs from that call
//! on, and "in use" is every sampled block live when the capture stopped, whatever its age (Go's
//! heap profile); `alloc_*` stays the capture's window.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

mod always_on;
mod capture;
mod dhat_mode;
mod heap_pprof;
mod sampled;
mod stack_walk;

pub use capture::{DEFAULT_SAMPLE_BYTES, MemoryMode, MemoryProfiler, UnknownMode};

/// What the allocator does with each call; changed only by the control thread. The low byte is
/// one of the [`mode`] constants; during a sampled capture the upper 24 bits hold the capture's
/// generation (see `sampled`), so the sampled fast path learns both from this one load. `OFF`
/// is the whole word 0.
///
/// Every allocator call of every thread reads this word, so it has a cache line to itself:
/// a counter written beside it (an `in_flight` count at each sample) would make all the other cores
/// miss on their next call.
static MODE: CacheLine<AtomicU32> = CacheLine(AtomicU32::new(mode::OFF));

/// A value alone in its (pair of adjacent) cache line(s): x86 prefetches lines in pairs.
#[repr(align(128))]
struct CacheLine<T>(T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// Set by any allocation routed through [`Allocator`] while [`MODE`] is `PROBE`: proof that it
/// is the process's global allocator.
static PROBE_SEEN: AtomicBool = AtomicBool::new(false);

/// Calls into `dhat::Alloc` (or into the sampler's tables) that have started and not finished.
/// A stop switches [`MODE`] away and then waits until none is left, so nothing touches the
/// capture's state after the stop took it (see `dhat_mode` and `sampled`).
///
/// Counted in stripes, one cache line each, a thread always in the same stripe: a sampled
/// capture enters twice per sample from every thread, and one shared counter would bounce
/// between the cores each time.
mod in_flight {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{CacheLine, MODE};

    const STRIPES: usize = 16;
    static COUNTS: [CacheLine<AtomicUsize>; STRIPES] = [const { CacheLine(AtomicUsize::new(0)) }; STRIPES];
    static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        /// This thread's number (see `thread_number`), `usize::MAX` until asked.
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }

    /// Proof that the calling thread is counted; dropping it ends the count.
    #[derive(Debug)]
    pub(crate) struct Entered(usize);

    impl Drop for Entered {
        fn drop(&mut self) {
            COUNTS[self.0].fetch_sub(1, Ordering::Release);
        }
    }

    /// Counts this call and checks that the `MODE` word still satisfies `wanted`; `None` (not
    /// counted) if not, and the caller stays away from the capture's state. The SeqCst
    /// increment-then-check pairs with the stop's SeqCst store-then-wait: either the stop sees
    /// this call counted and waits for it, or this call sees the new mode.
    #[inline]
    pub(crate) fn enter(wanted: impl FnOnce(u32) -> bool) -> Option<Entered> {
        let stripe = thread_number() % STRIPES;
        COUNTS[stripe].fetch_add(1, Ordering::SeqCst);
        let entered = Entered(stripe);
        wanted(MODE.load(Ordering::SeqCst)).then_some(entered)
    }

    /// Waits until every call counted before this one started has finished. Those calls only
    /// ever wait for each other (dhat's lock), never for the control thread, so this ends. A
    /// stripe once seen at zero is done with: a call that enters it later sees what the caller
    /// changed before waiting (a new mode, a new walker) and keeps away from the old state, so
    /// steady traffic (always-on sampling) cannot hold the wait up.
    pub(crate) fn wait_until_none() {
        let started = std::time::Instant::now();
        let mut warned = false;
        for count in &COUNTS {
            while count.load(Ordering::SeqCst) != 0 {
                std::thread::yield_now();
                if !warned && started.elapsed() > std::time::Duration::from_secs(5) {
                    warned = true;
                    tracing::warn!("onsite: memory capture stop is still waiting for allocations in progress");
                }
            }
        }
    }

    /// A small number for the calling thread, handed out in turn on first use (also its
    /// stripe, modulo the stripe count); other per-thread spreading (the stack walker's cache
    /// slots) uses it too.
    #[inline]
    pub(crate) fn thread_number() -> usize {
        STRIPE.with(|cell| {
            if cell.get() == usize::MAX {
                cell.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
            }
            cell.get()
        })
    }

    /// Whether no call is counted (for assertions).
    pub(crate) fn none() -> bool {
        COUNTS.iter().all(|count| count.load(Ordering::SeqCst) == 0)
    }
}

mod mode {
    /// No capture: straight to `System`.
    pub(crate) const OFF: u32 = 0;
    /// A capture is starting and checks that the allocator is installed.
    pub(crate) const PROBE: u32 = 1;
    /// A dhat capture: every call goes through `dhat::Alloc`.
    pub(crate) const DHAT: u32 = 2;
    /// A capture is stopping: `System` for everyone while it writes its report, and no other
    /// capture can start.
    pub(crate) const DRAINING: u32 = 3;
    /// A sampled capture (with its generation in the upper bits of the word).
    pub(crate) const SAMPLED: u32 = 4;
    /// This process is a fork's child, and the parent was capturing at the fork: `System` for
    /// everything, for good (see `fork`).
    pub(crate) const FORKED: u32 = 5;

    /// The mode part of a [`super::MODE`] word.
    #[inline(always)]
    pub(crate) const fn of(word: u32) -> u32 {
        word & 0xff
    }
}

/// onsite's global allocator: `System`, plus whatever a running memory capture needs.
///
/// Declare it once in the service's binary (see the crate docs); without it a memory capture
/// fails to start with an error saying so, and the other kinds of the capture carry on.
#[derive(Debug, Default, Clone, Copy)]
pub struct Allocator;

impl Allocator {
    /// The allocator, for `#[global_allocator] static ALLOC: Allocator = Allocator::new();`.
    pub const fn new() -> Self {
        Allocator
    }
}

// Each method: one relaxed load; `OFF` goes straight to `System`. Anything else goes to
// `routed`, whose sampled common case is inlined here too (a thread-local countdown on
// allocation, one filter byte on free) and whose other paths are out of line.
//
// SAFETY: every path hands the call to `System` (directly, through `dhat::Alloc`, which wraps
// `System`, or after the sampler's bookkeeping), with the caller's pointer and layout unchanged,
// so `System`'s guarantees are the allocator's.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let word = MODE.load(Ordering::Relaxed);
        if word == mode::OFF || sampled::count_down(word, layout.size()) {
            // SAFETY: forwarded as received.
            return unsafe { System.alloc(layout) };
        }
        // SAFETY: forwarded as received.
        unsafe { routed::alloc(word, layout, false) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let word = MODE.load(Ordering::Relaxed);
        if word == mode::OFF || sampled::count_down(word, layout.size()) {
            // SAFETY: forwarded as received.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // SAFETY: forwarded as received.
        unsafe { routed::alloc(word, layout, true) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let word = MODE.load(Ordering::Relaxed);
        if word == mode::OFF {
            // SAFETY: forwarded as received.
            return unsafe { System.dealloc(ptr, layout) };
        }
        // SAFETY: forwarded as received.
        unsafe { routed::dealloc(word, ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let word = MODE.load(Ordering::Relaxed);
        if word == mode::OFF {
            // SAFETY: forwarded as received.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: forwarded as received.
        unsafe { routed::realloc(word, ptr, layout, new_size) }
    }
}

/// The paths taken while a capture runs (or starts, or stops). `word` is the [`MODE`] word the
/// caller read; a stale one is handled like any call racing a mode change.
mod routed {
    use super::*;
    use onsite_core::own_work;

    /// Counts this call as in flight if the mode is still `DHAT`; the caller goes through dhat
    /// only while holding the result, and stays away from it on `None`.
    #[inline(always)]
    fn enter_dhat() -> Option<in_flight::Entered> {
        in_flight::enter(|word| word == mode::DHAT)
    }

    /// `System`'s allocation, zeroed or not.
    #[inline(always)]
    pub(crate) unsafe fn system_alloc(layout: Layout, zeroed: bool) -> *mut u8 {
        // SAFETY: forwarded as received.
        unsafe { if zeroed { System.alloc_zeroed(layout) } else { System.alloc(layout) } }
    }

    /// Everything but the sampled common case (which [`sampled::count_down`] settled inline):
    /// a maybe-sampled allocation, dhat, the probe.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn alloc(word: u32, layout: Layout, zeroed: bool) -> *mut u8 {
        match mode::of(word) {
            // SAFETY: forwarded as received.
            mode::SAMPLED => unsafe { sampled::alloc_past_budget(word, layout, zeroed) },
            // onsite's own allocations (its control thread symbolising, say) go to `System`:
            // they are not the service's, and they never wait on dhat's lock. Their frees go
            // through dhat like every free, and dhat ignores blocks it never recorded.
            mode::DHAT
                if !own_work::is_own_work()
                    && let Some(_entered) = enter_dhat() =>
            {
                // SAFETY: forwarded as received; dhat allocates from `System`.
                unsafe { if zeroed { dhat::Alloc.alloc_zeroed(layout) } else { dhat::Alloc.alloc(layout) } }
            }
            mode => {
                if mode == mode::PROBE {
                    PROBE_SEEN.store(true, Ordering::Relaxed);
                }
                // SAFETY: forwarded as received.
                unsafe { system_alloc(layout, zeroed) }
            }
        }
    }

    #[inline(always)]
    pub(super) unsafe fn dealloc(word: u32, ptr: *mut u8, layout: Layout) {
        if mode::of(word) == mode::SAMPLED {
            // Forget the block before `System` can hand its address out again.
            let _ = sampled::on_free(ptr);
            // SAFETY: forwarded as received.
            return unsafe { System.dealloc(ptr, layout) };
        }
        // SAFETY: forwarded as received.
        unsafe { dealloc_other(word, ptr, layout) }
    }

    #[cold]
    #[inline(never)]
    unsafe fn dealloc_other(word: u32, ptr: *mut u8, layout: Layout) {
        if word == mode::DHAT
            && let Some(_entered) = enter_dhat()
        {
            // SAFETY: forwarded as received; dhat ignores blocks it never recorded.
            return unsafe { dhat::Alloc.dealloc(ptr, layout) };
        }
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }

    #[inline(always)]
    pub(super) unsafe fn realloc(word: u32, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if mode::of(word) == mode::SAMPLED {
            // A realloc is a free of the old block and an allocation of the new size, for the
            // books as for dhat. The old block is forgotten first: once `System` has it, its
            // address may be handed to another thread and sampled there.
            let forgotten = sampled::on_free(ptr);
            if sampled::count_down(word, new_size) {
                // SAFETY: forwarded as received.
                let new = unsafe { System.realloc(ptr, layout, new_size) };
                if new.is_null()
                    && let Some(forgotten) = forgotten
                {
                    // Not freed after all: the old block is still the caller's, still live.
                    sampled::restore(ptr, forgotten);
                }
                return new;
            }
            // SAFETY: forwarded as received.
            return unsafe { sampled::realloc_past_budget(word, ptr, layout, new_size, forgotten) };
        }
        // SAFETY: forwarded as received.
        unsafe { realloc_other(word, ptr, layout, new_size) }
    }

    #[cold]
    #[inline(never)]
    unsafe fn realloc_other(word: u32, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if word == mode::DHAT
            && let Some(_entered) = enter_dhat()
        {
            // SAFETY: forwarded as received; a block dhat never saw is recorded as new.
            return unsafe { dhat::Alloc.realloc(ptr, layout, new_size) };
        }
        if word == mode::PROBE {
            PROBE_SEEN.store(true, Ordering::Relaxed);
        }
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// A service that forks while a memory capture runs: the child has only the forking thread,
/// and whatever the parent's other threads held at the fork stays held in the child for ever:
/// dhat's global lock (a thread inside `dhat::Alloc`), a walker cache slot, counts in
/// `in_flight`. The child must not inherit the capture either. So the child handler (from
/// `pthread_atfork`, registered at the first capture) moves the mode to `FORKED`: every call
/// goes to `System` from then on, which is safe because the child never enters dhat or the
/// sampler's tables again (a block dhat recorded goes back to `System`, where dhat took it
/// from). The child's copy of the capture's stopper does nothing if used ([`ForkGuard`]): it
/// must neither wait for the parent's calls in progress nor write the parent's capture.
mod fork {
    use std::sync::Once;
    use std::sync::atomic::Ordering;

    use super::{MODE, mode};

    /// Registers the child handler, once per process.
    pub(crate) fn register_child_handler() {
        static REGISTERED: Once = Once::new();
        REGISTERED.call_once(|| {
            // SAFETY: the handler only loads and stores an atomic (async-signal-safe, as the
            // child of a multi-threaded fork requires); it is a static function.
            let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
            if rc != 0 {
                tracing::warn!(rc, "onsite: pthread_atfork failed: a forked child may inherit a memory capture");
            }
        });
    }

    extern "C" fn in_child() {
        if MODE.load(Ordering::SeqCst) != mode::OFF {
            MODE.store(mode::FORKED, Ordering::SeqCst);
        }
    }
}

/// The process a capture started in: its stopper does nothing in a forked child (see `fork`).
#[derive(Debug)]
pub(crate) struct ForkGuard(u32);

impl ForkGuard {
    pub(crate) fn new() -> ForkGuard {
        ForkGuard(std::process::id())
    }

    /// Whether this is a forked child's copy of the capture.
    pub(crate) fn in_forked_child(&self) -> bool {
        std::process::id() != self.0
    }
}

/// Moves [`MODE`] from `OFF` to `PROBE`, allocates once, and reports whether that allocation
/// came through [`Allocator`]. Leaves the mode at `PROBE` on success (the caller owns the
/// capture from here) and at `OFF` on failure. `Err(true)` means another memory capture runs.
fn claim_and_probe() -> Result<(), bool> {
    fork::register_child_handler();
    if MODE.compare_exchange(mode::OFF, mode::PROBE, Ordering::SeqCst, Ordering::SeqCst).is_err() {
        return Err(true);
    }
    PROBE_SEEN.store(false, Ordering::SeqCst);
    drop(std::hint::black_box(Box::new(std::hint::black_box(0u64))));
    if PROBE_SEEN.load(Ordering::SeqCst) {
        Ok(())
    } else {
        MODE.store(mode::OFF, Ordering::SeqCst);
        Err(false)
    }
}
