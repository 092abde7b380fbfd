//! What a CPU capture costs the service: two threads run a fixed CPU-bound loop, alternating
//! rounds with no capture (the baseline) and with a 99 Hz capture running, and the throughput
//! ratio of each pair is reported (median over rounds, plus spread).
//!
//! Run: `cargo bench -p onsite-cpu --bench sampling_cost`.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, Profiler};
use onsite_cpu::CpuProfiler;

const ROUNDS: usize = 9;
const ROUND: Duration = Duration::from_millis(700);
const THREADS: usize = 2;

#[inline(never)]
fn work_unit(seed: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..2_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// Units of work done by `THREADS` threads in `ROUND`.
fn run_round() -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut acc = t as u64;
                while !stop.load(Ordering::Relaxed) {
                    acc = work_unit(acc);
                    n += 1;
                }
                std::hint::black_box(acc);
                done.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(ROUND);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    done.load(Ordering::Relaxed)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; there is nothing to list.
    }
    let dir = tempfile::tempdir().unwrap();
    let mut profiler = CpuProfiler::new(onsite_cpu::DEFAULT_FREQUENCY_HZ, false);
    run_round(); // warm-up
    let mut ratios = Vec::new();
    for round in 0..ROUNDS {
        let baseline = run_round();
        let stopper = profiler.start().unwrap();
        let capturing = run_round();
        stopper.stop(&CaptureOutput::new(DumpDir::new(dir.path()), CaptureStamp::now())).unwrap();
        let ratio = capturing as f64 / baseline as f64;
        println!("round {round}: baseline {baseline} units, capturing {capturing} units, ratio {ratio:.3}");
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "\nthroughput while a 99 Hz CPU capture runs / without: median {:.3} (min {:.3}, max {:.3}) over {ROUNDS} rounds of {ROUND:?} on {THREADS} threads",
        ratios[ROUNDS / 2],
        ratios[0],
        ratios[ROUNDS - 1]
    );
}
