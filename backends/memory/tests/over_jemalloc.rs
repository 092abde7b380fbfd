//! The sampled mode over jemalloc (`tikv-jemallocator`), as a service on jemalloc meets it:
//! child processes whose global allocator is `Allocator::wrapping(Jemalloc)` leak and churn
//! known amounts, cycle captures under load, ask for a dhat capture (refused: dhat frees
//! through `System`), and sample always (a leak made before a capture is in its in-use).
//! jemalloc's own counters show the leaked blocks really came from it.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::time::Duration;

use common::scenarios::*;
use common::*;
use tikv_jemallocator::Jemalloc;

#[global_allocator]
static ALLOC: onsite_memory::Allocator<Jemalloc> = onsite_memory::Allocator::wrapping(Jemalloc);

const INNER: &str = "tikv_jemallocator::Jemalloc";

/// Bytes jemalloc has handed out and not had back, now.
fn jemalloc_allocated() -> usize {
    tikv_jemalloc_ctl::epoch::advance().expect("jemalloc's epoch advances");
    tikv_jemalloc_ctl::stats::allocated::read().expect("jemalloc's stats.allocated")
}

#[test]
fn a_64_mib_leak_over_jemalloc_is_named_first_and_estimated_within_20_percent() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_leak_and_churn", dir.path(), Duration::from_secs(60), Duration::from_secs(60));
    check_leak_and_churn(dir.path(), INNER);
}

#[test]
#[ignore = "child role"]
fn child_leak_and_churn() {
    let Some(dir) = child_role("child_leak_and_churn") else { return };
    let before = jemalloc_allocated();
    leak_and_churn(&dir);
    let grown = jemalloc_allocated() - before;
    assert!(grown >= LEAK_BYTES * 9 / 10, "jemalloc holds the leak: it grew by {grown} bytes");
    // And the counter tells allocators apart: a block from `System` does not move it.
    let layout = Layout::from_size_align(8 * MIB, 8).unwrap();
    let before = jemalloc_allocated();
    // SAFETY: a valid layout; freed below with it.
    let block = unsafe { System.alloc(layout) };
    assert!(!block.is_null());
    let moved = jemalloc_allocated().abs_diff(before);
    // SAFETY: allocated above by `System` with `layout`.
    unsafe { System.dealloc(block, layout) };
    assert!(moved < MIB, "System's block moved jemalloc's counter by {moved}");
}

#[test]
fn thirty_cycles_under_load_over_jemalloc() {
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
fn a_dhat_capture_over_jemalloc_refuses_and_leaves_the_allocator_free_for_sampled_and_always_on() {
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
