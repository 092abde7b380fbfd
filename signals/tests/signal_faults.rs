//! Fault tests around the signals a service handles itself: real child processes, real
//! `kill`s, the files they wrote decoded.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use onsite_core::ProfileKind::Cpu;
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
