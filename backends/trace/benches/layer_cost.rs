//! What the trace layer costs a span: no layer vs the layer while no capture runs vs during a
//! capture. One process, the three measured in alternating rounds; reported as ratios to the
//! no-layer baseline (medians of the rounds). `cargo bench -p onsite-trace`.
//!
//! Then a disabled `trace_span!` beside a per-layer filtered fmt layer (`INFO`), the common
//! setup. Interest is cached per callsite across every live dispatcher and the maximum level is
//! process-wide, so each subscriber is measured in a child process of its own (this bench
//! re-run with `--filtered-child NAME`), the variants alternating round by round.

use std::hint::black_box;
use std::io::Write;
use std::process::Command;
use std::time::Instant;

use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, Profiler};
use tracing::Dispatch;
use tracing_subscriber::prelude::*;

const SPANS: u32 = 200_000;
const ROUNDS: usize = 7;

/// Nanoseconds per span (create, enter, exit, close) under `dispatch`.
fn ns_per_span(dispatch: &Dispatch) -> f64 {
    tracing::dispatcher::with_default(dispatch, || {
        let start = Instant::now();
        for i in 0..SPANS {
            let span = tracing::info_span!("request", i);
            let _entered = black_box(span.enter());
        }
        start.elapsed().as_nanos() as f64 / f64::from(SPANS)
    })
}

/// Nanoseconds per `trace_span!` (create, enter, exit) under the global subscriber, over `n`.
fn ns_per_trace_span(n: u32) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        let span = tracing::trace_span!("filtered_out", i);
        let _entered = black_box(span.enter());
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

/// The fastest of `batches` measurements of `n` spans: at ~2 ns a span, one preemption on this
/// shared machine is worth a whole batch, and the fastest batch is the one that had none.
fn fastest_ns_per_trace_span(batches: u32, n: u32) -> f64 {
    (0..batches).map(|_| ns_per_trace_span(n)).fold(f64::INFINITY, f64::min)
}

/// Spans per batch of a disabled span; a recorded one costs ~1000x more, so it gets fewer.
const DISABLED_SPANS: u32 = 500_000;
const RECORDED_SPANS: u32 = 20_000;

/// A layer that overrides nothing, so it answers `Interest::always()` for every callsite (what
/// onsite's layer did before it filtered itself).
struct PlainLayer;
impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PlainLayer {}

/// The filtered-fmt variants, each run in its own child process.
const FILTERED: [(&str, &str); 4] = [
    ("baseline", "fmt (INFO) only (baseline)"),
    ("off", "+ `onsite::trace::layer()`, no capture running"),
    ("capturing", "+ `onsite::trace::layer()`, trace capture running"),
    ("plain", "+ a plain layer (no filter; onsite's before)"),
];

/// In a child: installs the variant's subscriber, measures, prints the ns per span.
fn filtered_child(variant: &str) {
    use tracing_subscriber::filter::LevelFilter;
    macro_rules! fmt {
        () => {
            tracing_subscriber::fmt::layer().with_writer(std::io::sink).with_filter(LevelFilter::INFO)
        };
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut profiler = onsite_trace::TraceProfiler::new();
    let ns = match variant {
        "baseline" => {
            tracing_subscriber::registry().with(fmt!()).init();
            fastest_ns_per_trace_span(20, DISABLED_SPANS)
        }
        "plain" => {
            tracing_subscriber::registry().with(PlainLayer).with(fmt!()).init();
            fastest_ns_per_trace_span(20, DISABLED_SPANS)
        }
        "off" | "capturing" => {
            tracing_subscriber::registry().with(onsite_trace::layer()).with(fmt!()).init();
            if variant == "off" {
                // Once on and off again, so the measured state is the one after a capture.
                let out = CaptureOutput::new(DumpDir::new(dir.path()), CaptureStamp::now());
                profiler.start_for(&out).expect("start").stop(&out).expect("stop");
                fastest_ns_per_trace_span(20, DISABLED_SPANS)
            } else {
                let out = CaptureOutput::new(DumpDir::new(dir.path()), CaptureStamp::now());
                let stopper = profiler.start_for(&out).expect("start a trace capture");
                let ns = ns_per_trace_span(RECORDED_SPANS);
                stopper.stop(&out).expect("stop the trace capture");
                ns
            }
        }
        other => panic!("unknown variant {other}"),
    };
    let _ = writeln!(std::io::stdout().lock(), "{ns}");
}

fn run_filtered_child(variant: &str) -> f64 {
    let exe = std::env::current_exe().expect("this bench's path");
    let out = Command::new(exe).args(["--bench", "--filtered-child", variant]).output().expect("run the child");
    assert!(out.status.success(), "{variant}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("the child's ns per span")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo test --benches` runs benches with `--bench`-less args; only measure under `cargo bench`.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--filtered-child") {
        filtered_child(&args[i + 1]);
        return;
    }
    let plain = Dispatch::new(tracing_subscriber::registry().with(tracing_subscriber::layer::Identity::new()));
    let with_layer = Dispatch::new(tracing_subscriber::registry().with(onsite_trace::layer()));
    let mut profiler = onsite_trace::TraceProfiler::new();
    let dir = tempfile::tempdir().expect("temp dir");

    let (mut none, mut off, mut on) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        none.push(ns_per_span(&plain));
        off.push(ns_per_span(&with_layer));
        let out = CaptureOutput::new(DumpDir::new(dir.path()), CaptureStamp::now());
        let stopper = profiler.start_for(&out).expect("start a trace capture");
        on.push(ns_per_span(&with_layer));
        stopper.stop(&out).expect("stop the trace capture");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let (none, off, on) = (median(none), median(off), median(on));
    let mut report = std::io::stdout().lock();
    let _ =
        writeln!(report, "trace layer, ns per span (create+enter+exit+close), median of {ROUNDS} rounds of {SPANS}:");
    let _ = writeln!(report, "  no onsite layer        : {none:8.1} ns  1.00x");
    let _ = writeln!(report, "  layer, no capture:        {off:8.1} ns  {:.2}x  (+{:.1} ns)", off / none, off - none);
    let _ = writeln!(report, "  layer, capture running:   {on:8.1} ns  {:.2}x  (+{:.1} ns)", on / none, on - none);

    let mut filtered: Vec<Vec<f64>> = vec![Vec::new(); FILTERED.len()];
    for _ in 0..ROUNDS {
        for (i, (variant, _)) in FILTERED.iter().enumerate() {
            filtered[i].push(run_filtered_child(variant));
        }
    }
    let filtered: Vec<f64> = filtered.into_iter().map(median).collect();
    let _ = writeln!(
        report,
        "disabled trace_span! (create+enter+exit) beside fmt.with_filter(INFO), one child per measurement (fastest of 20 batches), median of {ROUNDS}:"
    );
    for ((_, label), ns) in FILTERED.iter().zip(&filtered) {
        let _ = writeln!(report, "  {label:55}: {ns:8.2} ns  {:.2}x", ns / filtered[0]);
    }
}
