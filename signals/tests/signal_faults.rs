//! Fault tests around the signals a service handles itself: real child processes, real
//! `kill`s, the files they wrote decoded.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use onsite_core::ProfileKind::{Cpu, Threads};
use onsite_core::pprof::decode;
use onsite_core::test_support::{dump_files, role};
use support::Service;

const DEADLINE: Duration = Duration::from_secs(60);

/// The file whose appearance makes the SIGTERM child register its own handler.
const REGISTER_FILE_VAR: &str = "ONSITE_TEST_REGISTER_FILE";

/// Exit code base of the SIGTERM child: it exits with this plus the SIGTERMs its handler saw.
const EXIT_BASE: i32 = 40;

fn cpu_only() -> Vec<(&'static str, &'static str)> {
    vec![("ONSITE_KINDS", "cpu"), ("ONSITE_CPU_FLAMEGRAPH", "false")]
}

fn init_logging() {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).init();
}

/// A service that registers its own SIGTERM handler (through signal-hook's registry, as tokio's
/// `signal(SignalKind::terminate())` does) only when the parent creates a file, so the parent
/// can make that happen while a capture runs. The handler counts deliveries; after the second
/// one the service shuts onsite down and exits with `EXIT_BASE` + the count.
#[test]
#[ignore = "child process role"]
fn child_registers_its_sigterm_handler_when_told() {
    if role().as_deref() != Some("child_registers_its_sigterm_handler_when_told") {
        return;
    }
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    init_logging();
    let onsite = onsite::install().expect("the test's configuration is valid");
    let register_file = PathBuf::from(std::env::var_os(REGISTER_FILE_VAR).unwrap());
    support::announce_ready();
    let mut registered = false;
    let mut reported = 0;
    loop {
        if !registered && register_file.exists() {
            // SAFETY: the action only increments an atomic.
            unsafe {
                signal_hook::low_level::register(libc::SIGTERM, || {
                    SEEN.fetch_add(1, Ordering::Relaxed);
                })
            }
            .unwrap();
            registered = true;
            tracing::info!("the service registered its own SIGTERM handler");
        }
        let seen = SEEN.load(Ordering::Relaxed);
        if seen != reported {
            tracing::info!("the service's handler has seen SIGTERM {seen} times");
            reported = seen;
        }
        if seen >= 2 {
            // The service decides: a graceful stop of onsite (it writes nothing more, no capture
            // runs), then its own exit code.
            onsite.shutdown();
            let seen = SEEN.load(Ordering::Relaxed);
            tracing::info!("the service exits; its handler saw SIGTERM {seen} times");
            std::process::exit(EXIT_BASE + seen.min(50) as i32);
        }
        support::burn_cpu_in_a_known_function(10_000);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A SIGTERM handler registered on top of onsite's while a capture runs chains to onsite's; the
/// signal onsite sends again after writing the capture must not come back to it. Then a second
/// capture, armed over the service's handler, and a second SIGTERM: one delivery each.
#[test]
fn a_sigterm_handler_registered_mid_capture_sees_each_sigterm_once() {
    let dir = tempfile::tempdir().unwrap();
    let register_file = dir.path().join("register-now");
    let mut env = cpu_only();
    let register_file_text = register_file.to_str().unwrap().to_owned();
    env.push((REGISTER_FILE_VAR, &register_file_text));
    let mut service = Service::start("child_registers_its_sigterm_handler_when_told", dir.path(), &env);

    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    std::fs::write(&register_file, "").unwrap();
    service.wait_for_log("the service registered its own SIGTERM handler", DEADLINE);

    service.signal(libc::SIGTERM);
    service.wait_for_log("capture stopped", DEADLINE);
    service.wait_for_log("the service's handler has seen SIGTERM 1 times", DEADLINE);
    assert_eq!(dump_files(dir.path(), Cpu, "pprof").len(), 1, "the capture was written:\n{}", service.log_text());

    // The control thread handles a termination before the toggles that follow it: once the
    // second capture has started, anything onsite sent again for the first SIGTERM has been sent.
    service.signal(libc::SIGUSR2);
    service.wait_for_log_count("capture started", 2, DEADLINE);
    assert!(
        !service.log_text().contains("has seen SIGTERM 2 times"),
        "onsite's own re-sent SIGTERM reached the service's handler again:\n{}",
        service.log_text()
    );

    service.signal(libc::SIGTERM);
    let status = service.wait_exit(DEADLINE);
    assert_eq!(
        status.code(),
        Some(EXIT_BASE + 2),
        "the service saw each of the two SIGTERMs exactly once and exited as it decided: {status:?}\n{}",
        service.log_text()
    );
    let files = dump_files(dir.path(), Cpu, "pprof");
    assert_eq!(files.len(), 2, "both captures were written before the exit: {files:?}");
    for file in &files {
        decode(&std::fs::read(file).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

/// A service that uses SIGUSR1 itself (log reopening, say): its handler, registered before
/// onsite's install, counts deliveries and the main loop logs the count.
#[test]
#[ignore = "child process role"]
fn child_with_its_own_sigusr1_handler() {
    if role().as_deref() != Some("child_with_its_own_sigusr1_handler") {
        return;
    }
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    init_logging();
    // SAFETY: the action only increments an atomic.
    unsafe {
        signal_hook::low_level::register(libc::SIGUSR1, || {
            SEEN.fetch_add(1, Ordering::Relaxed);
        })
    }
    .unwrap();
    let _onsite = onsite::install().expect("the test's configuration is valid");
    support::announce_ready();
    let mut reported = 0;
    loop {
        let seen = SEEN.load(Ordering::Relaxed);
        if seen != reported {
            tracing::info!("the service's SIGUSR1 handler has run {seen} times");
            reported = seen;
        }
        support::burn_cpu_in_a_known_function(10_000);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The thread-dump file's section for `thread`, which must be there.
fn section_of<'a>(dump: &'a str, thread: &str) -> &'a str {
    dump.split("\nthread ")
        .find(|s| s.contains(&format!("\"{thread}\"")))
        .unwrap_or_else(|| panic!("{thread} is not in the dump:\n{dump}"))
}

#[test]
fn with_the_dump_signal_moved_sigusr1_reaches_only_the_services_handler() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = cpu_only();
    env.push(("ONSITE_DUMP_SIGNAL", "SIGRTMIN+5"));
    let mut service = Service::start("child_with_its_own_sigusr1_handler", dir.path(), &env);
    let log = service.log_text();
    assert!(log.contains("dump_signal=SIGRTMIN+5"), "install logs the moved signal:\n{log}");
    assert!(!log.contains("already has a handler"), "onsite left SIGUSR1 alone:\n{log}");

    service.signal(libc::SIGUSR1);
    service.wait_for_log("the service's SIGUSR1 handler has run 1 times", DEADLINE);
    // The control thread looks at toggles and dump requests each time it wakes: once a capture
    // started and stopped after that SIGUSR1, a dump it asked for would have been written.
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture stopped", DEADLINE);
    assert!(dump_files(dir.path(), Threads, "txt").is_empty(), "SIGUSR1 wrote no thread dump:\n{}", service.log_text());

    service.signal(libc::SIGRTMIN() + 5);
    let dumps = service.wait_for_files(Threads, "txt", 1, DEADLINE);
    let text = std::fs::read_to_string(&dumps[0]).unwrap();
    assert!(section_of(&text, "onsite-control").contains("onsite::control::Controller::run"), "{text}");
    assert!(
        !service.log_text().contains("has run 2 times"),
        "the moved signal did not reach the service's SIGUSR1 handler:\n{}",
        service.log_text()
    );
    assert!(service.is_alive());
}

#[test]
fn install_says_when_onsite_chains_to_a_handler_already_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start("child_with_its_own_sigusr1_handler", dir.path(), &cpu_only());
    // The child's stderr reaches the log through a pipe: wait for the line, not only for ready.
    service.wait_for_log("SIGUSR1 already has a handler", DEADLINE);
    let log = service.log_text();
    let warning = log.lines().find(|l| l.contains("SIGUSR1 already has a handler")).unwrap();
    assert!(warning.contains("WARN") && warning.contains("ONSITE_DUMP_SIGNAL"), "{warning}");
    assert!(!log.contains("SIGUSR2 already has a handler"), "{log}");
    // Chained: one SIGUSR1 runs both handlers.
    service.signal(libc::SIGUSR1);
    service.wait_for_log("the service's SIGUSR1 handler has run 1 times", DEADLINE);
    service.wait_for_files(Threads, "txt", 1, DEADLINE);
}

/// The file whose appearance makes the forking child fork.
const FORK_FILE_VAR: &str = "ONSITE_TEST_FORK_FILE";

/// A service that forks while a capture runs (a pre-fork server's worker, say). The forked
/// child toggles (SIGUSR2 to itself), drops its copy of the `Onsite` handle, and sends itself
/// SIGTERM; the service reports how that child ended.
#[test]
#[ignore = "child process role"]
fn child_forks_during_a_capture() {
    if role().as_deref() != Some("child_forks_during_a_capture") {
        return;
    }
    init_logging();
    let onsite = onsite::install().expect("the test's configuration is valid");
    let fork_file = PathBuf::from(std::env::var_os(FORK_FILE_VAR).unwrap());
    support::announce_ready();
    while !fork_file.exists() {
        support::burn_cpu_in_a_known_function(10_000);
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: the child only makes async-signal-safe calls until it drops its copy of the
    // handle, which must not wait for the parent's threads (what this tests), and then ends.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: signals to this (child) process only; `_exit` ends it without running the
        // parent's exit handlers.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGUSR2);
            drop(onsite);
            libc::kill(libc::getpid(), libc::SIGTERM);
            libc::sleep(5);
            libc::_exit(3);
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child, with a status out-pointer we own.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    if libc::WIFSIGNALED(status) {
        tracing::info!("the forked child ended by signal {}", libc::WTERMSIG(status));
    } else {
        tracing::info!("the forked child exited with {}", libc::WEXITSTATUS(status));
    }
    loop {
        support::burn_cpu_in_a_known_function(10_000);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A child forked during a capture does not share the parent's onsite: its toggle reaches no
/// one, dropping its copy of the handle returns at once, and SIGTERM has its default action
/// there again (onsite's interception belonged to the parent's capture). The parent's capture
/// runs on and is written at the parent's own toggle.
#[test]
fn a_child_forked_during_a_capture_is_not_the_parents_onsite() {
    let dir = tempfile::tempdir().unwrap();
    let fork_file = dir.path().join("fork-now");
    let mut env = cpu_only();
    let fork_file_text = fork_file.to_str().unwrap().to_owned();
    env.push((FORK_FILE_VAR, &fork_file_text));
    let mut service = Service::start("child_forks_during_a_capture", dir.path(), &env);

    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    std::fs::write(&fork_file, "").unwrap();
    service.wait_for_log("the forked child ended", DEADLINE);
    assert!(
        service.log_text().contains(&format!("the forked child ended by signal {}", libc::SIGTERM)),
        "the forked child's SIGTERM did not end it:\n{}",
        service.log_text()
    );
    // The child's toggle would have stopped the parent's capture by now.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !service.log_text().contains("capture stopped"),
        "the child's toggle reached the parent:\n{}",
        service.log_text()
    );
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture stopped", DEADLINE);
    assert_eq!(support::manifests(dir.path()).len(), 1, "one capture, the parent's");
}
