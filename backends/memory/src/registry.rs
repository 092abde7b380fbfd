//! Where the mode word lives, and how the control thread finds the one that matters.
//!
//! Every [`Allocator`](crate::Allocator) carries its own mode word, in its own cache line, so
//! that the global allocator's calls read it straight out of the service's
//! `#[global_allocator]` static: the word is then defined in the service's own binary and
//! reached with one load at a fixed offset from the code, where a `static` of this crate would
//! be reached through the GOT (two dependent loads on every call). The control thread changes
//! the word of one allocator only, the process's global one, which it finds in three steps:
//!
//! 1. **Registration.** Every `Allocator` starts with its word at `UNREGISTERED`, which is not
//!    `OFF`, so its calls take the slow path (and go to the inner allocator) until its first
//!    realloc, the one path that carries the allocator's address (see `routed`'s
//!    `answer_or_register`: the allocation path is kept without it). That realloc moves the
//!    word to `OFF` (one compare-exchange: one caller wins) and puts the word's address into
//!    [`CANDIDATES`], a fixed array: no allocation, no lock, nothing to wait for. From then on
//!    its calls take the off path. The address is only kept, never used, until step 2 has
//!    checked it.
//! 2. **Check.** At the first capture the control thread keeps the candidates whose word lies in
//!    a writable segment of a loaded object (`onsite_core::symbols::WritableSegments`):
//!    `static`s, which live for good. An `Allocator` on a stack, in a thread-local or on the
//!    heap registers too if it is ever called, and is never touched: writing to its word later
//!    would be writing to memory that may be something else by then.
//! 3. **Probe.** It moves those words to `PROBE` and allocates and reallocates once, with
//!    [`PROBING`] set on its own thread: the realloc that answers (the global allocator's, the
//!    only one `std::alloc::realloc` reaches) names its word and its inner allocator. (Before
//!    step 2 the first capture reallocates once too, so that a global allocator no realloc has
//!    reached yet registers.) That word is [`ACTIVE`] for the rest of
//!    the process's life; the others go back to `OFF`. Later captures probe `ACTIVE` alone.
//!
//! A process has one global allocator, so `ACTIVE` never changes once set; an `Allocator` that
//! is not the global one (called directly) only ever sees `UNREGISTERED`, `OFF` and `PROBE`, so
//! it never enters dhat or the sampler's tables.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};

use crate::{Allocator, Inner, mode};

/// Words of `Allocator`s that have reallocated (in the order of their first reallocs), unchecked.
static CANDIDATES: [AtomicPtr<AtomicU32>; 8] = [const { AtomicPtr::new(std::ptr::null_mut()) }; 8];
/// Whether an `Allocator` found `CANDIDATES` full (for the error of a probe that fails).
static CANDIDATES_FULL: AtomicBool = AtomicBool::new(false);
/// The global allocator's word, once a probe found it; null until then.
static ACTIVE: AtomicPtr<AtomicU32> = AtomicPtr::new(std::ptr::null_mut());
/// The words the first probe has moved to `PROBE`, checked, by their `CANDIDATES` index
/// (for a forked child, see `forget_probe_in_child`).
static PROBED: [AtomicPtr<AtomicU32>; 8] = [const { AtomicPtr::new(std::ptr::null_mut()) }; 8];
/// Set while a control thread probes the candidates (before `ACTIVE` is known), so that two
/// captures starting together do not probe over each other.
static FINDING: AtomicBool = AtomicBool::new(false);
/// Set by the probe's own realloc when it comes through an `Allocator` whose word is `PROBE`:
/// its word and its inner allocator. Null until then.
static PROBE_WORD: AtomicPtr<AtomicU32> = AtomicPtr::new(std::ptr::null_mut());
static PROBE_INNER: AtomicPtr<Inner> = AtomicPtr::new(std::ptr::null_mut());

/// Stands in for the global allocator's word before a probe found it (nothing reads it then).
static DETACHED: AtomicU32 = AtomicU32::new(mode::OFF);

thread_local! {
    /// Set on the thread running the probe, around its one allocation, so only that allocation
    /// answers it (not an `Allocator` another thread calls directly rather than as the global
    /// allocator). Const-initialised, no destructor: readable from the allocator at any point of
    /// a thread's life.
    static PROBING: Cell<bool> = const { Cell::new(false) };
}

/// The global allocator's mode word, found by a probe; `None` before the first capture.
pub(crate) fn active() -> Option<&'static AtomicU32> {
    let word = ACTIVE.load(Ordering::SeqCst);
    // SAFETY: only ever set to a word the probe checked lies in a writable segment of a loaded
    // object (a `static`'s), which lives for the rest of the process.
    (!word.is_null()).then(|| unsafe { &*word })
}

/// The global allocator's mode word, for the control thread and the rare paths once a capture
/// has claimed it (so a probe found it); a word nothing reads before that.
pub(crate) fn mode_word() -> &'static AtomicU32 {
    active().unwrap_or(&DETACHED)
}

/// The global allocator's mode now (`OFF` before the first capture).
pub(crate) fn current_mode() -> u32 {
    mode_word().load(Ordering::SeqCst)
}

/// The slow path of an `Allocator`'s first realloc: its word goes to `OFF`, and its address to
/// `CANDIDATES`. Only atomics: this runs inside the allocator, maybe before `main`.
#[cold]
pub(crate) fn register(word: &AtomicU32) {
    if word.compare_exchange(mode::UNREGISTERED, mode::OFF, Ordering::SeqCst, Ordering::SeqCst).is_err() {
        return;
    }
    let address = std::ptr::from_ref(word).cast_mut();
    for slot in &CANDIDATES {
        if slot.compare_exchange(std::ptr::null_mut(), address, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            return;
        }
    }
    CANDIDATES_FULL.store(true, Ordering::Relaxed);
}

/// Answers the probe if this is its realloc (see [`PROBING`]); `word` is the calling
/// allocator's.
#[inline(always)]
pub(crate) fn answer_probe<A: std::alloc::GlobalAlloc + 'static>(word: &AtomicU32) {
    if PROBING.with(Cell::get) {
        PROBE_WORD.store(std::ptr::from_ref(word).cast_mut(), Ordering::Relaxed);
        PROBE_INNER.store(std::ptr::from_ref(Allocator::<A>::INNER).cast_mut(), Ordering::Relaxed);
    }
}

/// Why a claim failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unclaimed {
    /// Another memory capture (or always-on sampling) runs, or is starting.
    Taken,
    /// No `Allocator` is the global allocator. `full`: more of them reallocated than could be
    /// registered, so the global one may be among those that were not.
    NotGlobal { full: bool },
}

/// Moves the global allocator's word from `OFF` to `PROBE` (finding it first, at the first
/// capture), allocates and reallocates once, and reports the inner allocator the global `Allocator` hands
/// calls to. Leaves its word at `PROBE` on success (the caller owns the capture, or always-on
/// sampling, from here) and at `OFF` on failure.
pub(crate) fn claim_and_probe() -> Result<&'static Inner, Unclaimed> {
    crate::fork::register_child_handler();
    if let Some(word) = active() {
        if word.compare_exchange(mode::OFF, mode::PROBE, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return Err(Unclaimed::Taken);
        }
        return match probe(&[word]) {
            Some((_, inner)) => Ok(inner),
            None => {
                word.store(mode::OFF, Ordering::SeqCst);
                Err(Unclaimed::NotGlobal { full: false })
            }
        };
    }
    if FINDING.swap(true, Ordering::SeqCst) {
        return Err(Unclaimed::Taken);
    }
    let found = find_global();
    FINDING.store(false, Ordering::SeqCst);
    found.ok_or(Unclaimed::NotGlobal { full: CANDIDATES_FULL.load(Ordering::Relaxed) })
}

/// The first probe: over every candidate in static memory. Sets `ACTIVE` if one answers.
fn find_global() -> Option<&'static Inner> {
    // A global allocator that has not reallocated yet registers now.
    reallocate_once();
    let segments = onsite_core::symbols::WritableSegments::now();
    let mut words: Vec<&'static AtomicU32> = Vec::with_capacity(CANDIDATES.len());
    for (slot, probed) in CANDIDATES.iter().zip(&PROBED) {
        let address = slot.load(Ordering::SeqCst);
        if address.is_null() {
            continue;
        }
        if !segments.hold(address as usize, std::mem::size_of::<AtomicU32>()) {
            // Not a `static`: refused for good (the memory may be anything later).
            slot.store(std::ptr::null_mut(), Ordering::SeqCst);
            continue;
        }
        // SAFETY: a word in a writable segment of a loaded object: a `static`'s (see the
        // module docs), alive for the rest of the process.
        let word: &'static AtomicU32 = unsafe { &*address };
        // Registered words are `OFF` outside a probe, and only this thread probes them now.
        if word.compare_exchange(mode::OFF, mode::PROBE, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            probed.store(address, Ordering::SeqCst);
            words.push(word);
        }
    }
    let answer = probe(&words);
    for word in &words {
        if answer.is_none_or(|(answered, _)| !std::ptr::eq(answered, *word)) {
            word.store(mode::OFF, Ordering::SeqCst);
        }
    }
    for probed in &PROBED {
        probed.store(std::ptr::null_mut(), Ordering::SeqCst);
    }
    let (word, inner) = answer?;
    ACTIVE.store(std::ptr::from_ref(word).cast_mut(), Ordering::SeqCst);
    Some(inner)
}

/// Allocates and reallocates once with `PROBING` set, `words` at `PROBE`, and returns which of
/// them answered (the global allocator's) and its inner allocator.
fn probe(words: &[&'static AtomicU32]) -> Option<(&'static AtomicU32, &'static Inner)> {
    PROBE_WORD.store(std::ptr::null_mut(), Ordering::SeqCst);
    PROBE_INNER.store(std::ptr::null_mut(), Ordering::SeqCst);
    PROBING.with(|probing| probing.set(true));
    reallocate_once();
    PROBING.with(|probing| probing.set(false));
    let word = PROBE_WORD.load(Ordering::SeqCst);
    let inner = PROBE_INNER.load(Ordering::SeqCst);
    // Only a word this probe moved to `PROBE` can have answered; the check keeps `ACTIVE` to
    // words checked to be `static`s whatever happens.
    let word = *words.iter().find(|candidate| std::ptr::eq(**candidate, word))?;
    // SAFETY: only ever set to an `Allocator::INNER`, a reference to static memory.
    (!inner.is_null()).then(|| (word, unsafe { &*inner }))
}

/// One allocation, grown by a realloc and freed, through the global allocator.
fn reallocate_once() {
    let layout = std::alloc::Layout::new::<u64>();
    // SAFETY: a valid, non-zero layout; the block is grown with the layout it was allocated
    // with, and freed once with the layout of its new size; a null result is left alone.
    unsafe {
        let block = std::alloc::alloc(layout);
        if block.is_null() {
            return;
        }
        let grown = std::alloc::realloc(std::hint::black_box(block), layout, 2 * layout.size());
        if grown.is_null() {
            std::alloc::dealloc(block, layout);
        } else {
            std::alloc::dealloc(
                grown,
                std::alloc::Layout::from_size_align_unchecked(2 * layout.size(), layout.align()),
            );
        }
    }
}

/// Gives back a claim [`claim_and_probe`] made, for a capture that will not start after all.
pub(crate) fn release_claim() {
    mode_word().store(mode::OFF, Ordering::SeqCst);
}

/// In a forked child: a first probe the parent had under way at the fork is over (its thread
/// is not in the child), so the words it moved to `PROBE` go back to `OFF` and the next capture
/// may probe. Only atomics (async-signal-safe, as the child of a multi-threaded fork requires).
pub(crate) fn forget_probe_in_child() {
    for probed in &PROBED {
        let address = probed.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !address.is_null() {
            // SAFETY: the parent's probe checked this word is a `static`'s before keeping it.
            let _ = unsafe { &*address }.compare_exchange(mode::PROBE, mode::OFF, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
    FINDING.store(false, Ordering::SeqCst);
}
