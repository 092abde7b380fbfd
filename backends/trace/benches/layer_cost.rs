//! What the trace layer costs a span, `cargo bench -p onsite-trace`, in two setups:
//!
//! - an `info_span!` another layer records (a layer with no filter, which wants every span):
//!   that layer alone (the baseline), with onsite's layer beside it while no capture runs, and
//!   during a capture; then the same with the recording layer behind a per-layer filter;
//! - a disabled `trace_span!` beside a per-layer filtered fmt layer (`INFO`), the common setup:
//!   fmt alone, with onsite's layer off and capturing, and with a plain layer instead.
//!
//! Interest is cached per callsite across every live dispatcher and the maximum level is
//! process-wide, so each subscriber is measured in a child process of its own (this bench
//! re-run with `--child NAME`), the variants alternating round by round; reported as ratios to
//! each setup's baseline (medians of the rounds).

use std::hint::black_box;
use std::io::Write;
use std::process::Command;
use std::time::Instant;

use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, Profiler};
use tracing_subscriber::prelude::*;

const SPANS: u32 = 200_000;
const ROUNDS: usize = 7;

/// Nanoseconds per `info_span!` (create, enter, exit, close) under the global subscriber, over
/// `n`.
fn ns_per_span(n: u32) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        let span = tracing::info_span!("request", i);
        let _entered = black_box(span.enter());
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
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

/// The fastest of `batches` measurements: at ~2 ns a span, one preemption on this shared
/// machine is worth a whole batch, and the fastest batch is the one that had none.
fn fastest(batches: u32, measure: impl Fn() -> f64) -> f64 {
    (0..batches).map(|_| measure()).fold(f64::INFINITY, f64::min)
}

/// Spans per batch of a disabled span; a recorded one costs ~1000x more, so it gets fewer.
const DISABLED_SPANS: u32 = 500_000;
const RECORDED_SPANS: u32 = 20_000;

/// A layer that overrides nothing, so it answers `Interest::always()` for every callsite: the
/// other layer that records every span, and (in the second setup) what an unfiltered layer
/// costs a span no one wants.
struct PlainLayer;
impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PlainLayer {}

/// The variants of the first setup (a span another layer records), each in its own child.
const WANTED: [(&str, &str); 3] = [
    ("wanted-baseline", "a layer recording every span (baseline)"),
    ("wanted-off", "+ `onsite::trace::layer()`, no capture running"),
    ("wanted-capturing", "+ `onsite::trace::layer()`, trace capture running"),
];

/// The same span, recorded by a layer behind a per-layer filter (`INFO`): the registry already
/// keeps per-span filter state for it.
const WANTED_FILTERED: [(&str, &str); 2] = [
    ("wanted-filtered-baseline", "a filtered layer recording INFO (baseline)"),
    ("wanted-filtered-off", "+ `onsite::trace::layer()`, no capture running"),
];

/// The filtered-fmt variants, each run in its own child process.
const FILTERED: [(&str, &str); 4] = [
    ("baseline", "fmt (INFO) only (baseline)"),
    ("off", "+ `onsite::trace::layer()`, no capture running"),
    ("capturing", "+ `onsite::trace::layer()`, trace capture running"),
    ("plain", "+ a plain layer (no filter)"),
];

/// In a child: installs the variant's subscriber, measures, prints the ns per span.
fn child(variant: &str) {
    use tracing_subscriber::filter::LevelFilter;
    macro_rules! fmt {
        () => {
            tracing_subscriber::fmt::layer().with_writer(std::io::sink).with_filter(LevelFilter::INFO)
        };
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut profiler = onsite_trace::TraceProfiler::new();
    let ns = match variant {
        "wanted-filtered-baseline" => {
            tracing_subscriber::registry().with(PlainLayer.with_filter(LevelFilter::INFO)).init();
            fastest(5, || ns_per_span(SPANS))
        }
        "wanted-filtered-off" => {
            tracing_subscriber::registry()
                .with(onsite_trace::layer())
                .with(PlainLayer.with_filter(LevelFilter::INFO))
                .init();
            // Once on and off again, so the measured state is the one after a capture.
            let out = CaptureOutput::new(DumpDir::new(dir.path()), CaptureStamp::now());
            profiler.start_for(&out).expect("start").stop(&out).expect("stop");
            fastest(5, || ns_per_span(SPANS))
        }
        "wanted-baseline" => {
            tracing_subscriber::registry().with(PlainLayer).init();
            fastest(5, || ns_per_span(SPANS))
        }
        "wanted-off" | "wanted-capturing" => {
            tracing_subscriber::registry().with(onsite_trace::layer()).with(PlainLayer).init();
            let out = CaptureOutput::new(DumpDir::new(dir.path()), CaptureStamp::now());
            let stopper = profiler.start_for(&out).expect("start a trace capture");
            if variant == "wanted-off" {
                // Once on and off again, so the measured state is the one after a capture.
                stopper.stop(&out).expect("stop");
                fastest(5, || ns_per_span(SPANS))
            } else {
                let ns = ns_per_span(RECORDED_SPANS);
                stopper.stop(&out).expect("stop the trace capture");
                ns
            }
        }
        "baseline" => {
            tracing_subscriber::registry().with(fmt!()).init();
            fastest(20, || ns_per_trace_span(DISABLED_SPANS))
        }
        "plain" => {
            tracing_subscriber::registry().with(PlainLayer).with(fmt!()).init();
            fastest(20, || ns_per_trace_span(DISABLED_SPANS))
        }
        "off" | "capturing" => {
            tracing_subscriber::registry().with(onsite_trace::layer()).with(fmt!()).init();
            if variant == "off" {
                // Once on and off again, so the measured state is the one after a capture.
                let out = CaptureOutput::new(DumpDir::new(dir.path()), CaptureStamp::now());
                profiler.start_for(&out).expect("start").stop(&out).expect("stop");
                fastest(20, || ns_per_trace_span(DISABLED_SPANS))
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

fn run_child(variant: &str) -> f64 {
    let exe = std::env::current_exe().expect("this bench's path");
    let out = Command::new(exe).args(["--bench", "--child", variant]).output().expect("run the child");
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
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1]);
        return;
    }
    let mut report = std::io::stdout().lock();
    let wanted = medians_of_children(&WANTED);
    let _ = writeln!(
        report,
        "info_span! (create+enter+exit+close) another layer records, one child per measurement (fastest of 5 batches of {SPANS}; capturing: one batch of {RECORDED_SPANS}), median of {ROUNDS}:"
    );
    for ((_, label), ns) in WANTED.iter().zip(&wanted) {
        let _ = writeln!(report, "  {label:55}: {ns:8.2} ns  {:.2}x  ({:+.1} ns)", ns / wanted[0], ns - wanted[0]);
    }
    let wanted = medians_of_children(&WANTED_FILTERED);
    let _ = writeln!(report, "the same span, recorded by a per-layer filtered layer, median of {ROUNDS}:");
    for ((_, label), ns) in WANTED_FILTERED.iter().zip(&wanted) {
        let _ = writeln!(report, "  {label:55}: {ns:8.2} ns  {:.2}x  ({:+.1} ns)", ns / wanted[0], ns - wanted[0]);
    }
    let filtered = medians_of_children(&FILTERED);
    let _ = writeln!(
        report,
        "disabled trace_span! (create+enter+exit) beside fmt.with_filter(INFO), one child per measurement (fastest of 20 batches), median of {ROUNDS}:"
    );
    for ((_, label), ns) in FILTERED.iter().zip(&filtered) {
        let _ = writeln!(report, "  {label:55}: {ns:8.2} ns  {:.2}x", ns / filtered[0]);
    }
}

/// Each variant's median over `ROUNDS` rounds, the variants taking turns within a round.
fn medians_of_children(variants: &[(&str, &str)]) -> Vec<f64> {
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for (i, (variant, _)) in variants.iter().enumerate() {
            runs[i].push(run_child(variant));
        }
    }
    runs.into_iter().map(median).collect()
}
