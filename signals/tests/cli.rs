//! The `onsite` command against real processes: a child service with onsite installed that
//! leaks in one known function and burns CPU in another, captured with `onsite capture`; a
//! process without onsite (`sleep 60`) that must be refused and left alive; a capture a rule
//! started, which must be waited for rather than toggled off; Ctrl-C during the countdown;
//! `report`, `diff`, `ls`, `top` and `dump` on the dumps it wrote, and `--json` parsed.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use onsite_core::ProfileKind;
use onsite_core::test_support::{ChildOutput, ChildTest, dump_files, role};
use serde_json::Value;
use support::Service;

#[global_allocator]
static ALLOC: onsite::memory::Allocator = onsite::memory::Allocator::new();

const ONSITE: &str = env!("CARGO_BIN_EXE_onsite");
const DEADLINE: Duration = Duration::from_secs(180);
const LEAK: &str = "leak_in_a_known_function";
const HOT: &str = "burn_cpu_in_a_known_function";

/// Grows by 16 KiB blocks that are never freed (up to 256 MiB).
static LEAKED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

#[inline(never)]
fn leak_in_a_known_function() {
    let mut leaked = LEAKED.lock().unwrap();
    if leaked.len() < 16 * 1024 {
        leaked.push(vec![7u8; 16 * 1024]);
    }
}

/// The service: leaks steadily on one thread (one `tracing` span per block) and burns CPU in
/// a known function on the main one.
#[test]
#[ignore = "child process role"]
fn child_leaking_service() {
    let Some(_onsite) = support::install_traced_as_role("child_leaking_service") else { return };
    std::thread::Builder::new()
        .name("leaker".into())
        .spawn(|| {
            loop {
                drop(tracing::info_span!("leak_a_block").entered());
                leak_in_a_known_function();
                std::thread::sleep(Duration::from_millis(2));
            }
        })
        .unwrap();
    support::announce_ready();
    loop {
        support::burn_cpu_in_a_known_function(100_000);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The spiking service of the rule tests: quiet, more than one thread from the start.
#[test]
#[ignore = "child process role"]
fn child_spiking_service() {
    if role().as_deref() == Some("child_spiking_service") {
        support::run_spiking_service();
    }
}

fn leaking_service(dir: &Path) -> Service {
    Service::start("child_leaking_service", dir, &[("ONSITE_MEMORY_SAMPLE_BYTES", "65536")])
}

/// Runs `onsite args…` to its end.
fn onsite(args: &[&str]) -> ChildOutput {
    ChildTest::program(ONSITE, args).env("NO_COLOR", "1").output(DEADLINE)
}

/// Runs `onsite args…`, which must succeed.
fn onsite_ok(args: &[&str]) -> ChildOutput {
    let out = onsite(args);
    assert!(
        out.status.success(),
        "onsite {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out
}

fn json(out: &ChildOutput) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.stdout))
}

fn section<'a>(report: &'a Value, kind: &str) -> &'a Value {
    let sections = report["sections"].as_array().expect("sections");
    sections.iter().find(|s| s["kind"] == kind).unwrap_or_else(|| panic!("no {kind} section in {report:#}"))
}

/// The functions of one top, in order.
fn functions(top: &Value) -> Vec<String> {
    top["rows"].as_array().unwrap().iter().map(|r| r["function"].as_str().unwrap().to_owned()).collect()
}

/// The top of `kind` by `sample_type` in a report.
fn top_of(report: &Value, kind: &str, sample_type: &str) -> Vec<String> {
    let tops = section(report, kind)["tops"].as_array().unwrap();
    let top =
        tops.iter().find(|t| t["sample_type"] == sample_type).unwrap_or_else(|| panic!("{kind}: no {sample_type}"));
    functions(top)
}

/// Polls `probe` until it answers (failing after [`DEADLINE`]).
fn wait<T>(mut probe: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "nothing within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn only_memory_profile(dir: &Path, stamp: &str) -> PathBuf {
    let files = dump_files(dir, ProfileKind::Memory, "pprof");
    files.into_iter().find(|f| f.to_str().unwrap().contains(stamp)).expect("the capture's memory profile")
}

#[test]
fn capture_reports_the_leak_and_the_hot_function_and_two_heaps_diff_to_the_leak() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = leaking_service(dir.path());
    let pid = service.pid().to_string();

    // What the operator types, and reads.
    let out = onsite_ok(&["capture", &pid, "--for", "3s"]);
    let text = &out.stdout;
    assert!(text.contains("started by SIGUSR2, stopped by SIGUSR2"), "{text}");
    assert!(text.contains(&format!("cli::{LEAK}")), "the leak is in the report:\n{text}");
    assert!(text.contains(&format!("support::{HOT}")), "the hot function is in the report:\n{text}");
    assert!(text.lines().all(|l| l.chars().count() <= 80), "lines fit 80 columns:\n{text}");
    assert!(!text.contains('\x1b'), "no colour when stdout is not a terminal");
    assert!(out.stderr.contains(&format!("sent SIGUSR2 to pid {pid}")), "{}", out.stderr);

    // The same capture for scripts: the leak is the heap's first site, the hot function among
    // the CPU's first three.
    let first = support::manifests(dir.path());
    assert_eq!(first.len(), 1, "one capture: {first:?}");
    let report = json(&onsite_ok(&["report", "--json", first[0].0.to_str().unwrap()]));
    assert_eq!(report["why"], "SIGUSR2");
    let heap = top_of(&report, "memory", "inuse_space");
    assert!(heap[0].ends_with(LEAK), "heap by inuse_space: {heap:?}");
    let cpu = &section(&report, "cpu")["tops"][0];
    assert!(functions(cpu).iter().take(3).any(|f| f.ends_with(HOT)), "cpu: {cpu:#}");
    // A dump directory names its newest capture; the trace and threadcreate sections are there.
    let by_dir = json(&onsite_ok(&["report", "--json", dir.path().to_str().unwrap()]));
    assert_eq!(by_dir["manifest"]["path"], report["manifest"]["path"]);
    let spans = &section(&by_dir, "trace")["spans"][0];
    assert_eq!(spans["name"], "leak_a_block", "{by_dir:#}");
    assert!(spans["count"].as_u64().unwrap() > 10, "{by_dir:#}");
    let alive = top_of(&by_dir, "threadcreate", "alive");
    assert!(!alive.is_empty(), "threads alive by creating stack: {by_dir:#}");

    // A second, longer capture: the leak holds more, so across the two heaps it grew most.
    let second = json(&onsite_ok(&["--json", "capture", &pid, "--for", "6s", "--kinds", "memory"]));
    assert_eq!(second["waited_for_running_capture"], false);
    let sections = second["report"]["sections"].as_array().unwrap();
    assert!(sections.iter().all(|s| s["kind"] == "memory"), "--kinds memory shows only memory: {second:#}");
    let manifests = support::manifests(dir.path());
    assert_eq!(manifests.len(), 2);
    let stamp = |m: &Value| m["capture"].as_str().unwrap().to_owned();
    let before = only_memory_profile(dir.path(), &stamp(&manifests[0].1));
    let after = only_memory_profile(dir.path(), &stamp(&manifests[1].1));
    let (b, a) = (before.to_str().unwrap(), after.to_str().unwrap());
    let diff = json(&onsite_ok(&["diff", "--json", b, a]));
    assert_eq!(diff["sample_type"], "inuse_space");
    let grew = diff["grew"].as_array().unwrap();
    assert!(grew[0]["function"].as_str().unwrap().ends_with(LEAK), "grew most: {diff:#}");
    assert!(grew[0]["flat_delta"].as_i64().unwrap() > 0);
    assert!(diff["base"][0]["function"].as_str().unwrap().ends_with(LEAK), "-base: {diff:#}");
    let text = onsite_ok(&["diff", b, a]).stdout;
    let first_grown = text.lines().skip_while(|l| !l.contains("grew most")).nth(2).unwrap_or("");
    assert!(first_grown.ends_with(LEAK), "the first row under 'grew most':\n{text}");
    let based = onsite_ok(&["diff", "--base", b, a]).stdout;
    assert!(based.contains("minus"), "{based}");
    let first_row = based.lines().skip_while(|l| !l.contains("flat%")).nth(1).unwrap_or("");
    assert!(first_row.ends_with(LEAK) && first_row.trim_start().starts_with('+'), "{based}");
    // Two profiles of different kinds are refused, naming both.
    let cpu_file = &dump_files(dir.path(), ProfileKind::Cpu, "pprof")[0];
    let refused = onsite(&["diff", cpu_file.to_str().unwrap(), a]);
    assert!(!refused.status.success());
    assert!(refused.stderr.contains("not profiles of one kind"), "{}", refused.stderr);

    // `ls`: both captures, newest first, why and kinds; `top` on the file.
    let listing = json(&onsite_ok(&["ls", "--json", dir.path().to_str().unwrap()]));
    let entries = listing["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{listing:#}");
    assert_eq!(entries[0]["capture"], manifests[1].1["capture"], "newest first: {listing:#}");
    assert_eq!(entries[0]["why"], "SIGUSR2");
    assert!(entries[1]["kinds"].as_array().unwrap().contains(&Value::from("cpu")));
    assert!(entries.iter().all(|e| e["bytes"].as_u64().unwrap() > 0));
    let ls = onsite_ok(&["ls", dir.path().to_str().unwrap()]).stdout;
    assert_eq!(ls.matches("SIGUSR2").count(), 2, "{ls}");
    let top = json(&onsite_ok(&["top", "--json", "--rows", "3", a]));
    assert!(top[0]["rows"][0]["function"].as_str().unwrap().ends_with(LEAK), "{top:#}");
    assert!(service.is_alive());
}

#[test]
fn a_process_without_onsite_is_refused_and_left_alive() {
    let mut sleeper = ChildTest::program("sleep", &["60"]).spawn();
    let pid = sleeper.pid().to_string();
    for args in [["capture", &pid, "--for", "1s"].as_slice(), ["dump", &pid].as_slice()] {
        let out = onsite(args);
        assert!(!out.status.success(), "onsite {args:?} must refuse");
        let signal = if args[0] == "dump" { "SIGUSR1" } else { "SIGUSR2" };
        assert!(out.stderr.contains(&format!("pid {pid} (sleep) does not catch {signal}")), "{}", out.stderr);
        assert!(out.stderr.contains("nothing was sent"), "{}", out.stderr);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(sleeper.is_alive(), "sleep 60 must still run");
    // Nor does a process that is not there get anything but a clear error.
    let out = onsite(&["capture", "4194303"]);
    assert!(out.stderr.contains("no process 4194303"), "{}", out.stderr);
}

#[test]
fn a_capture_a_rule_started_is_waited_for_not_toggled_off() {
    let dir = tempfile::tempdir().unwrap();
    // The child always has more than one thread: the rule holds from its first sample.
    let rule = "threads>1for1s kinds=cpu capture=4s";
    let env = [
        ("ONSITE_AUTO", rule),
        ("ONSITE_AUTO_INTERVAL", "100ms"),
        ("ONSITE_KINDS", "cpu"),
        ("ONSITE_CPU_FLAMEGRAPH", "false"),
    ];
    let mut service = Service::start("child_spiking_service", dir.path(), &env);
    service.wait_for_log("automatic capture rule fired", DEADLINE);
    let running = wait(|| onsite::status::running_capture(dir.path(), service.pid() as u32));
    assert!(running.started_by["rule"] == rule, "the marker says why: {running:?}");
    let pid = service.pid().to_string();
    let out = onsite_ok(&["capture", &pid, "--for", "1s"]);
    assert!(out.stderr.contains("is already capturing cpu (started by rule"), "{}", out.stderr);
    assert!(!out.stderr.contains("sent SIGUSR2"), "nothing may be sent: {}", out.stderr);
    // The report wraps at 80 columns; read it as one line.
    let words = out.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(words.contains(&format!("started by rule {rule:?}, stopped by the rule's capture")), "{}", out.stdout);
    assert!(words.contains("in every sample"), "the rule's story: {}", out.stdout);
    let manifests = support::manifests(dir.path());
    assert_eq!(manifests.len(), 1, "only the rule's capture ran: {manifests:?}");
    assert_eq!(manifests[0].1["stopped_by"], "the rule's capture duration elapsed");
    assert!(service.is_alive());
    assert!(!service.log_text().contains("cause=SIGUSR2"), "{}", service.log_text());
}

#[test]
fn ctrl_c_stops_the_capture_early_and_still_reports() {
    let dir = tempfile::tempdir().unwrap();
    let service = leaking_service(dir.path());
    let pid = service.pid().to_string();
    let mut cli = ChildTest::program(ONSITE, &["capture", &pid, "--for", "10m", "--kinds", "cpu"]).spawn();
    let started = std::time::Instant::now();
    while !cli.stderr().contains("capturing") {
        assert!(cli.is_alive() && started.elapsed() < DEADLINE, "no countdown: {}", cli.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    cli.signal(libc::SIGINT);
    let out = cli.wait(DEADLINE);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("Ctrl-C: stopping the capture now"), "{}", out.stderr);
    assert!(out.stdout.contains("stopped by SIGUSR2"), "{}", out.stdout);
    assert!(out.stdout.contains(HOT), "{}", out.stdout);
    let manifests = support::manifests(dir.path());
    assert_eq!(manifests.len(), 1);
    assert!(manifests[0].1["duration_ms"].as_u64().unwrap() < 600_000);
}

#[test]
fn dump_prints_every_threads_stack_and_ls_lists_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = leaking_service(dir.path());
    let pid = service.pid().to_string();
    let out = onsite_ok(&["dump", &pid]);
    assert!(out.stdout.contains("leaker"), "the leaking thread is in the dump:\n{}", out.stdout);
    // The workload thread's own stack, symbolised: its role function is a frame of it whether
    // the dump finds it burning CPU or between two bursts, asleep.
    assert!(
        out.stdout.lines().any(|l| l.trim_end().ends_with(" cli::child_leaking_service")),
        "the workload thread's stack:\n{}",
        out.stdout
    );
    let dumps = dump_files(dir.path(), ProfileKind::Threads, "txt");
    assert_eq!(dumps.len(), 1);
    let as_json = json(&onsite_ok(&["--json", "dump", &pid]));
    assert!(as_json["dump"]["lines"].as_array().unwrap().len() > 3, "{as_json:#}");
    let listing = json(&onsite_ok(&["ls", "--json", dir.path().to_str().unwrap()]));
    let entries = listing["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{listing:#}");
    assert!(entries.iter().all(|e| e["why"] == "thread dump" && e["pid"].as_u64() == Some(service.pid() as u64)));
    let report = onsite_ok(&["report", dumps[0].to_str().unwrap()]).stdout;
    assert!(report.contains("onsite threads dump") && report.contains("more lines in"), "{report}");
    assert!(service.is_alive());
}
