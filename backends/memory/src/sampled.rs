//! The sampled mode: Go's `MemProfileRate` scheme, inside the global allocator.
//!
//! - **Which allocations**: each thread counts down a byte budget drawn from an exponential
//!   distribution (mean `sample_bytes`); the allocation that exhausts it is sampled and a new
//!   budget is drawn. Bytes are thus sampled as a Poisson process, and an allocation of `s`
//!   bytes is sampled with probability `1 - exp(-s / mean)`, which is what the writer scales
//!   back by (Go's `scaleHeapSample`).
//! - **The common allocation** costs two thread-locals and two compares: the mode word of the
//!   capture this thread's budget belongs to (compared with the word the allocator has in a
//!   register already; it carries the capture's generation, and no other mode's word ever
//!   matches, so the allocator needs no separate "is this a sampled capture" test), and the
//!   budget, from which the size is subtracted unless that would borrow. Anything else
//!   (exhausted, the thread's first allocation in this capture, or its first ever) takes the
//!   out-of-line path. A thread's first allocation in a capture draws a fresh budget there:
//!   none of its bytes in this capture have been counted yet, so that is exactly where its
//!   Poisson process starts (whatever mean the previous capture used). The cells are
//!   const-initialised and have no destructor: no lazy registration, usable from the
//!   allocator at any point of a thread's life.
//! - **Stacks**: only sampled allocations walk the stack (`stack_walk`: onsite-core's
//!   lock-free caching walker, libgcc's through `backtrace` as the fallback; raw return
//!   addresses into a buffer on the stack); they are symbolised when the file is written. A
//!   per-thread `busy` flag keeps anything the walk allocates from being sampled (no recursion
//!   into the sampler).
//! - **Tables** are fixed-size statics of atomics (no allocation, no lock in the
//!   allocator): `SITES` (onsite-core's `StackTable`: one entry per distinct stack; its
//!   counts beside it in `SITE_COUNTS`) and `LIVE_ADDRESS` / `LIVE_BLOCK` (address → site
//!   and size of each sampled block still live). A free must know whether its block was
//!   sampled: `FILTER` counts the live sampled blocks per address class (bits 8..28 of the
//!   address: 256-byte granules, addresses 256 MiB apart share a class), so the common free
//!   (a block never sampled, or allocated before the capture) costs a shift, a mask and one
//!   byte load, and nothing else. The class is taken straight from the address rather than
//!   hashed: blocks a thread frees are near each other in its heap, so the bytes their
//!   frees read are too (one cache line of the filter covers 16 KiB of heap), and stay in
//!   L1; a hashed index spread them over the whole filter and missed L1 on a third of all
//!   frees. The filter is large (1 Mi classes) so that a big sampled heap marks few of
//!   them: with 2,000 live sampled blocks a free meets a marked class 0.2% of the time.
//!   Only the pages around the heap's hot parts are ever touched. A free whose class holds
//!   entries first looks for its address without writing anything; only a block that really
//!   was sampled takes the counted (`in_flight`) path that updates the tables. The free reads
//!   no mode before the filter: a dhat capture marks every class (`mark_every_class`), so the
//!   same byte sends every free on to dhat then, and every other mode finds the classes of
//!   the blocks the last sampled capture left live, or none.
//! - **Full tables** never block or allocate, and never make a wrong profile: a sample whose
//!   stack finds `SITES` full is counted and its block tracked under the `STACK_NOT_KEPT` index
//!   (written as one named pseudo-frame); one the live table cannot hold is counted in
//!   `UNTRACKED` (written as another, `alloc_*` only). Both are logged and said in comments.
//! - **Stop**: the mode goes to `DRAINING` (everything to the inner allocator, and no other capture can
//!   start), then the stop waits for calls already inside the tables (counted in `in_flight`,
//!   only on the rare paths: a sample, or the free of a sampled block). After that the tables
//!   are quiet; they are read and the file written, then the walker goes and the mode is
//!   `OFF`. The tables are cleared at the next start.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use onsite_core::own_work;
use onsite_core::pprof::pseudo_frame;
use onsite_core::{CaptureError, CaptureOutput, ProfileKind, StackTable, Stopper};

use crate::registry::mode_word;
use crate::{heap_pprof, in_flight, mode, stack_walk};

/// Frames kept per sample (the allocator's own leaf frames included, dropped when written).
const MAX_DEPTH: usize = 64;
/// Distinct stacks per capture.
const SITE_SLOTS: usize = 1 << 12;
/// Sampled blocks live at once (at the default mean, 32 GiB of live sampled memory).
const LIVE_SLOTS: usize = 1 << 16;
const LIVE_BITS: u32 = LIVE_SLOTS.trailing_zeros();
/// Address classes of `FILTER`: bits `FILTER_GRANULE_BITS..+FILTER_BITS` of an address. A
/// class counts at most 255 live sampled blocks; a sample that would pass that is dropped
/// (counted like one that finds a table full), so a counter never wraps.
const FILTER_GRANULE_BITS: u32 = 8;
const FILTER_BITS: u32 = 20;
const FILTER_SLOTS: usize = 1 << FILTER_BITS;
/// How far a lookup walks from a home slot before giving up.
const PROBE_LIMIT: usize = 32;
/// Generations fit in the 24 bits above the mode byte of the mode word.
const GENERATION_MAX: u32 = (1 << 24) - 1;
/// The largest mean interval (budgets are drawn up to ~40 means).
pub(crate) const MAX_MEAN_BYTES: u64 = 1 << 40;

const EMPTY: usize = 0;
const TOMBSTONE: usize = 1;
/// A live-table slot an insert has claimed and not yet published: its `LIVE_BLOCK` is being
/// written, so a reader skips it (the address is stored last, see `insert_live`).
const CLAIMED: usize = 2;
/// The `SITE_COUNTS` index (and live-table site) of sampled blocks whose stack found no room in
/// `SITES`: still counted and tracked until freed, under one named pseudo-frame.
const STACK_NOT_KEPT: usize = SITE_SLOTS;

/// What was sampled at one stack of `SITES` (by the same index).
struct SiteCounts {
    alloc_count: AtomicU64,
    alloc_bytes: AtomicU64,
}

impl SiteCounts {
    const fn new() -> Self {
        SiteCounts { alloc_count: AtomicU64::new(0), alloc_bytes: AtomicU64::new(0) }
    }

    fn add(&self, bytes: u64) {
        self.alloc_count.fetch_add(1, Ordering::Relaxed);
        self.alloc_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn read(&self) -> (u64, u64) {
        (self.alloc_count.load(Ordering::Relaxed), self.alloc_bytes.load(Ordering::Relaxed))
    }

    fn reset(&self) {
        self.alloc_count.store(0, Ordering::Relaxed);
        self.alloc_bytes.store(0, Ordering::Relaxed);
    }
}

/// The distinct stacks of sampled allocations (a lookup gives up after `PROBE_LIMIT`
/// entries, so a full table costs a sample little), and what each allocated.
static SITES: StackTable<SITE_SLOTS, MAX_DEPTH> = StackTable::new(PROBE_LIMIT);
/// One more than `SITES` has entries: the last is `STACK_NOT_KEPT`'s.
static SITE_COUNTS: [SiteCounts; SITE_SLOTS + 1] = [const { SiteCounts::new() }; SITE_SLOTS + 1];
/// Each live sampled block's address, or `EMPTY` / `TOMBSTONE`. Kept apart from `LIVE_BLOCK`
/// so a lookup reads 8 candidate addresses per cache line.
static LIVE_ADDRESS: [AtomicUsize; LIVE_SLOTS] = [const { AtomicUsize::new(EMPTY) }; LIVE_SLOTS];
/// The same slot's `size << 16 | site index`.
static LIVE_BLOCK: [AtomicU64; LIVE_SLOTS] = [const { AtomicU64::new(0) }; LIVE_SLOTS];
static FILTER: [AtomicU8; FILTER_SLOTS] = [const { AtomicU8::new(0) }; FILTER_SLOTS];

/// Mean sampling interval in bytes, for the running capture.
static MEAN_BYTES: AtomicU64 = AtomicU64::new(crate::DEFAULT_SAMPLE_BYTES);
/// The last capture's generation (1..=GENERATION_MAX).
static GENERATION: AtomicU32 = AtomicU32::new(0);
/// Sampled allocations the live table had no room for (its probe sequence full, or their
/// filter class at 255): counted here, and never tracked, so in-use cannot include them.
static UNTRACKED: SiteCounts = SiteCounts::new();
/// Sampled blocks that left the live table on a realloc that then failed and found no room to
/// go back: still live, no longer counted in use.
static UNTRACKED_LIVE: AtomicU64 = AtomicU64::new(0);
/// Whether the tables hold a previous capture's data.
static DIRTY: AtomicBool = AtomicBool::new(false);
/// Whether every filter class was marked (by a dhat capture, see [`mark_every_class`]), so
/// that clearing the tables must clear the whole filter.
static EVERY_CLASS_MARKED: AtomicBool = AtomicBool::new(false);

/// A thread's `word` before its first sampled allocation: its mode byte (0xff) is no mode's,
/// so no mode word, `OFF` included, matches it.
const NO_CAPTURE: u32 = u32::MAX;

/// Per-thread sampling state (see the module docs).
struct ThreadSampler {
    /// The mode word of the capture `budget` counts for; `NO_CAPTURE` (no mode's word) at first.
    word: Cell<u32>,
    /// Bytes left before the next sample.
    budget: Cell<u64>,
    rng: Cell<u64>,
    busy: Cell<bool>,
}

impl ThreadSampler {
    const fn new() -> Self {
        ThreadSampler { word: Cell::new(NO_CAPTURE), budget: Cell::new(0), rng: Cell::new(0), busy: Cell::new(false) }
    }
}

thread_local! {
    static THREAD: ThreadSampler = const { ThreadSampler::new() };
}

/// Starts a sampled capture over the global allocator's `inner` allocator; the caller has
/// claimed the mode (it is `PROBE`). The mean is limited to `1..=MAX_MEAN_BYTES`.
pub(crate) fn start(mean_bytes: u64, inner: &'static crate::Inner) -> SampledStopper {
    let started = SystemTime::now();
    let clock = Instant::now();
    let mean_bytes = begin(mean_bytes);
    SampledStopper { mean_bytes, inner, started, clock, sampling: true, released: false, fork: crate::ForkGuard::new() }
}

/// Empties the tables and starts sampling (the mode word goes to a new sampled generation);
/// the caller has claimed the mode (it is `PROBE`). Returns the mean used, limited to
/// `1..=MAX_MEAN_BYTES`. Shared by a capture and by always-on sampling.
pub(crate) fn begin(mean_bytes: u64) -> u64 {
    let mean_bytes = mean_bytes.clamp(1, MAX_MEAN_BYTES);
    if DIRTY.swap(false, Ordering::SeqCst) {
        clear_tables();
    }
    MEAN_BYTES.store(mean_bytes, Ordering::Relaxed);
    let generation = GENERATION.load(Ordering::Relaxed) % GENERATION_MAX + 1;
    GENERATION.store(generation, Ordering::Relaxed);
    // Before the mode word: a thread that samples must find the walker (it allocates, too).
    stack_walk::install();
    // SeqCst: a thread that sees this word also sees the mean and the cleared tables.
    mode_word().store(word_of(generation), Ordering::SeqCst);
    mean_bytes
}

/// Ends sampling: the mode goes to `DRAINING`, not `OFF` (every call goes to the inner allocator, and no
/// other capture can claim the allocator and clear the tables while they are read), then
/// waits until no call is left inside the tables.
pub(crate) fn end() {
    mode_word().store(mode::DRAINING, Ordering::SeqCst);
    in_flight::wait_until_none();
}

/// After the tables were read: the walker goes (and with it the pins that kept every object
/// the stacks point into loaded while they were symbolised), and the allocator is free for the
/// next capture, which clears the tables.
pub(crate) fn release() {
    stack_walk::uninstall();
    DIRTY.store(true, Ordering::SeqCst);
    mode_word().store(mode::OFF, Ordering::SeqCst);
}

/// The mode word of the sampled capture with `generation`.
const fn word_of(generation: u32) -> u32 {
    mode::SAMPLED | generation << 8
}

/// Resets every table. Only called while no capture runs and nothing is in flight.
///
/// Only what a capture wrote is cleared, so the pages of the tables no capture touched stay
/// untouched (and not resident): the sites that were claimed, and the filter classes of the
/// blocks still in the live table (the filter counts exactly those).
fn clear_tables() {
    if EVERY_CLASS_MARKED.swap(false, Ordering::Relaxed) {
        for class in &FILTER {
            class.store(0, Ordering::Relaxed);
        }
    }
    SITES.clear(|site| SITE_COUNTS[site].reset());
    SITE_COUNTS[STACK_NOT_KEPT].reset();
    UNTRACKED.reset();
    UNTRACKED_LIVE.store(0, Ordering::Relaxed);
    for address in LIVE_ADDRESS.iter().filter(|address| address.load(Ordering::Relaxed) != EMPTY) {
        match address.swap(EMPTY, Ordering::Relaxed) {
            EMPTY | TOMBSTONE | CLAIMED => {}
            live => FILTER[filter_class(live)].store(0, Ordering::Relaxed),
        }
    }
}

/// The common case of every allocation while a capture runs: counts `size` bytes off this
/// thread's budget and returns `true` if that is all there is to do. `false` (budget
/// exhausted, the thread's budget is from another capture, or `word` is not a sampled
/// capture's) sends the caller to [`alloc_past_budget`] / [`realloc_past_budget`] (or to the
/// other modes' paths), with the budget untouched. Reads only while not sampling.
#[inline(always)]
pub(crate) fn count_down(word: u32, size: usize) -> bool {
    THREAD.with(|t| {
        if t.word.get() != word {
            return false;
        }
        match t.budget.get().checked_sub(size as u64) {
            Some(left) => {
                t.budget.set(left);
                true
            }
            None => false,
        }
    })
}

/// An allocation [`count_down`] did not settle: maybe sampled. The block comes from `inner`.
///
/// # Safety
/// As `GlobalAlloc::alloc`.
#[inline(never)]
pub(crate) unsafe fn alloc_past_budget<A: GlobalAlloc>(inner: &A, word: u32, layout: Layout, zeroed: bool) -> *mut u8 {
    let sampled = take_sample(word, layout.size());
    // SAFETY: forwarded as received.
    let ptr = unsafe { crate::routed::inner_alloc(inner, layout, zeroed) };
    if sampled {
        if !ptr.is_null() {
            record(word, ptr as usize, layout.size());
        }
        THREAD.with(|t| t.busy.set(false));
    }
    ptr
}

/// A realloc [`count_down`] did not settle (the old block is already forgotten): maybe sampled.
/// `inner`'s own `realloc` moves or grows the block.
///
/// # Safety
/// As `GlobalAlloc::realloc`.
#[inline(never)]
pub(crate) unsafe fn realloc_past_budget<A: GlobalAlloc>(
    inner: &A,
    word: u32,
    ptr: *mut u8,
    layout: Layout,
    new_size: usize,
    forgotten: Option<Forgotten>,
) -> *mut u8 {
    let sampled = take_sample(word, new_size);
    // SAFETY: forwarded as received.
    let new = unsafe { inner.realloc(ptr, layout, new_size) };
    if new.is_null() {
        if let Some(forgotten) = forgotten {
            restore(ptr, forgotten);
        }
    } else if sampled {
        record(word, new as usize, new_size);
    }
    if sampled {
        THREAD.with(|t| t.busy.set(false));
    }
    new
}

/// Decides about an allocation of `size` bytes that [`count_down`] did not settle, and sets
/// this thread's budget for what follows. On `true` the caller records the block and then
/// clears `busy`.
fn take_sample(word: u32, size: usize) -> bool {
    // `word` came from a relaxed load; this pairs with the SeqCst store of it in `start`, so
    // the mean read for `next_budget` is this capture's.
    std::sync::atomic::fence(Ordering::Acquire);
    let size = size as u64;
    THREAD.with(|t| {
        if t.word.get() != word {
            // This thread's first allocation in this capture: its count starts here.
            t.word.set(word);
            let budget = next_budget(t, MEAN_BYTES.load(Ordering::Relaxed));
            if size <= budget {
                t.budget.set(budget - size);
                return false;
            }
        }
        // Past the budget: sampled. Go discards the overshoot too: the next point of a
        // Poisson process is an exponential distance away wherever one starts counting.
        t.budget.set(next_budget(t, MEAN_BYTES.load(Ordering::Relaxed)));
        if t.busy.get() || own_work::is_own_work() {
            // An allocation made while recording a sample (the stack walker's), or by onsite's
            // own threads and work: not the program's (and recording the walker's would
            // re-enter the sampler).
            return false;
        }
        t.busy.set(true);
        true
    })
}

/// Called for every free (and the old block of every realloc) in every mode but `OFF`, before
/// the block goes back to the inner allocator: whether its filter class is marked, because it
/// holds live sampled blocks (only then can the block be one of them, and [`forget`] must look)
/// or because a dhat capture marked them all (every free must reach dhat then).
#[inline(always)]
pub(crate) fn may_be_sampled(ptr: *mut u8) -> bool {
    FILTER[filter_class(ptr as usize)].load(Ordering::Relaxed) != 0
}

/// Marks every filter class, for a dhat capture: the free's filter check then sends every free
/// on to the path that asks the mode, as dhat needs. Called before the dhat capture begins
/// (the mode is `PROBE`, so no sampled capture reads or writes the filter); the next sampled
/// start clears the whole filter (which then stays resident: 1 MiB).
pub(crate) fn mark_every_class() {
    for class in &FILTER {
        class.store(u8::MAX, Ordering::Relaxed);
    }
    EVERY_CLASS_MARKED.store(true, Ordering::Relaxed);
    DIRTY.store(true, Ordering::SeqCst);
}

/// A sampled block's live-table entry (`size << 16 | site`), taken out by [`forget`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Forgotten(u64);

/// Puts back the entry of a block whose realloc failed (so it was not freed after all).
#[cold]
#[inline(never)]
pub(crate) fn restore(ptr: *mut u8, forgotten: Forgotten) {
    let Some(_entered) = in_flight::enter(|word| mode::of(word) == mode::SAMPLED) else { return };
    let Forgotten(block) = forgotten;
    if !insert_live(ptr as usize, (block & 0xffff) as u32, block >> 16) {
        UNTRACKED_LIVE.fetch_add(1, Ordering::Relaxed);
    }
}

/// The slot of the live table holding `address`, if any. Reads only.
#[inline(always)]
fn find_live(address: usize, home: usize) -> Option<usize> {
    for step in 0..PROBE_LIMIT {
        let index = (home + step) & (LIVE_SLOTS - 1);
        match LIVE_ADDRESS[index].load(Ordering::Acquire) {
            EMPTY => return None,
            found if found == address => return Some(index),
            _ => {}
        }
    }
    None
}

/// A free whose filter class holds live sampled blocks ([`may_be_sampled`]): takes the block
/// out of the live table if it is there, and returns its entry (a realloc that fails puts it
/// back: the old block is then still the caller's). Most such blocks were not sampled (they
/// only share the class), so the first look writes nothing and counts nothing; the freeing
/// thread owns the block, so nobody else can add or remove its address meanwhile.
#[cold]
#[inline(never)]
pub(crate) fn forget(ptr: *mut u8) -> Option<Forgotten> {
    let address = ptr as usize;
    let home = home_slot(address);
    find_live(address, home)?;
    // A block sampled in an earlier capture that is still in the tables is forgotten too:
    // it is not live any more, whichever capture reads the tables.
    let _entered = in_flight::enter(|word| mode::of(word) == mode::SAMPLED)?;
    // Looked up again once counted: the tables may have been cleared for a new capture
    // between the first look and `enter`. What was freed needs no count of its own: the
    // writer takes "in use" from the blocks still in the live table.
    let index = find_live(address, home)?;
    let block = LIVE_BLOCK[index].load(Ordering::Relaxed);
    LIVE_ADDRESS[index].store(TOMBSTONE, Ordering::Release);
    FILTER[filter_class(address)].fetch_sub(1, Ordering::Relaxed);
    Some(Forgotten(block))
}

/// Records one sampled block: its stack (into `SITES`) and itself (into the live table).
/// Inlined into its two callers so the stack walk starts one frame from the service's code
/// (see `stack_walk::capture`).
#[inline(always)]
fn record(word: u32, address: usize, size: usize) {
    // Only into the capture whose budget decided this sample: if that capture ended since
    // (and another began), its mean and its tables are not this one's.
    let Some(_entered) = in_flight::enter(|current| current == word) else { return };
    let mut ips = [0usize; MAX_DEPTH];
    let depth = stack_walk::capture(&mut ips);
    // A stack with no room in `SITES` still counts, and its block is still tracked until it
    // is freed: only the stack is lost, under a pseudo-frame that says so.
    let site = SITES.intern(&ips[..depth]).unwrap_or(STACK_NOT_KEPT);
    if insert_live(address, site as u32, size as u64) {
        SITE_COUNTS[site].add(size as u64);
    } else {
        UNTRACKED.add(size as u64);
    }
}

fn insert_live(address: usize, site: u32, size: u64) -> bool {
    const { assert!(STACK_NOT_KEPT < 1 << 16) };
    // Counted in the filter first, so the counter can refuse (never wrap) before anything is
    // published; a free of this block cannot run before the allocation returns.
    let class = &FILTER[filter_class(address)];
    if class.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1)).is_err() {
        return false;
    }
    let home = home_slot(address);
    for step in 0..PROBE_LIMIT {
        let index = (home + step) & (LIVE_SLOTS - 1);
        let slot = &LIVE_ADDRESS[index];
        let found = slot.load(Ordering::Relaxed);
        if (found == EMPTY || found == TOMBSTONE)
            && slot.compare_exchange(found, CLAIMED, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            // The block, then the address: a reader of the tables while sampling runs
            // (always-on) that sees the address sees this block with it (see `read_live`).
            LIVE_BLOCK[index].store(size << 16 | u64::from(site), Ordering::Release);
            slot.store(address, Ordering::Release);
            return true;
        }
    }
    class.fetch_sub(1, Ordering::Relaxed);
    false
}

/// The `FILTER` counter of `address`.
#[inline(always)]
fn filter_class(address: usize) -> usize {
    (address >> FILTER_GRANULE_BITS) & (FILTER_SLOTS - 1)
}

#[inline(always)]
fn home_slot(address: usize) -> usize {
    ((address as u64 >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - LIVE_BITS)) as usize
}

/// A fresh exponential budget with the capture's mean; 0 (every allocation sampled, exact
/// counts, like Go's `MemProfileRate = 1`) when the mean is 1.
fn next_budget(t: &ThreadSampler, mean: u64) -> u64 {
    if mean <= 1 {
        return 0;
    }
    let mut x = t.rng.get();
    if x == 0 {
        // Seed from the thread's own thread-local address and the generation: distinct per
        // thread, no system call.
        x = (t as *const ThreadSampler as u64) ^ 0x9e37_79b9_7f4a_7c15 ^ u64::from(GENERATION.load(Ordering::Relaxed));
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
    }
    // xorshift64*
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    t.rng.set(x);
    let bits = x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11; // 53 random bits
    let uniform = (bits as f64 + 0.5) / (1u64 << 53) as f64; // in (0, 1)
    // At most ~37 means (`uniform` is at least 2^-54), so no overflow up to `MAX_MEAN_BYTES`.
    // Rounded down: an allocation of `s` bytes then exhausts the budget (is sampled) with
    // probability exactly `1 - exp(-s / mean)` for whole `s`, what `scale` assumes.
    ((-uniform.ln()) * mean as f64) as u64
}

/// Go's `scaleHeapSample`: from sampled counts to an estimate of what was really allocated,
/// assuming the site's sampled blocks all had its average size.
fn scale(count: u64, bytes: u64, mean: u64) -> (i64, i64) {
    if count == 0 || bytes == 0 {
        return (0, 0);
    }
    if mean <= 1 {
        return (count as i64, bytes as i64);
    }
    let average = bytes as f64 / count as f64;
    let factor = 1.0 / (1.0 - (-average / mean as f64).exp());
    ((count as f64 * factor) as i64, (bytes as f64 * factor) as i64)
}

/// A running sampled capture.
#[derive(Debug)]
pub(crate) struct SampledStopper {
    mean_bytes: u64,
    inner: &'static crate::Inner,
    started: SystemTime,
    clock: Instant,
    sampling: bool,
    released: bool,
    fork: crate::ForkGuard,
}

impl SampledStopper {
    fn end_sampling(&mut self) {
        if self.sampling && !self.fork.in_forked_child() {
            self.sampling = false;
            end();
        }
    }

    fn release(&mut self) {
        if !self.released && !self.fork.in_forked_child() {
            self.end_sampling();
            self.released = true;
            release();
        }
    }
}

impl Drop for SampledStopper {
    fn drop(&mut self) {
        self.release();
    }
}

impl Stopper for SampledStopper {
    fn stop(mut self: Box<Self>, out: &CaptureOutput) -> Result<(), CaptureError> {
        if self.fork.in_forked_child() {
            return Err(forked_child_error());
        }
        self.end_sampling();
        let window = Window {
            mean_bytes: self.mean_bytes,
            inner: self.inner,
            started: self.started,
            duration: self.clock.elapsed(),
            baseline: &Baseline::zero(),
            always_on_for: None,
        };
        let written = write_profile(out, &window);
        self.release();
        written
    }
}

/// The pseudo-frame of sampled blocks whose stack found no room in the stack table.
pub(crate) const STACK_TABLE_FULL_FRAME: &str = "[stack not kept: stack table full]";
/// The pseudo-frame of sampled allocations the live-block table had no room for.
pub(crate) const LIVE_TABLE_FULL_FRAME: &str = "[samples lost: live-block table full]";

/// The counters a capture's `alloc_*` count from: zero for a capture that cleared the tables
/// at its start, a snapshot taken at its start for one taken while always-on sampling runs.
#[derive(Debug)]
pub(crate) struct Baseline {
    /// Per `SITE_COUNTS` index (empty: all zero).
    sites: Vec<(u64, u64)>,
    untracked: (u64, u64),
    untracked_live: u64,
    fallback_walks: u64,
}

impl Baseline {
    pub(crate) fn zero() -> Baseline {
        Baseline { sites: Vec::new(), untracked: (0, 0), untracked_live: 0, fallback_walks: 0 }
    }

    /// The counters now (on the control thread: this allocates, unsampled).
    pub(crate) fn now() -> Baseline {
        Baseline {
            sites: SITE_COUNTS.iter().map(SiteCounts::read).collect(),
            untracked: UNTRACKED.read(),
            untracked_live: UNTRACKED_LIVE.load(Ordering::Relaxed),
            fallback_walks: stack_walk::fallback_walks(),
        }
    }

    /// What `counts` (at `SITE_COUNTS[site]`) added since the baseline.
    fn since(&self, site: usize, counts: &SiteCounts) -> (u64, u64) {
        let (count, bytes) = counts.read();
        let (count_before, bytes_before) = self.sites.get(site).copied().unwrap_or((0, 0));
        (count.saturating_sub(count_before), bytes.saturating_sub(bytes_before))
    }
}

/// What one heap profile covers.
#[derive(Debug)]
pub(crate) struct Window<'a> {
    pub(crate) mean_bytes: u64,
    /// The inner allocator the global [`crate::Allocator`] hands its calls to.
    pub(crate) inner: &'static crate::Inner,
    pub(crate) started: SystemTime,
    pub(crate) duration: std::time::Duration,
    pub(crate) baseline: &'a Baseline,
    /// How long always-on sampling had run when the capture ended; `None` for a capture that
    /// sampled only its own window.
    pub(crate) always_on_for: Option<std::time::Duration>,
}

/// The sampled blocks in the live table, as (count, bytes) per `SITE_COUNTS` index, and how
/// many slots they take. Correct while samples and frees go on (always-on): a slot's block
/// is read between two reads of its address (see `insert_live`), and kept only if the
/// address did not change meanwhile.
fn read_live() -> (Vec<(u64, u64)>, usize) {
    let mut live = vec![(0u64, 0u64); SITE_SLOTS + 1];
    let mut used = 0;
    for (address, block) in LIVE_ADDRESS.iter().zip(&LIVE_BLOCK) {
        let seen = address.load(Ordering::Acquire);
        if matches!(seen, EMPTY | TOMBSTONE | CLAIMED) {
            continue;
        }
        let block = block.load(Ordering::Acquire);
        if address.load(Ordering::Relaxed) != seen {
            continue; // Freed while read (and maybe reused): not this block's.
        }
        used += 1;
        if let Some((count, bytes)) = live.get_mut((block & 0xffff) as usize) {
            *count += 1;
            *bytes += block >> 16;
        }
    }
    (live, used)
}

/// Static memory the sampler's tables take, whatever the load (only the pages samples touch
/// become resident).
pub(crate) fn table_bytes() -> usize {
    std::mem::size_of_val(&SITES)
        + std::mem::size_of_val(&SITE_COUNTS)
        + std::mem::size_of_val(&LIVE_ADDRESS)
        + std::mem::size_of_val(&LIVE_BLOCK)
        + std::mem::size_of_val(&FILTER)
}

/// The table sizes, for the log and the profile's comments.
pub(crate) fn table_limits() -> String {
    format!("{SITE_SLOTS} stacks, {LIVE_SLOTS} live sampled blocks, {} KiB of static memory", table_bytes() / 1024)
}

/// Reads the tables into a heap profile and writes it. `inuse_*`: every sampled block in the
/// live table (for a capture that cleared the tables at its start, those it allocated);
/// `alloc_*`: what was sampled since `window.baseline`.
pub(crate) fn write_profile(out: &CaptureOutput, window: &Window<'_>) -> Result<(), CaptureError> {
    let mean = window.mean_bytes;
    let baseline = window.baseline;
    let mut builder = heap_pprof::builder(window.started, window.duration, mean as i64);
    match window.always_on_for {
        None => builder.comment(&format!(
            "onsite memory capture, mode sampled: one sample per {mean} bytes allocated on average, scaled; \
             alloc_* and inuse_* count the blocks allocated during the capture (inuse_*: those still live at its end)"
        )),
        Some(running) => builder.comment(&format!(
            "onsite memory capture, mode sampled, always on (for {:.0} s): one sample per {mean} bytes allocated \
             on average, scaled; inuse_* counts every sampled block live at the capture's end, whatever its age; \
             alloc_* counts the allocations made during the capture",
            running.as_secs_f64()
        )),
    }
    builder.comment(&format!("allocator: onsite_memory::Allocator over {}", window.inner.name()));
    let (live, live_slots) = read_live();
    let window_counts: Vec<(u64, u64)> =
        SITE_COUNTS.iter().enumerate().map(|(site, counts)| baseline.since(site, counts)).collect();
    let (untracked_now, untracked_bytes_now) = UNTRACKED.read();
    let untracked = untracked_now.saturating_sub(baseline.untracked.0);
    let untracked_bytes = untracked_bytes_now.saturating_sub(baseline.untracked.1);
    let untracked_live = UNTRACKED_LIVE.load(Ordering::Relaxed).saturating_sub(baseline.untracked_live);

    let samples: u64 = window_counts.iter().map(|&(count, _)| count).sum::<u64>() + untracked;
    let libgcc_walks = stack_walk::fallback_walks().saturating_sub(baseline.fallback_walks).min(samples);
    builder.comment(&format!(
        "stacks walked: {} by the caching unwinder, {libgcc_walks} by libgcc's",
        samples - libgcc_walks
    ));
    let stacks_used = SITE_COUNTS[..SITE_SLOTS].iter().filter(|counts| counts.read().0 > 0).count();
    builder.comment(&format!(
        "sampler tables (fixed: {}): {stacks_used} stacks and {live_slots} live sampled blocks in use",
        table_limits()
    ));
    tracing::debug!(stacks_used, live_slots, limits = %table_limits(), "onsite: memory sampler tables");

    for site in 0..SITE_SLOTS {
        let (allocs, alloc_bytes) = window_counts[site];
        let (live_count, live_bytes) = live[site];
        if allocs == 0 && live_count == 0 {
            continue;
        }
        let Some(ips) = SITES.get(site) else { continue };
        let (alloc_objects, alloc_space) = scale(allocs, alloc_bytes, mean);
        let (inuse_objects, inuse_space) = scale(live_count, live_bytes, mean);
        builder.add_addresses(&ips, &[alloc_objects, alloc_space, inuse_objects, inuse_space], &[]);
    }
    let (not_kept, not_kept_bytes) = window_counts[STACK_NOT_KEPT];
    let (not_kept_live, not_kept_live_bytes) = live[STACK_NOT_KEPT];
    if not_kept > 0 || not_kept_live > 0 {
        let (alloc_objects, alloc_space) = scale(not_kept, not_kept_bytes, mean);
        let (inuse_objects, inuse_space) = scale(not_kept_live, not_kept_live_bytes, mean);
        let frame = [vec![pseudo_frame(STACK_TABLE_FULL_FRAME)]];
        builder.add_frames(&frame, &[alloc_objects, alloc_space, inuse_objects, inuse_space], &[]);
        tracing::warn!(
            samples = not_kept,
            live = not_kept_live,
            "onsite: memory samples whose stack found no room in the sampler's stack table are counted under {STACK_TABLE_FULL_FRAME}"
        );
        builder.comment(&format!(
            "{not_kept} samples of this capture and {not_kept_live} live sampled blocks have no stack (the stack table \
             was full): counted, in use included, under {STACK_TABLE_FULL_FRAME}"
        ));
    }
    if untracked > 0 || untracked_live > 0 {
        let (alloc_objects, alloc_space) = scale(untracked, untracked_bytes, mean);
        let frame = [vec![pseudo_frame(LIVE_TABLE_FULL_FRAME)]];
        builder.add_frames(&frame, &[alloc_objects, alloc_space, 0, 0], &[]);
        tracing::warn!(
            samples = untracked,
            "onsite: memory samples found no room in the sampler's live-block table: in-use is short of them"
        );
        builder.comment(&format!(
            "{untracked} samples ({alloc_space} bytes, scaled) found no room in the live-block table, and {untracked_live} \
             live sampled blocks lost their place in it: alloc_* counts the samples under {LIVE_TABLE_FULL_FRAME}, \
             inuse_* cannot (it is short of whichever of them are still live)"
        ));
    }
    out.write(ProfileKind::Memory, "pprof", |w| builder.write_gzip(w)).map(|_| ())
}

/// What a forked child's copy of a capture's stopper says (it writes nothing).
pub(crate) fn forked_child_error() -> CaptureError {
    CaptureError::new(ProfileKind::Memory, "this process is a fork's child: the memory capture is its parent's")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_matches_go() {
        // Go: scaleHeapSample(1, 4096, 524288) -> scale 1/(1-e^(-1/128)) ~ 128.5
        let (objects, bytes) = scale(1, 4096, 512 * 1024);
        assert_eq!(objects, 128);
        assert!((526_000..=526_700).contains(&bytes), "{bytes}");
        assert_eq!(scale(3, 300, 1), (3, 300));
        assert_eq!(scale(0, 0, 512), (0, 0));
    }

    #[test]
    fn the_countdown_runs_out_into_the_slow_path_and_a_new_capture_starts_fresh() {
        let word = word_of(7);
        let budget = || THREAD.with(|t| (t.word.get(), t.budget.get()));
        let set = |owner: u32, left: u64| {
            THREAD.with(|t| {
                t.word.set(owner);
                t.budget.set(left);
            })
        };
        // A thread that never sampled matches no mode's word, `OFF` included; and other modes'
        // words never match a thread's budget, whatever it holds.
        for other in [mode::OFF, mode::PROBE, mode::DHAT, mode::DRAINING] {
            set(ThreadSampler::new().word.get(), 1000);
            assert!(!count_down(other, 1));
            set(word, 1000);
            assert!(!count_down(other, 1));
        }
        // This thread's budget is from generation 6: the fast path does not settle it.
        set(word_of(6), 1000);
        assert!(!count_down(word, 1));
        if take_sample(word, 1) {
            THREAD.with(|t| t.busy.set(false)); // a fresh budget under 1 byte: sampled at once
        }
        assert_eq!(budget().0, word);
        // The fast path counts the budget down to 0 exactly...
        let left = budget().1;
        assert!(count_down(word, left as usize));
        assert_eq!(budget(), (word, 0));
        // ...and one byte more would borrow: slow path, budget untouched.
        assert!(!count_down(word, 1));
        assert_eq!(budget(), (word, 0));
        // So does any allocation larger than the budget, however large.
        set(word, 1 << 40);
        assert!(!count_down(word, isize::MAX as usize));
        assert_eq!(budget(), (word, 1 << 40));
        // The slow path samples past the budget and draws the next one in the same capture.
        set(word, 0);
        assert!(take_sample(word, 1));
        assert_eq!(budget().0, word);
        // While that sample is being recorded, nothing else is sampled (no recursion).
        set(word, 0);
        assert!(!take_sample(word, 1));
        THREAD.with(|t| t.busy.set(false));
        // Another capture's word: this thread's budget is stale there, whatever is left of it.
        set(word, 1 << 40);
        assert!(!count_down(word_of(8), 1));
    }

    #[test]
    fn a_filter_class_refuses_its_256th_block_rather_than_wrap() {
        // Addresses one filter period apart share a class; none of these is dereferenced.
        let period = 1usize << (FILTER_GRANULE_BITS + FILTER_BITS);
        let address = |k: usize| 0x5000_0000_0000 + k * period;
        let class = &FILTER[filter_class(address(0))];
        for k in 0..255 {
            assert!(insert_live(address(k), 0, 64), "block {k}");
        }
        assert_eq!(class.load(Ordering::Relaxed), 255);
        // A wrapped counter would read 0 and hide all 256 blocks from their frees.
        assert!(!insert_live(address(255), 0, 64));
        assert_eq!(class.load(Ordering::Relaxed), 255);
        assert!(find_live(address(255), home_slot(address(255))).is_none());
        assert!(find_live(address(254), home_slot(address(254))).is_some());
        // Clearing for the next capture empties both the live table and the class.
        clear_tables();
        assert_eq!(class.load(Ordering::Relaxed), 0);
        assert!(find_live(address(0), home_slot(address(0))).is_none());
    }

    #[test]
    fn budgets_are_exponential_around_the_mean() {
        let t = ThreadSampler::new();
        let n = 20_000;
        let draws: Vec<u64> = (0..n).map(|_| next_budget(&t, 1000)).collect();
        let mean = draws.iter().sum::<u64>() as f64 / n as f64;
        assert!((950.0..1050.0).contains(&mean), "mean {mean}");
        // Exponential: about e^-1 of the draws exceed the mean.
        let above = draws.iter().filter(|&&d| d > 1000).count() as f64 / n as f64;
        assert!((0.34..0.40).contains(&above), "{above}");
    }
}
