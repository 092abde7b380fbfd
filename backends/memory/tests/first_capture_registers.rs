//! A program whose global allocator has never reallocated when its first memory capture
//! starts: an `Allocator` registers at its first realloc, so the capture's start reallocates
//! once itself, and finds it. Its own `main` (no test harness, which reallocates before any
//! test runs), and nothing before the capture but allocations and frees.

use onsite_core::Profiler;
use onsite_memory::{Allocator, MemoryMode, MemoryProfiler};

#[global_allocator]
static ALLOC: Allocator = Allocator::new();

fn main() {
    let blocks: Vec<Box<u64>> = Vec::with_capacity(4);
    drop(std::hint::black_box(blocks));
    let mut profiler = MemoryProfiler::new(MemoryMode::Sampled, 1024);
    let stopper =
        profiler.start().unwrap_or_else(|err| panic!("the first capture did not find the global allocator: {err}"));
    // Dropped without a stop: the capture gives the allocator back and writes nothing.
    drop(stopper);
}
