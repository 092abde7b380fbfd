//! Sampled mode, as a service meets it: a child process with onsite's allocator installed leaks
//! and churns known amounts during a capture; the parent decodes the profile and checks the
//! scaled estimates.

mod common;

use std::hint::black_box;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use onsite_core::ProfileKind::Memory;
use onsite_core::Profiler;
use onsite_core::test_support::the_dump_file;
use onsite_memory::{MemoryMode, MemoryProfiler};

#[global_allocator]
static ALLOC: onsite_memory::Allocator = onsite_memory::Allocator::new();

const BLOCK: usize = 4096;
const MIB: usize = 1 << 20;
/// A smaller mean than the default 512 KiB, so ±20% on 64 MiB is ~6 standard deviations
/// (1024 expected samples) and the test cannot fail by chance in practice.
const TEST_MEAN: u64 = 64 * 1024;

static LEAK: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

#[inline(never)]
fn planted_leak(bytes: usize) {
    let mut leak = LEAK.lock().unwrap();
    for i in 0..bytes / BLOCK {
        leak.push(vec![i as u8; BLOCK]);
    }
}

#[inline(never)]
fn smaller_leak(bytes: usize) {
    let mut leak = LEAK.lock().unwrap();
    for i in 0..bytes / BLOCK {
        leak.push(vec![i as u8; BLOCK]);
    }
}

#[inline(never)]
fn planted_churn(bytes: usize) {
    for i in 0..bytes / BLOCK {
        drop(black_box(vec![i as u8; BLOCK]));
    }
}

fn sampled() -> MemoryProfiler {
    MemoryProfiler::new(MemoryMode::Sampled, TEST_MEAN)
}

#[test]
fn a_64_mib_leak_is_named_first_and_estimated_within_20_percent() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_leak_and_churn", dir.path(), Duration::from_secs(60), Duration::from_secs(60));
    assert!(
        std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().path().to_string_lossy().ends_with(".dhat.json"))
    );
    let profile = read_pprof(&the_dump_file(dir.path(), Memory, "pprof"));
    let (types, default) = sample_types(&profile);
    assert_eq!(types, ["alloc_objects/count", "alloc_space/bytes", "inuse_objects/count", "inuse_space/bytes"]);
    assert_eq!(default, "inuse_space");
    assert_eq!(profile.period, TEST_MEAN as i64);

    let inuse = totals(&profile, "inuse_space");
    assert!(is_fn(&inuse[0].function, "planted_leak"), "the leak comes first: {:?}", &inuse[..3.min(inuse.len())]);
    let estimate = flat(&inuse, "planted_leak") as f64;
    let truth = (64 * MIB) as f64;
    assert!((estimate / truth - 1.0).abs() <= 0.20, "estimated {estimate} bytes in use for a {truth}-byte leak");
    let objects = flat(&totals(&profile, "inuse_objects"), "planted_leak") as f64;
    let truth_objects = (64 * MIB / BLOCK) as f64;
    assert!((objects / truth_objects - 1.0).abs() <= 0.20, "estimated {objects} blocks for {truth_objects}");

    let churn_inuse = flat(&inuse, "planted_churn") as f64;
    assert!(churn_inuse <= 0.02 * truth, "churn holds ~nothing: {churn_inuse}");
    let churn_alloc = flat(&totals(&profile, "alloc_space"), "planted_churn") as f64;
    assert!((churn_alloc / (128 * MIB) as f64 - 1.0).abs() <= 0.20, "churn allocated ~128 MiB: {churn_alloc}");

    // The profile says how its stacks were walked; on x86_64 Linux the caching unwinder
    // (framehop) should manage all of these plain Rust stacks without libgcc's help.
    let (fast, libgcc) = walk_counts(&profile);
    assert!(fast + libgcc >= 1000, "~3000 samples expected: {fast} + {libgcc}");
    if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        assert!(libgcc * 100 <= fast, "stacks walked by libgcc instead: {libgcc} of {}", fast + libgcc);
    }
}

/// The `stacks walked: N by the caching unwinder, M by libgcc's` comment's numbers.
fn walk_counts(profile: &onsite_core::pprof::proto::Profile) -> (u64, u64) {
    let comment = profile
        .comment
        .iter()
        .map(|&i| profile.string_table[i as usize].as_str())
        .find_map(|c| c.strip_prefix("stacks walked: "))
        .expect("a stacks-walked comment");
    let numbers: Vec<u64> = comment.split(' ').filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1])
}

#[test]
#[ignore = "child role"]
fn child_leak_and_churn() {
    let Some(dir) = child_role("child_leak_and_churn") else { return };
    capture(&mut sampled(), &dir, || {
        planted_leak(64 * MIB);
        planted_churn(128 * MIB);
    });
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

/// 30 captures while 4 threads allocate, free and reallocate (with a tiny mean, so the tables
/// are busy and fill up) and one thread allocates while holding the stderr lock.
#[test]
fn thirty_cycles_under_load() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_cycles_under_load", dir.path(), Duration::from_secs(60), Duration::from_secs(20));
    for cycle in 0..CYCLES {
        let profile = read_pprof(&the_dump_file(&dir.path().join(format!("cycle-{cycle}")), Memory, "pprof"));
        assert_eq!(profile.sample_type.len(), 4, "cycle {cycle}");
        assert!(!profile.sample.is_empty(), "cycle {cycle} sampled something");
    }
}

const CYCLES: usize = 30;

#[test]
#[ignore = "child role"]
fn child_cycles_under_load() {
    let Some(dir) = child_role("child_cycles_under_load") else { return };
    under_churn_and_stderr_load(|| {
        // Alternate a tiny mean (tables under pressure) with the default.
        for cycle in 0..CYCLES {
            progress(&dir, &format!("cycle {cycle}"));
            let mean = if cycle % 2 == 0 { 256 } else { onsite_memory::DEFAULT_SAMPLE_BYTES / 64 };
            let mut profiler = MemoryProfiler::new(MemoryMode::Sampled, mean);
            capture(&mut profiler, &dir.join(format!("cycle-{cycle}")), || {
                std::thread::sleep(Duration::from_millis(30))
            });
        }
        progress(&dir, "done");
    });
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
