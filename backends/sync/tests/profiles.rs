//! The mutex and block profiles as a service gets them: a child process uses the locks while
//! captures are started and stopped through the `Profiler` trait, the files are written
//! through a real `CaptureOutput`, and the parent decodes them.

mod common;

use std::hint::black_box;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use onsite_core::test_support::{self, dump_files};
use onsite_core::{ProfileKind, Profiler};
use onsite_sync::{BlockProfiler, Condvar, Mutex, MutexProfiler};

const DEADLINE: Duration = Duration::from_secs(30);
const ROUNDS: u32 = 4;
const HOLD: Duration = Duration::from_millis(40);

/// Holds `lock` across a sleep while the other thread waits for it: the planted bottleneck.
#[inline(never)]
fn hold_contended_lock(lock: &Mutex<u64>, holding: &mpsc::Sender<()>) {
    let mut guard = lock.lock();
    holding.send(()).unwrap();
    std::thread::sleep(HOLD);
    *guard += 1;
}

/// Waits for `lock` while the holder sleeps; returns how long it waited.
#[inline(never)]
fn wait_for_contended_lock(lock: &Mutex<u64>) -> Duration {
    let started = Instant::now();
    let mut guard = lock.lock();
    let waited = started.elapsed();
    *guard += 1;
    waited
}

/// Locks and unlocks a lock no other thread touches, a million times.
#[inline(never)]
fn use_uncontended_lock(lock: &Mutex<u64>) {
    for _ in 0..1_000_000 {
        *lock.lock() += 1;
    }
    black_box(lock);
}

#[test]
#[ignore = "child process of contended_lock_is_named_in_both_profiles"]
fn child_contended_and_uncontended() {
    if test_support::role().as_deref() != Some("contended") {
        return;
    }
    let mut mutex = MutexProfiler::new(1);
    let mut block = BlockProfiler::default();
    let mutex_capture = mutex.start().unwrap();
    let block_capture = block.start().unwrap();

    let contended = Mutex::new(0);
    let uncontended = Mutex::new(0);
    let waited = std::thread::scope(|s| {
        let (holding_tx, holding_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let contended = &contended;
        s.spawn(move || {
            for _ in 0..ROUNDS {
                hold_contended_lock(contended, &holding_tx);
                done_rx.recv().unwrap();
            }
        });
        let waiter = s.spawn(move || {
            let mut waited = Duration::ZERO;
            for _ in 0..ROUNDS {
                holding_rx.recv().unwrap();
                waited += wait_for_contended_lock(contended);
                done_tx.send(()).unwrap();
            }
            waited
        });
        use_uncontended_lock(&uncontended);
        waiter.join().unwrap()
    });

    let out = capture_output(&child_dir());
    mutex_capture.stop(&out).unwrap();
    block_capture.stop(&out).unwrap();
    std::fs::write(child_dir().join("waited-ns"), waited.as_nanos().to_string()).unwrap();
}

#[test]
fn contended_lock_is_named_in_both_profiles() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_contended_and_uncontended", "contended", dir.path(), DEADLINE);
    let waited: i64 = std::fs::read_to_string(dir.path().join("waited-ns")).unwrap().parse().unwrap();

    let mutex = read_profile(dir.path(), ProfileKind::Mutex);
    assert_eq!(
        types(&mutex),
        (vec!["contentions/count".to_owned(), "delay/nanoseconds".to_owned()], "contentions/count".to_owned())
    );
    let mutex_top = top(&mutex);
    assert!(mutex_top[0].function.ends_with("hold_contended_lock"), "mutex top: {mutex_top:#?}");
    let delay = total(&mutex, 1);
    assert!(
        delay >= waited / 2 && delay <= waited * 2,
        "mutex delay {delay} ns vs {waited} ns the waiter measured: {mutex_top:#?}"
    );
    assert!(total(&mutex, 0) >= 1);

    let block = read_profile(dir.path(), ProfileKind::Block);
    assert_eq!(types(&block).0, types(&mutex).0);
    let block_top = top(&block);
    assert!(block_top[0].function.ends_with("wait_for_contended_lock"), "block top: {block_top:#?}");
    let blocked = block_top[0].flat;
    assert!(blocked >= waited / 2 && blocked <= waited * 2, "blocked {blocked} ns vs {waited} ns measured");

    for profile in [&mutex, &block] {
        assert!(!mentions(profile, "use_uncontended_lock"), "the uncontended lock shows: {:#?}", top(profile));
    }
}

/// Waits on `ready` until the flag is set; returns how long it waited.
#[inline(never)]
fn wait_on_condvar(lock: &Mutex<bool>, ready: &Condvar, waiting: mpsc::Sender<()>) -> Duration {
    let mut flag = lock.lock();
    let started = Instant::now();
    waiting.send(()).unwrap();
    while !*flag {
        ready.wait(&mut flag);
    }
    started.elapsed()
}

#[test]
#[ignore = "child process of condvar_wait_is_in_the_block_profile"]
fn child_condvar() {
    if test_support::role().as_deref() != Some("condvar") {
        return;
    }
    let mut block = BlockProfiler::default();
    let capture = block.start().unwrap();
    let lock = Mutex::new(false);
    let ready = Condvar::new();
    let waited = std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let waiter = s.spawn(|| wait_on_condvar(&lock, &ready, tx));
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        *lock.lock() = true;
        ready.notify_one();
        waiter.join().unwrap()
    });
    capture.stop(&capture_output(&child_dir())).unwrap();
    std::fs::write(child_dir().join("waited-ns"), waited.as_nanos().to_string()).unwrap();
}

#[test]
fn condvar_wait_is_in_the_block_profile() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_condvar", "condvar", dir.path(), DEADLINE);
    let waited: i64 = std::fs::read_to_string(dir.path().join("waited-ns")).unwrap().parse().unwrap();
    let block = read_profile(dir.path(), ProfileKind::Block);
    let block_top = top(&block);
    let row = block_top.iter().find(|t| t.function.ends_with("wait_on_condvar")).expect("the condvar waiter");
    assert!(row.flat >= waited / 2 && row.flat <= waited * 2, "condvar wait {} ns vs {waited} ns measured", row.flat);
    assert!(block_top[0].function.ends_with("wait_on_condvar"), "{block_top:#?}");
    assert!(dump_files(dir.path(), ProfileKind::Mutex, "pprof").is_empty(), "only the block profile was captured");
}

/// Makes this thread wait for a lock that `holder` holds across a short sleep (each holder
/// has its own name, which tells the captures apart).
fn contend(holder: fn(&Mutex<u64>, &mpsc::Sender<()>)) {
    let lock = Mutex::new(0);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let lock = &lock;
        s.spawn(move || holder(lock, &tx));
        rx.recv().unwrap();
        *lock.lock() += 1;
    });
}

#[inline(never)]
fn hold_in_first_capture(lock: &Mutex<u64>, holding: &mpsc::Sender<()>) {
    let _guard = lock.lock();
    holding.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
}

#[inline(never)]
fn hold_in_second_capture(lock: &Mutex<u64>, holding: &mpsc::Sender<()>) {
    let _guard = lock.lock();
    holding.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
}

#[inline(never)]
fn hold_between_captures(lock: &Mutex<u64>, holding: &mpsc::Sender<()>) {
    let _guard = lock.lock();
    holding.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
}

#[test]
#[ignore = "child process of captures_are_independent_and_do_not_leak"]
fn child_independent_captures() {
    if test_support::role().as_deref() != Some("independent") {
        return;
    }
    let dir = child_dir();
    let mut mutex = MutexProfiler::new(1);
    let mut block = BlockProfiler::new(Duration::ZERO);

    // 1: mutex only.
    let capture = mutex.start().unwrap();
    assert!(mutex.start().is_err(), "a second mutex capture while one runs is refused");
    contend(hold_in_first_capture);
    capture.stop(&capture_output(&dir.join("1"))).unwrap();

    contend(hold_between_captures);

    // 2: block only.
    let capture = block.start().unwrap();
    contend(hold_in_second_capture);
    capture.stop(&capture_output(&dir.join("2"))).unwrap();

    // 3: both again, no contention: nothing from earlier captures may show.
    let mutex_capture = mutex.start().unwrap();
    let block_capture = block.start().unwrap();
    let out = capture_output(&dir.join("3"));
    mutex_capture.stop(&out).unwrap();
    block_capture.stop(&out).unwrap();

    // 4: a stopper dropped without stop ends its capture, and a new one starts cleanly.
    drop(mutex.start().unwrap());
    let capture = mutex.start().unwrap();
    contend(hold_in_second_capture);
    capture.stop(&capture_output(&dir.join("4"))).unwrap();
}

#[test]
fn captures_are_independent_and_do_not_leak() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_independent_captures", "independent", dir.path(), DEADLINE);
    let first = dir.path().join("1");
    let mutex1 = read_profile(&first, ProfileKind::Mutex);
    assert!(top(&mutex1)[0].function.ends_with("hold_in_first_capture"), "{:#?}", top(&mutex1));
    assert!(dump_files(&first, ProfileKind::Block, "pprof").is_empty());

    let second = dir.path().join("2");
    assert!(dump_files(&second, ProfileKind::Mutex, "pprof").is_empty());
    let block2 = read_profile(&second, ProfileKind::Block);
    assert!(top(&block2)[0].function.starts_with("profiles::contend"), "the waiter's stack: {:#?}", top(&block2));
    for name in ["hold_in_first_capture", "hold_between_captures"] {
        assert!(!mentions(&block2, name), "{name} leaked into the block capture");
    }

    let third = dir.path().join("3");
    for kind in [ProfileKind::Mutex, ProfileKind::Block] {
        let profile = read_profile(&third, kind);
        assert!(profile.sample.is_empty(), "{kind} capture without contention has samples: {:#?}", top(&profile));
    }

    let fourth = read_profile(&dir.path().join("4"), ProfileKind::Mutex);
    assert!(top(&fourth)[0].function.ends_with("hold_in_second_capture"), "{:#?}", top(&fourth));
    assert!(!mentions(&fourth, "hold_in_first_capture"));
    assert_eq!(MutexProfiler::default().kind(), ProfileKind::Mutex);
    assert_eq!(BlockProfiler::default().kind(), ProfileKind::Block);
}
