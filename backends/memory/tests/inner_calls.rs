//! What reaches the inner allocator: every call onsite's allocator takes goes to the inner
//! allocator's own method (`alloc`, `alloc_zeroed`, `realloc`, `dealloc`) with the caller's
//! pointer and layout unchanged (over-aligned ones included; a realloc stays a realloc, never
//! an allocation and a copy), with no capture, during a sampled capture whose budget settles
//! the call inline, and during one that samples every call. The inner allocator here records
//! the calls of the thread under test, so it sees exactly what onsite passes on; a dhat capture
//! over it refuses to start, naming both allocators.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use onsite_core::Profiler;
use onsite_memory::{Allocator, MemoryMode, MemoryProfiler};

/// `System`, recording each call made by a thread that asked for it (fixed tables of atomics:
/// a global allocator may not allocate). Not zero-sized, unlike `System`, jemalloc's and
/// mimalloc's: `calls` counts every call through `&self`, so the allocator's paths that pass
/// the inner allocator's address are the ones under test here.
struct Recorder {
    calls: AtomicUsize,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Call {
    Alloc { ptr: usize, size: usize, align: usize },
    AllocZeroed { ptr: usize, size: usize, align: usize },
    Realloc { ptr: usize, size: usize, align: usize, new_size: usize, new: usize },
    Dealloc { ptr: usize, size: usize, align: usize },
}

const SLOTS: usize = 256;
const FIELDS: usize = 6;
static LOG: [[AtomicUsize; FIELDS]; SLOTS] = [const { [const { AtomicUsize::new(0) }; FIELDS] }; SLOTS];
static LOGGED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static RECORDING: Cell<bool> = const { Cell::new(false) };
}

fn log(fields: [usize; FIELDS]) {
    if RECORDING.with(Cell::get) {
        // Never a panic here (it would allocate): a full log is counted, and `recorded` fails.
        let at = LOGGED.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = LOG.get(at) {
            for (slot, value) in entry.iter().zip(fields) {
                slot.store(value, Ordering::Relaxed);
            }
        }
    }
}

/// Runs `body` with this thread's calls recorded, and returns them.
fn recorded(body: impl FnOnce()) -> Vec<Call> {
    LOGGED.store(0, Ordering::Relaxed);
    RECORDING.with(|r| r.set(true));
    body();
    RECORDING.with(|r| r.set(false));
    let n = LOGGED.load(Ordering::Relaxed);
    assert!(n <= SLOTS, "{n} calls recorded, the log holds {SLOTS}");
    (0..n)
        .map(|i| {
            let [kind, ptr, size, align, new_size, new] = LOG[i].each_ref().map(|f| f.load(Ordering::Relaxed));
            match kind {
                0 => Call::Alloc { ptr, size, align },
                1 => Call::AllocZeroed { ptr, size, align },
                2 => Call::Realloc { ptr, size, align, new_size, new },
                _ => Call::Dealloc { ptr, size, align },
            }
        })
        .collect()
}

// SAFETY: every call goes to `System` unchanged; recording only stores into atomics.
unsafe impl GlobalAlloc for Recorder {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.calls.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        let ptr = unsafe { System.alloc(layout) };
        log([0, ptr as usize, layout.size(), layout.align(), 0, 0]);
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.calls.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        log([1, ptr as usize, layout.size(), layout.align(), 0, 0]);
        ptr
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.calls.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        log([2, ptr as usize, layout.size(), layout.align(), new_size, new as usize]);
        new
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        log([3, ptr as usize, layout.size(), layout.align(), 0, 0]);
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Allocator<Recorder> = Allocator::wrapping(Recorder { calls: AtomicUsize::new(0) });

/// One of each call through the global allocator, with sizes nothing else uses: a plain
/// allocation, a page-aligned zeroed one, a realloc of each (growing the plain one, shrinking
/// the aligned one), and their frees. Checks that the inner allocator saw exactly these calls,
/// with the same pointers and layouts, and that the zeroed block is zero.
fn each_call_reaches_the_inner_allocator(state: &str) {
    let calls_before = ALLOC.inner().calls.load(Ordering::Relaxed);
    let plain = Layout::from_size_align(12_345, 8).unwrap();
    let aligned = Layout::from_size_align(20_000, 4096).unwrap();
    let mut returned = Vec::new();
    let calls = recorded(|| {
        // SAFETY: valid layouts; each block is reallocated and freed with the layout it has.
        unsafe {
            let a = std::alloc::alloc(plain);
            let z = std::alloc::alloc_zeroed(aligned);
            assert!(!a.is_null() && !z.is_null());
            assert_eq!(z as usize % 4096, 0, "{state}: the aligned block is aligned");
            assert!(std::slice::from_raw_parts(z, aligned.size()).iter().all(|&b| b == 0), "{state}: zeroed");
            let a2 = std::alloc::realloc(a, plain, 54_321);
            let z2 = std::alloc::realloc(z, aligned, 9_000);
            assert!(!a2.is_null() && !z2.is_null());
            assert_eq!(z2 as usize % 4096, 0, "{state}: the aligned block stays aligned");
            std::alloc::dealloc(a2, Layout::from_size_align(54_321, 8).unwrap());
            std::alloc::dealloc(z2, Layout::from_size_align(9_000, 4096).unwrap());
            returned.extend([a as usize, z as usize, a2 as usize, z2 as usize]);
        }
    });
    let [a, z, a2, z2] = returned[..] else { unreachable!() };
    // The sampler's own work (a sample's stack walk) may allocate on this thread too; those
    // calls are not the test's and have other sizes.
    let ours: Vec<Call> = calls
        .into_iter()
        .filter(|call| {
            let (Call::Alloc { size, .. }
            | Call::AllocZeroed { size, .. }
            | Call::Realloc { size, .. }
            | Call::Dealloc { size, .. }) = *call;
            [12_345, 20_000, 54_321, 9_000].contains(&size)
        })
        .collect();
    assert_eq!(
        ours,
        [
            Call::Alloc { ptr: a, size: 12_345, align: 8 },
            Call::AllocZeroed { ptr: z, size: 20_000, align: 4096 },
            Call::Realloc { ptr: a, size: 12_345, align: 8, new_size: 54_321, new: a2 },
            Call::Realloc { ptr: z, size: 20_000, align: 4096, new_size: 9_000, new: z2 },
            Call::Dealloc { ptr: a2, size: 54_321, align: 8 },
            Call::Dealloc { ptr: z2, size: 9_000, align: 4096 },
        ],
        "{state}: what the inner allocator saw"
    );
    // Through the `Recorder` the global allocator holds, not a stand-in for it.
    assert!(ALLOC.inner().calls.load(Ordering::Relaxed) >= calls_before + 6, "{state}: calls through its address");
}

#[test]
fn every_call_reaches_the_inner_allocators_own_method_unchanged() {
    // One test: the capture state is the process's.
    each_call_reaches_the_inner_allocator("no capture");
    for (state, mean) in
        [("sampled capture, budget settles inline", 1 << 30), ("sampled capture, every call sampled", 1)]
    {
        let mut profiler = MemoryProfiler::new(MemoryMode::Sampled, mean);
        let stopper = profiler.start().unwrap_or_else(|e| panic!("{state}: {e}"));
        each_call_reaches_the_inner_allocator(state);
        drop(stopper);
    }

    // Over an inner allocator that is not `System`, dhat refuses, naming both, and releases
    // the allocator: the next capture starts.
    let err = match MemoryProfiler::new(MemoryMode::Dhat, 1).start() {
        Ok(_) => panic!("a dhat capture started over the recorder"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("std::alloc::System") && err.contains("inner_calls::Recorder"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let written = capture(&mut MemoryProfiler::new(MemoryMode::Sampled, 1 << 16), dir.path(), || {
        each_call_reaches_the_inner_allocator("sampled capture after the refusal")
    });
    assert_eq!(written.len(), 1, "{written:?}");
}
