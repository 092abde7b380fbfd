//! The cost of onsite's allocator: an allocation-heavy loop on 2 threads, run against `System`,
//! onsite's allocator with no capture, during a sampled capture (default 512 KiB mean), during a
//! sampled capture that holds ~2000 live sampled blocks (so frees meet a busy sample table, as in
//! a service with a large heap), with always-on sampling (and a capture of it running), and
//! during a dhat capture.
//!
//! `cargo bench -p onsite-memory` — the headline: throughput ratios, all in one run. Each setup
//! is measured *beside* `System`: with the setup's capture running, the two take turns in 10 ms
//! slices (20 of each per round, which goes first alternating), so every ratio compares runs
//! milliseconds apart. `System`'s loop never calls onsite's allocator, so a running capture
//! does not touch its slices. Rounds visit the setups in an order rotated round by round; the
//! report gives the median of the per-round ratios and their spread (quartiles, min–max).
//! Load from other processes comes and goes over seconds, so it hits both sides of a pair about
//! alike; the median drops the rounds it did not.
//!
//! `cargo bench -p onsite-memory -- --instructions` — a supporting, noise-free view: re-runs
//! this binary under `valgrind --tool=callgrind` once per setup (one thread, a fixed number of
//! operations) and reports instructions per operation, counted inside the loop only (malloc and
//! free included). Instructions are not time (cache misses and contention do not show), so this
//! explains the throughput figures; it does not replace them.
//!
//! `ONSITE_BENCH_ROUNDS` (default 15) and `ONSITE_BENCH_ROUND_MS` (default 200: a setup's time per
//! round, and System's as much again) change the run;
//! `ONSITE_BENCH_SAMPLE_BYTES` the sampled captures' mean (default 524288; the setups' names and
//! the ballast stay as they are), to separate the per-call cost from the per-sample cost.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, Profiler, Stopper};
use onsite_memory::{Allocator, DEFAULT_SAMPLE_BYTES, MemoryMode, MemoryProfiler};

#[global_allocator]
static ALLOC: Allocator = Allocator::new();

const THREADS: usize = 2;
const ROUNDS: usize = 15;
/// Time a setup runs per round (and System as long again, in the slices beside it).
const ROUND_MS: u64 = 200;
/// Slices of each per setup and round (see `paired_round`): 10 ms each by default.
const SLICES: usize = 20;
/// Live blocks per thread: each step frees the oldest and allocates a new one.
const RING: usize = 64;
/// Memory the `SampledBusy` setup keeps live, allocated during the capture: about
/// `BALLAST / DEFAULT_SAMPLE_BYTES` = 2048 live sampled blocks.
const BALLAST: usize = 1 << 30;
const BALLAST_BLOCK: usize = 64 * 1024;
/// Operations per setup for the instruction count (one thread).
const COUNTED_OPS: u64 = 2_000_000;
/// Selects the setup when this binary runs under callgrind.
const SETUP_ENV: &str = "ONSITE_BENCH_COUNT_SETUP";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Setup {
    System,
    Off,
    Sampled,
    SampledBusy,
    AlwaysOn,
    Dhat,
}

const SETUPS: [Setup; 6] =
    [Setup::System, Setup::Off, Setup::Sampled, Setup::SampledBusy, Setup::AlwaysOn, Setup::Dhat];

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::System => "System alone",
            Setup::Off => "onsite, no capture",
            Setup::Sampled => "onsite, sampled capture (512 KiB)",
            Setup::SampledBusy => "onsite, sampled capture, 1 GiB sampled live (~2000 blocks)",
            Setup::AlwaysOn => "onsite, always-on sampling (512 KiB), a capture of it running",
            Setup::Dhat => "onsite, dhat capture",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Setup::System => "system",
            Setup::Off => "off",
            Setup::Sampled => "sampled",
            Setup::SampledBusy => "sampled-busy",
            Setup::AlwaysOn => "always-on",
            Setup::Dhat => "dhat",
        }
    }
}

/// When to stop a `churn` loop.
#[derive(Clone, Copy)]
enum Until {
    Time(Instant),
    /// At least this many operations.
    Ops(u64),
}

/// One thread's loop: allocate, touch, sometimes grow, free the oldest. Returns operations
/// (allocations + frees + reallocs) done.
#[inline(never)]
fn churn<A: GlobalAlloc>(a: &A, seed: usize, until: Until) -> u64 {
    let mut ring: [(*mut u8, Layout); RING] = [(std::ptr::null_mut(), Layout::new::<u8>()); RING];
    let mut ops = 0u64;
    let mut x = seed as u64 | 1;
    let mut i = 0usize;
    loop {
        for _ in 0..256 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let size = 16 + (x % 1008) as usize;
            let slot = &mut ring[i % RING];
            // SAFETY: every pointer in the ring came from `a` with the layout stored beside it.
            unsafe {
                if !slot.0.is_null() {
                    a.dealloc(slot.0, slot.1);
                    ops += 1;
                }
                let layout = Layout::from_size_align_unchecked(size, 8);
                let mut ptr = a.alloc(layout);
                assert!(!ptr.is_null());
                ptr.write(1);
                let mut layout = layout;
                if x.is_multiple_of(8) {
                    ptr = a.realloc(ptr, layout, size * 2);
                    assert!(!ptr.is_null());
                    layout = Layout::from_size_align_unchecked(size * 2, 8);
                    ops += 1;
                }
                *slot = (black_box(ptr), layout);
            }
            ops += 1;
            i += 1;
        }
        let done = match until {
            Until::Time(end) => Instant::now() >= end,
            Until::Ops(n) => ops >= n,
        };
        if done {
            break;
        }
    }
    for (ptr, layout) in ring {
        if !ptr.is_null() {
            // SAFETY: as above.
            unsafe { a.dealloc(ptr, layout) };
        }
    }
    ops
}

fn run_churn(setup: Setup, seed: usize, until: Until) -> u64 {
    if setup == Setup::System { churn(&System, seed, until) } else { churn(&ALLOC, seed, until) }
}

/// This thread's CPU time so far.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid out-pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// What one slice did: operations, and the wall and CPU time they took.
#[derive(Clone, Copy)]
struct Slice {
    ops: u64,
    /// Wall time of the slice (all threads ran in parallel within it).
    wall: Duration,
    /// CPU time the threads actually ran, summed.
    cpu: Duration,
}

impl Slice {
    /// Operations per second of CPU time the threads actually ran.
    fn per_cpu(&self) -> f64 {
        self.ops as f64 / self.cpu.as_secs_f64()
    }

    /// Operations per second of wall time, all threads together.
    fn per_wall(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64()
    }
}

/// The `THREADS` threads that run the loop, for the whole benchmark. Long-lived like a
/// service's threads: each keeps its malloc arena, tcache and heap layout from slice to slice.
/// (Threads spawned per slice got their arenas reassigned every time, sometimes sharing one,
/// and that arena-lock contention came and went from slice to slice.)
struct Workers {
    orders: Vec<mpsc::Sender<(Setup, Duration)>>,
    results: mpsc::Receiver<(u64, Duration)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start() -> Workers {
        let barrier = Arc::new(Barrier::new(THREADS));
        let (report, results) = mpsc::channel();
        let (orders, threads) = (0..THREADS)
            .map(|t| {
                let (order, orders) = mpsc::channel::<(Setup, Duration)>();
                let (barrier, report) = (barrier.clone(), report.clone());
                let thread = std::thread::spawn(move || {
                    for (setup, length) in orders {
                        barrier.wait();
                        let cpu_before = thread_cpu_time();
                        let ops = run_churn(setup, t + 1, Until::Time(Instant::now() + length));
                        report.send((ops, thread_cpu_time() - cpu_before)).unwrap();
                    }
                });
                (order, thread)
            })
            .unzip();
        Workers { orders, results, threads }
    }

    /// One slice: every thread runs `churn` under `setup` for `length` of wall time.
    fn slice(&self, setup: Setup, length: Duration) -> Slice {
        // The loop looks at the clock every 256 steps, so a slow setup overruns `length`: the
        // wall time is what the slice really took (the threads' hand-over included, alike for
        // every setup).
        let started = Instant::now();
        for order in &self.orders {
            order.send((setup, length)).unwrap();
        }
        let (ops, cpu) = (0..THREADS)
            .map(|_| self.results.recv().unwrap())
            .fold((0u64, Duration::ZERO), |a, b| (a.0 + b.0, a.1 + b.1));
        Slice { ops, wall: started.elapsed(), cpu }
    }

    fn stop(self) {
        drop(self.orders);
        for thread in self.threads {
            thread.join().unwrap();
        }
    }
}

/// One round of one setup: with the setup's capture running, `System` and the setup take turns
/// in `SLICES` short slices each (which goes first alternates), so the two are measured within
/// milliseconds of each other. `System`'s loop never calls onsite's allocator, so the capture
/// does not touch its slices. Returns (System's slices, the setup's slices).
fn paired_round(
    workers: &Workers,
    setup: Setup,
    length: Duration,
    round: usize,
    dir: &std::path::Path,
) -> (Vec<Slice>, Vec<Slice>) {
    let (stopper, ballast) = start(setup);
    let length = length / SLICES as u32;
    let (mut system, mut other) = (Vec::new(), Vec::new());
    for i in 0..SLICES {
        if (i + round).is_multiple_of(2) {
            system.push(workers.slice(Setup::System, length));
            other.push(workers.slice(setup, length));
        } else {
            other.push(workers.slice(setup, length));
            system.push(workers.slice(Setup::System, length));
        }
    }
    stop(stopper, ballast, dir);
    (system, other)
}

/// Starts the capture `setup` runs under (and its ballast), or nothing.
fn start(setup: Setup) -> (Option<Box<dyn Stopper>>, Vec<Vec<u8>>) {
    let profiler = match setup {
        Setup::System | Setup::Off => return (None, Vec::new()),
        Setup::Sampled | Setup::SampledBusy => {
            MemoryProfiler::new(MemoryMode::Sampled, env_number("ONSITE_BENCH_SAMPLE_BYTES", DEFAULT_SAMPLE_BYTES))
        }
        Setup::AlwaysOn => {
            // Sampling runs while the profiler or the capture it starts lives: the capture
            // below keeps it running until its stop.
            let mut profiler =
                MemoryProfiler::new(MemoryMode::Sampled, env_number("ONSITE_BENCH_SAMPLE_BYTES", DEFAULT_SAMPLE_BYTES));
            profiler.sample_always().unwrap();
            profiler
        }
        Setup::Dhat => MemoryProfiler::new(MemoryMode::Dhat, 1),
    };
    let stopper = profiler.clone().start().unwrap();
    let mut ballast = Vec::new();
    if setup == Setup::SampledBusy {
        // Reserved, not touched: only the allocator's headers become resident.
        ballast = (0..BALLAST / BALLAST_BLOCK).map(|_| Vec::with_capacity(BALLAST_BLOCK)).collect();
    }
    (Some(stopper), ballast)
}

fn stop(stopper: Option<Box<dyn Stopper>>, ballast: Vec<Vec<u8>>, dir: &std::path::Path) {
    if let Some(stopper) = stopper {
        let sub = dir.join(format!("{}", rand_suffix()));
        std::fs::create_dir_all(&sub).unwrap();
        stopper.stop(&CaptureOutput::new(DumpDir::new(&sub), CaptureStamp::now())).unwrap();
        std::fs::remove_dir_all(&sub).unwrap();
    }
    drop(black_box(ballast));
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// The value at quantile `q` (nearest rank) of sorted `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(default)
}

#[allow(clippy::print_stdout)] // a benchmark's report is its output
fn throughput(quick: bool) {
    let rounds = if quick { 1 } else { env_number("ONSITE_BENCH_ROUNDS", ROUNDS as u64) as usize };
    let length = Duration::from_millis(if quick { 20 } else { env_number("ONSITE_BENCH_ROUND_MS", ROUND_MS) });
    let dir = tempfile::tempdir().unwrap();
    let load_before = load_average();
    let workers = Workers::start();
    // Warm-up: the allocator's arenas, the sample tables' pages, the code.
    for &setup in &SETUPS[1..SETUPS.len() - 1] {
        paired_round(&workers, setup, length / 4, 0, dir.path());
    }
    let measured = &SETUPS[1..];
    // Per measured setup: (System's slices, the setup's slices), round after round.
    let mut slices_of = vec![(Vec::new(), Vec::new()); measured.len()];
    for r in 0..rounds {
        for k in 0..measured.len() {
            let i = (r + k) % measured.len();
            let (system, other) = paired_round(&workers, measured[i], length, r, dir.path());
            slices_of[i].0.extend(system);
            slices_of[i].1.extend(other);
        }
    }
    workers.stop();
    if quick {
        println!("quick check that the benchmark runs (one short round, likely a debug build): not a measurement");
    }
    println!(
        "allocation loop, {THREADS} threads, {rounds} rounds; per round and setup, {SLICES} slices of {:?} of \
         the setup alternating with {SLICES} of System; load average before {load_before}, after {}",
        length / SLICES as u32,
        load_average()
    );
    println!(
        "ratio = per round, median of the setup's slices / median of System's slices beside them; the \
         median of those over rounds, their quartiles and min–max; last column: the same ratio with all \
         rounds' slices pooled"
    );
    println!();
    for (title, per_cpu) in [("per CPU-second the threads ran (headline)", true), ("per wall-clock second", false)] {
        let pick = |s: &Slice| if per_cpu { s.per_cpu() } else { s.per_wall() };
        println!("throughput {title}:");
        println!();
        println!("| setup | ops/s (median) | ratio to System | quartiles | min–max | pooled |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        let all_system = slices_of.iter().flat_map(|(system, _)| system.iter().map(pick));
        println!("| {} | {:.2e} | 1 | | | |", Setup::System.name(), median(all_system));
        for (setup, (system, other)) in measured.iter().zip(&slices_of) {
            let ratio =
                |system: &[Slice], other: &[Slice]| median(other.iter().map(pick)) / median(system.iter().map(pick));
            let rounds = sorted(system.chunks(SLICES).zip(other.chunks(SLICES)).map(|(s, o)| ratio(s, o)));
            println!(
                "| {} | {:.2e} | **{:.3}** | {:.3}–{:.3} | {:.3}–{:.3} | {:.3} |",
                setup.name(),
                median(other.iter().map(pick)),
                quantile(&rounds, 0.5),
                quantile(&rounds, 0.25),
                quantile(&rounds, 0.75),
                rounds[0],
                rounds[rounds.len() - 1],
                ratio(system, other),
            );
        }
        println!();
    }
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    quantile(&sorted(values), 0.5)
}

/// Runs under callgrind: one setup, one thread, `COUNTED_OPS` operations inside `churn`.
fn counted(setup: Setup) {
    let dir = tempfile::tempdir().unwrap();
    let (stopper, ballast) = start(setup);
    black_box(run_churn(setup, 1, Until::Ops(COUNTED_OPS)));
    stop(stopper, ballast, dir.path());
}

/// Re-runs this binary under callgrind for each setup but dhat (far too slow there) and prints
/// instructions per operation inside `churn`.
#[allow(clippy::print_stdout)]
fn instructions() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    println!("instructions per operation inside the loop (callgrind, 1 thread, {COUNTED_OPS} operations)");
    println!();
    println!("| setup | instructions / op | vs System |");
    println!("| --- | ---: | ---: |");
    let mut base = None;
    for setup in SETUPS.into_iter().filter(|&s| s != Setup::Dhat) {
        let out = dir.path().join(format!("callgrind.{}", setup.key()));
        let status = std::process::Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg("--toggle-collect=*churn*")
            .arg(&exe)
            .env(SETUP_ENV, setup.key())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("valgrind runs (is it installed?)");
        assert!(status.success(), "callgrind run of {} failed: {status}", setup.key());
        let text = std::fs::read_to_string(&out).unwrap();
        let total: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
            .and_then(|n| n.trim().parse().ok())
            .expect("callgrind output has a summary");
        let per_op = total / COUNTED_OPS as f64;
        let base = *base.get_or_insert(per_op);
        println!("| {} | {:.1} | {:+.1} |", setup.name(), per_op, per_op - base);
    }
}

fn main() {
    if let Ok(key) = std::env::var(SETUP_ENV) {
        let setup = SETUPS.into_iter().find(|s| s.key() == key).expect("known setup");
        return counted(setup);
    }
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--instructions") {
        return instructions();
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too, so keep it short there.
    throughput(!args.iter().any(|a| a == "--bench"));
}
