//! dhat mode, as a service meets it: a child process with onsite's allocator installed runs a
//! workload, captures through the `Profiler` API, and the parent reads the files with real
//! readers (serde_json for dhat's report, `onsite_core::pprof::decode` for the profile).

mod common;

use std::hint::black_box;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use onsite_core::ProfileKind::Memory;
use onsite_core::test_support::the_dump_file;
use onsite_memory::{MemoryMode, MemoryProfiler};

#[global_allocator]
static ALLOC: onsite_memory::Allocator = onsite_memory::Allocator::new();

const BLOCK: usize = 4096;
const LEAK_BLOCKS: usize = 300;
const CHURN_BLOCKS: usize = 3000;

static LEAK: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

#[inline(never)]
fn planted_leak() {
    for i in 0..LEAK_BLOCKS {
        LEAK.lock().unwrap().push(vec![i as u8; BLOCK]);
    }
}

#[inline(never)]
fn planted_churn() {
    for i in 0..CHURN_BLOCKS {
        drop(black_box(vec![i as u8; BLOCK]));
    }
}

fn dhat() -> MemoryProfiler {
    MemoryProfiler::new(MemoryMode::Dhat, 1)
}

#[test]
fn the_leak_tops_inuse_space_and_the_churn_only_alloc_space() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_leak_and_churn", dir.path(), Duration::from_secs(60), Duration::from_secs(60));

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(the_dump_file(dir.path(), Memory, "dhat.json")).unwrap())
            .expect("dhat's report is JSON");
    assert_eq!(report["mode"], "rust-heap");
    assert!(
        report["ftbl"].as_array().unwrap().iter().any(|f| f.as_str().unwrap().contains("planted_leak")),
        "dhat's frames name the leak"
    );

    let profile = read_pprof(&the_dump_file(dir.path(), Memory, "pprof"));
    let (types, default) = sample_types(&profile);
    assert_eq!(types, ["alloc_objects/count", "alloc_space/bytes", "inuse_objects/count", "inuse_space/bytes"]);
    assert_eq!(default, "inuse_space");

    let inuse = totals(&profile, "inuse_space");
    assert!(
        is_fn(&inuse[0].function, "planted_leak"),
        "the leak is the top in-use function: {:?}",
        &inuse[..4.min(inuse.len())]
    );
    let leaked = (LEAK_BLOCKS * BLOCK) as i64;
    assert!(inuse[0].flat >= leaked, "exact: at least the {leaked} bytes leaked, got {}", inuse[0].flat);
    assert!(flat(&inuse, "planted_churn") <= BLOCK as i64, "churn holds ~nothing: {inuse:?}");
    // The blocks, plus the global Vec's own buffer that `push` grew.
    assert_eq!(flat(&totals(&profile, "inuse_objects"), "planted_leak"), LEAK_BLOCKS as i64 + 1);

    let alloc = totals(&profile, "alloc_space");
    assert!(flat(&alloc, "planted_churn") >= (CHURN_BLOCKS * BLOCK) as i64, "{alloc:?}");
    assert_eq!(flat(&totals(&profile, "alloc_objects"), "planted_churn"), CHURN_BLOCKS as i64);
}

#[test]
#[ignore = "child role"]
fn child_leak_and_churn() {
    let Some(dir) = child_role("child_leak_and_churn") else { return };
    capture(&mut dhat(), &dir, || {
        planted_leak();
        planted_churn();
    });
}

/// A dhat capture marks every filter class (every free must reach dhat); a sampled capture
/// after it in the same process starts from a clear filter, and is as right as a first one.
#[test]
fn a_sampled_capture_after_a_dhat_one_is_as_right_as_a_first_one() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_dhat_then_sampled", dir.path(), Duration::from_secs(60), Duration::from_secs(60));
    common::scenarios::check_leak_and_churn(&dir.path().join("sampled"), "std::alloc::System");
}

#[test]
#[ignore = "child role"]
fn child_dhat_then_sampled() {
    let Some(dir) = child_role("child_dhat_then_sampled") else { return };
    capture(&mut dhat(), &dir.join("dhat"), planted_churn);
    common::scenarios::leak_and_churn(&dir.join("sampled"));
}

/// Blocks that cross a capture's edges: allocated before and freed during, reallocated during,
/// allocated during and freed after (and their addresses reused in the next capture).
#[test]
fn blocks_crossing_the_edges_cause_no_crash_and_no_false_in_use() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_crossing_the_edges", dir.path(), Duration::from_secs(60), Duration::from_secs(60));

    let first = read_pprof(&the_dump_file(&dir.path().join("first"), Memory, "pprof"));
    let inuse = totals(&first, "inuse_space");
    assert_eq!(flat(&inuse, "allocated_before_the_capture"), 0, "never recorded: {inuse:?}");
    assert_eq!(flat(&totals(&first, "alloc_objects"), "allocated_before_the_capture"), 0);
    assert!(flat(&inuse, "allocated_during_the_capture") >= (EDGE_BLOCKS * BLOCK) as i64, "{inuse:?}");
    assert_eq!(flat(&totals(&first, "inuse_objects"), "allocated_during_the_capture"), EDGE_BLOCKS as i64 + 1);
    // A realloc of a block from before the capture is an allocation of its new size.
    assert_eq!(flat(&inuse, "grown_during_the_capture"), (EDGE_BLOCKS * 2 * BLOCK) as i64, "{inuse:?}");

    let second = read_pprof(&the_dump_file(&dir.path().join("second"), Memory, "pprof"));
    let inuse = totals(&second, "inuse_space");
    for name in ["allocated_before_the_capture", "allocated_during_the_capture", "grown_during_the_capture"] {
        assert_eq!(flat(&inuse, name), 0, "{name} is not in use in the second capture: {inuse:?}");
    }
    assert_eq!(flat(&inuse, "reusing_freed_addresses"), 0, "{inuse:?}");
    assert!(flat(&totals(&second, "alloc_space"), "reusing_freed_addresses") >= (EDGE_BLOCKS * BLOCK) as i64);
}

const EDGE_BLOCKS: usize = 100;

#[inline(never)]
fn allocated_before_the_capture() -> Vec<Vec<u8>> {
    (0..EDGE_BLOCKS).map(|i| vec![i as u8; BLOCK]).collect()
}

/// `black_box` keeps `collect` from being a tail call, which in an optimised build would take
/// this frame off the stacks of the blocks it allocates.
#[inline(never)]
fn allocated_during_the_capture() -> Vec<Vec<u8>> {
    black_box((0..EDGE_BLOCKS).map(|i| vec![i as u8; BLOCK]).collect())
}

#[inline(never)]
fn grown_during_the_capture(blocks: &mut [Vec<u8>]) {
    for block in blocks {
        block.reserve_exact(2 * BLOCK - block.len());
    }
}

#[inline(never)]
fn reusing_freed_addresses() {
    for i in 0..EDGE_BLOCKS {
        drop(black_box(vec![i as u8; BLOCK]));
    }
}

#[test]
#[ignore = "child role"]
fn child_crossing_the_edges() {
    let Some(dir) = child_role("child_crossing_the_edges") else { return };
    let before = allocated_before_the_capture();
    let mut grown: Vec<Vec<u8>> = (0..EDGE_BLOCKS).map(|i| vec![i as u8; BLOCK]).collect();
    let mut kept = Vec::new();
    capture(&mut dhat(), &dir.join("first"), || {
        drop(before);
        grown_during_the_capture(&mut grown);
        kept = allocated_during_the_capture();
    });
    drop(kept);
    capture(&mut dhat(), &dir.join("second"), || {
        reusing_freed_addresses();
        drop(grown);
    });
}

/// 30 captures while 4 threads allocate, free and reallocate and one thread allocates while
/// holding the stderr lock (dhat prints its summary to stderr while holding its own lock).
#[test]
fn thirty_cycles_under_load_with_a_busy_stderr() {
    let dir = tempfile::tempdir().unwrap();
    // Each cycle must finish within 20 s of the previous one; the whole run within 120 s.
    run_child("child_cycles_under_load", dir.path(), Duration::from_secs(120), Duration::from_secs(20));
    for cycle in 0..CYCLES {
        let cycle_dir = dir.path().join(format!("cycle-{cycle}"));
        let json = std::fs::read(the_dump_file(&cycle_dir, Memory, "dhat.json")).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&json).unwrap_or_else(|e| panic!("cycle {cycle}: dhat file is not JSON: {e}"));
        assert!(json["pps"].is_array(), "cycle {cycle}");
        let profile = read_pprof(&the_dump_file(&cycle_dir, Memory, "pprof"));
        assert_eq!(profile.sample_type.len(), 4, "cycle {cycle}");
    }
}

const CYCLES: usize = 30;

#[test]
#[ignore = "child role"]
fn child_cycles_under_load() {
    let Some(dir) = child_role("child_cycles_under_load") else { return };
    under_churn_and_stderr_load(|| {
        let mut profiler = dhat();
        for cycle in 0..CYCLES {
            progress(&dir, &format!("cycle {cycle}"));
            capture(&mut profiler, &dir.join(format!("cycle-{cycle}")), || {
                std::thread::sleep(Duration::from_millis(30))
            });
        }
        progress(&dir, "done");
    });
}
