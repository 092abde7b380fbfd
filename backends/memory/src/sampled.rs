//! The sampled mode: Go's `MemProfileRate` scheme, inside the global allocator.
//!
//! - **Which allocations**: each thread counts down a byte budget drawn from an exponential
//!   distribution (mean `sample_bytes`); the allocation that exhausts it is sampled and a new
//!   budget is drawn. Bytes are thus sampled as a Poisson process, and an allocation of `s`
//!   bytes is sampled with probability `1 - exp(-s / mean)`, which is what the writer scales
//!   back by (Go's `scaleHeapSample`).
//! - **The common allocation** costs one thread-local word and one branch: the word holds the
//!   capture's generation above the budget (`generation << 40 | budget`), and the `MODE` word
//!   the allocator already loaded carries the running capture's generation. Subtracting the
//!   size borrows into the generation bits exactly when the budget runs out, so "same
//!   generation after the subtraction" means both "this thread's budget belongs to this
//!   capture" and "not yet exhausted". Anything else (exhausted, or the thread's first
//!   allocation in this capture, or its first ever) takes the out-of-line path. A thread's
//!   first allocation in a capture draws a fresh budget there: none of its bytes in this
//!   capture have been counted yet, so that is exactly where its Poisson process starts
//!   (whatever mean the previous capture used). The cells are const-initialised and have no
//!   destructor: no lazy registration, usable from the allocator at any point of a thread's
//!   life.
//! - **Stacks**: only sampled allocations walk the stack (`stack_walk`: framehop's caching
//!   unwinder on x86_64 Linux, libgcc's through `backtrace` as the fallback; raw return
//!   addresses into a buffer on the stack); they are symbolised when the file is written. A
//!   per-thread `busy` flag keeps anything the walk allocates from being sampled (no recursion
//!   into the sampler).
//! - **Tables** are fixed-size statics of atomics (no allocation, no lock in the allocator):
//!   `SITES` (one per distinct stack, with its counts) and `LIVE_ADDRESS` / `LIVE_BLOCK`
//!   (address → site and size of each sampled block still live). A free must know whether its
//!   block was sampled: `FILTER` counts the live entries per group of 4 home slots of the live
//!   table, so the common free (a block never sampled, or allocated before the capture) costs
//!   a multiply and one load from a 16 KiB array, and nothing else. A free whose group holds
//!   entries first looks for its address without writing anything; only a block that really
//!   was sampled takes the counted (`IN_FLIGHT`) path that updates the tables.
//! - **Full tables** drop the sample (counted, logged and written as a profile comment) rather
//!   than block or allocate.
//! - **Stop**: the mode goes to `OFF`, then the stop waits for calls already inside the tables
//!   (counted in `IN_FLIGHT`, only on the rare paths: a sample, or the free of a sampled
//!   block). After that the tables are quiet and are read; they are cleared at the next start.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use onsite_core::{CaptureError, CaptureOutput, ProfileKind, Stopper};

use crate::{IN_FLIGHT, MODE, heap_pprof, mode, stack_walk};

/// Frames kept per sample (the allocator's own leaf frames included, dropped when written).
const MAX_DEPTH: usize = 64;
/// Distinct stacks per capture.
const SITE_SLOTS: usize = 1 << 12;
/// Sampled blocks live at once (at the default mean, 32 GiB of live sampled memory).
const LIVE_SLOTS: usize = 1 << 16;
const LIVE_BITS: u32 = LIVE_SLOTS.trailing_zeros();
/// Home slots of the live table per `FILTER` counter. With a probe limit of 32, at most
/// `4 + 31` entries share a counter, so a byte holds it; 16 KiB in all, so the check every free
/// makes mostly stays in L1.
const FILTER_GROUP_BITS: u32 = 2;
const FILTER_SLOTS: usize = LIVE_SLOTS >> FILTER_GROUP_BITS;
/// How far a lookup walks from a home slot before giving up.
const PROBE_LIMIT: usize = 32;
/// Bits of a thread's countdown word that hold its budget; the generation sits above them.
const BUDGET_BITS: u32 = 40;
const BUDGET_MAX: u64 = (1 << BUDGET_BITS) - 1;
/// Generations fit in the 24 bits above the mode byte of the `MODE` word (and above the budget
/// in the countdown word); 0 is never used, so a thread that never counted is always stale.
const GENERATION_MAX: u32 = (1 << 24) - 1;
/// The largest mean interval: budgets (up to ~40 means) must fit in `BUDGET_BITS`.
pub(crate) const MAX_MEAN_BYTES: u64 = 1 << 32;

const EMPTY: usize = 0;
const TOMBSTONE: usize = 1;

struct Site {
    /// The stack's hash, 0 while the slot is free.
    hash: AtomicU64,
    /// Set (Release) once `depth` and `ips` are written.
    ready: AtomicBool,
    depth: AtomicUsize,
    ips: [AtomicUsize; MAX_DEPTH],
    alloc_count: AtomicU64,
    alloc_bytes: AtomicU64,
    free_count: AtomicU64,
    free_bytes: AtomicU64,
}

impl Site {
    const fn new() -> Self {
        Site {
            hash: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            depth: AtomicUsize::new(0),
            ips: [const { AtomicUsize::new(0) }; MAX_DEPTH],
            alloc_count: AtomicU64::new(0),
            alloc_bytes: AtomicU64::new(0),
            free_count: AtomicU64::new(0),
            free_bytes: AtomicU64::new(0),
        }
    }
}

static SITES: [Site; SITE_SLOTS] = [const { Site::new() }; SITE_SLOTS];
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
/// Samples that could not be recorded because a table was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Whether the tables hold a previous capture's data.
static DIRTY: AtomicBool = AtomicBool::new(false);

/// Per-thread sampling state (see the module docs for `countdown`).
struct ThreadSampler {
    /// `generation << BUDGET_BITS | bytes left before the next sample`.
    countdown: Cell<u64>,
    rng: Cell<u64>,
    busy: Cell<bool>,
}

impl ThreadSampler {
    const fn new() -> Self {
        ThreadSampler { countdown: Cell::new(0), rng: Cell::new(0), busy: Cell::new(false) }
    }
}

thread_local! {
    static THREAD: ThreadSampler = const { ThreadSampler::new() };
}

/// Starts a sampled capture; the caller has claimed the mode (it is `PROBE`). The mean is
/// limited to `1..=MAX_MEAN_BYTES`.
pub(crate) fn start(mean_bytes: u64) -> SampledStopper {
    let mean_bytes = mean_bytes.clamp(1, MAX_MEAN_BYTES);
    if DIRTY.swap(false, Ordering::SeqCst) {
        clear_tables();
    }
    DROPPED.store(0, Ordering::Relaxed);
    MEAN_BYTES.store(mean_bytes, Ordering::Relaxed);
    let generation = GENERATION.load(Ordering::Relaxed) % GENERATION_MAX + 1;
    GENERATION.store(generation, Ordering::Relaxed);
    // Before the mode word: a thread that samples must find the walker (it allocates, too).
    stack_walk::install();
    let stopper = SampledStopper { mean_bytes, started: SystemTime::now(), clock: Instant::now(), stopped: false };
    // SeqCst: a thread that sees this word also sees the mean and the cleared tables.
    MODE.store(mode::SAMPLED | generation << 8, Ordering::SeqCst);
    stopper
}

/// Resets every table. Only called while no capture runs and nothing is in flight.
fn clear_tables() {
    for site in &SITES {
        site.hash.store(0, Ordering::Relaxed);
        site.ready.store(false, Ordering::Relaxed);
        for counter in [&site.alloc_count, &site.alloc_bytes, &site.free_count, &site.free_bytes] {
            counter.store(0, Ordering::Relaxed);
        }
    }
    for address in &LIVE_ADDRESS {
        address.store(EMPTY, Ordering::Relaxed);
    }
    for count in &FILTER {
        count.store(0, Ordering::Relaxed);
    }
}

/// The common case of every allocation while sampling: counts `size` bytes off this thread's
/// budget and returns `true` if that is all there is to do. `false` (budget exhausted, or the
/// thread's budget is from another capture) sends the caller to [`alloc_past_budget`] /
/// [`realloc_past_budget`], with the budget untouched.
#[inline(always)]
pub(crate) fn count_down(word: u32, size: usize) -> bool {
    THREAD.with(|t| {
        let left = t.countdown.get().wrapping_sub(size as u64);
        let counting = left >> BUDGET_BITS == u64::from(word >> 8);
        if counting {
            t.countdown.set(left);
        }
        counting
    })
}

/// An allocation [`count_down`] did not settle: maybe sampled.
///
/// # Safety
/// As `GlobalAlloc::alloc`.
#[inline(never)]
pub(crate) unsafe fn alloc_past_budget(word: u32, layout: Layout, zeroed: bool) -> *mut u8 {
    let sampled = take_sample(word, layout.size());
    // SAFETY: forwarded as received.
    let ptr = unsafe { crate::routed::system_alloc(layout, zeroed) };
    if sampled {
        if !ptr.is_null() {
            record(ptr as usize, layout.size());
        }
        THREAD.with(|t| t.busy.set(false));
    }
    ptr
}

/// A realloc [`count_down`] did not settle (the old block is already forgotten): maybe sampled.
///
/// # Safety
/// As `GlobalAlloc::realloc`.
#[inline(never)]
pub(crate) unsafe fn realloc_past_budget(word: u32, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    let sampled = take_sample(word, new_size);
    // SAFETY: forwarded as received.
    let new = unsafe { System.realloc(ptr, layout, new_size) };
    if sampled {
        if !new.is_null() {
            record(new as usize, new_size);
        }
        THREAD.with(|t| t.busy.set(false));
    }
    new
}

/// Decides about an allocation of `size` bytes that [`count_down`] did not settle, and sets
/// this thread's countdown for what follows. On `true` the caller records the block and then
/// clears `busy`.
fn take_sample(word: u32, size: usize) -> bool {
    let generation = u64::from(word >> 8);
    let size = size as u64;
    THREAD.with(|t| {
        if t.countdown.get() >> BUDGET_BITS != generation {
            // This thread's first allocation in this capture: its count starts here.
            let budget = next_budget(t);
            if budget > size {
                t.countdown.set(generation << BUDGET_BITS | (budget - size));
                return false;
            }
        }
        // Past the budget: sampled. Go discards the overshoot too: the next point of a
        // Poisson process is an exponential distance away wherever one starts counting.
        t.countdown.set(generation << BUDGET_BITS | next_budget(t));
        if t.busy.get() {
            // An allocation made while recording a sample (the stack walker's): not the
            // program's, and recording it would re-enter the sampler.
            return false;
        }
        t.busy.set(true);
        true
    })
}

/// Called for every free (and the old block of every realloc) while sampling, before the block
/// goes back to `System`.
#[inline(always)]
pub(crate) fn on_free(ptr: *mut u8) {
    let address = ptr as usize;
    let home = home_slot(address);
    if FILTER[home >> FILTER_GROUP_BITS].load(Ordering::Relaxed) != 0 {
        forget(address, home);
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

/// A free whose filter group holds live sampled blocks. Most such blocks were not sampled
/// (they only share the group), so the first look writes nothing and counts nothing; the
/// freeing thread owns the block, so nobody else can add or remove its address meanwhile.
#[cold]
#[inline(never)]
fn forget(address: usize, home: usize) {
    if find_live(address, home).is_none() || !enter() {
        return;
    }
    // Looked up again inside `enter`: the tables may have been cleared for a new capture
    // between the first look and `enter`.
    if let Some(index) = find_live(address, home) {
        let block = LIVE_BLOCK[index].load(Ordering::Relaxed);
        LIVE_ADDRESS[index].store(TOMBSTONE, Ordering::Release);
        FILTER[home >> FILTER_GROUP_BITS].fetch_sub(1, Ordering::Relaxed);
        let site = &SITES[(block & 0xffff) as usize];
        site.free_count.fetch_add(1, Ordering::Relaxed);
        site.free_bytes.fetch_add(block >> 16, Ordering::Relaxed);
    }
    leave();
}

/// Counts this call in `IN_FLIGHT` if the capture still runs (see `routed::enter_dhat` for
/// why SeqCst on both sides).
fn enter() -> bool {
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    if mode::of(MODE.load(Ordering::SeqCst)) == mode::SAMPLED {
        true
    } else {
        IN_FLIGHT.fetch_sub(1, Ordering::Release);
        false
    }
}

fn leave() {
    IN_FLIGHT.fetch_sub(1, Ordering::Release);
}

/// Records one sampled block: its stack (into `SITES`) and itself (into the live table).
#[inline(never)]
fn record(address: usize, size: usize) {
    if !enter() {
        return;
    }
    let mut ips = [0usize; MAX_DEPTH];
    let depth = stack_walk::capture(&mut ips);
    let recorded = site_for(&ips[..depth]).is_some_and(|site| {
        if !insert_live(address, site, size as u64) {
            return false;
        }
        let site = &SITES[site as usize];
        site.alloc_count.fetch_add(1, Ordering::Relaxed);
        site.alloc_bytes.fetch_add(size as u64, Ordering::Relaxed);
        true
    });
    if !recorded {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
    leave();
}

/// The index of the site of `ips`, claiming a slot for a new stack.
fn site_for(ips: &[usize]) -> Option<u32> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &ip in ips {
        hash = (hash ^ ip as u64).wrapping_mul(0x0100_0000_01b3).rotate_left(29);
    }
    let hash = hash | 1;
    let home = hash as usize & (SITE_SLOTS - 1);
    for step in 0..PROBE_LIMIT {
        let index = (home + step) & (SITE_SLOTS - 1);
        let site = &SITES[index];
        let mut current = site.hash.load(Ordering::Acquire);
        if current == 0 {
            match site.hash.compare_exchange(0, hash, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    for (slot, &ip) in site.ips.iter().zip(ips) {
                        slot.store(ip, Ordering::Relaxed);
                    }
                    site.depth.store(ips.len(), Ordering::Relaxed);
                    site.ready.store(true, Ordering::Release);
                    return Some(index as u32);
                }
                Err(other) => current = other,
            }
        }
        if current == hash {
            return Some(index as u32);
        }
    }
    None
}

fn insert_live(address: usize, site: u32, size: u64) -> bool {
    const { assert!(SITE_SLOTS <= 1 << 16) };
    let home = home_slot(address);
    for step in 0..PROBE_LIMIT {
        let index = (home + step) & (LIVE_SLOTS - 1);
        let slot = &LIVE_ADDRESS[index];
        let found = slot.load(Ordering::Relaxed);
        if (found == EMPTY || found == TOMBSTONE)
            && slot.compare_exchange(found, address, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            // Nobody can look this address up before the allocation returns it, so writing
            // the rest after the address is published is fine.
            LIVE_BLOCK[index].store(size << 16 | u64::from(site), Ordering::Relaxed);
            FILTER[home >> FILTER_GROUP_BITS].fetch_add(1, Ordering::Relaxed);
            return true;
        }
    }
    false
}

#[inline(always)]
fn home_slot(address: usize) -> usize {
    ((address as u64 >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - LIVE_BITS)) as usize
}

/// A fresh exponential budget with the capture's mean (1..=BUDGET_MAX bytes).
fn next_budget(t: &ThreadSampler) -> u64 {
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
    let mean = MEAN_BYTES.load(Ordering::Relaxed) as f64;
    ((-uniform.ln()) * mean).clamp(1.0, BUDGET_MAX as f64) as u64
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
    started: SystemTime,
    clock: Instant,
    stopped: bool,
}

impl SampledStopper {
    fn finish(&mut self) {
        if !self.stopped {
            self.stopped = true;
            MODE.store(mode::OFF, Ordering::SeqCst);
            crate::wait_for_in_flight();
            stack_walk::uninstall();
            DIRTY.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for SampledStopper {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Stopper for SampledStopper {
    fn stop(mut self: Box<Self>, out: &CaptureOutput) -> Result<(), CaptureError> {
        self.finish();
        let dropped = DROPPED.load(Ordering::Relaxed);
        let mut builder = heap_pprof::builder(self.started, self.clock.elapsed(), self.mean_bytes as i64);
        builder.comment(&format!(
            "onsite memory capture, mode sampled: one sample per {} bytes allocated on average, scaled",
            self.mean_bytes
        ));
        let (fast_walks, libgcc_walks) = stack_walk::walk_counts();
        builder.comment(&format!("stacks walked: {fast_walks} by the caching unwinder, {libgcc_walks} by libgcc's"));
        if dropped > 0 {
            tracing::warn!(dropped, "onsite: memory samples dropped because the sample tables were full");
            builder.comment(&format!("{dropped} samples dropped: the sample tables were full"));
        }
        let mut ips = Vec::with_capacity(MAX_DEPTH);
        for site in &SITES {
            if !site.ready.load(Ordering::Acquire) {
                continue;
            }
            let allocs = site.alloc_count.load(Ordering::Relaxed);
            let alloc_bytes = site.alloc_bytes.load(Ordering::Relaxed);
            let frees = site.free_count.load(Ordering::Relaxed).min(allocs);
            let free_bytes = site.free_bytes.load(Ordering::Relaxed).min(alloc_bytes);
            if allocs == 0 {
                continue;
            }
            let (alloc_objects, alloc_space) = scale(allocs, alloc_bytes, self.mean_bytes);
            let (inuse_objects, inuse_space) = scale(allocs - frees, alloc_bytes - free_bytes, self.mean_bytes);
            ips.clear();
            let depth = site.depth.load(Ordering::Relaxed).min(MAX_DEPTH);
            ips.extend(site.ips[..depth].iter().map(|ip| ip.load(Ordering::Relaxed)));
            builder.add_addresses(&ips, &[alloc_objects, alloc_space, inuse_objects, inuse_space], &[]);
        }
        out.write(ProfileKind::Memory, "pprof", |w| builder.write_gzip(w))?;
        Ok(())
    }
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
        let word = mode::SAMPLED | 7 << 8;
        let budget = || THREAD.with(|t| t.countdown.get());
        // This thread never counted in generation 7: the fast path does not settle it.
        assert!(!count_down(word, 1));
        if take_sample(word, 1) {
            THREAD.with(|t| t.busy.set(false)); // a fresh budget of 1 byte: sampled at once
        }
        assert_eq!(budget() >> BUDGET_BITS, 7);
        // The fast path counts the budget down to 0 exactly...
        let left = budget() & BUDGET_MAX;
        assert!(count_down(word, left as usize));
        assert_eq!(budget(), 7 << BUDGET_BITS);
        // ...and one byte more borrows into the generation: slow path, budget untouched.
        assert!(!count_down(word, 1));
        assert_eq!(budget(), 7 << BUDGET_BITS);
        // The slow path samples it and draws the next budget in the same generation.
        assert!(take_sample(word, 1));
        assert_eq!(budget() >> BUDGET_BITS, 7);
        assert!(budget() & BUDGET_MAX >= 1);
        // While that sample is being recorded, nothing else is sampled (no recursion).
        THREAD.with(|t| t.countdown.set(7 << BUDGET_BITS));
        assert!(!take_sample(word, 1));
        THREAD.with(|t| t.busy.set(false));
        // Another capture's word: this thread's budget is stale there, whatever is left of it.
        assert!(!count_down(mode::SAMPLED | 8 << 8, 1));
    }

    #[test]
    fn budgets_are_exponential_around_the_mean() {
        MEAN_BYTES.store(1000, Ordering::Relaxed);
        let t = ThreadSampler::new();
        let n = 20_000;
        let draws: Vec<u64> = (0..n).map(|_| next_budget(&t)).collect();
        let mean = draws.iter().sum::<u64>() as f64 / n as f64;
        assert!((950.0..1050.0).contains(&mean), "mean {mean}");
        // Exponential: about e^-1 of the draws exceed the mean.
        let above = draws.iter().filter(|&&d| d > 1000).count() as f64 / n as f64;
        assert!((0.34..0.40).contains(&above), "{above}");
        MEAN_BYTES.store(crate::DEFAULT_SAMPLE_BYTES, Ordering::Relaxed);
    }
}
