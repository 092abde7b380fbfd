//! End to end, the way an operator meets onsite: a real child process with onsite installed,
//! real `kill -USR2`, and the files it wrote decoded as pprof.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use onsite_core::ProfileKind::Cpu;
use onsite_core::pprof::{decode, function_totals};
use onsite_core::test_support::{ChildTest, dump_files, role};
use support::Service;

const DEADLINE: Duration = Duration::from_secs(60);

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn cpu_only() -> [(&'static str, &'static str); 1] {
    [("ONSITE_KINDS", "cpu")]
}

/// The service the tests signal: onsite with the cpu kind, burning CPU in a known function.
#[test]
#[ignore = "child process role"]
fn child_busy_service() {
    if role().as_deref() == Some("child_busy_service") {
        support::run_service(0);
    }
}

/// The same service with two threads allocating and freeing heavily (the unwinder stress).
#[test]
#[ignore = "child process role"]
fn child_allocating_service() {
    if role().as_deref() == Some("child_allocating_service") {
        support::run_service(2);
    }
}

/// A service with its own SIGTERM handler (through signal-hook, as tokio's signal handling is):
/// it exits with code 42 when its handler has seen SIGTERM.
#[test]
#[ignore = "child process role"]
fn child_service_with_its_own_sigterm_handler() {
    if role().as_deref() != Some("child_service_with_its_own_sigterm_handler") {
        return;
    }
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).init();
    let term = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(libc::SIGTERM, std::sync::Arc::clone(&term)).unwrap();
    let onsite = onsite::install().unwrap();
    support::announce_ready();
    while !term.load(std::sync::atomic::Ordering::Relaxed) {
        support::burn_cpu_in_a_known_function(100_000);
    }
    tracing::info!("the service's own SIGTERM handler ran; shutting down gracefully");
    onsite.shutdown();
    std::process::exit(42);
}

#[test]
fn sigterm_during_a_capture_still_reaches_the_services_own_handler() {
    let dir = tempdir();
    let mut service = Service::start("child_service_with_its_own_sigterm_handler", dir.path(), &cpu_only());
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    std::thread::sleep(Duration::from_millis(300));
    service.signal(libc::SIGTERM);
    let status = service.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(42), "the service's handler decided how to end: {status:?}\n{}", service.log_text());
    let files = dump_files(dir.path(), Cpu, "pprof");
    assert_eq!(files.len(), 1, "the capture was written first: {files:?}");
    decode(&std::fs::read(&files[0]).unwrap()).unwrap();
}

#[test]
fn usr2_twice_writes_a_cpu_profile_naming_the_hot_function() {
    let dir = tempdir();
    let mut service = Service::start("child_busy_service", dir.path(), &cpu_only());
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    std::thread::sleep(Duration::from_secs(2));
    service.signal(libc::SIGUSR2);
    let files = service.wait_for_files(Cpu, "svg", 1, DEADLINE);
    let pprof = dump_files(dir.path(), Cpu, "pprof");
    assert_eq!(pprof.len(), 1, "{pprof:?}");

    let name = pprof[0].file_name().unwrap().to_str().unwrap();
    let expected_prefix = format!("{}-{}-cpu-", exe_name(), service.pid());
    assert!(name.starts_with(&expected_prefix), "{name} should start with {expected_prefix}");

    let profile = decode(&std::fs::read(&pprof[0]).unwrap()).unwrap();
    let types: Vec<(&str, &str)> = profile
        .sample_type
        .iter()
        .map(|t| (profile.string_table[t.r#type as usize].as_str(), profile.string_table[t.unit as usize].as_str()))
        .collect();
    assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
    let top = function_totals(&profile, "samples").unwrap();
    let top3: Vec<&str> = top.iter().take(3).map(|t| t.function.as_str()).collect();
    assert!(
        top3.iter().any(|f| f.ends_with("burn_cpu_in_a_known_function")),
        "the hot function is not in the top 3 by flat samples: {:?}",
        &top[..top.len().min(10)]
    );
    let svg = std::fs::read_to_string(&files[0]).unwrap();
    assert!(svg.contains("<svg") && svg.contains("burn_cpu_in_a_known_function"));
}

#[test]
fn two_captures_in_one_second_get_distinct_names_with_the_childs_pid() {
    let dir = tempdir();
    let mut service = Service::start(
        "child_busy_service",
        dir.path(),
        &[("ONSITE_KINDS", "cpu"), ("ONSITE_CPU_FLAMEGRAPH", "false")],
    );
    for _ in 0..2 {
        service.signal(libc::SIGUSR2);
        std::thread::sleep(Duration::from_millis(100));
        service.signal(libc::SIGUSR2);
        std::thread::sleep(Duration::from_millis(100));
    }
    let files = service.wait_for_files(Cpu, "pprof", 2, DEADLINE);
    assert_eq!(files.len(), 2);
    assert_ne!(files[0], files[1]);
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(name.contains(&format!("-{}-cpu-", service.pid())), "{name}");
        assert_ne!(service.pid() as u32, std::process::id());
    }
    assert!(dump_files(dir.path(), Cpu, "svg").is_empty(), "ONSITE_CPU_FLAMEGRAPH=false is honoured");
}

#[test]
fn a_planted_symlink_is_not_followed_and_the_service_keeps_running() {
    let dir = tempdir();
    let mut service = Service::start("child_busy_service", dir.path(), &cpu_only());
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "do not overwrite").unwrap();
    // Plant a symlink at every name the next capture could take in the coming 5 s (planting
    // itself takes a while on a loaded machine, so the window is extended until it is ahead).
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut ms = now_ms() - 200;
    while ms < now_ms() + 5000 {
        let name = format!("{}-{}-cpu-{}.pprof", exe_name(), service.pid(), onsite_core::format_utc_millis(ms));
        std::os::unix::fs::symlink(&precious, dir.path().join(name)).unwrap();
        ms += 1;
    }
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture stopped", DEADLINE);

    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "do not overwrite");
    let log = service.log_text();
    assert!(log.contains("already exists"), "the error names the cause: {log}");
    assert!(log.contains(&dir.path().display().to_string()), "the error names the path: {log}");
    assert!(service.is_alive(), "the service keeps running");
    // Every planted name is still a symlink to the precious file; nothing was written through it.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "pprof") {
            assert_eq!(std::fs::read_link(&path).unwrap(), precious);
        }
    }
}

#[test]
fn an_unwritable_dump_dir_is_logged_and_the_service_keeps_running() {
    let dir = tempdir();
    let unwritable = "/proc/onsite-cannot-create-this";
    let mut service =
        Service::start("child_busy_service", dir.path(), &[("ONSITE_KINDS", "cpu"), ("ONSITE_DIR", unwritable)]);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture stopped", DEADLINE);
    let log = service.log_text();
    assert!(log.contains(&format!("could not write {unwritable}/")), "{log}");
    assert!(service.is_alive());
    // And it still answers the next toggle.
    service.signal(libc::SIGUSR2);
    std::thread::sleep(Duration::from_millis(200));
    assert!(service.is_alive());
}

#[test]
fn a_wrong_env_value_in_strict_mode_is_a_clear_install_error() {
    let dir = tempdir();
    let out = ChildTest::new("child_busy_service")
        .env("ONSITE_DIR", dir.path())
        .env("ONSITE_STRICT", "1")
        .env("ONSITE_MAX_DURATION", "10 minutes")
        .output(DEADLINE);
    assert_eq!(out.status.code(), Some(3), "install failed and the child exited with its own code");
    assert!(out.stderr.contains("ONSITE_MAX_DURATION=\"10 minutes\""), "{}", out.stderr);
}

#[test]
fn sigint_during_a_capture_writes_the_files_then_exits_by_sigint() {
    let dir = tempdir();
    let mut service = Service::start("child_busy_service", dir.path(), &cpu_only());
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    std::thread::sleep(Duration::from_millis(500));
    service.signal(libc::SIGINT);
    let status = service.wait_exit(DEADLINE);
    assert_eq!(status.signal(), Some(libc::SIGINT), "exits by SIGINT, as without onsite: {status:?}");
    let files = dump_files(dir.path(), Cpu, "pprof");
    assert_eq!(files.len(), 1, "{files:?}\n{}", service.log_text());
    decode(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(dump_files(dir.path(), Cpu, "svg").len(), 1);
    let temporaries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(temporaries.is_empty(), "no temporary file is left: {temporaries:?}");
}

#[test]
fn sigterm_without_a_capture_ends_the_process_as_usual() {
    let dir = tempdir();
    let mut service = Service::start("child_busy_service", dir.path(), &cpu_only());
    service.signal(libc::SIGTERM);
    let status = service.wait_exit(DEADLINE);
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert!(dump_files(dir.path(), Cpu, "pprof").is_empty());
}

#[test]
fn fifty_toggles_under_an_allocating_load_neither_hang_nor_crash() {
    let dir = tempdir();
    let mut service = Service::start(
        "child_allocating_service",
        dir.path(),
        // Retention would otherwise start deleting the oldest of these 50 captures.
        &[("ONSITE_KINDS", "cpu"), ("ONSITE_CPU_FLAMEGRAPH", "false"), ("ONSITE_RETAIN_CAPTURES", "unlimited")],
    );
    for cycle in 1..=50 {
        service.signal(libc::SIGUSR2);
        std::thread::sleep(Duration::from_millis(60));
        service.signal(libc::SIGUSR2);
        // Each capture's file must appear before the next starts: a hang shows up here, within
        // a deadline, instead of as a stuck test.
        service.wait_for_files(Cpu, "pprof", cycle, DEADLINE);
        assert!(service.is_alive(), "crashed in cycle {cycle}:\n{}", service.log_text());
    }
    let files = dump_files(dir.path(), Cpu, "pprof");
    assert_eq!(files.len(), 50);
    for f in &files {
        decode(&std::fs::read(f).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
    // A late SIGPROF after the last stop must not kill the process.
    std::thread::sleep(Duration::from_millis(300));
    assert!(service.is_alive());
}

fn exe_name() -> String {
    std::env::current_exe().unwrap().file_name().unwrap().to_str().unwrap().to_owned()
}
