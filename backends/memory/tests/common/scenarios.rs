//! The sampled mode's scenarios, shared by the test binaries that run them over each inner
//! allocator (`sampled_mode`: `System`; `over_jemalloc`, `over_mimalloc`). Each binary declares
//! its own `#[global_allocator]` and calls these from its child roles and its tests.

use std::hint::black_box;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use onsite_core::ProfileKind::Memory;
use onsite_core::pprof::proto::Profile;
use onsite_core::test_support::the_dump_file;
use onsite_memory::{MemoryMode, MemoryProfiler};

use super::*;

pub const BLOCK: usize = 4096;
pub const MIB: usize = 1 << 20;
/// A smaller mean than the default 512 KiB, so ±20% on 64 MiB is ~6 standard deviations
/// (1024 expected samples) and the test cannot fail by chance in practice.
pub const TEST_MEAN: u64 = 64 * 1024;
/// The planted leak.
pub const LEAK_BYTES: usize = 64 * MIB;
/// The planted churn: allocated and freed at once.
pub const CHURN_BYTES: usize = 128 * MIB;

/// What the planted leaks keep.
pub static LEAK: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

#[inline(never)]
pub fn planted_leak(bytes: usize) {
    let mut leak = LEAK.lock().unwrap();
    for i in 0..bytes / BLOCK {
        leak.push(vec![i as u8; BLOCK]);
    }
}

#[inline(never)]
pub fn smaller_leak(bytes: usize) {
    let mut leak = LEAK.lock().unwrap();
    for i in 0..bytes / BLOCK {
        leak.push(vec![i as u8; BLOCK]);
    }
}

#[inline(never)]
pub fn planted_churn(bytes: usize) {
    for i in 0..bytes / BLOCK {
        drop(black_box(vec![i as u8; BLOCK]));
    }
}

pub fn sampled() -> MemoryProfiler {
    MemoryProfiler::new(MemoryMode::Sampled, TEST_MEAN)
}

/// The child of the leak-and-churn test: one capture around a 64 MiB leak and 128 MiB of churn.
pub fn leak_and_churn(dir: &Path) {
    capture(&mut sampled(), dir, || {
        planted_leak(LEAK_BYTES);
        planted_churn(CHURN_BYTES);
    });
}

/// The parent's side: the leak is named first and estimated within 20 %, the churn holds ~0 in
/// use and allocated ~128 MiB, the stacks were walked by the caching unwinder, and the profile
/// says the capture ran over `inner` (the inner allocator's type name).
pub fn check_leak_and_churn(dir: &Path, inner: &str) {
    assert_no_dhat_file(dir);
    let profile = read_pprof(&the_dump_file(dir, Memory, "pprof"));
    let (types, default) = sample_types(&profile);
    assert_eq!(types, ["alloc_objects/count", "alloc_space/bytes", "inuse_objects/count", "inuse_space/bytes"]);
    assert_eq!(default, "inuse_space");
    assert_eq!(profile.period, TEST_MEAN as i64);
    assert_names_allocator(&profile, inner);

    let inuse = totals(&profile, "inuse_space");
    assert_leak_held(&inuse);
    let truth = LEAK_BYTES as f64;
    let objects = flat(&totals(&profile, "inuse_objects"), "planted_leak") as f64;
    let truth_objects = (LEAK_BYTES / BLOCK) as f64;
    assert!((objects / truth_objects - 1.0).abs() <= 0.20, "estimated {objects} blocks for {truth_objects}");

    let churn_inuse = flat(&inuse, "planted_churn") as f64;
    assert!(churn_inuse <= 0.02 * truth, "churn holds ~nothing: {churn_inuse}");
    let churn_alloc = flat(&totals(&profile, "alloc_space"), "planted_churn") as f64;
    assert!((churn_alloc / CHURN_BYTES as f64 - 1.0).abs() <= 0.20, "churn allocated ~128 MiB: {churn_alloc}");

    // The profile says how its stacks were walked; on x86_64 Linux the caching unwinder
    // (framehop) should manage all of these plain Rust stacks without libgcc's help.
    let (fast, libgcc) = walk_counts(&profile);
    assert!(fast + libgcc >= 1000, "~3000 samples expected: {fast} + {libgcc}");
    if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        assert!(libgcc * 100 <= fast, "stacks walked by libgcc instead: {libgcc} of {}", fast + libgcc);
    }
}

/// No capture in `dir` wrote a dhat file.
fn assert_no_dhat_file(dir: &Path) {
    assert!(
        std::fs::read_dir(dir).unwrap().all(|e| !e.unwrap().path().to_string_lossy().ends_with(".dhat.json")),
        "no dhat file"
    );
}

/// The profile says it ran over `inner` (the inner allocator's type name).
fn assert_names_allocator(profile: &Profile, inner: &str) {
    let allocator = format!("allocator: onsite_memory::Allocator over {inner}");
    assert!(
        comments(profile).any(|c| c == allocator),
        "no {allocator:?} in {:?}",
        comments(profile).collect::<Vec<_>>()
    );
}

/// The planted leak comes first by in-use bytes and is estimated within 20 %.
fn assert_leak_held(inuse: &[FunctionTotal]) {
    assert!(is_fn(&inuse[0].function, "planted_leak"), "the leak comes first: {:?}", &inuse[..3.min(inuse.len())]);
    let estimate = flat(inuse, "planted_leak") as f64;
    let truth = LEAK_BYTES as f64;
    assert!((estimate / truth - 1.0).abs() <= 0.20, "estimated {estimate} bytes in use for a {truth}-byte leak");
}

/// The `stacks walked: N by the caching unwinder, M by libgcc's` comment's numbers.
fn walk_counts(profile: &Profile) -> (u64, u64) {
    let comment = comments(profile).find_map(|c| c.strip_prefix("stacks walked: ")).expect("a stacks-walked comment");
    let numbers: Vec<u64> = comment.split(' ').filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1])
}

pub const CYCLES: usize = 30;

/// The child of the cycles test: 30 captures while 4 threads allocate, free and reallocate
/// (with a tiny mean, so the tables are busy and fill up) and one thread allocates while
/// holding the stderr lock.
pub fn cycles_under_load(dir: &Path) {
    under_churn_and_stderr_load(|| {
        // Alternate a tiny mean (tables under pressure) with the default.
        for cycle in 0..CYCLES {
            progress(dir, &format!("cycle {cycle}"));
            let mean = if cycle % 2 == 0 { 256 } else { onsite_memory::DEFAULT_SAMPLE_BYTES / 64 };
            let mut profiler = MemoryProfiler::new(MemoryMode::Sampled, mean);
            capture(&mut profiler, &dir.join(format!("cycle-{cycle}")), || {
                std::thread::sleep(Duration::from_millis(30))
            });
        }
        progress(dir, "done");
    });
}

/// The parent's side: every cycle wrote a heap profile that sampled something.
pub fn check_cycles(dir: &Path) {
    for cycle in 0..CYCLES {
        let profile = read_pprof(&the_dump_file(&dir.join(format!("cycle-{cycle}")), Memory, "pprof"));
        assert_eq!(profile.sample_type.len(), 4, "cycle {cycle}");
        assert!(!profile.sample.is_empty(), "cycle {cycle} sampled something");
    }
}

/// In a child over a non-`System` inner allocator: a dhat capture refuses to start, naming
/// `System` and `inner`, twice, and leaves the allocator free: a sampled capture then runs and
/// writes into `dir`. Then always-on sampling starts over `inner`, 64 MiB leak before a capture
/// (a dhat capture still refuses, because the sampler runs), and the capture, which allocates
/// nothing but churn, writes into `dir/always-on`.
pub fn dhat_refuses_then_sampled_and_always_on_run(dir: &Path, inner: &str) {
    use onsite_core::Profiler as _;
    let mut dhat = MemoryProfiler::new(MemoryMode::Dhat, 1);
    for _ in 0..2 {
        let err = match dhat.start() {
            Ok(_) => panic!("a dhat capture started over {inner}"),
            Err(err) => err.to_string(),
        };
        assert!(err.contains("std::alloc::System") && err.contains(inner), "the error names both allocators: {err}");
        assert!(err.contains("ONSITE_MEMORY_MODE=sampled"), "the error says what works: {err}");
    }
    capture(&mut sampled(), dir, || planted_churn(8 * MIB));

    let mut always = sampled();
    always.sample_always().unwrap_or_else(|e| panic!("always-on sampling starts over {inner}: {e}"));
    planted_leak(LEAK_BYTES);
    let err = dhat.start().err().expect("a dhat capture refuses while always-on sampling runs").to_string();
    assert!(err.contains("always-on sampling runs"), "{err}");
    capture(&mut always, &dir.join("always-on"), || planted_churn(8 * MIB));
}

/// The parent's side of [`dhat_refuses_then_sampled_and_always_on_run`]: no dhat file; the
/// sampled capture's file; and the always-on capture's, which holds the leak made before it
/// (64 MiB ±20 % in use, none of it allocated during the capture) and names `inner`.
pub fn check_sampled_and_always_on_captures(dir: &Path, inner: &str) {
    assert_no_dhat_file(dir);
    let profile = read_pprof(&the_dump_file(dir, Memory, "pprof"));
    assert!(flat(&totals(&profile, "alloc_space"), "planted_churn") > 0, "the sampled capture after the refusals ran");

    let profile = read_pprof(&the_dump_file(&dir.join("always-on"), Memory, "pprof"));
    assert_names_allocator(&profile, inner);
    assert_leak_held(&totals(&profile, "inuse_space"));
    let during = flat(&totals(&profile, "alloc_space"), "planted_leak");
    assert_eq!(during, 0, "the leak was allocated before the capture, not during it");
    assert!(flat(&totals(&profile, "alloc_space"), "planted_churn") > 0, "the capture's own churn is its alloc_*");
}
