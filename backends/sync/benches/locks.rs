//! `cargo bench -p onsite-sync`: lock throughput of parking_lot, onsite-sync with no capture
//! running ("off") and onsite-sync while a mutex and a block capture run ("capturing"), as
//! ratios to parking_lot measured in the same run. Rounds alternate the three so drift in
//! machine load hits all of them alike. Two ratios per cell: the median over rounds of each
//! round's ratio, and the ratio of the fastest rounds ("best"), which other load on the
//! machine can only make slower, never faster.

use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, Profiler, Stopper};
use onsite_sync::{BlockProfiler, MutexProfiler};

const ROUNDS: usize = 21;
const UNCONTENDED_OPS: u64 = 1_000_000;
const CONTENDED_OPS_PER_THREAD: u64 = 100_000;
const THREADS: usize = 2;

macro_rules! workloads {
    ($module:ident, $mutex:ty, $rwlock:ty) => {
        mod $module {
            use super::*;

            #[inline(never)]
            pub fn uncontended_mutex(m: &$mutex, ops: u64) {
                for _ in 0..ops {
                    *m.lock() += 1;
                }
            }

            #[inline(never)]
            pub fn uncontended_read(l: &$rwlock, ops: u64) {
                for _ in 0..ops {
                    black_box(*l.read());
                }
            }

            /// `THREADS` threads incrementing one counter: a short critical section, so
            /// the lock itself is the bottleneck.
            #[inline(never)]
            pub fn contended_mutex(m: &$mutex, ops: u64) {
                std::thread::scope(|s| {
                    for _ in 0..THREADS {
                        s.spawn(|| {
                            for _ in 0..ops {
                                let mut g = m.lock();
                                *g = black_box(*g + 1);
                            }
                        });
                    }
                });
            }
        }
    };
}

workloads!(baseline, parking_lot::Mutex<u64>, parking_lot::RwLock<u64>);
workloads!(onsite, onsite_sync::Mutex<u64>, onsite_sync::RwLock<u64>);

fn time(f: impl FnOnce()) -> Duration {
    let started = Instant::now();
    f();
    started.elapsed()
}

/// Both captures running, as a SIGUSR2 capture would run them.
struct Capturing(Vec<Box<dyn Stopper>>);

impl Capturing {
    fn start() -> Self {
        Capturing(vec![MutexProfiler::default().start().unwrap(), BlockProfiler::default().start().unwrap()])
    }

    fn stop(self, out: &CaptureOutput) {
        for stopper in self.0 {
            stopper.stop(out).unwrap();
        }
    }
}

struct Row {
    name: &'static str,
    ops: u64,
    times: [Vec<Duration>; 3],
}

impl Row {
    fn median_ratio(&self, i: usize) -> f64 {
        let mut ratios: Vec<f64> =
            self.times[i].iter().zip(&self.times[0]).map(|(t, base)| t.as_secs_f64() / base.as_secs_f64()).collect();
        ratios.sort_by(f64::total_cmp);
        ratios[ratios.len() / 2]
    }

    fn best_ratio(&self, i: usize) -> f64 {
        let best = |i: usize| self.times[i].iter().min().unwrap().as_secs_f64();
        best(i) / best(0)
    }

    fn median_ns_per_op(&self, i: usize) -> f64 {
        let mut times = self.times[i].clone();
        times.sort();
        times[times.len() / 2].as_nanos() as f64 / self.ops as f64
    }
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let pl_mutex = parking_lot::Mutex::new(0);
    let pl_rwlock = parking_lot::RwLock::new(0);
    let os_mutex = onsite_sync::Mutex::new(0);
    let os_rwlock = onsite_sync::RwLock::new(0);
    let mut rows = [
        Row { name: "uncontended Mutex lock+unlock", ops: UNCONTENDED_OPS, times: Default::default() },
        Row { name: "uncontended RwLock read+unlock", ops: UNCONTENDED_OPS, times: Default::default() },
        Row {
            name: "contended Mutex (2 threads) lock+unlock",
            ops: CONTENDED_OPS_PER_THREAD * THREADS as u64,
            times: Default::default(),
        },
    ];
    for round in 0..=ROUNDS {
        // Round 0 warms up caches and the CPU clock and is not counted.
        let mut measured = [[Duration::ZERO; 3]; 3];
        for (variant, row) in measured.iter_mut().enumerate() {
            let capturing = (variant == 2).then(Capturing::start);
            row[0] = match variant {
                0 => time(|| baseline::uncontended_mutex(&pl_mutex, UNCONTENDED_OPS)),
                _ => time(|| onsite::uncontended_mutex(&os_mutex, UNCONTENDED_OPS)),
            };
            row[1] = match variant {
                0 => time(|| baseline::uncontended_read(&pl_rwlock, UNCONTENDED_OPS)),
                _ => time(|| onsite::uncontended_read(&os_rwlock, UNCONTENDED_OPS)),
            };
            row[2] = match variant {
                0 => time(|| baseline::contended_mutex(&pl_mutex, CONTENDED_OPS_PER_THREAD)),
                _ => time(|| onsite::contended_mutex(&os_mutex, CONTENDED_OPS_PER_THREAD)),
            };
            if let Some(capturing) = capturing {
                let out_dir = dir.path().join(round.to_string());
                std::fs::create_dir_all(&out_dir).unwrap();
                capturing.stop(&CaptureOutput::new(DumpDir::new(&out_dir), CaptureStamp::now()));
            }
        }
        if round > 0 {
            for (r, row) in rows.iter_mut().enumerate() {
                for (variant, times) in row.times.iter_mut().enumerate() {
                    times.push(measured[variant][r]);
                }
            }
        }
    }

    let mut out = std::io::stdout().lock();
    writeln!(out, "onsite-sync lock throughput, median of {ROUNDS} alternating rounds (ratio = time / parking_lot's)")
        .unwrap();
    writeln!(
        out,
        "{:<42} {:>12} {:>10} {:>18} {:>12} {:>18}",
        "workload (ns per op, median)", "parking_lot", "off", "off ratio med/best", "capturing", "cap ratio med/best"
    )
    .unwrap();
    for row in &rows {
        writeln!(
            out,
            "{:<42} {:>12.2} {:>10.2} {:>11.3} / {:.3} {:>12.2} {:>11.3} / {:.3}",
            row.name,
            row.median_ns_per_op(0),
            row.median_ns_per_op(1),
            row.median_ratio(1),
            row.best_ratio(1),
            row.median_ns_per_op(2),
            row.median_ratio(2),
            row.best_ratio(2),
        )
        .unwrap();
    }
}
