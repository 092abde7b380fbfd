//! Shared by the memory tests: run a role of the test binary as a child process with a
//! deadline, drive a capture through the `Profiler` API, and read what it wrote.
#![allow(dead_code)]

pub mod scenarios;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use onsite_core::pprof::comments;
use onsite_core::pprof::{FunctionTotal, decode, function_totals, proto::Profile};
use onsite_core::test_support::{self, ChildTest};
use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, Profiler, WrittenFile};
use onsite_memory::MemoryProfiler;

/// Where the child writes its captures.
pub const DIR_ENV: &str = "ONSITE_MEMORY_TEST_DIR";
/// A file the child rewrites with its progress (e.g. the cycle it is in).
pub const PROGRESS_FILE: &str = "progress";

/// The dump directory when this process is the child playing `role`, else `None`.
pub fn child_role(role: &str) -> Option<PathBuf> {
    (test_support::role()? == role).then(|| PathBuf::from(std::env::var(DIR_ENV).unwrap()))
}

/// Runs this test binary's `#[ignore]`d test `role` as a child writing into `dir`. Fails if it
/// does not succeed, if it runs past `deadline`, or if its progress file stays unchanged for
/// `stall` (the child is killed then).
pub fn run_child(role: &str, dir: &Path, deadline: Duration, stall: Duration) {
    ChildTest::new(role).env(DIR_ENV, dir).progress_file(dir.join(PROGRESS_FILE), stall).run(deadline);
}

/// Notes the child's progress for the parent's stall check.
pub fn progress(dir: &Path, text: &str) {
    std::fs::write(dir.join(PROGRESS_FILE), text).unwrap();
}

/// Runs one capture around `during`, writing into `dir` (created if needed).
pub fn capture(profiler: &mut MemoryProfiler, dir: &Path, during: impl FnOnce()) -> Vec<WrittenFile> {
    std::fs::create_dir_all(dir).unwrap();
    let stopper = profiler.start().expect("memory capture starts");
    during();
    let out = CaptureOutput::new(DumpDir::new(dir), CaptureStamp::now());
    stopper.stop(&out).expect("memory capture stops and writes");
    out.written().into_iter().map(|(_, f)| f).collect()
}

pub fn read_pprof(path: &Path) -> Profile {
    decode(&std::fs::read(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn totals(profile: &Profile, sample_type: &str) -> Vec<FunctionTotal> {
    function_totals(profile, sample_type).unwrap_or_else(|| panic!("no {sample_type} sample type"))
}

/// The flat value of the function whose name ends with `name`, its closures included (0 when
/// absent).
pub fn flat(rows: &[FunctionTotal], name: &str) -> i64 {
    rows.iter().filter(|r| is_fn(&r.function, name)).map(|r| r.flat).sum()
}

/// Whether `function` is `name` (a path suffix) or one of its closures.
pub fn is_fn(function: &str, name: &str) -> bool {
    let mut f = function;
    while let Some(outer) = f.strip_suffix("::{{closure}}") {
        f = outer;
    }
    f.ends_with(name)
}

/// The profile's sample type names, in order, and the default one.
pub fn sample_types(profile: &Profile) -> (Vec<String>, String) {
    let s = |i: i64| profile.string_table[i as usize].clone();
    (
        profile.sample_type.iter().map(|t| format!("{}/{}", s(t.r#type), s(t.unit))).collect(),
        s(profile.default_sample_type),
    )
}

/// A block more aligned than any allocator's default.
#[repr(align(4096))]
pub struct PageAligned(pub [u8; 64]);

/// Allocates, frees and reallocates blocks of varying sizes (and now and then a page-aligned
/// one) until `stop`.
pub fn churn_with_reallocs(seed: usize, stop: &AtomicBool) {
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut aligned: Vec<Box<PageAligned>> = Vec::new();
    let mut i = seed;
    while !stop.load(Ordering::Relaxed) {
        i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let size = 1 + (i >> 33) % 3000;
        if (i >> 12).is_multiple_of(64) {
            let block = Box::new(PageAligned([i as u8; 64]));
            assert_eq!(std::ptr::from_ref(&*block) as usize % 4096, 0, "a page-aligned block is page-aligned");
            aligned.push(block);
            if aligned.len() > 16 {
                aligned.swap_remove((i >> 40) % aligned.len());
            }
        }
        match (i >> 20) % 4 {
            0 | 1 => pool.push(vec![i as u8; size]),
            2 => {
                if let Some(v) = pool.last_mut() {
                    v.resize(v.len() + size, 1);
                    v.shrink_to_fit();
                }
            }
            _ => {
                if !pool.is_empty() {
                    let at = (i >> 40) % pool.len();
                    pool.swap_remove(at);
                }
            }
        }
        if pool.len() > 256 {
            pool.truncate(64);
        }
    }
}

/// Runs `body` while 4 threads allocate, free and reallocate and one more writes to stderr,
/// allocating while it holds the stderr lock (the dhat#33 deadlock's ingredients).
pub fn under_churn_and_stderr_load(body: impl FnOnce()) {
    use std::io::Write as _;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for worker in 0..4 {
            let stop = &stop;
            s.spawn(move || churn_with_reallocs(worker, stop));
        }
        s.spawn(|| {
            let mut line = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut err = std::io::stderr().lock();
                // Allocates while holding the stderr lock.
                let text = format!("writer line {line} {:?}", vec![line; 4]);
                let _ = writeln!(err, "{text}");
                drop(err);
                line += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        body();
        stop.store(true, Ordering::Relaxed);
    });
}
