//! The sampled mode over mimalloc, as a service on mimalloc meets it: child processes whose
//! global allocator is `Allocator::wrapping(MiMalloc)` leak and churn known amounts, cycle
//! captures under load, ask for a dhat capture (refused: dhat frees through `System`), and
//! sample always (a leak made before a capture is in its in-use). mimalloc itself says the
//! leaked blocks are in its heap.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::time::Duration;

use common::scenarios::*;
use common::*;
use mimalloc::MiMalloc;

#[global_allocator]
static ALLOC: onsite_memory::Allocator<MiMalloc> = onsite_memory::Allocator::wrapping(MiMalloc);

const INNER: &str = "mimalloc::MiMalloc";

/// Whether mimalloc says `ptr` is inside a region it manages.
fn in_mimalloc_heap(ptr: *const u8) -> bool {
    // SAFETY: only compares the address with mimalloc's regions; any pointer will do.
    unsafe { libmimalloc_sys::mi_is_in_heap_region(ptr.cast()) }
}

#[test]
fn a_64_mib_leak_over_mimalloc_is_named_first_and_estimated_within_20_percent() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_leak_and_churn", dir.path(), Duration::from_secs(60), Duration::from_secs(60));
    check_leak_and_churn(dir.path(), INNER);
}

#[test]
#[ignore = "child role"]
fn child_leak_and_churn() {
    let Some(dir) = child_role("child_leak_and_churn") else { return };
    leak_and_churn(&dir);
    let leak = LEAK.lock().unwrap();
    assert_eq!(leak.len(), LEAK_BYTES / BLOCK);
    assert!(leak.iter().all(|block| in_mimalloc_heap(block.as_ptr())), "every leaked block is mimalloc's");
    // And the check tells allocators apart: a block from `System` is not mimalloc's.
    let layout = Layout::from_size_align(4096, 8).unwrap();
    // SAFETY: a valid layout; freed below with it.
    let block = unsafe { System.alloc(layout) };
    assert!(!block.is_null() && !in_mimalloc_heap(block), "System's block is not in mimalloc's heap");
    // SAFETY: allocated above by `System` with `layout`.
    unsafe { System.dealloc(block, layout) };
}

#[test]
fn thirty_cycles_under_load_over_mimalloc() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_cycles_under_load", dir.path(), Duration::from_secs(60), Duration::from_secs(20));
    check_cycles(dir.path());
}

#[test]
#[ignore = "child role"]
fn child_cycles_under_load() {
    let Some(dir) = child_role("child_cycles_under_load") else { return };
    cycles_under_load(&dir);
}

#[test]
fn a_dhat_capture_over_mimalloc_refuses_and_leaves_the_allocator_free_for_sampled_and_always_on() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_dhat_refused", dir.path(), Duration::from_secs(60), Duration::from_secs(60));
    check_sampled_and_always_on_captures(dir.path(), INNER);
}

#[test]
#[ignore = "child role"]
fn child_dhat_refused() {
    let Some(dir) = child_role("child_dhat_refused") else { return };
    dhat_refuses_then_sampled_and_always_on_run(&dir, INNER);
}
