//! Automatic captures end to end: a real child process with rules set through `ONSITE_AUTO`,
//! a metric it really has (its thread count), and the files and manifests it wrote.

mod support;

use std::time::{Duration, Instant};

use onsite_core::ProfileKind::Cpu;
use onsite_core::pprof::decode;
use onsite_core::test_support::{ChildTest, dump_files, role};
use support::Service;

const DEADLINE: Duration = Duration::from_secs(60);

/// A quiet service that starts 60 threads when the test creates its spike file.
#[test]
#[ignore = "child process role"]
fn child_spiking_service() {
    if role().as_deref() == Some("child_spiking_service") {
        support::run_spiking_service();
    }
}

fn start(dir: &std::path::Path, rules: &str, extra: &[(&'static str, &str)]) -> Service {
    let spike = dir.with_extension("spike");
    let mut env = vec![
        ("ONSITE_AUTO", rules),
        ("ONSITE_AUTO_INTERVAL", "100ms"),
        ("ONSITE_KINDS", "cpu"),
        ("ONSITE_CPU_FLAMEGRAPH", "false"),
        (support::SPIKE_FILE_VAR, spike.to_str().unwrap()),
    ];
    env.extend_from_slice(extra);
    Service::start("child_spiking_service", dir, &env)
}

fn spike(dir: &std::path::Path) {
    std::fs::write(dir.with_extension("spike"), "go").unwrap();
}

#[test]
fn a_rule_fires_once_writes_a_complete_capture_and_a_manifest_then_cools_down() {
    let dir = tempfile::tempdir().unwrap();
    // The child always has more than one thread (its main thread and onsite's): the rule
    // holds from the first sample, for good.
    let rule = "threads>1for1s kinds=cpu capture=1s";
    let service = start(dir.path(), rule, &[]);
    let manifests = service.wait_for_manifests(1, DEADLINE);
    // Proof that the rule was evaluated, held and was held back during the cooldown.
    service.wait_for_log("rule holds again but is cooling down", DEADLINE);
    // Several more samples in the cooldown; still one capture.
    std::thread::sleep(Duration::from_millis(500));
    let log = service.log_text();
    assert_eq!(log.matches("automatic capture rule fired").count(), 1, "{log}");
    assert_eq!(support::manifests(dir.path()).len(), 1);
    let pprof = dump_files(dir.path(), Cpu, "pprof");
    assert_eq!(pprof.len(), 1, "{pprof:?}");
    decode(&std::fs::read(&pprof[0]).unwrap()).unwrap();

    let (path, m) = &manifests[0];
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with(&format!("{}-{}-manifest-", support::command_name(), service.pid())), "{name}");
    assert_eq!(m["pid"], service.pid());
    assert_eq!(m["onsite_version"], env!("CARGO_PKG_VERSION"));
    let started_by = &m["started_by"];
    assert_eq!(started_by["trigger"], "rule", "{m:#}");
    assert_eq!(started_by["rule"], rule);
    assert_eq!(started_by["metric"], "threads");
    let history = started_by["history"].as_array().unwrap();
    assert!(history.len() >= 2, "a 1 s run at 100 ms takes several samples: {m:#}");
    assert!(history.iter().all(|p| p["value"].as_f64().unwrap() > 1.0), "{m:#}");
    assert_eq!(history.last().unwrap()["value"], started_by["value"]);
    assert!(started_by["reason"].as_str().unwrap().contains("in every sample"), "{m:#}");
    assert_eq!(m["stopped_by"], "the rule's capture duration elapsed");
    assert_eq!(m["kinds"], serde_json::json!(["cpu"]));
    assert_eq!(m["failed"], serde_json::json!([]));
    assert!(m["stopped_at_unix_ms"].as_u64().unwrap() >= m["started_at_unix_ms"].as_u64().unwrap());
    // Every file it lists exists with the size it says, and the capture's files are all listed.
    let files = m["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{m:#}");
    assert_eq!(files[0]["kind"], "cpu");
    assert_eq!(files[0]["name"], pprof[0].file_name().unwrap().to_str().unwrap());
    assert_eq!(files[0]["bytes"], std::fs::metadata(&pprof[0]).unwrap().len());
}

#[test]
fn sigusr2_during_an_automatic_capture_stops_it_early() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = start(dir.path(), "threads>1 kinds=cpu capture=1h", &[]);
    service.wait_for_log("capture started", DEADLINE);
    service.signal(libc::SIGUSR2);
    let manifests = service.wait_for_manifests(1, DEADLINE);
    let m = &manifests[0].1;
    assert_eq!(m["started_by"]["trigger"], "rule", "{m:#}");
    assert_eq!(m["stopped_by"], "SIGUSR2", "{m:#}");
    assert_eq!(dump_files(dir.path(), Cpu, "pprof").len(), 1);
}

#[test]
fn a_rule_never_interrupts_a_manual_capture_and_fires_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = start(dir.path(), "threads>40 kinds=cpu capture=500ms", &[]);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    spike(dir.path());
    service.wait_for_log("rule holds but another capture is running", DEADLINE);
    service.signal(libc::SIGUSR2);
    let manifests = service.wait_for_manifests(2, DEADLINE);
    let (manual, auto) = (&manifests[0].1, &manifests[1].1);
    assert_eq!(manual["started_by"]["trigger"], "signal", "{manual:#}");
    assert_eq!(manual["stopped_by"], "SIGUSR2", "the rule did not stop it: {manual:#}");
    assert_eq!(auto["started_by"]["trigger"], "rule", "{auto:#}");
    assert!(auto["started_by"]["value"].as_f64().unwrap() > 40.0);
    assert!(
        manual["stopped_at_unix_ms"].as_u64() <= auto["started_at_unix_ms"].as_u64(),
        "captures never overlap: {manual:#} {auto:#}"
    );
    assert_eq!(dump_files(dir.path(), Cpu, "pprof").len(), 2);
}

#[test]
fn without_rules_the_control_thread_never_wakes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = Service::start(
        "child_spiking_service",
        dir.path(),
        &[("ONSITE_KINDS", "cpu"), ("RUST_LOG", "info,onsite=debug")],
    );
    quiet.wait_for_log("control thread running", DEADLINE);
    // Let start-up work (a retention pass) finish: the count settles.
    let start = Instant::now();
    let mut settled = support::control_thread_wakeups(&quiet);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = support::control_thread_wakeups(&quiet);
        if now == settled {
            break;
        }
        settled = now;
        assert!(start.elapsed() < DEADLINE, "the control thread never settles");
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(support::control_thread_wakeups(&quiet), settled, "no rule, no periodic wake-up");

    // With a rule it wakes every interval (here 100 ms): the same measure moves.
    let dir2 = tempfile::tempdir().unwrap();
    let watching = start_with_rule(dir2.path());
    let before = support::control_thread_wakeups(&watching);
    std::thread::sleep(Duration::from_secs(1));
    assert!(support::control_thread_wakeups(&watching) > before + 2);
}

fn start_with_rule(dir: &std::path::Path) -> Service {
    let service = start(dir, "threads>100000", &[("RUST_LOG", "info,onsite=debug")]);
    service.wait_for_log("control thread running", DEADLINE);
    service
}

#[test]
fn a_wrong_rule_in_strict_mode_is_a_clear_install_error_quoting_it() {
    let cases = [
        ("ONSITE_AUTO", "mem>80%for3m; cpu>90%for1mm", "rule 2 \"cpu>90%for1mm\""),
        ("ONSITE_AUTO", "disk>90%", "unknown metric \"disk\""),
        ("ONSITE_AUTO", "mem>80% kinds=heap", "option `kinds=heap`"),
        ("ONSITE_AUTO_INTERVAL", "0s", "must be at least"),
    ];
    for (var, value, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let out = ChildTest::new("child_spiking_service")
            .env("ONSITE_DIR", dir.path())
            .env("ONSITE_AUTO", "threads>500")
            .env("ONSITE_STRICT", "1")
            .env(var, value)
            .output(DEADLINE);
        let stderr = &out.stderr;
        assert_eq!(out.status.code(), Some(3), "install failed and the child exited with its own code: {stderr}");
        assert!(stderr.contains(&format!("{var}=")), "{stderr}");
        assert!(stderr.contains(expected), "{var}={value}: {stderr}");
    }
}
