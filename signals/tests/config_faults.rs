//! Bad configuration never takes the service down: a real child process started with wrong
//! `ONSITE_*` values keeps serving, logs what was wrong, and answers the toggle.

mod support;

use std::time::Duration;

use onsite_core::ProfileKind::{Cpu, Memory};
use onsite_core::pprof::decode;
use onsite_core::test_support::{ChildTest, dump_files, role};
use support::Service;

const DEADLINE: Duration = Duration::from_secs(60);

/// The service of these tests: `onsite::install()` (its errors end the child with code 3),
/// burning CPU in a known function.
#[test]
#[ignore = "child process role"]
fn child_service() {
    if role().as_deref() == Some("child_service") {
        support::run_service(0);
    }
}

/// The log line that reports `variable=value`, if any.
fn report_of<'a>(log: &'a str, variable: &str, value: &str) -> Option<&'a str> {
    let needle = format!("bad setting {variable}={value:?}");
    log.lines().find(|line| line.contains(&needle))
}

#[test]
fn bad_env_values_are_logged_and_the_service_keeps_serving_with_the_other_settings() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start(
        "child_service",
        dir.path(),
        &[
            ("ONSITE_MAX_DURATION", "banana"),
            ("ONSITE_CPU_HZ", "fast"),
            ("ONSITE_AUTO", "disk>90%"),
            ("ONSITE_RETAIN_CAPTURES", "0"),
            // Good values beside them still apply.
            ("ONSITE_KINDS", "cpu"),
            ("ONSITE_CPU_FLAMEGRAPH", "false"),
        ],
    );
    let log = service.log_text();
    for (variable, value, instead) in [
        ("ONSITE_MAX_DURATION", "banana", "using 600s instead"),
        ("ONSITE_CPU_HZ", "fast", "using 99 instead"),
        ("ONSITE_AUTO", "disk>90%", "using no automatic rules instead"),
        ("ONSITE_RETAIN_CAPTURES", "0", "using 50 instead"),
    ] {
        let line = report_of(&log, variable, value)
            .unwrap_or_else(|| panic!("{variable}={value} is not reported in the log:\n{log}"));
        assert!(line.contains("ERROR"), "logged as an error: {line}");
        assert!(line.contains(instead), "the line says what is used instead ({instead}): {line}");
    }

    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    let log = service.log_text();
    let started = log.lines().find(|l| l.contains("capture started")).unwrap();
    assert!(started.contains("kinds=cpu ") && started.contains("stops_after=600s"), "{started}");
    service.signal(libc::SIGUSR2);
    let files = service.wait_for_files(Cpu, "pprof", 1, DEADLINE);
    decode(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert!(dump_files(dir.path(), Memory, "pprof").is_empty(), "ONSITE_KINDS=cpu still applies");
    assert!(dump_files(dir.path(), Cpu, "svg").is_empty(), "ONSITE_CPU_FLAMEGRAPH=false still applies");
    assert!(service.is_alive(), "the service runs on:\n{}", service.log_text());
}

#[test]
fn a_bad_signal_setting_turns_that_job_off_and_one_signal_for_two_jobs_is_refused() {
    // Strict: install fails, naming both settings.
    let dir = tempfile::tempdir().unwrap();
    let out = ChildTest::new("child_service")
        .env("ONSITE_DIR", dir.path())
        .env("ONSITE_STRICT", "1")
        .env("ONSITE_DUMP_SIGNAL", "SIGRTMIN+4")
        .output(DEADLINE);
    assert_eq!(out.status.code(), Some(3), "install failed: {}", out.stderr);
    assert!(
        out.stderr.contains("ONSITE_THREADS_DUMP_SIGNAL=\"SIGRTMIN+4\": is also ONSITE_DUMP_SIGNAL"),
        "{}",
        out.stderr
    );

    // Not strict: the dump is turned off, said so, and the toggle still works.
    let mut service =
        Service::start("child_service", dir.path(), &[("ONSITE_DUMP_SIGNAL", "USR2"), ("ONSITE_KINDS", "cpu")]);
    let log = service.log_text();
    let line = report_of(&log, "ONSITE_DUMP_SIGNAL", "SIGUSR2").unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("is also the toggle signal (ONSITE_TOGGLE_SIGNAL)") && line.contains("using off"), "{line}");
    assert!(log.contains("dump_signal=off"), "{log}");
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    service.signal(libc::SIGUSR2);
    service.wait_for_files(Cpu, "pprof", 1, DEADLINE);
    assert!(service.is_alive());

    drop(service);

    // A signal onsite cannot take: that job is off, not back at a default the service may use.
    let mut service = Service::start("child_service", dir.path(), &[("ONSITE_TOGGLE_SIGNAL", "SIGTERM")]);
    let log = service.log_text();
    let line = report_of(&log, "ONSITE_TOGGLE_SIGNAL", "SIGTERM").unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("not a signal onsite can use") && line.contains("using off"), "{line}");
    assert!(log.contains("no toggle signal (ONSITE_TOGGLE_SIGNAL=off)"), "{log}");
    assert!(service.is_alive());
}

#[test]
fn a_duration_too_long_for_the_clock_is_refused_and_the_service_keeps_serving() {
    // Each part, and their sum, is beyond what a `Duration` holds; a year and a day is not, but
    // is past onsite's ceiling.
    const HUGE: &str = "10000000000000000000s10000000000000000000s";
    const SINGLE: &str = "10000000000000000000s";
    let dir = tempfile::tempdir().unwrap();
    let out = ChildTest::new("child_service")
        .env("ONSITE_DIR", dir.path())
        .env("ONSITE_STRICT", "1")
        .env("ONSITE_MAX_DURATION", HUGE)
        .output(DEADLINE);
    assert_eq!(out.status.code(), Some(3), "install failed: {}", out.stderr);
    assert!(
        out.stderr.contains(&format!("ONSITE_MAX_DURATION={HUGE:?}: is longer than 8760h")),
        "strict mode names the variable and the value: {}",
        out.stderr
    );

    let mut service = Service::start(
        "child_service",
        dir.path(),
        &[
            ("ONSITE_MAX_DURATION", HUGE),
            ("ONSITE_SHUTDOWN_BUDGET", SINGLE),
            ("ONSITE_AUTO_INTERVAL", "8784h"),
            ("ONSITE_KINDS", "cpu"),
        ],
    );
    let log = service.log_text();
    for (variable, value, instead) in [
        ("ONSITE_MAX_DURATION", HUGE, "using 600s instead"),
        ("ONSITE_SHUTDOWN_BUDGET", SINGLE, "using 3s instead"),
        ("ONSITE_AUTO_INTERVAL", "8784h", "using 5s instead"),
    ] {
        let line = report_of(&log, variable, value)
            .unwrap_or_else(|| panic!("{variable}={value} is not reported in the log:\n{log}"));
        assert!(line.contains("ERROR") && line.contains("longer than 8760h"), "{line}");
        assert!(line.contains(instead), "the line says what is used instead ({instead}): {line}");
    }
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    let started = service.log_text().lines().find(|l| l.contains("capture started")).unwrap().to_owned();
    assert!(started.contains("stops_after=600s"), "{started}");
    service.signal(libc::SIGUSR2);
    service.wait_for_files(Cpu, "pprof", 1, DEADLINE);
    assert!(service.is_alive(), "the service runs on:\n{}", service.log_text());
    drop(service);

    // The longest accepted, a year, runs a capture: its stop time is still one the clock holds.
    let mut service =
        Service::start("child_service", dir.path(), &[("ONSITE_MAX_DURATION", "8760h"), ("ONSITE_KINDS", "cpu")]);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    service.signal(libc::SIGUSR2);
    service.wait_for_files(Cpu, "pprof", 2, DEADLINE);
    assert!(service.is_alive(), "the service runs on:\n{}", service.log_text());
}
