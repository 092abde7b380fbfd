//! Stack walks for sampled allocations, from inside the global allocator, with onsite-core's
//! lock-free walker (`onsite_core::stack_walk`, whose docs say why it is safe there).
//!
//! The walker is built by [`install`] at a sampled start (a capture's, on the control thread;
//! always-on sampling's, on the thread calling `MemoryProfiler::sample_always`), before the allocator starts
//! sampling (building it allocates), and published in [`WALKER`]; it is only
//! used inside the sampler's counted (`in_flight`) section, and [`uninstall`] drops it after the
//! stop has waited for those to finish and the file is written (so the frames are symbolised
//! while the objects its pins keep loaded are still there). libgcc's unwinder stays the
//! fallback for a walk the walker cannot finish (code loaded after the start, all cache slots
//! claimed, unknown stack bounds): it may take the loader's lock, which is libc's to wait for,
//! never onsite's. A stray allocation while walking would not recurse: the sampler's per-thread
//! `busy` flag is set for the whole walk.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use onsite_core::stack_walk::Walker;

/// framehop caches that walks can claim at once; more threads sampling at the same instant
/// walk with libgcc.
const CACHE_SLOTS: usize = 8;

/// The running capture's walker, or null. See the module docs for its lifetime.
static WALKER: AtomicPtr<Walker> = AtomicPtr::new(std::ptr::null_mut());

/// Walks done by libgcc since the capture started. (The caching walks are not counted: a
/// counter every sampling thread writes would bounce between the cores at every sample.)
static FALLBACK_WALKS: AtomicU64 = AtomicU64::new(0);

/// How many of this capture's stacks were walked by libgcc so far.
pub(crate) fn fallback_walks() -> u64 {
    FALLBACK_WALKS.load(Ordering::Relaxed)
}

/// Fills `ips` with this thread's stack, leaf first (the walker's own frames included; the
/// writer drops them), and returns how many frames it wrote. Only called from the sampler's
/// counted section (see the module docs).
///
/// Inlined (with the walk) into the sampler's out-of-line paths: every frame of onsite's own
/// between the walk and the service's code is one more frame to unwind per sample.
#[inline(always)]
pub(crate) fn capture(ips: &mut [usize]) -> usize {
    // SeqCst, as `refresh`'s swap: either that swap waits for this call (counted before this
    // load), or this load sees the new walker.
    let walker = WALKER.load(Ordering::SeqCst);
    if !walker.is_null() {
        // SAFETY: published by `install`, freed by `uninstall` only after every counted call
        // (this one included: see `capture`'s caller) has finished.
        let walker = unsafe { &*walker };
        // Threads numbered in turn prefer different cache slots.
        if let Some(depth) = walker.walk_here(crate::in_flight::thread_number(), ips) {
            return depth;
        }
    }
    FALLBACK_WALKS.fetch_add(1, Ordering::Relaxed);
    onsite_core::stack_walk::libgcc_walk(ips)
}

/// Builds the walker for a capture and publishes it. Called on the control thread before the
/// allocator starts sampling (it allocates).
pub(crate) fn install() {
    FALLBACK_WALKS.store(0, Ordering::Relaxed);
    let walker = Box::new(Walker::new(CACHE_SLOTS));
    tracing::debug!(modules = walker.modules(), "onsite: memory stack walker registered the loaded objects");
    let old = WALKER.swap(Box::into_raw(walker), Ordering::AcqRel);
    if !old.is_null() {
        // SAFETY: came from `Box::into_raw` here; no capture runs, so nobody uses it.
        drop(unsafe { Box::from_raw(old) });
    }
}

/// Replaces the running walker with one built now, while sampling goes on (always-on
/// sampling, at each capture's start): code loaded since the last build is walked by the
/// caching walker again, and objects unloaded since are no longer pinned. The old walker is
/// freed once no counted call is left, since only counted calls can still hold it: a call
/// counted after the swap loads the new one.
pub(crate) fn refresh() {
    let walker = Box::new(Walker::new(CACHE_SLOTS));
    let old = WALKER.swap(Box::into_raw(walker), Ordering::SeqCst);
    crate::in_flight::wait_until_none();
    if !old.is_null() {
        // SAFETY: came from `Box::into_raw`; every call that could have loaded it has finished.
        drop(unsafe { Box::from_raw(old) });
    }
}

/// Takes the walker down. Called after the stop waited for every sample in progress.
pub(crate) fn uninstall() {
    let old = WALKER.swap(std::ptr::null_mut(), Ordering::AcqRel);
    if !old.is_null() {
        // SAFETY: came from `Box::into_raw` in `install`; the stop has waited for every counted
        // call, and only those use the walker.
        drop(unsafe { Box::from_raw(old) });
    }
}
