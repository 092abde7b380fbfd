//! A program whose global allocator is onsite's, and which also calls other `Allocator`s
//! directly: a `static` one, one on the stack, one on the heap, before its first capture and
//! during it. The capture finds the global one among them, samples what reaches it and nothing
//! the others are asked for, and the others go on handing every call to their inner allocator.

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::time::Duration;

use common::*;
use onsite_core::ProfileKind::Memory;
use onsite_core::test_support::the_dump_file;
use onsite_memory::{Allocator, MemoryMode, MemoryProfiler};

#[global_allocator]
static ALLOC: Allocator = Allocator::new();
/// Not the global allocator: called directly.
static OTHER: Allocator = Allocator::new();

const THROUGH_GLOBAL: usize = 555_555;
const THROUGH_OTHERS: usize = 777_777;

#[test]
fn a_capture_finds_the_global_allocator_and_samples_only_what_reaches_it() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_other_instances", dir.path(), Duration::from_secs(60), Duration::from_secs(60));
    let profile = read_pprof(&the_dump_file(dir.path(), Memory, "pprof"));
    for sample_type in ["alloc_space", "inuse_space"] {
        let rows = totals(&profile, sample_type);
        // The mean is 1 byte: every allocation is sampled, and its estimate is its size.
        assert_eq!(flat(&rows, "through_global"), THROUGH_GLOBAL as i64, "{sample_type}: {rows:?}");
        assert_eq!(flat(&rows, "through_others"), 0, "{sample_type}: {rows:?}");
    }
}

#[test]
#[ignore = "child role"]
fn child_other_instances() {
    let Some(dir) = child_role("child_other_instances") else { return };
    // Their first calls, before any capture, register all three.
    let on_stack = Allocator::new();
    let on_heap = Box::new(Allocator::new());
    for allocator in [&OTHER, &on_stack, &*on_heap] {
        through_others(allocator, false);
    }
    drop(on_heap);
    let mut kept = Vec::new();
    capture(&mut MemoryProfiler::new(MemoryMode::Sampled, 1), &dir, || {
        kept.push(through_global());
        through_others(&OTHER, true);
        through_others(&on_stack, true);
        through_others(&Allocator::new(), true);
    });
    drop(kept);
}

#[inline(never)]
fn through_global() -> Vec<u8> {
    black_box(vec![1u8; THROUGH_GLOBAL])
}

/// Allocates, grows and frees a block through `allocator` directly, and checks the block is
/// real memory (the inner allocator's).
#[inline(never)]
fn through_others(allocator: &Allocator, zeroed: bool) {
    let layout = Layout::from_size_align(THROUGH_OTHERS, 64).unwrap();
    // SAFETY: a valid, non-zero layout; the block is written within its size, grown with the
    // same layout, and freed once with the layout of its last size.
    unsafe {
        let block = if zeroed { allocator.alloc_zeroed(layout) } else { allocator.alloc(layout) };
        assert!(!block.is_null() && (block as usize).is_multiple_of(64));
        if zeroed {
            assert_eq!(*block.add(THROUGH_OTHERS - 1), 0);
        }
        block.write_bytes(7, THROUGH_OTHERS);
        let grown = allocator.realloc(block, layout, 2 * THROUGH_OTHERS);
        assert!(!grown.is_null());
        assert_eq!(*grown.add(THROUGH_OTHERS - 1), 7);
        allocator.dealloc(black_box(grown), Layout::from_size_align(2 * THROUGH_OTHERS, 64).unwrap());
    }
}
