//! Every kind through the real operator path: a child service that uses onsite's allocator,
//! locks and trace layer; `kill -USR2` twice; each file decoded and checked against the work
//! the child is known to do. And `kill -USR1` for the thread dump, idle and during a capture.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use onsite_core::ProfileKind;
use onsite_core::pprof::{decode, function_totals};
use onsite_core::test_support::{ChildTest, dump_files, role};
use support::Service;
use tracing_subscriber::prelude::*;

#[global_allocator]
static ALLOC: onsite::memory::Allocator = onsite::memory::Allocator::new();

const DEADLINE: Duration = Duration::from_secs(90);

/// Grows by 64 KiB blocks that are never freed.
static LEAKED: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
static CONTENDED: onsite::sync::Mutex<u64> = onsite::sync::Mutex::new(0);
static NEVER_UNLOCKED: onsite::sync::Mutex<()> = onsite::sync::Mutex::new(());
/// How many of the dump's subject threads have reached their own function.
static IN_PLACE: AtomicUsize = AtomicUsize::new(0);

#[inline(never)]
fn leak_a_block() {
    LEAKED.lock().unwrap().push(vec![7u8; 64 * 1024]);
}

/// Holds the contended lock across a sleep: the mutex profile must charge the waiting to it.
#[inline(never)]
fn hold_the_lock_while_sleeping() -> u64 {
    let mut n = CONTENDED.lock();
    *n += 1;
    std::thread::sleep(Duration::from_millis(5));
    let value = *n;
    drop(n);
    std::hint::black_box(value)
}

#[inline(never)]
fn spawn_a_short_lived_thread() {
    let _ = std::thread::Builder::new().name("short-lived".into()).spawn(|| std::hint::black_box(1 + 1));
}

#[inline(never)]
fn spin_forever() {
    IN_PLACE.fetch_add(1, Ordering::SeqCst);
    loop {
        support::burn_cpu_in_a_known_function(1_000_000);
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[inline(never)]
fn sleep_forever() {
    IN_PLACE.fetch_add(1, Ordering::SeqCst);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[inline(never)]
fn wait_on_a_lock_forever() {
    IN_PLACE.fetch_add(1, Ordering::SeqCst);
    drop(NEVER_UNLOCKED.lock());
}

#[test]
#[ignore = "child process role"]
fn child_full_service() {
    let Some(_onsite) = support::install_traced_as_role("child_full_service") else { return };
    // Threads in known states for the SIGUSR1 dump.
    let held = NEVER_UNLOCKED.lock();
    std::thread::Builder::new().name("spinner".into()).spawn(spin_forever).unwrap();
    std::thread::Builder::new().name("sleeper".into()).spawn(sleep_forever).unwrap();
    std::thread::Builder::new().name("blocked".into()).spawn(wait_on_a_lock_forever).unwrap();
    std::mem::forget(held);
    // Two threads contend for one lock.
    for name in ["contender-a", "contender-b"] {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(|| {
                loop {
                    let _span = tracing::info_span!("contend").entered();
                    hold_the_lock_while_sleeping();
                }
            })
            .unwrap();
    }
    // Ready only once every subject thread runs its own function, so a dump taken at once
    // cannot catch one still starting up.
    while IN_PLACE.load(Ordering::SeqCst) < 3 {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    support::announce_ready();
    loop {
        let _span = tracing::info_span!("work_item").entered();
        leak_a_block();
        spawn_a_short_lived_thread();
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn one_capture_writes_every_kind_and_each_names_the_childs_own_work() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start("child_full_service", dir.path(), &[("ONSITE_MUTEX_FRACTION", "1")]);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    std::thread::sleep(Duration::from_secs(3));
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture stopped", DEADLINE);

    let one = |kind: ProfileKind, ext: &str| {
        let files = dump_files(dir.path(), kind, ext);
        assert_eq!(files.len(), 1, "one {kind} file, found {files:?}\n{}", service.log_text());
        files[0].clone()
    };
    let profile = |kind: ProfileKind| decode(&std::fs::read(one(kind, "pprof")).unwrap()).unwrap();
    let top = |kind: ProfileKind, sample_type: &str| -> Vec<String> {
        function_totals(&profile(kind), sample_type)
            .unwrap()
            .into_iter()
            .filter(|r| r.flat > 0)
            .map(|r| r.function)
            .collect()
    };

    let memory = top(ProfileKind::Memory, "inuse_space");
    assert!(memory[0].ends_with("leak_a_block"), "memory, by inuse_space: {memory:?}");
    let mutex = top(ProfileKind::Mutex, "delay");
    assert!(mutex[0].ends_with("hold_the_lock_while_sleeping"), "mutex, by delay: {mutex:?}");
    let block = top(ProfileKind::Block, "delay");
    assert!(block.iter().take(2).any(|f| f.ends_with("hold_the_lock_while_sleeping")), "block: {block:?}");
    let created = top(ProfileKind::ThreadCreate, "threadcreate");
    assert!(created[0].ends_with("spawn_a_short_lived_thread"), "threadcreate: {created:?}");
    let cpu = top(ProfileKind::Cpu, "samples");
    assert!(cpu.iter().take(3).any(|f| f.ends_with("burn_cpu_in_a_known_function")), "cpu: {cpu:?}");

    let trace: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(one(ProfileKind::Trace, "json")).unwrap()).unwrap();
    let begins = trace.iter().filter(|e| e["ph"] == "B" && e["name"] == "work_item").count();
    assert!(begins > 10, "the trace holds the child's spans: {begins} work_item spans");

    // All files of the capture share one timestamp: `{command}-{pid}-{kind}-{stamp}.{ext}`.
    let prefix =
        format!("{}-{}-", std::env::current_exe().unwrap().file_name().unwrap().to_str().unwrap(), service.pid());
    let stamps: std::collections::BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|name| {
            let (_kind, rest) = name.strip_prefix(&prefix)?.split_once('-')?;
            Some(rest[..=rest.find('Z')?].to_owned())
        })
        .collect();
    assert_eq!(stamps.len(), 1, "{stamps:?}");
}

#[test]
fn usr1_dumps_every_thread_with_its_function_idle_and_during_a_capture() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start("child_full_service", dir.path(), &[("ONSITE_KINDS", "threadcreate")]);
    service.signal(libc::SIGUSR1);
    let first = service.wait_for_files(ProfileKind::Threads, "txt", 1, DEADLINE);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    service.signal(libc::SIGUSR1);
    let both = service.wait_for_files(ProfileKind::Threads, "txt", 2, DEADLINE);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture stopped", DEADLINE);
    for dump in [&first[0], &both[1]] {
        let text = std::fs::read_to_string(dump).unwrap();
        for (thread, function) in [
            ("spinner", "spin_forever"),
            ("sleeper", "sleep_forever"),
            ("blocked", "wait_on_a_lock_forever"),
            ("onsite-control", "onsite::control::Controller::run"),
        ] {
            let section = text
                .split("\nthread ")
                .find(|s| s.contains(&format!("\"{thread}\"")))
                .unwrap_or_else(|| panic!("{thread} is not in the dump {}:\n{text}", dump.display()));
            assert!(section.contains(function), "{thread}'s stack lacks {function}:\n{section}");
        }
    }
}

fn live_threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Installs, captures every kind through the API, shuts down, and exits 0 only if no thread
/// onsite started is left and SIGINT is back to its default disposition.
#[test]
#[ignore = "child process role"]
fn child_install_capture_shutdown() {
    if role().as_deref() != Some("child_install_capture_shutdown") {
        return;
    }
    tracing_subscriber::registry()
        .with(onsite::trace::layer())
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false))
        .init();
    let before = live_threads();
    let onsite = onsite::install().expect("install");
    assert!(onsite.start_capture(), "a capture starts");
    assert!(!onsite.start_capture(), "a second start while one runs changes nothing");
    {
        let _span = tracing::info_span!("inside_the_capture").entered();
        leak_a_block();
        spawn_a_short_lived_thread();
    }
    let written = onsite.stop_capture();
    assert!(written.len() >= 6, "files of every kind: {written:?}");
    onsite.shutdown();
    // Short-lived threads of the workload may still be exiting.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while live_threads() > before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(live_threads(), before, "threads left behind after shutdown");
    // SAFETY: reading the current disposition only.
    let sigint = unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGINT, std::ptr::null(), &mut current);
        current.sa_sigaction
    };
    assert_eq!(sigint, libc::SIG_DFL, "SIGINT is back to its default");
    // A second installation works after a shutdown.
    onsite::install().expect("install again").shutdown();
    support::announce_ready();
}

#[test]
fn shutdown_leaves_no_thread_or_handler_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = ChildTest::new("child_install_capture_shutdown").env("ONSITE_DIR", dir.path()).run(DEADLINE);
    assert!(out.stdout.contains(support::READY), "{out:?}");
}
