//! onsite-memory: heap captures, exact (dhat) or sampled, written as Go-style heap pprof.
//!
//! A library cannot choose a program's global allocator, so a service opts in with one line,
//! over `System` or over the allocator it already uses:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: onsite::memory::Allocator = onsite::memory::Allocator::new();
//! // or, over jemalloc / mimalloc:
//! static ALLOC: onsite::memory::Allocator<tikv_jemallocator::Jemalloc> =
//!     onsite::memory::Allocator::wrapping(tikv_jemallocator::Jemalloc);
//! static ALLOC: onsite::memory::Allocator<mimalloc::MiMalloc> = onsite::memory::Allocator::wrapping(mimalloc::MiMalloc);
//! ```
//!
//! [`Allocator`] costs one relaxed atomic load and a call to its inner allocator while no
//! capture runs. A capture is started and stopped by [`MemoryProfiler`] (an
//! `onsite_core::Profiler`) in one of two [`MemoryMode`]s:
//!
//! - [`MemoryMode::Sampled`] (the default, over any inner allocator): one allocation per
//!   ~512 KiB allocated (per thread, exponential intervals like Go's `MemProfileRate`) records
//!   its stack; the rest cost a thread-local subtraction. Estimates are scaled back like Go's
//!   `scaleHeapSample`.
//! - [`MemoryMode::Dhat`] (over [`System`] only: dhat allocates and frees through it): every
//!   allocation goes through `dhat::Alloc` (a backtrace under a global lock each, roughly two
//!   orders of magnitude slower); exact counts, plus dhat's JSON for `dh_view.html`.
//!
//! Both write `…-memory-….pprof` with `alloc_objects`, `alloc_space`, `inuse_objects`,
//! `inuse_space` (default), where "in use" means allocated during the capture and still live
//! when it stopped. With [`MemoryProfiler::sample_always`] the sampled mode runs from that call
//! on (over any inner allocator, probed at that call as at a capture's start), and "in use" is
//! every sampled block live when the capture stopped, whatever its age (Go's heap profile);
//! `alloc_*` stays the capture's window.

use std::alloc::{GlobalAlloc, Layout, System};
use std::any::TypeId;
use std::sync::atomic::{AtomicU32, Ordering};

mod always_on;
mod capture;
mod dhat_mode;
mod heap_pprof;
mod registry;
mod sampled;
mod stack_walk;

pub use capture::{DEFAULT_SAMPLE_BYTES, MemoryMode, MemoryProfiler, UnknownMode};

/// A value alone in its (pair of adjacent) cache line(s): x86 prefetches lines in pairs.
#[derive(Debug)]
#[repr(align(128))]
struct CacheLine<T>(T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// The inner allocator of an [`Allocator`], as the probe reports it. One per inner type, in
/// static memory (an associated constant), so the allocator publishes it with one pointer
/// store and nothing else.
#[derive(Debug)]
pub(crate) struct Inner {
    type_id: fn() -> TypeId,
    type_name: fn() -> &'static str,
}

impl Inner {
    /// Whether the inner allocator is [`System`], the only one the dhat mode can sit on.
    pub(crate) fn is_system(&self) -> bool {
        (self.type_id)() == TypeId::of::<System>()
    }

    /// The inner allocator's type, e.g. `tikv_jemallocator::Jemalloc`.
    pub(crate) fn name(&self) -> &'static str {
        (self.type_name)()
    }
}

/// Whether `A` is [`System`]: a constant once monomorphised.
#[inline(always)]
fn is_system<A: 'static>() -> bool {
    TypeId::of::<A>() == TypeId::of::<System>()
}

/// Calls into `dhat::Alloc` (or into the sampler's tables) that have started and not finished.
/// A stop switches the mode away and then waits until none is left, so nothing touches the
/// capture's state after the stop took it (see `dhat_mode` and `sampled`).
///
/// Counted in stripes, one cache line each, a thread always in the same stripe: a sampled
/// capture enters twice per sample from every thread, and one shared counter would bounce
/// between the cores each time.
mod in_flight {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{CacheLine, registry};

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

    /// Counts this call and checks that the global allocator's mode word still satisfies `wanted`; `None` (not
    /// counted) if not, and the caller stays away from the capture's state. The SeqCst
    /// increment-then-check pairs with the stop's SeqCst store-then-wait: either the stop sees
    /// this call counted and waits for it, or this call sees the new mode.
    #[inline]
    pub(crate) fn enter(wanted: impl FnOnce(u32) -> bool) -> Option<Entered> {
        let stripe = thread_number() % STRIPES;
        COUNTS[stripe].fetch_add(1, Ordering::SeqCst);
        let entered = Entered(stripe);
        wanted(registry::mode_word().load(Ordering::SeqCst)).then_some(entered)
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
    /// No capture: straight to the inner allocator.
    pub(crate) const OFF: u32 = 0;
    /// A capture is starting and checks that the allocator is installed.
    pub(crate) const PROBE: u32 = 1;
    /// A dhat capture: every call goes through `dhat::Alloc`.
    pub(crate) const DHAT: u32 = 2;
    /// A capture is stopping: the inner allocator for everyone while it writes its report, and no other
    /// capture can start.
    pub(crate) const DRAINING: u32 = 3;
    /// A sampled capture (with its generation in the upper bits of the word).
    pub(crate) const SAMPLED: u32 = 4;
    /// This process is a fork's child, and the parent was capturing at the fork: the inner allocator for
    /// everything, for good (see `fork`).
    pub(crate) const FORKED: u32 = 5;
    /// An [`super::Allocator`] that has not reallocated yet: its first realloc registers it (see
    /// `registry`) and moves it to `OFF`.
    pub(crate) const UNREGISTERED: u32 = 6;

    /// The mode part of a mode word.
    #[inline(always)]
    pub(crate) const fn of(word: u32) -> u32 {
        word & 0xff
    }
}

/// onsite's global allocator: an inner allocator (`System` unless said otherwise), plus whatever
/// a running memory capture needs.
///
/// Declare it once in the service's binary (see the crate docs); without it a memory capture
/// fails to start with an error saying so, and the other kinds of the capture carry on.
///
/// Every call reaches the inner allocator's own method (`alloc`, `alloc_zeroed`, `realloc`,
/// `dealloc`) with the caller's pointer and layout unchanged, in every mode but a dhat capture
/// (which only runs over `System`, where dhat allocates from).
///
/// It must sit in a `static` (as `#[global_allocator]` requires anyway): it carries the mode
/// word every call reads, in a cache line of its own, which a capture finds and changes there.
/// An `Allocator` anywhere else, called directly, only ever hands calls to its inner allocator.
#[derive(Debug)]
pub struct Allocator<A: GlobalAlloc = System> {
    /// What this allocator does with each call; changed only by the control thread, and only
    /// in the global allocator's (see `registry`). The low byte is one of the [`mode`]
    /// constants; during a sampled capture the upper 24 bits hold the capture's generation (see
    /// `sampled`), so the sampled fast path learns both from this one load. `OFF` is the whole
    /// word 0. Alone in its cache line: every allocator call of every thread reads it, and a
    /// counter written beside it would make all the other cores miss on their next call.
    mode: CacheLine<AtomicU32>,
    inner: A,
}

impl<A: GlobalAlloc + Default> Default for Allocator<A> {
    fn default() -> Self {
        Allocator::wrapping(A::default())
    }
}

impl Allocator<System> {
    /// The allocator over `System`, for
    /// `#[global_allocator] static ALLOC: Allocator = Allocator::new();`.
    pub const fn new() -> Self {
        Allocator::wrapping(System)
    }
}

impl<A: GlobalAlloc> Allocator<A> {
    /// The allocator over `inner`, for
    /// `#[global_allocator] static ALLOC: Allocator<Jemalloc> = Allocator::wrapping(Jemalloc);`.
    /// Sampled captures work over any inner allocator; dhat captures refuse to start unless it
    /// is `System`.
    pub const fn wrapping(inner: A) -> Self {
        Allocator { mode: CacheLine(AtomicU32::new(mode::UNREGISTERED)), inner }
    }

    /// The inner allocator (for its own statistics, say).
    pub const fn inner(&self) -> &A {
        &self.inner
    }
}

impl<A: GlobalAlloc + 'static> Allocator<A> {
    /// What the probe reports for this inner allocator.
    const INNER: &'static Inner = &Inner { type_id: TypeId::of::<A>, type_name: std::any::type_name::<A> };
}

// Each method is one relaxed load and a branch: `OFF` goes straight to the inner allocator,
// anything else to one out-of-line function of `routed`. The load is of the allocator's own
// mode word, in the service's `#[global_allocator]` static, so it is one load at a fixed offset
// from the code (a `static` of this crate would be reached through the GOT: two dependent
// loads). The off path is what a service pays all the time, so it is the one laid out
// straight: it falls through to the inner allocator's tail call, no register is saved for the
// other paths, and `cold_path` keeps LLVM from laying the other way inline (its heuristics take
// `== 0` for the unlikely side). `routed`'s entry points are optimised for speed, not size: the
// sampled common case (a thread-local countdown on allocation, one filter byte on free) is
// inlined there, and they end in a tail call of the inner allocator, so a sampled call costs
// one taken branch more than an off one (a conditional tail call into `routed`), plus its own
// checks. (Inlining that common case here instead makes the off path pay a taken branch and
// the registers the other paths save: 0.91–0.94 of the bare allocator against 0.96–0.99; see
// BENCHMARKS.) `routed`'s arguments are what `__rust_alloc`/`__rust_dealloc`/`__rust_realloc`
// receive, in their order (the layout as size then alignment, where a `Layout` argument would
// come the other way round), then the mode word, so that no register has to move; then only
// what the path needs: nothing more for an allocation or a free over a zero-sized inner
// allocator, whose address would have to be materialised after the branch (a `lea`, and the
// branch no longer a tail call: a jump more), the inner allocator's address over one that is
// not zero-sized, and the allocator's own address for a realloc (see `answer_or_register`).
//
// Go's shape, a thread-local countdown on every allocation in every mode (the off mode's
// budget only a re-check interval, so a sampled allocation costs what an off one does), made
// sampled cheaper and off dearer (BENCHMARKS, "Tried and not kept"): a read-modify-write of a
// thread-local costs more than one shared, never-written load, and off is what a service pays
// all the time.
//
// SAFETY: every path hands the call to the inner allocator (directly, or after the sampler's
// bookkeeping), with the caller's pointer and layout unchanged, so its guarantees are the
// allocator's. The one exception is the dhat mode, taken only when the inner allocator is
// `System` (`is_system`), which `dhat::Alloc` wraps: a block is freed by the allocator that
// allocated it either way.
unsafe impl<A: GlobalAlloc + 'static> GlobalAlloc for Allocator<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let word = self.mode.load(Ordering::Relaxed);
        if word == mode::OFF {
            // SAFETY: forwarded as received.
            return unsafe { self.inner.alloc(layout) };
        }
        std::hint::cold_path();
        // SAFETY: forwarded as received.
        unsafe {
            if size_of::<A>() == 0 {
                routed::alloc_zero_sized::<A, false>(layout.size(), layout.align(), word)
            } else {
                routed::alloc::<A, false>(layout.size(), layout.align(), word, &self.inner)
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let word = self.mode.load(Ordering::Relaxed);
        if word == mode::OFF {
            // SAFETY: forwarded as received.
            return unsafe { self.inner.alloc_zeroed(layout) };
        }
        std::hint::cold_path();
        // SAFETY: forwarded as received.
        unsafe {
            if size_of::<A>() == 0 {
                routed::alloc_zero_sized::<A, true>(layout.size(), layout.align(), word)
            } else {
                routed::alloc::<A, true>(layout.size(), layout.align(), word, &self.inner)
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let word = self.mode.load(Ordering::Relaxed);
        if word == mode::OFF {
            // SAFETY: forwarded as received.
            return unsafe { self.inner.dealloc(ptr, layout) };
        }
        std::hint::cold_path();
        // SAFETY: forwarded as received.
        unsafe {
            if size_of::<A>() == 0 {
                routed::dealloc_zero_sized::<A>(ptr, layout.size(), layout.align(), word)
            } else {
                routed::dealloc(ptr, layout.size(), layout.align(), word, &self.inner)
            }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let word = self.mode.load(Ordering::Relaxed);
        if word == mode::OFF {
            // SAFETY: forwarded as received.
            return unsafe { self.inner.realloc(ptr, layout, new_size) };
        }
        std::hint::cold_path();
        // SAFETY: forwarded as received.
        unsafe { routed::realloc(ptr, layout.size(), layout.align(), new_size, word, self) }
    }
}

/// The paths taken while a capture runs (or starts, or stops), and before an allocator's first
/// realloc. `word` is the mode word the caller read; a stale one is handled like any call
/// racing a mode change. `allocator` is the calling [`Allocator`], `inner` its inner allocator.
mod routed {
    use super::*;
    use onsite_core::own_work;

    /// Counts this call as in flight if the mode is still `DHAT`; the caller goes through dhat
    /// only while holding the result, and stays away from it on `None`.
    #[inline(always)]
    fn enter_dhat() -> Option<in_flight::Entered> {
        in_flight::enter(|word| word == mode::DHAT)
    }

    /// The inner allocator's allocation, zeroed or not.
    #[inline(always)]
    pub(crate) unsafe fn inner_alloc<A: GlobalAlloc>(inner: &A, layout: Layout, zeroed: bool) -> *mut u8 {
        // SAFETY: forwarded as received.
        unsafe { if zeroed { inner.alloc_zeroed(layout) } else { inner.alloc(layout) } }
    }

    /// What a realloc in a mode other than sampled or dhat does before it goes to the inner
    /// allocator: answer the probe, or register the allocator at its first realloc. Only the
    /// realloc path does either, because only it carries the allocator's address: passing it
    /// on the allocation path too would cost every sampled allocation an instruction and a
    /// jump more (the branch into `routed` would no longer be a conditional tail call), and
    /// reallocs are rare enough for that. An allocator that has not reallocated yet takes the
    /// slow path (and goes to the inner allocator) until it does; the probe reallocates.
    fn answer_or_register<A: GlobalAlloc + 'static>(word: u32, allocator: &Allocator<A>) {
        if word == mode::PROBE {
            registry::answer_probe::<A>(&allocator.mode);
        } else if word == mode::UNREGISTERED {
            registry::register(&allocator.mode);
        }
    }

    /// A zero-sized inner allocator (`System`, jemalloc's, mimalloc's), for the entry points
    /// that take no address of it: LLVM passes `&self.inner` in a register even when nothing
    /// reads it, and materialising that address after the branch out of the off path turns the
    /// branch (a conditional tail call into `routed`) into a branch, an address and a jump.
    #[inline(always)]
    fn zero_sized<'a, A>() -> &'a A {
        debug_assert_eq!(size_of::<A>(), 0);
        // SAFETY: `A` is zero-sized (the callers check), so any non-null, aligned pointer is a
        // valid reference to it; the value exists (it is the calling allocator's `inner`), and a
        // zero-sized value has no bytes for its address to tell apart.
        unsafe { std::ptr::NonNull::<A>::dangling().as_ref() }
    }

    /// As [`alloc`], over a zero-sized inner allocator (see [`zero_sized`]).
    #[inline(never)]
    pub(super) unsafe fn alloc_zero_sized<A: GlobalAlloc + 'static, const ZEROED: bool>(
        size: usize,
        align: usize,
        word: u32,
    ) -> *mut u8 {
        // SAFETY: forwarded as received.
        unsafe { alloc_body::<A, ZEROED>(size, align, word, zero_sized()) }
    }

    /// An allocation while the mode is not `OFF`.
    #[inline(never)]
    pub(super) unsafe fn alloc<A: GlobalAlloc + 'static, const ZEROED: bool>(
        size: usize,
        align: usize,
        word: u32,
        inner: &A,
    ) -> *mut u8 {
        // SAFETY: forwarded as received.
        unsafe { alloc_body::<A, ZEROED>(size, align, word, inner) }
    }

    /// The sampled common case ([`sampled::count_down`]) inline, the rest out of line.
    #[inline(always)]
    unsafe fn alloc_body<A: GlobalAlloc + 'static, const ZEROED: bool>(
        size: usize,
        align: usize,
        word: u32,
        inner: &A,
    ) -> *mut u8 {
        // SAFETY: the parts of a valid layout.
        let layout = unsafe { Layout::from_size_align_unchecked(size, align) };
        if sampled::count_down(word, layout.size()) {
            // SAFETY: forwarded as received.
            return unsafe { inner_alloc(inner, layout, ZEROED) };
        }
        // SAFETY: forwarded as received.
        unsafe { alloc_other(inner, word, layout, ZEROED) }
    }

    /// Everything but the sampled common case: a maybe-sampled allocation, dhat, and every
    /// other mode's (straight to the inner allocator).
    #[cold]
    #[inline(never)]
    unsafe fn alloc_other<A: GlobalAlloc + 'static>(inner: &A, word: u32, layout: Layout, zeroed: bool) -> *mut u8 {
        match mode::of(word) {
            // SAFETY: forwarded as received.
            mode::SAMPLED => unsafe { sampled::alloc_past_budget(inner, word, layout, zeroed) },
            // onsite's own allocations (its control thread symbolising, say) go to `System`:
            // they are not the service's, and they never wait on dhat's lock. Their frees go
            // through dhat like every free, and dhat ignores blocks it never recorded. (Only
            // over `System`: a dhat capture never starts over another allocator, and an
            // `Allocator` over another one used directly never enters dhat either.)
            mode::DHAT
                if is_system::<A>()
                    && !own_work::is_own_work()
                    && let Some(_entered) = enter_dhat() =>
            {
                // SAFETY: forwarded as received; dhat allocates from `System`, the inner one.
                unsafe { if zeroed { dhat::Alloc.alloc_zeroed(layout) } else { dhat::Alloc.alloc(layout) } }
            }
            // SAFETY: forwarded as received.
            _ => unsafe { inner_alloc(inner, layout, zeroed) },
        }
    }

    /// A free while the mode is not `OFF`: a block whose filter class is clear (no live
    /// sample in it, and no dhat capture running, which marks every class) goes straight to
    /// the inner allocator, whatever the mode; the filter byte answers for both, so the common
    /// free reads no mode.
    #[inline(never)]
    pub(super) unsafe fn dealloc<A: GlobalAlloc + 'static>(
        ptr: *mut u8,
        size: usize,
        align: usize,
        word: u32,
        inner: &A,
    ) {
        // SAFETY: forwarded as received.
        unsafe { dealloc_body(ptr, size, align, word, inner) }
    }

    /// As [`dealloc`], over a zero-sized inner allocator (see [`zero_sized`]).
    #[inline(never)]
    pub(super) unsafe fn dealloc_zero_sized<A: GlobalAlloc + 'static>(
        ptr: *mut u8,
        size: usize,
        align: usize,
        word: u32,
    ) {
        // SAFETY: forwarded as received.
        unsafe { dealloc_body(ptr, size, align, word, zero_sized::<A>()) }
    }

    #[inline(always)]
    unsafe fn dealloc_body<A: GlobalAlloc + 'static>(ptr: *mut u8, size: usize, align: usize, word: u32, inner: &A) {
        if !sampled::may_be_sampled(ptr) {
            // SAFETY: forwarded as received; the parts of a valid layout.
            return unsafe { inner.dealloc(ptr, Layout::from_size_align_unchecked(size, align)) };
        }
        // SAFETY: forwarded as received.
        unsafe { dealloc_marked(ptr, size, align, word, inner) }
    }

    /// A free whose filter class is marked: a block that may have been sampled, or any block
    /// during a dhat capture. Arguments in `dealloc`'s order, so that its jump here moves no
    /// register.
    #[cold]
    #[inline(never)]
    unsafe fn dealloc_marked<A: GlobalAlloc + 'static>(ptr: *mut u8, size: usize, align: usize, word: u32, inner: &A) {
        // SAFETY: the parts of a valid layout.
        let layout = unsafe { Layout::from_size_align_unchecked(size, align) };
        if mode::of(word) == mode::SAMPLED {
            // Forget the block before the inner allocator can hand its address out again.
            let _ = sampled::forget(ptr);
        } else if word == mode::DHAT
            && is_system::<A>()
            && let Some(_entered) = enter_dhat()
        {
            // SAFETY: forwarded as received; dhat ignores blocks it never recorded, and frees
            // through `System`, the inner allocator.
            return unsafe { dhat::Alloc.dealloc(ptr, layout) };
        }
        // SAFETY: forwarded as received.
        unsafe { inner.dealloc(ptr, layout) }
    }

    /// A realloc while the mode is not `OFF`.
    #[inline(never)]
    pub(super) unsafe fn realloc<A: GlobalAlloc + 'static>(
        ptr: *mut u8,
        size: usize,
        align: usize,
        new_size: usize,
        word: u32,
        allocator: &Allocator<A>,
    ) -> *mut u8 {
        // The common case: a block in a clear filter class (see `dealloc`), and a new size
        // within this thread's budget of a sampled capture (no other mode's word matches it).
        if !sampled::may_be_sampled(ptr) && sampled::count_down(word, new_size) {
            // SAFETY: forwarded as received; the parts of a valid layout.
            return unsafe { allocator.inner.realloc(ptr, Layout::from_size_align_unchecked(size, align), new_size) };
        }
        // SAFETY: forwarded as received.
        unsafe { realloc_other(ptr, size, align, new_size, word, allocator) }
    }

    /// A realloc during sampling whose old block may have been sampled, or whose new size is
    /// past the budget. Arguments in `realloc`'s order, as for `dealloc_marked`.
    #[cold]
    #[inline(never)]
    unsafe fn realloc_sampled<A: GlobalAlloc>(
        ptr: *mut u8,
        size: usize,
        align: usize,
        new_size: usize,
        word: u32,
        allocator: &Allocator<A>,
    ) -> *mut u8 {
        let inner = &allocator.inner;
        // SAFETY: the parts of a valid layout.
        let layout = unsafe { Layout::from_size_align_unchecked(size, align) };
        // A realloc is a free of the old block and an allocation of the new size, for the
        // books as for dhat. The old block is forgotten first: once the inner allocator has
        // it, its address may be handed to another thread and sampled there.
        let forgotten = if sampled::may_be_sampled(ptr) { sampled::forget(ptr) } else { None };
        if sampled::count_down(word, new_size) {
            // SAFETY: forwarded as received.
            let new = unsafe { inner.realloc(ptr, layout, new_size) };
            if new.is_null()
                && let Some(forgotten) = forgotten
            {
                // Not freed after all: the old block is still the caller's, still live.
                sampled::restore(ptr, forgotten);
            }
            return new;
        }
        // SAFETY: forwarded as received.
        unsafe { sampled::realloc_past_budget(inner, word, ptr, layout, new_size, forgotten) }
    }

    /// Everything but the common case of a realloc: a sampled capture's (see
    /// `realloc_sampled`), dhat's, and every other mode's (the probe's and a first realloc's
    /// included, see `answer_or_register`).
    #[cold]
    #[inline(never)]
    unsafe fn realloc_other<A: GlobalAlloc + 'static>(
        ptr: *mut u8,
        size: usize,
        align: usize,
        new_size: usize,
        word: u32,
        allocator: &Allocator<A>,
    ) -> *mut u8 {
        if mode::of(word) == mode::SAMPLED {
            // SAFETY: forwarded as received.
            return unsafe { realloc_sampled(ptr, size, align, new_size, word, allocator) };
        }
        // SAFETY: the parts of a valid layout.
        let layout = unsafe { Layout::from_size_align_unchecked(size, align) };
        if word == mode::DHAT
            && is_system::<A>()
            && let Some(_entered) = enter_dhat()
        {
            // SAFETY: forwarded as received; a block dhat never saw is recorded as new.
            return unsafe { dhat::Alloc.realloc(ptr, layout, new_size) };
        }
        answer_or_register(word, allocator);
        // SAFETY: forwarded as received.
        unsafe { allocator.inner.realloc(ptr, layout, new_size) }
    }
}

/// A service that forks while a memory capture runs: the child has only the forking thread,
/// and whatever the parent's other threads held at the fork stays held in the child for ever:
/// dhat's global lock (a thread inside `dhat::Alloc`), a walker cache slot, counts in
/// `in_flight`. The child must not inherit the capture either. So the child handler (from
/// `pthread_atfork`, registered at the first capture) moves the mode to `FORKED`: every call
/// goes to the inner allocator from then on, which is safe because the child never enters dhat
/// or the sampler's tables again (a block dhat recorded goes back to `System`, where dhat took
/// it from: the only inner allocator a dhat capture runs over). The child's copy of the capture's stopper does nothing if used ([`ForkGuard`]): it
/// must neither wait for the parent's calls in progress nor write the parent's capture.
mod fork {
    use std::sync::Once;
    use std::sync::atomic::Ordering;

    use super::{mode, registry};

    /// Registers the child handler, once per process.
    pub(crate) fn register_child_handler() {
        static REGISTERED: Once = Once::new();
        REGISTERED.call_once(|| {
            // SAFETY: the handler only loads and stores atomics (async-signal-safe, as the
            // child of a multi-threaded fork requires); it is a static function.
            let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
            if rc != 0 {
                tracing::warn!(rc, "onsite: pthread_atfork failed: a forked child may inherit a memory capture");
            }
        });
    }

    extern "C" fn in_child() {
        registry::forget_probe_in_child();
        if let Some(word) = registry::active()
            && word.load(Ordering::SeqCst) != mode::OFF
        {
            word.store(mode::FORKED, Ordering::SeqCst);
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

/// Whether always-on heap sampling runs in this process (started at install by
/// [`MemoryProfiler::sample_always`]): a memory capture then reports every live sampled block
/// whatever its age, so even one with no window says what holds the memory now.
pub fn sampling_always() -> bool {
    always_on::running()
}
