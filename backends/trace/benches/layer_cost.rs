//! What the trace layer costs a span: no layer vs the layer while no capture runs vs during a
//! capture. One process, the three measured in alternating rounds; reported as ratios to the
//! no-layer baseline (medians of the rounds). `cargo bench -p onsite-trace`.

use std::hint::black_box;
use std::io::Write;
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo test --benches` runs benches with `--bench`-less args; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
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
        let stopper = profiler.start().expect("start a trace capture");
        on.push(ns_per_span(&with_layer));
        let out = CaptureOutput::new(DumpDir::new(dir.path()), CaptureStamp::now());
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
}
