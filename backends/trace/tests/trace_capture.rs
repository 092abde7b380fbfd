//! Trace captures in real child processes (each needs its own process: a process has one
//! tracing-chrome layer), read back with a real JSON parser.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use onsite_core::test_support::{self, ChildOutput, ChildTest, dump_files};
use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, ProfileKind, Profiler};
use serde_json::Value;
use tracing_subscriber::prelude::*;

const DIR: &str = "ONSITE_TRACE_TEST_DIR";

/// Runs this test binary's `child` test with `role`, and fails (killing it) after a deadline.
fn run_child(role: &str, dir: &Path) -> ChildOutput {
    ChildTest::new("child").role(role).env(DIR, dir).run(Duration::from_secs(30))
}

/// Counts of `B` and `E` events by span name, and the names of instant events, checking that
/// every `E` closes a `B` of the same name on the same thread.
fn balanced_spans(events: &[Value]) -> (HashMap<String, usize>, Vec<String>) {
    let mut open: HashMap<u64, Vec<String>> = HashMap::new();
    let mut closed: HashMap<String, usize> = HashMap::new();
    let mut instants = Vec::new();
    for e in events {
        let name = e["name"].as_str().unwrap_or_default().to_owned();
        let tid = e["tid"].as_u64().unwrap_or(u64::MAX);
        match e["ph"].as_str().unwrap() {
            "B" => open.entry(tid).or_default().push(name),
            "E" => {
                let top = open.get_mut(&tid).and_then(Vec::pop);
                assert_eq!(top.as_deref(), Some(name.as_str()), "E without its B: {e}");
                *closed.entry(name).or_default() += 1;
            }
            "i" => instants.push(name),
            "M" => {}
            other => panic!("unexpected phase {other}: {e}"),
        }
    }
    let still_open: Vec<&String> = open.values().flatten().collect();
    assert!(still_open.iter().all(|n| *n == "still_open"), "unexpected open spans: {still_open:?}");
    (closed, instants)
}

#[test]
fn two_captures_in_a_row_hold_balanced_named_spans() {
    let dir = tempfile::tempdir().unwrap();
    run_child("two_captures", dir.path());
    let files = dump_files(dir.path(), ProfileKind::Trace, "json");
    assert_eq!(files.len(), 2, "{files:?}");

    let first: Vec<Value> = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).expect("first file is JSON");
    let (closed, instants) = balanced_spans(&first);
    assert_eq!(closed.get("request"), Some(&3), "{closed:?}");
    assert_eq!(closed.get("parse"), Some(&3), "{closed:?}");
    assert_eq!(closed.get("worker_job"), Some(&2), "{closed:?}");
    assert!(!closed.contains_key("before_capture"), "a span entered before the capture has no E: {closed:?}");
    assert!(instants.iter().any(|n| n.contains("trace_capture.rs")), "the event is there: {instants:?}");
    assert!(first.iter().any(|e| e["ph"] == "B" && e["name"] == "still_open"), "the open span's B is kept");

    let second: Vec<Value> = serde_json::from_slice(&std::fs::read(&files[1]).unwrap()).expect("second file is JSON");
    let (closed, _) = balanced_spans(&second);
    assert_eq!(closed.get("second_capture"), Some(&2), "{closed:?}");
    assert!(!closed.contains_key("request"), "nothing of the first capture: {closed:?}");
    assert!(!closed.contains_key("still_open"), "its B was in the first file: {closed:?}");
}

#[test]
fn beside_a_filtered_fmt_layer_a_capture_records_every_level_and_off_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_child("filtered_fmt", dir.path());
    let files = dump_files(dir.path(), ProfileKind::Trace, "json");
    assert_eq!(files.len(), 2, "{files:?}");

    let first: Vec<Value> = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    let (closed, instants) = balanced_spans(&first);
    for name in ["trace_level", "debug_level", "info_level"] {
        assert_eq!(closed.get(name), Some(&2), "{name}, levels the fmt filter drops too: {closed:?}");
    }
    assert_eq!(instants.len(), 2, "the debug and the info event: {instants:?}");
    assert!(!closed.contains_key("off_before"), "{closed:?}");

    let second: Vec<Value> = serde_json::from_slice(&std::fs::read(&files[1]).unwrap()).unwrap();
    let (closed, _) = balanced_spans(&second);
    assert_eq!(closed.get("second"), Some(&1), "{closed:?}");
    assert!(!closed.contains_key("off_between"), "spans made while off are not recorded: {closed:?}");
    assert!(!closed.contains_key("info_level") && !closed.contains_key("trace_level"), "{closed:?}");

    // The fmt layer saw its own level only, during the capture as outside it.
    assert!(out.stderr.contains("info event in a capture"), "{}", out.stderr);
    assert!(!out.stderr.contains("debug event in a capture"), "{}", out.stderr);
}

#[test]
fn without_the_layer_a_capture_fails_saying_how_to_add_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_child("no_layer", dir.path());
    assert!(out.stdout.contains("onsite::trace::layer()"), "{out:?}");
    assert!(dump_files(dir.path(), ProfileKind::Trace, "json").is_empty());
}

fn threads_of_this_process() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// One capture the way onsite's control thread runs it: its scratch file in `dir` (checked to
/// leave nothing there), its file written there at the stop.
fn capture(profiler: &mut dyn Profiler, dir: &Path, work: impl FnOnce()) {
    let before = names_in(dir);
    let out = CaptureOutput::new(DumpDir::new(dir), CaptureStamp::now());
    let stopper = profiler.start_for(&out).unwrap();
    assert_eq!(names_in(dir), before, "the scratch file is unlinked at once");
    work();
    stopper.stop(&out).unwrap();
    // Two captures in one millisecond would share a name.
    std::thread::sleep(Duration::from_millis(2));
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
#[ignore = "child process of the tests above"]
fn child() {
    let Some(role) = test_support::role() else { return };
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    match role.as_str() {
        "two_captures" => {
            tracing_subscriber::registry().with(onsite_trace::layer()).init();
            let threads_before = threads_of_this_process();
            let mut profiler = onsite_trace::TraceProfiler::new();

            let before = tracing::info_span!("before_capture").entered();
            let mut still_open = None;
            capture(&mut profiler, &dir, || {
                drop(before);
                for i in 0..3 {
                    let _request = tracing::info_span!("request", i).entered();
                    let _parse = tracing::debug_span!("parse").entered();
                    tracing::info!(i, "parsed");
                }
                std::thread::spawn(|| {
                    for _ in 0..2 {
                        let _job = tracing::info_span!("worker_job").entered();
                    }
                })
                .join()
                .unwrap();
                still_open = Some(tracing::info_span!("still_open").entered());
            });
            capture(&mut profiler, &dir, || {
                drop(still_open);
                for _ in 0..2 {
                    let _s = tracing::info_span!("second_capture").entered();
                }
            });

            drop(profiler);
            assert_eq!(threads_of_this_process(), threads_before, "the writer thread was joined");
        }
        "filtered_fmt" => {
            use tracing::level_filters::LevelFilter;
            tracing_subscriber::registry()
                .with(onsite_trace::layer())
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(false)
                        .with_filter(LevelFilter::INFO),
                )
                .init();
            let mut profiler = onsite_trace::TraceProfiler::new();
            // Off, the layer asks for nothing: the maximum level is the fmt layer's, and a
            // trace callsite is disabled before any span is built.
            let off = || {
                assert_eq!(LevelFilter::current(), LevelFilter::INFO, "off leaves the max level alone");
                assert!(!tracing::enabled!(tracing::Level::TRACE), "a trace callsite is disabled while off");
            };
            off();
            drop(tracing::trace_span!("off_before").entered());
            capture(&mut profiler, &dir, || {
                assert_eq!(LevelFilter::current(), LevelFilter::TRACE, "a capture wants every level");
                assert!(tracing::enabled!(tracing::Level::TRACE));
                for _ in 0..2 {
                    let _t = tracing::trace_span!("trace_level").entered();
                    let _d = tracing::debug_span!("debug_level").entered();
                    let _i = tracing::info_span!("info_level").entered();
                }
                tracing::debug!("debug event in a capture");
                tracing::info!("info event in a capture");
            });
            off();
            let made_while_off = tracing::info_span!("off_between");
            for _ in 0..3 {
                drop(tracing::trace_span!("off_between").entered());
                drop(made_while_off.enter());
            }
            capture(&mut profiler, &dir, || {
                // Created before the capture: not the layer's (see the crate docs).
                drop(made_while_off.enter());
                drop(tracing::info_span!("second").entered());
            });
            off();
        }
        "no_layer" => {
            tracing_subscriber::registry().init();
            let mut profiler = onsite_trace::TraceProfiler::new();
            let err = profiler.start().err().expect("start fails without the layer");
            // The parent reads the message from this output.
            let message = err.to_string();
            std::io::Write::write_all(&mut std::io::stdout(), message.as_bytes()).unwrap();
        }
        other => panic!("unknown role {other}"),
    }
}
