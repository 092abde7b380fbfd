//! The cost of onsite's allocator over an inner allocator (`System`, jemalloc, mimalloc: one
//! bench binary each, since a process has one global allocator; this loop is theirs alike): an
//! allocation-heavy loop on 2 threads, run against the bare inner allocator, onsite's allocator
//! over it with no capture, during a sampled capture (default 512 KiB mean), during a sampled
//! capture that holds ~2000 live sampled blocks (so frees meet a busy sample table, as in a
//! service with a large heap), with always-on sampling (and a capture of it running), during a
//! dhat capture (over `System` only), and, where the inner
//! allocator has a heap profiler of its own (jemalloc), with that profiler active instead.
//!
//! Either allocator is reached as a service reaches its global allocator: through functions
//! with the signatures of `__rust_alloc`, `__rust_dealloc` and `__rust_realloc` that the loop
//! cannot inline ([`loop_over`]).
//!
//! `cargo bench -p onsite-memory --bench alloc_loop[_jemalloc|_mimalloc]` — the headline:
//! throughput ratios, all in one run. Each setup is measured *beside* the bare inner allocator:
//! with the setup's capture running, the two take turns in 10 ms slices (20 of each per round,
//! which goes first alternating), so every ratio compares runs milliseconds apart. The bare
//! loop calls the inner allocator directly, never onsite's, so a running capture does not touch
//! its slices. Rounds visit the setups in an order rotated round by round; the report gives the
//! median of the per-round ratios and their spread (quartiles, min–max). Load from other
//! processes comes and goes over seconds, so it hits both sides of a pair about alike; the
//! median drops the rounds it did not.
//!
//! The inner allocator's own profiler needs the process to start with it configured
//! ([`InnerProfiler::conf`]), which changes the allocator even while that profiler is
//! inactive. So it is measured in a second process, this binary re-run with that configuration,
//! in the same run: there the bare slices have the profiler configured but inactive, and its
//! own setup switches it on for its slices only (e.g. jemalloc's `prof.active`).
//!
//! `cargo bench -p onsite-memory --bench … -- --instructions` — a supporting, noise-free view:
//! re-runs this binary under `valgrind --tool=callgrind` once per setup (one thread, a fixed
//! number of operations) and reports instructions per operation, counted inside the loop only
//! (the allocator's calls included). Instructions are not time (cache misses and contention do
//! not show), so this explains the throughput figures; it does not replace them.
//!
//! `ONSITE_BENCH_ROUNDS` (default 15) and `ONSITE_BENCH_ROUND_MS` (default 200: a setup's time per
//! round, and the bare allocator's as much again) change the run;
//! `ONSITE_BENCH_SAMPLE_BYTES` the sampled captures' mean (default 524288; the setups' names and
//! the ballast stay as they are), to separate the per-call cost from the per-sample cost.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::marker::PhantomData;
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, Profiler, Stopper};
use onsite_memory::{DEFAULT_SAMPLE_BYTES, MemoryMode, MemoryProfiler};

/// The inner allocator a bench binary measures, and onsite's allocator over it (its
/// `#[global_allocator]`).
pub struct Subject {
    /// How the tables name it: `System`, `jemalloc`, `mimalloc`.
    pub name: &'static str,
    /// The loop over the inner allocator, called directly (the baseline):
    /// `loop_over::<`a [`Reach`] of the inner allocator`>`.
    pub bare: Loop,
    /// The loop over the binary's global allocator (onsite's, over the same inner one).
    pub onsite: Loop,
    /// Whether a dhat capture can run over it (only over `System`).
    pub dhat: bool,
    /// The inner allocator's own heap profiler, if it has one: the anchor.
    pub profiler: Option<InnerProfiler>,
}

/// An inner allocator's own sampling heap profiler (jemalloc's), set up through the environment
/// at process start and switched on and off at run time.
pub struct InnerProfiler {
    /// What the tables call it.
    pub name: &'static str,
    /// The variable and value that configure it (inactive) at process start.
    pub conf: (&'static str, &'static str),
    /// Checks that the process runs with it configured (panics if not).
    pub check: fn(),
    /// Switches it on (`true`) or off.
    pub activate: fn(bool),
}

const THREADS: usize = 2;
const ROUNDS: usize = 15;
/// Time a setup runs per round (and the bare allocator as long again, in the slices beside it).
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

/// Set in the re-run process that measures the inner allocator's own profiler.
const INNER_PROFILER_ENV: &str = "ONSITE_BENCH_INNER_PROFILER";
/// The bare allocator's median throughput in the first process, handed to the second.
const BARE_OPS_ENV: &str = "ONSITE_BENCH_BARE_OPS";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Setup {
    Bare,
    Off,
    Sampled,
    SampledBusy,
    AlwaysOn,
    Dhat,
    /// The bare inner allocator with its own heap profiler active.
    InnerProfiler,
}

const SETUPS: [Setup; 7] =
    [Setup::Bare, Setup::Off, Setup::Sampled, Setup::SampledBusy, Setup::AlwaysOn, Setup::Dhat, Setup::InnerProfiler];

impl Setup {
    fn name(self, subject: &Subject) -> String {
        let inner = subject.name;
        match self {
            Setup::Bare if std::env::var_os(INNER_PROFILER_ENV).is_some() => {
                format!("{inner} alone, {} configured, inactive", subject.profiler.as_ref().map_or("", |p| p.name))
            }
            Setup::Bare => format!("{inner} alone"),
            Setup::Off => format!("onsite over {inner}, no capture"),
            Setup::Sampled => format!("onsite over {inner}, sampled capture (512 KiB)"),
            Setup::SampledBusy => format!("onsite over {inner}, sampled capture, 1 GiB sampled live (~2000 blocks)"),
            Setup::AlwaysOn => format!("onsite over {inner}, always-on sampling (512 KiB), a capture of it running"),
            Setup::Dhat => format!("onsite over {inner}, dhat capture"),
            Setup::InnerProfiler => {
                format!("{inner} alone, {} active", subject.profiler.as_ref().map_or("", |p| p.name))
            }
        }
    }

    fn key(self) -> &'static str {
        match self {
            Setup::Bare => "bare",
            Setup::Off => "off",
            Setup::Sampled => "sampled",
            Setup::SampledBusy => "sampled-busy",
            Setup::AlwaysOn => "always-on",
            Setup::Dhat => "dhat",
            Setup::InnerProfiler => "inner-profiler",
        }
    }

    /// Whether the setup calls the inner allocator directly.
    fn is_bare(self) -> bool {
        matches!(self, Setup::Bare | Setup::InnerProfiler)
    }

    /// Whether `subject` has this setup.
    fn applies(self, subject: &Subject) -> bool {
        match self {
            Setup::Dhat => subject.dhat,
            Setup::InnerProfiler => subject.profiler.is_some(),
            _ => true,
        }
    }
}

/// When to stop a `churn` loop.
#[derive(Clone, Copy)]
pub enum Until {
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
    // Not a constant, so neither side's entry point is specialised for it: `__rust_alloc`
    // gets the alignment as an argument.
    let align = black_box(8);
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
                let layout = Layout::from_size_align_unchecked(size, align);
                let mut ptr = a.alloc(layout);
                assert!(!ptr.is_null());
                ptr.write(1);
                let mut layout = layout;
                if x.is_multiple_of(8) {
                    ptr = a.realloc(ptr, layout, size * 2);
                    assert!(!ptr.is_null());
                    layout = Layout::from_size_align_unchecked(size * 2, align);
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

fn run_churn(subject: &Subject, setup: Setup, seed: usize, until: Until) -> u64 {
    if setup.is_bare() { (subject.bare)(seed, until) } else { (subject.onsite)(seed, until) }
}

/// One thread's loop over one allocator: [`loop_over`] for some [`Reach`].
pub type Loop = fn(usize, Until) -> u64;

/// An allocator in a static of the bench binary, for [`loop_over`].
pub trait Reach: 'static {
    type Alloc: GlobalAlloc + 'static;
    const ALLOC: &'static Self::Alloc;
}

/// A bench binary's two [`Reach`]es: `Bare`, its inner allocator (`$inner`, of type `$ty`), and
/// `Onsite`, its global allocator (the static `$global`, onsite's over `$ty`).
macro_rules! reaches {
    ($ty:ty = $inner:expr, $global:ident) => {
        struct Bare;
        struct Onsite;

        impl common::Reach for Bare {
            type Alloc = $ty;
            const ALLOC: &'static $ty = &$inner;
        }

        impl common::Reach for Onsite {
            type Alloc = onsite_memory::Allocator<$ty>;
            const ALLOC: &'static onsite_memory::Allocator<$ty> = &$global;
        }
    };
}
pub(crate) use reaches;

/// The loop over `R::ALLOC`, reached as a service reaches its global allocator: `Box` and `Vec`
/// call `__rust_alloc(size, align)`, a function of its own that holds the global allocator's
/// `alloc` (with no `#[global_allocator]`, the same for `System`), on an allocator in a static.
/// [`Through`] calls such a function for either side. Inlined into the loop instead, an
/// allocator's branches would become the loop's own, and its cost would say more about the
/// loop's code layout than about what a service pays.
pub fn loop_over<R: Reach>(seed: usize, until: Until) -> u64 {
    churn(&Through::<R>(PhantomData), seed, until)
}

/// The loop's view of `R::ALLOC`: each call goes through a function with the signature of
/// `__rust_alloc`, `__rust_dealloc` or `__rust_realloc` (size and alignment as two arguments,
/// in that order), which the loop cannot inline.
struct Through<R>(PhantomData<R>);

// SAFETY: forwards every call, unchanged, to the allocator `R` names.
unsafe impl<R: Reach> GlobalAlloc for Through<R> {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received.
        unsafe { rust_alloc::<R>(layout.size(), layout.align()) }
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { rust_dealloc::<R>(ptr, layout.size(), layout.align()) }
    }

    #[inline(always)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as received.
        unsafe { rust_realloc::<R>(ptr, layout.size(), layout.align(), new_size) }
    }
}

/// # Safety
/// As `GlobalAlloc::alloc`, with a valid layout.
#[inline(never)]
unsafe fn rust_alloc<R: Reach>(size: usize, align: usize) -> *mut u8 {
    // SAFETY: forwarded as received.
    unsafe { R::ALLOC.alloc(Layout::from_size_align_unchecked(size, align)) }
}

/// # Safety
/// As `GlobalAlloc::dealloc`.
#[inline(never)]
unsafe fn rust_dealloc<R: Reach>(ptr: *mut u8, size: usize, align: usize) {
    // SAFETY: forwarded as received.
    unsafe { R::ALLOC.dealloc(ptr, Layout::from_size_align_unchecked(size, align)) }
}

/// # Safety
/// As `GlobalAlloc::realloc`.
#[inline(never)]
unsafe fn rust_realloc<R: Reach>(ptr: *mut u8, size: usize, align: usize, new_size: usize) -> *mut u8 {
    // SAFETY: forwarded as received.
    unsafe { R::ALLOC.realloc(ptr, Layout::from_size_align_unchecked(size, align), new_size) }
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
    fn start(subject: &'static Subject) -> Workers {
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
                        let ops = run_churn(subject, setup, t + 1, Until::Time(Instant::now() + length));
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

/// One round of one setup: with the setup's capture running, the bare allocator and the setup
/// take turns in `SLICES` short slices each (which goes first alternates), so the two are
/// measured within milliseconds of each other. The bare loop never calls onsite's allocator, so
/// the capture does not touch its slices. Returns (the bare slices, the setup's slices).
fn paired_round(
    subject: &Subject,
    workers: &Workers,
    setup: Setup,
    length: Duration,
    round: usize,
    dir: &std::path::Path,
) -> (Vec<Slice>, Vec<Slice>) {
    let length = length / SLICES as u32;
    let (mut system, mut other) = (Vec::new(), Vec::new());
    if setup == Setup::InnerProfiler {
        // The profiler samples every thread that allocates, so it is on only for its slices.
        let profiler = subject.profiler.as_ref().expect("an inner profiler");
        for i in 0..SLICES {
            let measure = |profiled: bool| {
                (profiler.activate)(profiled);
                let slice = workers.slice(if profiled { setup } else { Setup::Bare }, length);
                (profiler.activate)(false);
                slice
            };
            if (i + round).is_multiple_of(2) {
                system.push(measure(false));
                other.push(measure(true));
            } else {
                other.push(measure(true));
                system.push(measure(false));
            }
        }
        return (system, other);
    }
    let (stopper, ballast) = start(setup);
    for i in 0..SLICES {
        if (i + round).is_multiple_of(2) {
            system.push(workers.slice(Setup::Bare, length));
            other.push(workers.slice(setup, length));
        } else {
            other.push(workers.slice(setup, length));
            system.push(workers.slice(Setup::Bare, length));
        }
    }
    stop(stopper, ballast, dir);
    (system, other)
}

/// Starts the capture `setup` runs under (and its ballast), or nothing.
fn start(setup: Setup) -> (Option<Box<dyn Stopper>>, Vec<Vec<u8>>) {
    let profiler = match setup {
        Setup::Bare | Setup::Off | Setup::InnerProfiler => return (None, Vec::new()),
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
fn throughput(subject: &'static Subject, quick: bool) {
    let rounds = if quick { 1 } else { env_number("ONSITE_BENCH_ROUNDS", ROUNDS as u64) as usize };
    let length = Duration::from_millis(if quick { 20 } else { env_number("ONSITE_BENCH_ROUND_MS", ROUND_MS) });
    let second_process = std::env::var_os(INNER_PROFILER_ENV).is_some();
    let measured: Vec<Setup> = if second_process {
        (subject.profiler.as_ref().expect("an inner profiler").check)();
        vec![Setup::InnerProfiler]
    } else {
        SETUPS[1..].iter().copied().filter(|s| *s != Setup::InnerProfiler && s.applies(subject)).collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let load_before = load_average();
    let workers = Workers::start(subject);
    // Warm-up: the allocator's arenas, the sample tables' pages, the code.
    for &setup in measured.iter().filter(|s| **s != Setup::Dhat) {
        paired_round(subject, &workers, setup, length / 4, 0, dir.path());
    }
    // Per measured setup: (the bare slices, the setup's slices), round after round.
    let mut slices_of = vec![(Vec::new(), Vec::new()); measured.len()];
    for r in 0..rounds {
        for k in 0..measured.len() {
            let i = (r + k) % measured.len();
            let (system, other) = paired_round(subject, &workers, measured[i], length, r, dir.path());
            slices_of[i].0.extend(system);
            slices_of[i].1.extend(other);
        }
    }
    workers.stop();
    let bare = Setup::Bare.name(subject);
    if quick {
        println!("quick check that the benchmark runs (one short round, likely a debug build): not a measurement");
    }
    println!(
        "allocation loop over {}, {THREADS} threads, {rounds} rounds; per round and setup, {SLICES} slices of \
         {:?} of the setup alternating with {SLICES} of {bare}; load average before {load_before}, after {}",
        subject.name,
        length / SLICES as u32,
        load_average()
    );
    println!(
        "ratio = per round, median of the setup's slices / median of the bare slices beside them; the \
         median of those over rounds, their quartiles and min–max; last column: the same ratio with all \
         rounds' slices pooled"
    );
    println!();
    let mut bare_per_cpu = 0.0;
    for (title, per_cpu) in [("per CPU-second the threads ran (headline)", true), ("per wall-clock second", false)] {
        let pick = |s: &Slice| if per_cpu { s.per_cpu() } else { s.per_wall() };
        println!("throughput {title}:");
        println!();
        println!("| setup | ops/s (median) | ratio to the first row | quartiles | min–max | pooled |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        let all_bare = median(slices_of.iter().flat_map(|(system, _)| system.iter().map(pick)));
        if per_cpu {
            bare_per_cpu = all_bare;
        }
        println!("| {bare} | {all_bare:.2e} | 1 | | | |");
        for (setup, (system, other)) in measured.iter().zip(&slices_of) {
            let ratio =
                |system: &[Slice], other: &[Slice]| median(other.iter().map(pick)) / median(system.iter().map(pick));
            let rounds = sorted(system.chunks(SLICES).zip(other.chunks(SLICES)).map(|(s, o)| ratio(s, o)));
            println!(
                "| {} | {:.2e} | **{:.3}** | {:.3}–{:.3} | {:.3}–{:.3} | {:.3} |",
                setup.name(subject),
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
    if second_process {
        if let Some(first) = std::env::var(BARE_OPS_ENV).ok().and_then(|v| v.parse::<f64>().ok()) {
            println!(
                "{bare}: {:.3} of {} alone in the first process (per CPU-second; not paired: another \
                 process, a minute apart)",
                bare_per_cpu / first,
                subject.name
            );
            println!();
        }
    } else if let Some(profiler) = &subject.profiler {
        // The anchor: this binary again, started with the inner profiler configured.
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env(profiler.conf.0, profiler.conf.1)
            .env(INNER_PROFILER_ENV, "1")
            .env(BARE_OPS_ENV, bare_per_cpu.to_string())
            .status()
            .expect("the benchmark re-runs itself");
        assert!(status.success(), "the run with {} configured failed: {status}", profiler.name);
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
fn counted(subject: &'static Subject, setup: Setup) {
    let dir = tempfile::tempdir().unwrap();
    if setup == Setup::InnerProfiler {
        let profiler = subject.profiler.as_ref().expect("an inner profiler");
        (profiler.check)();
        (profiler.activate)(true);
        black_box(run_churn(subject, setup, 1, Until::Ops(COUNTED_OPS)));
        (profiler.activate)(false);
        return;
    }
    let (stopper, ballast) = start(setup);
    black_box(run_churn(subject, setup, 1, Until::Ops(COUNTED_OPS)));
    stop(stopper, ballast, dir.path());
}

/// Re-runs this binary under callgrind for each setup but dhat (far too slow there) and prints
/// instructions per operation inside `churn`.
#[allow(clippy::print_stdout)]
fn instructions(subject: &'static Subject) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    println!(
        "instructions per operation inside the loop over {} (callgrind, 1 thread, {COUNTED_OPS} operations)",
        subject.name
    );
    println!();
    println!("| setup | instructions / op | vs {} alone |", subject.name);
    println!("| --- | ---: | ---: |");
    let mut base = None;
    for setup in SETUPS.into_iter().filter(|&s| s != Setup::Dhat && s.applies(subject)) {
        let out = dir.path().join(format!("callgrind.{}", setup.key()));
        let mut command = std::process::Command::new("valgrind");
        command
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg("--toggle-collect=*churn*")
            .arg(&exe)
            .env(SETUP_ENV, setup.key())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if setup == Setup::InnerProfiler
            && let Some(profiler) = &subject.profiler
        {
            command.env(profiler.conf.0, profiler.conf.1);
        }
        let status = command.status().expect("valgrind runs (is it installed?)");
        assert!(status.success(), "callgrind run of {} failed: {status}", setup.key());
        let text = std::fs::read_to_string(&out).unwrap();
        let total: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
            .and_then(|n| n.trim().parse().ok())
            .expect("callgrind output has a summary");
        let per_op = total / COUNTED_OPS as f64;
        let base = *base.get_or_insert(per_op);
        println!("| {} | {:.1} | {:+.1} |", setup.name(subject), per_op, per_op - base);
    }
}

/// A bench binary's `main`: the throughput table (`--bench`; a quick run otherwise, as under
/// `cargo test --benches`), or `--instructions`.
pub fn main(subject: &'static Subject) {
    if let Ok(key) = std::env::var(SETUP_ENV) {
        let setup = SETUPS.into_iter().find(|s| s.key() == key).expect("known setup");
        return counted(subject, setup);
    }
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--instructions") {
        return instructions(subject);
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too, so keep it short there.
    throughput(subject, !args.iter().any(|a| a == "--bench"));
}
