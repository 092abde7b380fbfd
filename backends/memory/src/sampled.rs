//! The sampled mode: Go's `MemProfileRate` scheme, inside the global allocator.
//!
//! - **Which allocations**: each thread counts down a byte budget drawn from an exponential
//!   distribution (mean `sample_bytes`); the allocation that exhausts it is sampled and a new
//!   budget is drawn. Bytes are thus sampled as a Poisson process, and an allocation of `s`
//!   bytes is sampled with probability `1 - exp(-s / mean)`, which is what the writer scales
//!   back by (Go's `scaleHeapSample`). Unsampled allocations touch only thread-local cells.
//! - **Stacks**: only sampled allocations walk the stack (`backtrace::trace_unsynchronized`,
//!   raw return addresses into a buffer on the stack); they are symbolised when the file is
//!   written. A per-thread `busy` flag sends anything the walk allocates straight to `System`.
//! - **Tables** are fixed-size statics of atomics (no allocation, no lock in the allocator):
//!   `SITES` (one per distinct stack, with its counts) and `LIVE` (address → site and size of
//!   each sampled block still live). A free must know whether its block was sampled: `FILTER`
//!   counts the live entries per group of 16 home slots of `LIVE`, so the common free (a block
//!   never sampled, or allocated before the capture) costs a multiply and one load from a
//!   16 KiB array, and nothing else. Only a free whose group holds entries probes `LIVE`.
//! - **Full tables** drop the sample (counted, logged and written as a profile comment) rather
//!   than block or allocate.
//! - **Stop**: the mode goes to `OFF`, then the stop waits for calls already inside the tables
//!   (counted in `IN_FLIGHT`, only on the rare paths: a sample, or a free whose home slot is
//!   in use). After that the tables are quiet and are read; they are cleared at the next start.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use onsite_core::{CaptureError, CaptureOutput, ProfileKind, Stopper};

use crate::{IN_FLIGHT, MODE, heap_pprof, mode};

/// Frames kept per sample (the allocator's own leaf frames included, dropped when written).
const MAX_DEPTH: usize = 64;
/// Distinct stacks per capture.
const SITE_SLOTS: usize = 1 << 12;
/// Sampled blocks live at once (at the default mean, 32 GiB of live sampled memory).
const LIVE_SLOTS: usize = 1 << 16;
const LIVE_BITS: u32 = LIVE_SLOTS.trailing_zeros();
/// Counters of live sampled blocks per group of 16 home slots of `LIVE`: 16 KiB, so the check
/// every free makes stays in L1.
const FILTER_SLOTS: usize = LIVE_SLOTS / 16;
/// How far a lookup walks from a home slot before giving up.
const PROBE_LIMIT: usize = 32;

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

struct LiveSlot {
    /// The block's address, or `EMPTY` / `TOMBSTONE`.
    address: AtomicUsize,
    /// The site's index and the block's size.
    site: AtomicU32,
    size: AtomicU64,
}

static SITES: [Site; SITE_SLOTS] = [const { Site::new() }; SITE_SLOTS];
static LIVE: [LiveSlot; LIVE_SLOTS] =
    [const { LiveSlot { address: AtomicUsize::new(EMPTY), site: AtomicU32::new(0), size: AtomicU64::new(0) } };
        LIVE_SLOTS];
static FILTER: [AtomicU32; FILTER_SLOTS] = [const { AtomicU32::new(0) }; FILTER_SLOTS];

/// Mean sampling interval in bytes, for the running capture.
static MEAN_BYTES: AtomicU64 = AtomicU64::new(crate::DEFAULT_SAMPLE_BYTES);
/// Bumped at each start, so threads draw a fresh budget with the capture's mean.
static GENERATION: AtomicU32 = AtomicU32::new(0);
/// Samples that could not be recorded because a table was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Whether the tables hold a previous capture's data.
static DIRTY: AtomicBool = AtomicBool::new(false);

/// Per-thread sampling state. Const-initialised `Cell`s without `Drop`: no lazy registration,
/// no destructor, usable from the allocator at any point of a thread's life.
struct ThreadSampler {
    generation: Cell<u32>,
    budget: Cell<i64>,
    rng: Cell<u64>,
    busy: Cell<bool>,
}

thread_local! {
    static THREAD: ThreadSampler = const {
        ThreadSampler { generation: Cell::new(0), budget: Cell::new(0), rng: Cell::new(0), busy: Cell::new(false) }
    };
}

/// Starts a sampled capture; the caller has claimed the mode (it is `PROBE`).
pub(crate) fn start(mean_bytes: u64) -> SampledStopper {
    if DIRTY.swap(false, Ordering::SeqCst) {
        clear_tables();
    }
    DROPPED.store(0, Ordering::Relaxed);
    MEAN_BYTES.store(mean_bytes.max(1), Ordering::Relaxed);
    GENERATION.fetch_add(1, Ordering::Relaxed);
    let stopper = SampledStopper { mean_bytes, started: SystemTime::now(), clock: Instant::now(), stopped: false };
    MODE.store(mode::SAMPLED, Ordering::SeqCst);
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
    for slot in &LIVE {
        slot.address.store(EMPTY, Ordering::Relaxed);
    }
    for count in &FILTER {
        count.store(0, Ordering::Relaxed);
    }
}

/// Called for every allocation while sampling.
#[inline(always)]
pub(crate) fn on_alloc(ptr: *mut u8, size: usize) {
    let take = THREAD
        .try_with(|t| {
            if t.busy.get() {
                return false;
            }
            let generation = GENERATION.load(Ordering::Relaxed);
            if t.generation.get() != generation {
                t.generation.set(generation);
                t.budget.set(next_budget(t));
            }
            let left = t.budget.get() - size as i64;
            if left > 0 {
                t.budget.set(left);
                return false;
            }
            // Sampled. Go discards the overshoot too: the next point of a Poisson process is
            // an exponential distance away wherever one starts counting.
            t.budget.set(next_budget(t));
            t.busy.set(true);
            true
        })
        .unwrap_or(false);
    if take {
        record(ptr as usize, size);
        let _ = THREAD.try_with(|t| t.busy.set(false));
    }
}

/// Called for every free (and the old block of every realloc) while sampling, before the block
/// goes back to `System`.
#[inline(always)]
pub(crate) fn on_free(ptr: *mut u8) {
    let address = ptr as usize;
    let home = home_slot(address);
    if FILTER[home / 16].load(Ordering::Relaxed) == 0 {
        return;
    }
    forget(address, home);
}

#[inline(never)]
fn forget(address: usize, home: usize) {
    if !enter() {
        return;
    }
    for step in 0..PROBE_LIMIT {
        let slot = &LIVE[(home + step) & (LIVE_SLOTS - 1)];
        let found = slot.address.load(Ordering::Acquire);
        if found == EMPTY {
            break;
        }
        if found == address {
            let site = &SITES[slot.site.load(Ordering::Relaxed) as usize];
            let size = slot.size.load(Ordering::Relaxed);
            slot.address.store(TOMBSTONE, Ordering::Release);
            FILTER[home / 16].fetch_sub(1, Ordering::Relaxed);
            site.free_count.fetch_add(1, Ordering::Relaxed);
            site.free_bytes.fetch_add(size, Ordering::Relaxed);
            break;
        }
    }
    leave();
}

/// Counts this call in `IN_FLIGHT` if the capture still runs (see `routed::enter_dhat` for
/// why SeqCst on both sides).
fn enter() -> bool {
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    if MODE.load(Ordering::SeqCst) == mode::SAMPLED {
        true
    } else {
        IN_FLIGHT.fetch_sub(1, Ordering::Release);
        false
    }
}

fn leave() {
    IN_FLIGHT.fetch_sub(1, Ordering::Release);
}

/// Records one sampled block: its stack (into `SITES`) and itself (into `LIVE`).
#[inline(never)]
fn record(address: usize, size: usize) {
    if !enter() {
        return;
    }
    let mut ips = [0usize; MAX_DEPTH];
    let mut depth = 0;
    // SAFETY: `trace_unsynchronized` is unsafe only because it does not take backtrace's
    // global lock; it walks this thread's own stack, and the closure neither allocates nor
    // unwinds.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            if frame.ip().is_null() {
                return false; // the end of the stack
            }
            ips[depth] = frame.ip() as usize;
            depth += 1;
            depth < MAX_DEPTH
        });
    }
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
    let home = home_slot(address);
    for step in 0..PROBE_LIMIT {
        let slot = &LIVE[(home + step) & (LIVE_SLOTS - 1)];
        let found = slot.address.load(Ordering::Relaxed);
        if (found == EMPTY || found == TOMBSTONE)
            && slot.address.compare_exchange(found, address, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            // Nobody can look this address up before the allocation returns it, so writing
            // the rest after the address is published is fine.
            slot.site.store(site, Ordering::Relaxed);
            slot.size.store(size, Ordering::Relaxed);
            FILTER[home / 16].fetch_add(1, Ordering::Relaxed);
            return true;
        }
    }
    false
}

#[inline(always)]
fn home_slot(address: usize) -> usize {
    ((address as u64 >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - LIVE_BITS)) as usize
}

/// A fresh exponential budget with the capture's mean (at least 1 byte).
fn next_budget(t: &ThreadSampler) -> i64 {
    let mut x = t.rng.get();
    if x == 0 {
        // Seed from the thread's own stack address and the clock-free global generation:
        // distinct per thread, no system call.
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
    ((-uniform.ln()) * mean).clamp(1.0, i64::MAX as f64 / 2.0) as i64
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
    fn budgets_are_exponential_around_the_mean() {
        MEAN_BYTES.store(1000, Ordering::Relaxed);
        let t =
            ThreadSampler { generation: Cell::new(0), budget: Cell::new(0), rng: Cell::new(0), busy: Cell::new(false) };
        let n = 20_000;
        let draws: Vec<i64> = (0..n).map(|_| next_budget(&t)).collect();
        let mean = draws.iter().sum::<i64>() as f64 / n as f64;
        assert!((950.0..1050.0).contains(&mean), "mean {mean}");
        // Exponential: about e^-1 of the draws exceed the mean.
        let above = draws.iter().filter(|&&d| d > 1000).count() as f64 / n as f64;
        assert!((0.34..0.40).contains(&above), "{above}");
        MEAN_BYTES.store(crate::DEFAULT_SAMPLE_BYTES, Ordering::Relaxed);
    }
}
