//! Sampled mode, as a service meets it: a child process with onsite's allocator installed leaks
//! and churns known amounts during a capture; the parent decodes the profile and checks the
//! scaled estimates.

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::scenarios::*;
use common::*;
use onsite_core::ProfileKind::Memory;
use onsite_core::Profiler;
use onsite_core::test_support::the_dump_file;
use onsite_memory::{MemoryMode, MemoryProfiler};

#[global_allocator]
static ALLOC: onsite_memory::Allocator = onsite_memory::Allocator::new();

#[test]
fn a_64_mib_leak_is_named_first_and_estimated_within_20_percent() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_leak_and_churn", dir.path(), Duration::from_secs(60), Duration::from_secs(60));
    check_leak_and_churn(dir.path(), "std::alloc::System");
}

#[test]
#[ignore = "child role"]
fn child_leak_and_churn() {
    let Some(dir) = child_role("child_leak_and_churn") else { return };
    leak_and_churn(&dir);
}

#[test]
fn two_leaks_of_3_to_1_come_out_in_order_and_ratio() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_two_leaks", dir.path(), Duration::from_secs(60), Duration::from_secs(60));
    let inuse = totals(&read_pprof(&the_dump_file(dir.path(), Memory, "pprof")), "inuse_space");
    assert!(is_fn(&inuse[0].function, "planted_leak"), "{:?}", &inuse[..3.min(inuse.len())]);
    assert!(is_fn(&inuse[1].function, "smaller_leak"), "{:?}", &inuse[..3.min(inuse.len())]);
    let ratio = flat(&inuse, "planted_leak") as f64 / flat(&inuse, "smaller_leak") as f64;
    assert!((2.4..=3.75).contains(&ratio), "3:1 leaks estimated at {ratio:.2}:1");
}

#[test]
#[ignore = "child role"]
fn child_two_leaks() {
    let Some(dir) = child_role("child_two_leaks") else { return };
    // ~1,500 and ~500 samples: the ratio's estimate has a spread (in log terms) of ~0.05,
    // so the ±20 % band is more than 4 of them on each side.
    capture(&mut MemoryProfiler::new(MemoryMode::Sampled, 16 * 1024), &dir, || {
        planted_leak(24 * MIB);
        smaller_leak(8 * MIB);
    });
}

/// 30 captures while 4 threads allocate, free and reallocate (see `cycles_under_load`).
#[test]
fn thirty_cycles_under_load() {
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

/// Libraries a service might load and unload at run time (NSS modules, plugins); the first one
/// present is used. None is linked into this test binary, so loading it changes the loader's list.
const LOADABLE: [&std::ffi::CStr; 3] = [c"libz.so.1", c"libanl.so.1", c"libutil.so.1"];

/// Capture starts (which read the loader's list and pin what is loaded) racing a thread that
/// loads and unloads a library: taking the loader's locks in the wrong order deadlocks both.
#[test]
fn captures_start_and_stop_while_the_service_loads_and_unloads_a_library() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_captures_beside_dlopen", dir.path(), Duration::from_secs(60), Duration::from_secs(10));
    let profile = read_pprof(&the_dump_file(&dir.path().join("last"), Memory, "pprof"));
    assert!(!profile.sample.is_empty(), "the last capture sampled something");
}

#[test]
#[ignore = "child role"]
fn child_captures_beside_dlopen() {
    let Some(dir) = child_role("child_captures_beside_dlopen") else { return };
    let library = LOADABLE
        .iter()
        .find(|name| {
            // SAFETY: a valid C string; the handle is closed at once.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW) };
            // SAFETY: a handle from dlopen, closed once.
            !handle.is_null() && unsafe { libc::dlclose(handle) } == 0
        })
        .expect("one of the loadable libraries is installed");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: as above.
                let handle = unsafe { libc::dlopen(library.as_ptr(), libc::RTLD_NOW) };
                assert!(!handle.is_null());
                // SAFETY: as above.
                unsafe { libc::dlclose(handle) };
            }
        });
        for cycle in 0..300 {
            progress(&dir, &format!("cycle {cycle}"));
            let stopper = sampled().start().expect("memory capture starts");
            black_box(vec![0u8; 4 * BLOCK]);
            drop(stopper); // abandoned: ends the capture without writing
        }
        capture(&mut sampled(), &dir.join("last"), || planted_churn(8 * MIB));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    progress(&dir, "done");
}

/// Grows a 1 MiB buffer by an impossible amount: the realloc fails, the buffer stays.
#[inline(never)]
fn kept_after_failed_growth() -> Vec<u8> {
    let mut buffer: Vec<u8> = Vec::with_capacity(MIB);
    assert!(buffer.try_reserve(1 << 60).is_err(), "growing by 2^60 bytes fails");
    buffer
}

/// With a mean of 1 every allocation is sampled and counted exactly (Go's
/// `MemProfileRate = 1`); a block whose realloc failed is still in use at the end.
#[test]
fn mean_one_counts_exactly_and_a_failed_realloc_keeps_its_block() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_failed_realloc", dir.path(), Duration::from_secs(60), Duration::from_secs(20));
    let profile = read_pprof(&the_dump_file(dir.path(), Memory, "pprof"));
    let inuse = totals(&profile, "inuse_space");
    assert_eq!(flat(&inuse, "kept_after_failed_growth"), MIB as i64, "{inuse:#?}");
    let objects = totals(&profile, "alloc_objects");
    assert_eq!(flat(&objects, "kept_after_failed_growth"), 1, "{objects:#?}");
}

#[test]
#[ignore = "child role"]
fn child_failed_realloc() {
    let Some(dir) = child_role("child_failed_realloc") else { return };
    let mut kept = Vec::new();
    capture(&mut MemoryProfiler::new(MemoryMode::Sampled, 1), &dir, || kept = kept_after_failed_growth());
    drop(black_box(kept));
}
