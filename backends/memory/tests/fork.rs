//! A service that forks while a memory capture runs (a pre-fork server, `fork` + `exec`): in a
//! child process with onsite's allocator, a capture runs while four threads allocate, and the
//! main thread forks again and again. Each forked child allocates a lot, tries its copy of the
//! capture's stopper, and must exit 0 having written nothing (no deadlock on a lock a parent's
//! thread held at the fork, no inherited capture); the parent's capture still completes. The
//! same with always-on sampling running (and a capture of it).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use onsite_core::ProfileKind::Memory;
use onsite_core::test_support::the_dump_file;
use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, Profiler};
use onsite_memory::{MemoryMode, MemoryProfiler};

#[global_allocator]
static ALLOC: onsite_memory::Allocator = onsite_memory::Allocator::new();

const FORKS: usize = 20;
/// How long the parent waits for one forked child before it kills it and fails.
const CHILD_DEADLINE: Duration = Duration::from_secs(20);

/// Exit codes of a forked child.
const STOPPER_WROTE: i32 = 3;
const PANICKED: i32 = 4;

fn run(role: &str) {
    let dir = tempfile::tempdir().unwrap();
    run_child(role, dir.path(), Duration::from_secs(120), Duration::from_secs(60));
    // The parent's capture completed.
    let profile = read_pprof(&the_dump_file(dir.path(), Memory, "pprof"));
    assert!(!profile.sample.is_empty(), "the parent's capture recorded allocations");
    // No forked child wrote anything.
    let forked = dir.path().join("forked");
    let written: Vec<_> = std::fs::read_dir(&forked).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(written.is_empty(), "forked children wrote {written:?}");
}

#[test]
fn forks_during_a_sampled_capture_neither_hang_nor_inherit_it() {
    run("child_forks_sampled");
}

#[test]
fn forks_during_a_dhat_capture_neither_hang_nor_inherit_it() {
    run("child_forks_dhat");
}

#[test]
fn forks_while_always_on_sampling_runs_neither_hang_nor_inherit_it() {
    run("child_forks_always_on");
}

#[test]
#[ignore = "child role"]
fn child_forks_always_on() {
    let Some(dir) = child_role("child_forks_always_on") else { return };
    let mut profiler = MemoryProfiler::new(MemoryMode::Sampled, 4096);
    profiler.sample_always().expect("always-on sampling starts");
    forks_during_a_capture(profiler, &dir);
}

#[test]
#[ignore = "child role"]
fn child_forks_sampled() {
    let Some(dir) = child_role("child_forks_sampled") else { return };
    forks_during_a_capture(MemoryProfiler::new(MemoryMode::Sampled, 4096), &dir);
}

#[test]
#[ignore = "child role"]
fn child_forks_dhat() {
    let Some(dir) = child_role("child_forks_dhat") else { return };
    forks_during_a_capture(MemoryProfiler::new(MemoryMode::Dhat, 1), &dir);
}

fn forks_during_a_capture(mut profiler: MemoryProfiler, dir: &Path) {
    let forked_dir = dir.join("forked");
    std::fs::create_dir_all(&forked_dir).unwrap();
    let stopper = profiler.start().expect("memory capture starts");
    // Four threads allocate throughout (dhat's lock is often held by one of them at a fork).
    let stop = std::sync::atomic::AtomicBool::new(false);
    let stopper = std::thread::scope(|s| {
        for worker in 0..4 {
            let stop = &stop;
            s.spawn(move || churn_with_reallocs(worker, stop));
        }
        // Also on a failed assertion, so the threads end and the failure is reported at once.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(50));
        let stopper = std::sync::Mutex::new(Some(stopper));
        for round in 0..FORKS {
            progress(dir, &format!("fork {round}"));
            // SAFETY: the child only allocates, uses its copy of the stopper and `_exit`s.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
            if pid == 0 {
                let copy = stopper.lock().map(|mut s| s.take()).ok().flatten();
                in_forked_child(copy, &forked_dir);
            }
            wait_for(pid, round);
            std::thread::sleep(Duration::from_millis(5));
        }
        stopper.into_inner().unwrap().unwrap()
    });
    let out = CaptureOutput::new(DumpDir::new(dir), CaptureStamp::now());
    stopper.stop(&out).expect("the parent's capture stops and writes");
}

/// The forked child: allocates a lot, then tries to stop its copy of the capture (which must
/// refuse and write nothing), and exits 0. Never returns.
fn in_forked_child(stopper: Option<Box<dyn onsite_core::Stopper>>, forked_dir: &Path) -> ! {
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut kept: Vec<Vec<u8>> = Vec::new();
        for i in 0..20_000usize {
            let mut block = vec![i as u8; 16 + (i * 37) % 4000];
            block.extend_from_slice(&[1; 100]);
            if i % 3 == 0 {
                kept.push(block);
            }
            if kept.len() > 2000 {
                kept.clear();
            }
        }
        let out = CaptureOutput::new(DumpDir::new(forked_dir), CaptureStamp::now());
        match stopper.map(|stopper| stopper.stop(&out)) {
            Some(Ok(())) => STOPPER_WROTE,
            _ => 0,
        }
    })) {
        Ok(code) => code,
        Err(_) => PANICKED,
    };
    // SAFETY: ends the forked child at once, without running the parent's exit handlers.
    unsafe { libc::_exit(code) }
}

/// Waits for the forked child `pid` to exit 0; kills it and fails if it does not within the
/// deadline.
fn wait_for(pid: libc::pid_t, round: usize) {
    let started = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child without blocking.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "forked child {round} ended with status {status:#x}"
            );
            return;
        }
        assert_eq!(done, 0, "waitpid: {}", std::io::Error::last_os_error());
        if started.elapsed() > CHILD_DEADLINE {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("forked child {round} did not exit within {CHILD_DEADLINE:?} (deadlocked)");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
