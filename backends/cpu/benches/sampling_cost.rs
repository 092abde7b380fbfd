//! What a CPU capture costs and how complete it is, per-thread CPU timers beside pprof-rs's
//! process-wide `setitimer`, all in one run:
//!
//! - **completeness**: samples recorded / what the busy threads' own CPU time predicts, at
//!   99 Hz and 999 Hz, with 2 and with 8 busy threads;
//! - **proportionality**: two threads whose CPU time is about 3:1 (one always busy, one busy a
//!   quarter of the time): their sample ratio over their CPU-time ratio;
//! - **start latency**: from the capture's start to its first sample, the first capture of the
//!   process (cold: pprof-rs's first-use setup) and the following ones;
//! - **cost**: throughput of two busy threads with a capture running / without, alternating
//!   rounds (median over rounds, plus spread), at 99 Hz and 999 Hz.
//!
//! - **flight recorder**: throughput per process CPU-second with the always-on recorder at its
//!   default 19 Hz / without, and its memory with 64 threads (`-- --recorder` runs only this).
//!
//! Run: `cargo bench -p onsite-cpu --bench sampling_cost`.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use onsite_core::pprof::{decode, proto::Profile};
use onsite_core::test_support::the_dump_file;
use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, ProfileKind, Profiler};
use onsite_cpu::CpuProfiler;

const THREADS: usize = 2;

/// How long each part runs. `cargo bench` passes `--bench`; `cargo test --benches` does not,
/// and then one short pass only checks that the benchmark still runs.
struct Lengths {
    /// Alternating pairs of rounds in the cost part, each `round` long.
    rounds: usize,
    round: Duration,
    latency_captures: usize,
    accuracy_run: Duration,
    /// Long enough that the light thread gets ~100 samples at 99 Hz: a per-thread CPU timer's
    /// count is its CPU time over the period give or take the first and last period, so a
    /// short run would measure those edges, not proportionality.
    proportion_run: Duration,
}

const MEASURE: Lengths = Lengths {
    rounds: 15,
    round: Duration::from_millis(700),
    latency_captures: 11,
    accuracy_run: Duration::from_millis(1500),
    proportion_run: Duration::from_secs(4),
};

const QUICK: Lengths = Lengths {
    rounds: 1,
    round: Duration::from_millis(50),
    latency_captures: 2,
    accuracy_run: Duration::from_millis(100),
    proportion_run: Duration::from_millis(100),
};

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

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One busy thread's count of work units, on a cache line of its own.
#[repr(align(128))]
#[derive(Default)]
struct Units(AtomicU64);

/// `THREADS` threads doing work units until stopped, each publishing its own count.
struct BusyThreads {
    stop: Arc<AtomicBool>,
    units: Vec<Arc<Units>>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl BusyThreads {
    fn start() -> BusyThreads {
        let stop = Arc::new(AtomicBool::new(false));
        let units: Vec<Arc<Units>> = (0..THREADS).map(|_| Arc::default()).collect();
        let threads = units
            .iter()
            .enumerate()
            .map(|(t, units)| {
                let (stop, units) = (Arc::clone(&stop), Arc::clone(units));
                std::thread::spawn(move || {
                    let (mut n, mut acc) = (0u64, t as u64);
                    while !stop.load(Ordering::Relaxed) {
                        acc = work_unit(acc);
                        n += 1;
                        units.0.store(n, Ordering::Relaxed);
                    }
                    std::hint::black_box(acc);
                    n
                })
            })
            .collect();
        BusyThreads { stop, units, threads }
    }

    /// Units done so far.
    fn units(&self) -> u64 {
        self.units.iter().map(|u| u.0.load(Ordering::Relaxed)).sum()
    }

    /// Stops the threads; the units they did in all.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().map(|t| t.join().unwrap()).sum()
    }
}

/// Units of work done by `THREADS` threads in `round`.
fn run_round(round: Duration) -> u64 {
    let busy = BusyThreads::start();
    std::thread::sleep(round);
    busy.stop()
}

/// Busy threads named `busy-N`, each busy `duty` of the time (in 4 ms slices), for `run`;
/// returns each thread's CPU time during it.
fn busy_threads(duties: &[f64], run: Duration) -> Vec<(String, Duration)> {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = duties
        .iter()
        .enumerate()
        .map(|(i, &duty)| {
            let stop = Arc::clone(&stop);
            let name = format!("busy-{i}");
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let start = thread_cpu();
                    let mut acc = i as u64;
                    while !stop.load(Ordering::Relaxed) {
                        // The CPU clock is read every 64 units only: a sample inside its system
                        // call lands in the vDSO, which pprof-rs's blocklist drops.
                        let slice = thread_cpu();
                        while thread_cpu() - slice < Duration::from_micros((4000.0 * duty) as u64) {
                            for _ in 0..64 {
                                acc = work_unit(acc);
                            }
                        }
                        if duty < 1.0 {
                            std::thread::sleep(Duration::from_micros((4000.0 * (1.0 - duty)) as u64));
                        }
                    }
                    std::hint::black_box(acc);
                    (name, thread_cpu() - start)
                })
                .unwrap()
        })
        .collect();
    std::thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn capture<T>(profiler: &mut CpuProfiler, during: impl FnOnce() -> T) -> (T, Profile) {
    let dir = tempfile::tempdir().unwrap();
    let stopper = profiler.start().unwrap();
    let result = during();
    stopper.stop(&CaptureOutput::new(DumpDir::new(dir.path()), CaptureStamp::now())).unwrap();
    let profile = decode(&std::fs::read(the_dump_file(dir.path(), ProfileKind::Cpu, "pprof")).unwrap()).unwrap();
    (result, profile)
}

fn samples_by_thread(profile: &Profile) -> HashMap<String, i64> {
    let mut by = HashMap::new();
    let Some(key) = profile.string_table.iter().position(|s| s == "thread") else { return by };
    for sample in &profile.sample {
        if let Some(l) = sample.label.iter().find(|l| l.key == key as i64) {
            *by.entry(profile.string_table[l.str as usize].clone()).or_insert(0) += sample.value[0];
        }
    }
    by
}

fn comment_ms(profile: &Profile, after: &str) -> Option<f64> {
    onsite_core::pprof::comments(profile).find_map(|c| {
        let at = c.find(after)? + after.len();
        c[at..].trim_start().split(' ').next()?.parse().ok()
    })
}

fn clock_name(per_thread: bool) -> &'static str {
    if per_thread { "per-thread timers" } else { "setitimer" }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; there is nothing to list.
    }
    let len = if std::env::args().any(|a| a == "--bench") { &MEASURE } else { &QUICK };
    if std::ptr::eq(len, &QUICK) {
        println!("quick pass (no --bench): checks that the benchmark runs; its figures are not measurements");
    }
    if std::env::args().any(|a| a == "--recorder") {
        return recorder_cost(len); // only the flight recorder's part
    }
    let profiler = |hz: u32, per_thread: bool| CpuProfiler::new(hz, false).per_thread_timers(per_thread);
    // The first profiler of the process warms pprof-rs up in the background; a service has it
    // from `install`, long before anyone signals it. `--cold` measures without that head start.
    let warm_start = !std::env::args().any(|a| a == "--cold");
    let _first = profiler(99, true);
    if warm_start && std::ptr::eq(len, &MEASURE) {
        std::thread::sleep(Duration::from_millis(1500));
    }

    println!("start latency (capture's start to its first sample, 2 busy threads, 99 Hz, per-thread timers):");
    let mut warm = Vec::new();
    for i in 0..len.latency_captures {
        // The threads are busy before the capture starts, as a service's are when it is signalled.
        let busy = std::thread::spawn(|| busy_threads(&[1.0, 1.0], Duration::from_millis(100)));
        std::thread::sleep(Duration::from_millis(20));
        let (_, profile) = capture(&mut profiler(99, true), || std::thread::sleep(Duration::from_millis(50)));
        busy.join().unwrap();
        let armed = comment_ms(&profile, "start: sampling").unwrap_or(f64::NAN);
        let first = comment_ms(&profile, "first sample after").unwrap_or(f64::NAN);
        if i == 0 {
            println!("  first capture of the process: sampling after {armed:.2} ms, first sample after {first:.2} ms");
        } else {
            warm.push((armed, first));
        }
    }
    warm.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut armed: Vec<f64> = warm.iter().map(|w| w.0).collect();
    armed.sort_by(f64::total_cmp);
    println!(
        "  later captures ({}): first sample after median {:.2} ms (max {:.2}); sampling after median {:.2} ms",
        warm.len(),
        warm[warm.len() / 2].1,
        warm[warm.len() - 1].1,
        armed[armed.len() / 2]
    );

    println!("\ncompleteness: samples recorded / the busy threads' CPU time predicts ({:?} each)", len.accuracy_run);
    println!("| busy threads | rate | setitimer | per-thread timers |");
    for threads in [2usize, 8] {
        for hz in [99u32, 999] {
            let mut cells = Vec::new();
            for per_thread in [false, true] {
                let (times, profile) =
                    capture(&mut profiler(hz, per_thread), || busy_threads(&vec![1.0; threads], len.accuracy_run));
                let by = samples_by_thread(&profile);
                let cpu: f64 = times.iter().map(|(_, d)| d.as_secs_f64()).sum();
                let got: i64 = times.iter().map(|(n, _)| by.get(n).copied().unwrap_or(0)).sum();
                cells.push(got as f64 / (cpu * f64::from(hz)));
                if per_thread && std::env::args().any(|a| a == "--comments") {
                    for &c in &profile.comment {
                        println!("    {}", profile.string_table[c as usize]);
                    }
                }
            }
            println!("| {threads} | {hz} Hz | {:.3} | {:.3} |", cells[0], cells[1]);
        }
    }

    println!("\nproportionality: (samples heavy / light) / (CPU heavy / light), threads busy 100% and 25%");
    for hz in [99u32, 999] {
        let mut cells = Vec::new();
        for per_thread in [false, true] {
            let (times, profile) =
                capture(&mut profiler(hz, per_thread), || busy_threads(&[1.0, 0.25], len.proportion_run));
            let by = samples_by_thread(&profile);
            let s = |i: usize| by.get(&times[i].0).copied().unwrap_or(0) as f64;
            let c = |i: usize| times[i].1.as_secs_f64();
            cells.push((s(0) / s(1)) / (c(0) / c(1)));
            println!(
                "  {hz} Hz, {}: CPU {:.2}:1, samples {:.2}:1, ratio {:.3}",
                clock_name(per_thread),
                c(0) / c(1),
                s(0) / s(1),
                cells.last().unwrap()
            );
        }
    }

    println!(
        "\ncost: throughput with a capture running / without ({} alternating pairs of {:?}, {THREADS} threads)",
        len.rounds, len.round
    );
    run_round(len.round); // warm-up
    for hz in [99u32, 999] {
        for per_thread in [false, true] {
            let mut p = profiler(hz, per_thread);
            let dir = tempfile::tempdir().unwrap();
            let mut ratios = Vec::new();
            for _ in 0..len.rounds {
                let baseline = run_round(len.round);
                let stopper = p.start().unwrap();
                let capturing = run_round(len.round);
                stopper.stop(&CaptureOutput::new(DumpDir::new(dir.path()), CaptureStamp::now())).unwrap();
                ratios.push(capturing as f64 / baseline as f64);
            }
            ratios.sort_by(f64::total_cmp);
            println!(
                "  {hz} Hz, {}: median {:.3} (min {:.3}, max {:.3})",
                clock_name(per_thread),
                ratios[len.rounds / 2],
                ratios[0],
                ratios[len.rounds - 1]
            );
        }
    }

    recorder_cost(len);
}

/// `CLOCK_PROCESS_CPUTIME_ID`: every thread's CPU, the recorder's own thread included.
fn process_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The flight recorder's cost: two long-lived busy threads (the recorder arms the threads alive
/// when it starts at once), slices with the recorder running alternating with slices without;
/// throughput per CPU-second of the whole process, so what other processes take of the machine
/// cancels out and the recorder's own thread counts against it.
fn recorder_cost(len: &Lengths) {
    use onsite_cpu::{FlightRecorder, flight_recorder};
    println!(
        "\nflight recorder at {} Hz: throughput per process CPU-second with it / without ({} alternating pairs of {:?}, {THREADS} threads)",
        flight_recorder::DEFAULT_HZ,
        len.rounds,
        len.round
    );
    let busy = BusyThreads::start();
    let slice = || {
        let (units, cpu) = (busy.units(), process_cpu());
        std::thread::sleep(len.round);
        (busy.units() - units) as f64 / (process_cpu() - cpu).as_secs_f64()
    };
    slice(); // warm-up
    let mut ratios = Vec::new();
    let mut armed = 0;
    for _ in 0..len.rounds {
        let without = slice();
        let recorder = FlightRecorder::start(flight_recorder::DEFAULT_WINDOW, flight_recorder::DEFAULT_HZ).unwrap();
        armed = flight_recorder::timers_armed();
        let with = slice();
        recorder.stop();
        ratios.push(with / without);
    }
    busy.stop();
    ratios.sort_by(f64::total_cmp);
    println!(
        "  median {:.4} (min {:.4}, max {:.4}); {armed} threads armed",
        ratios[len.rounds / 2],
        ratios[0],
        ratios[len.rounds - 1]
    );
    if len.rounds > 1 {
        recorder_memory();
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

/// What the recorder takes with 64 threads of many different stacks for 20 s at its default
/// rate: the process's RSS with it running, minus the same threads' RSS before it started.
fn recorder_memory() {
    use onsite_cpu::{FlightRecorder, flight_recorder};
    #[inline(never)]
    fn nested(depth: u32, stop: &AtomicBool) -> u64 {
        if depth == 0 {
            let mut acc = 0;
            while !stop.load(Ordering::Relaxed) {
                acc = work_unit(acc);
                std::thread::sleep(Duration::from_micros(200));
            }
            acc
        } else {
            nested(depth - 1, stop) ^ u64::from(depth)
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..64u32)
        .map(|t| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || nested(t % 48, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_kib();
    let recorder = FlightRecorder::start(flight_recorder::DEFAULT_WINDOW, flight_recorder::DEFAULT_HZ).unwrap();
    let armed = flight_recorder::timers_armed();
    std::thread::sleep(Duration::from_secs(20));
    let during = rss_kib();
    recorder.stop();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        std::hint::black_box(t.join().unwrap());
    }
    println!(
        "  memory, 64 threads ({armed} armed), 20 s at {} Hz: RSS +{} KiB with the recorder; its fixed ring and \
         stack table are {} KiB ({} slots of {} stacks of {} frames), the same for any window and any number of \
         threads, plus one kernel timer per thread",
        flight_recorder::DEFAULT_HZ,
        during.saturating_sub(before),
        flight_recorder::memory_bytes() / 1024,
        flight_recorder::RING_SLOTS,
        flight_recorder::STACKS,
        flight_recorder::DEPTH
    );
}
