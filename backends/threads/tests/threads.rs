//! The threadcreate profile and the all-threads dump, each in a real child process (the hook and
//! the dump are process-wide), read back with onsite's pprof reader and as text.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use onsite_core::pprof::{decode, function_totals};
use onsite_core::test_support::{self, ChildTest, the_dump_file};
use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, ProfileKind, Profiler};

const DIR: &str = "ONSITE_THREADS_TEST_DIR";
const ALPHA: usize = 3;
const BETA: usize = 5;

/// Runs this test binary's `child` test with `role`, failing (and killing it) after a deadline.
fn run_child(role: &str, dir: &Path) {
    ChildTest::new("child").role(role).env(DIR, dir).run(Duration::from_secs(30));
}

fn cum(profile: &onsite_core::pprof::proto::Profile, sample_type: &str, function: &str) -> i64 {
    let rows = function_totals(profile, sample_type).expect("the sample type exists");
    rows.iter().filter(|r| r.function.ends_with(function)).map(|r| r.cum).sum()
}

#[test]
fn threadcreate_counts_threads_by_the_function_that_created_them() {
    let dir = tempfile::tempdir().unwrap();
    run_child("threadcreate", dir.path());
    let file = the_dump_file(dir.path(), ProfileKind::ThreadCreate, "pprof");
    let profile = decode(&std::fs::read(&file).unwrap()).unwrap();

    assert_eq!(cum(&profile, "threadcreate", "::spawn_from_alpha"), ALPHA as i64);
    assert_eq!(cum(&profile, "threadcreate", "::spawn_from_beta"), BETA as i64);
    // Alpha's threads still run at the stop; beta's were joined.
    assert_eq!(cum(&profile, "alive", "::spawn_from_alpha"), ALPHA as i64);
    assert_eq!(cum(&profile, "alive", "::spawn_from_beta"), 0);
    // The thread started before the capture is alive, not created.
    assert_eq!(cum(&profile, "threadcreate", "::spawn_before_capture"), 0);
    assert_eq!(cum(&profile, "alive", "::spawn_before_capture"), 1);
    assert_eq!(cum(&profile, "alive", "[main thread]"), 1);
    // The hook's own frames are not what a stack ends in.
    let leaf = function_totals(&profile, "threadcreate").unwrap();
    assert!(leaf.iter().all(|r| r.flat == 0 || !r.function.starts_with("onsite_threads")), "{leaf:?}");
}

/// Distinct creating stacks the first capture sees: more than the hook's table holds (1024).
const FIRST_STACKS: u32 = 1050;
/// Distinct creating stacks the second capture sees, none of them the first's.
const SECOND_STACKS: u32 = 50;

#[test]
fn each_capture_has_room_for_its_creating_stacks_after_1100_distinct_ones() {
    let dir = tempfile::tempdir().unwrap();
    run_child("refill", dir.path());
    let read = |capture: &str| {
        let file = the_dump_file(&dir.path().join(capture), ProfileKind::ThreadCreate, "pprof");
        decode(&std::fs::read(&file).unwrap()).unwrap()
    };
    let first = read("first");
    // The first capture really filled the table: some of its stacks found no room.
    let unrecorded = "[onsite: creating stack not recorded, table full]";
    assert!(cum(&first, "threadcreate", unrecorded) > 0, "the table was not filled");
    let second = read("second");
    assert_eq!(cum(&second, "threadcreate", "::spawn_from_bits"), SECOND_STACKS as i64);
    assert_eq!(cum(&second, "threadcreate", unrecorded), 0);
    // A thread created in the first capture and alive through the second keeps its stack.
    assert_eq!(cum(&second, "alive", "::spawn_long_lived"), 1);
    assert_eq!(cum(&second, "threadcreate", "::spawn_long_lived"), 0);
}

/// Spawns (and joins) one thread from a stack of its own for each `code`: the creating stack
/// goes through `zero` or `one` at each of 11 levels, by the bits of `code`.
#[inline(never)]
fn spawn_from_bits(code: u32, bit: u32) {
    #[inline(never)]
    fn zero(code: u32, bit: u32) {
        spawn_from_bits(code, bit);
        std::hint::black_box(());
    }
    #[inline(never)]
    fn one(code: u32, bit: u32) {
        spawn_from_bits(code, bit);
        std::hint::black_box(());
    }
    if bit == 11 {
        std::thread::spawn(|| {}).join().unwrap();
    } else if code >> bit & 1 == 0 {
        zero(code, bit + 1);
    } else {
        one(code, bit + 1);
    }
    std::hint::black_box(());
}

#[inline(never)]
fn spawn_long_lived(release: &Arc<Mutex<()>>) -> std::thread::JoinHandle<()> {
    let release = Arc::clone(release);
    std::thread::spawn(move || drop(release.lock()))
}

/// Each forked child symbolises its own profile (~0.5 s in a debug build), so a few suffice: a
/// fork often lands inside a creation of the two creating threads.
const FORKS: usize = 10;

#[test]
fn a_child_forked_while_threads_are_created_captures_its_own_threads() {
    let dir = tempfile::tempdir().unwrap();
    run_child("fork", dir.path());
    for round in 0..FORKS {
        let file = the_dump_file(&dir.path().join(format!("forked-{round}")), ProfileKind::ThreadCreate, "pprof");
        let profile = decode(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(cum(&profile, "threadcreate", "::spawn_in_forked_child"), 2, "child {round}");
    }
}

#[inline(never)]
fn spawn_in_forked_child() {
    for _ in 0..2 {
        std::thread::spawn(|| {}).join().unwrap();
    }
}

/// In a forked child: a threadcreate capture of its own threads (its compaction must not wait
/// for creations that were in progress in the parent's threads at the fork). Never returns.
fn capture_in_forked_child(dir: &Path) -> ! {
    let ok = std::panic::catch_unwind(|| {
        let stopper = onsite_threads::ThreadCreateProfiler::new().start().unwrap();
        spawn_in_forked_child();
        stopper.stop(&output(dir)).unwrap();
    })
    .is_ok();
    // SAFETY: ends the forked child at once.
    unsafe { libc::_exit(if ok { 0 } else { 3 }) }
}

#[test]
fn the_threads_dump_shows_every_thread_in_its_function() {
    let dir = tempfile::tempdir().unwrap();
    run_child("dump", dir.path());
    let file = the_dump_file(dir.path(), ProfileKind::Threads, "txt");
    let text = std::fs::read_to_string(&file).unwrap();
    let section = |name: &str| -> String {
        let start = text.find(&format!("\"{name}\"")).unwrap_or_else(|| panic!("thread {name} listed:\n{text}"));
        let rest = &text[start..];
        rest[..rest.find("\nthread ").unwrap_or(rest.len())].to_owned()
    };
    assert!(section("blocked").contains("::wait_for_lock"), "{}", section("blocked"));
    assert!(section("sleeper").contains("::sleep_a_lot"), "{}", section("sleeper"));
    assert!(section("spinner").contains("::spin_until_told"), "{}", section("spinner"));
    assert!(section("sleeper").contains("created by"), "{}", section("sleeper"));
    let masked = section("masked");
    assert!(masked.contains("did not answer") && masked.contains("blocks SIGRTMIN+4"), "{masked}");
    assert!(text.contains("main thread"), "{text}");
    // The main thread (its bounds from the `[stack]` mapping) is walked through the test
    // harness to the runtime's start (the harness's own `main` is a tail call in a release
    // build, so it is no frame to look for).
    let main = &text[text.find(", main thread").unwrap()..];
    assert!(main[..main.find("\nthread ").unwrap_or(main.len())].contains("std::rt::lang_start"), "{main}");
    // A thread interrupted in code no object holds (generated at run time): the handler's
    // walker says it cannot walk it, and nothing else walks it there.
    let jitted = section("jitted");
    assert!(jitted.contains("[stack not walked: a frame is in code loaded after"), "{jitted}");
    assert!(!jitted.contains("#0"), "{jitted}");
}

#[inline(never)]
fn spawn_from_alpha(release: &Arc<Mutex<()>>) -> Vec<std::thread::JoinHandle<()>> {
    (0..ALPHA)
        .map(|_| {
            let release = Arc::clone(release);
            std::thread::spawn(move || drop(release.lock()))
        })
        .collect()
}

#[inline(never)]
fn spawn_from_beta() {
    let handles: Vec<_> = (0..BETA).map(|_| std::thread::spawn(|| {})).collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
}

#[inline(never)]
fn spawn_before_capture(release: &Arc<Mutex<()>>) -> std::thread::JoinHandle<()> {
    let release = Arc::clone(release);
    std::thread::spawn(move || drop(release.lock()))
}

#[inline(never)]
fn wait_for_lock(lock: &Mutex<()>, ready: mpsc::Sender<()>) {
    ready.send(()).unwrap();
    drop(lock.lock());
}

#[inline(never)]
fn sleep_a_lot(ready: mpsc::Sender<()>) {
    ready.send(()).unwrap();
    std::thread::sleep(Duration::from_secs(3600));
}

#[inline(never)]
fn spin_until_told(stop: &AtomicBool, ready: mpsc::Sender<()>) {
    ready.send(()).unwrap();
    while !stop.load(Ordering::Relaxed) {
        std::hint::spin_loop();
    }
}

/// Runs generated machine code (`loop: cmp byte [rdi], 0; je loop; ret`) in an anonymous
/// executable mapping until `stop` is set: a thread interrupted there is in no loaded object.
#[cfg(target_arch = "x86_64")]
fn spin_in_generated_code(stop: &AtomicBool, ready: mpsc::Sender<()>) {
    const CODE: [u8; 6] = [0x80, 0x3f, 0x00, 0x74, 0xfb, 0xc3];
    // SAFETY: a fresh private mapping, written, then made executable (and no longer writable);
    // the code only reads the flag byte it is given and returns once it is set. The mapping is
    // removed after the code returned.
    unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(page, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(CODE.as_ptr(), page.cast::<u8>(), CODE.len());
        assert_eq!(libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC), 0);
        let spin = std::mem::transmute::<*mut libc::c_void, extern "C" fn(*const AtomicBool)>(page);
        ready.send(()).unwrap();
        spin(stop);
        libc::munmap(page, 4096);
    }
}

#[inline(never)]
fn sleep_with_signals_blocked(ready: mpsc::Sender<()>) {
    // SAFETY: blocks every signal in this thread only.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
    ready.send(()).unwrap();
    std::thread::sleep(Duration::from_secs(3600));
}

fn output(dir: &Path) -> CaptureOutput {
    CaptureOutput::new(DumpDir::new(dir), CaptureStamp::now())
}

#[test]
#[ignore = "child process of the tests above"]
fn child() {
    let Some(role) = test_support::role() else { return };
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    assert!(matches!(onsite_threads::hook_status(), onsite_threads::HookStatus::Active { .. }));
    match role.as_str() {
        "threadcreate" => {
            let release = Arc::new(Mutex::new(()));
            let held = release.lock().unwrap();
            let early = spawn_before_capture(&release);
            let mut profiler = onsite_threads::ThreadCreateProfiler::new();
            let stopper = profiler.start().unwrap();
            let alpha = spawn_from_alpha(&release);
            spawn_from_beta();
            stopper.stop(&output(&dir)).unwrap();
            drop(held);
            alpha.into_iter().chain([early]).for_each(|h| h.join().unwrap());
        }
        "refill" => {
            let release = Arc::new(Mutex::new(()));
            let held = release.lock().unwrap();
            let mut profiler = onsite_threads::ThreadCreateProfiler::new();
            for (capture, codes) in [("first", 0..FIRST_STACKS), ("second", FIRST_STACKS..FIRST_STACKS + SECOND_STACKS)]
            {
                let out = dir.join(capture);
                std::fs::create_dir(&out).unwrap();
                let stopper = profiler.start().unwrap();
                let long_lived = (capture == "first").then(|| spawn_long_lived(&release));
                codes.for_each(|code| spawn_from_bits(code, 0));
                stopper.stop(&output(&out)).unwrap();
                std::mem::forget(long_lived); // joined at the process's end
            }
            drop(held);
        }
        "fork" => {
            // Two threads create threads all the time, so forks land inside the hook.
            let stop = Arc::new(AtomicBool::new(false));
            let creators: Vec<_> = (0..2)
                .map(|_| {
                    let stop = Arc::clone(&stop);
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            std::thread::spawn(|| {}).join().unwrap();
                        }
                    })
                })
                .collect();
            for round in 0..FORKS {
                let forked_dir = dir.join(format!("forked-{round}"));
                std::fs::create_dir(&forked_dir).unwrap();
                // SAFETY: the child captures, then `_exit`s.
                let pid = unsafe { libc::fork() };
                assert!(pid >= 0);
                if pid == 0 {
                    capture_in_forked_child(&forked_dir);
                }
                let started = std::time::Instant::now();
                let mut status = 0;
                // SAFETY: waits for our own child without blocking.
                while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
                    if started.elapsed() > Duration::from_secs(10) {
                        // SAFETY: kills our own child.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        stop.store(true, Ordering::Relaxed);
                        panic!("forked child {round} did not finish its capture (deadlocked)");
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child {round}: {status:#x}");
            }
            stop.store(true, Ordering::Relaxed);
            creators.into_iter().for_each(|h| h.join().unwrap());
        }
        "dump" => {
            let lock = Arc::new(Mutex::new(()));
            let held = lock.lock().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let (ready, is_ready) = mpsc::channel();
            let named = |name: &str| std::thread::Builder::new().name(name.into());
            let lock2 = Arc::clone(&lock);
            let r = ready.clone();
            let blocked = named("blocked").spawn(move || wait_for_lock(&lock2, r)).unwrap();
            let r = ready.clone();
            named("sleeper").spawn(move || sleep_a_lot(r)).unwrap();
            let (stop2, r) = (Arc::clone(&stop), ready.clone());
            let spinner = named("spinner").spawn(move || spin_until_told(&stop2, r)).unwrap();
            let (stop2, r) = (Arc::clone(&stop), ready.clone());
            let jitted = named("jitted").spawn(move || spin_in_generated_code(&stop2, r)).unwrap();
            named("masked").spawn(move || sleep_with_signals_blocked(ready)).unwrap();
            for _ in 0..5 {
                is_ready.recv().unwrap();
            }
            // A capture running at the same time does not get in the way.
            let mut profiler = onsite_threads::ThreadCreateProfiler::new();
            let stopper = profiler.start().unwrap();
            onsite_threads::dump_all_threads(&output(&dir), Duration::from_secs(2)).unwrap();
            drop(stopper);
            stop.store(true, Ordering::Relaxed);
            drop(held);
            blocked.join().unwrap();
            spinner.join().unwrap();
            jitted.join().unwrap();
            // The handler is gone again: the signal's default action is back.
            // SAFETY: reads the current action only.
            let action = unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                libc::sigaction(onsite_threads::default_dump_signal(), std::ptr::null(), &mut action);
                action.sa_sigaction
            };
            assert_eq!(action, libc::SIG_DFL);
        }
        other => panic!("unknown role {other}"),
    }
}

/// A C-style start routine that ends its thread with `pthread_exit`, which unwinds (forced)
/// through the hook's trampoline.
extern "C-unwind" fn exits_with_pthread_exit(_: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: ends this thread; nothing on this frame needs dropping.
    unsafe { libc::pthread_exit(7 as *mut libc::c_void) }
}

#[test]
fn pthread_exit_passes_through_the_hook() {
    let mut thread: libc::pthread_t = 0;
    // SAFETY: the start routine has the C signature (it may also unwind, as pthread_exit does);
    // the thread is joined below.
    let value = unsafe {
        let start = std::mem::transmute::<
            extern "C-unwind" fn(*mut libc::c_void) -> *mut libc::c_void,
            extern "C" fn(*mut libc::c_void) -> *mut libc::c_void,
        >(exits_with_pthread_exit);
        assert_eq!(libc::pthread_create(&mut thread, std::ptr::null(), start, std::ptr::null_mut()), 0);
        let mut value = std::ptr::null_mut();
        assert_eq!(libc::pthread_join(thread, &mut value), 0);
        value
    };
    assert_eq!(value as usize, 7);
    assert!(
        matches!(onsite_threads::hook_status(), onsite_threads::HookStatus::Active { threads_seen } if threads_seen > 0)
    );
}
