//! The CPU flight recorder as a service meets it: a real child process with
//! `ONSITE_CPU_RECORDER` set, real `kill -USR2`, and the `cpu-before` file it writes decoded
//! and compared with the capture's own CPU file and manifest.

#![allow(clippy::print_stdout)] // the child service talks to the test through its stdout

mod support;

use std::time::{Duration, Instant, SystemTime};

use onsite_core::ProfileKind::{Cpu, CpuBefore};
use onsite_core::pprof::{comments, decode, function_totals, proto::Profile};
use onsite_core::test_support::dump_files;
use support::Service;

const DEADLINE: Duration = Duration::from_secs(90);
const BURST: Duration = Duration::from_secs(5);
const GAP: Duration = Duration::from_secs(20);
const RECORDER_HZ: u32 = 49;

/// Spins on the CPU until `until`, in a function the profile must name.
#[inline(never)]
fn burst_before_the_capture(until: Instant) -> u64 {
    let mut n = 0;
    while Instant::now() < until {
        n ^= support::burn_cpu_in_a_known_function(20_000);
    }
    n
}

/// `black_box` keeps the call from being a tail call, which in an optimised build would take
/// this frame off the stacks sampled under it.
#[inline(never)]
fn work_during_the_capture() -> u64 {
    std::hint::black_box(support::burn_cpu_in_a_known_function(20_000))
}

/// Burns CPU for [`BURST`], idles for [`GAP`], says so, then works in another function once
/// the capture has begun.
#[test]
#[ignore = "child process role"]
fn child_burst_then_quiet() {
    let Some(_onsite) = support::install_as_role("child_burst_then_quiet") else { return };
    // The recorder starts on onsite's control thread; the burst is for it to see.
    let deadline = Instant::now() + Duration::from_secs(60);
    while onsite_cpu::flight_recorder::timers_armed() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    support::announce_ready();
    let cpu = thread_cpu();
    std::hint::black_box(burst_before_the_capture(Instant::now() + BURST));
    println!("BURST cpu_ms={}", (thread_cpu() - cpu).as_millis());
    std::thread::sleep(GAP);
    println!("CAPTURE-NOW");
    // Idle until the capture has begun (its cpu-before file is written at its start), so
    // everything of the next function happens inside the capture.
    let dir = std::path::PathBuf::from(std::env::var("ONSITE_DIR").unwrap());
    while dump_files(&dir, CpuBefore, "pprof").is_empty() {
        std::thread::sleep(Duration::from_millis(10));
    }
    loop {
        std::hint::black_box(work_during_the_capture());
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn read(path: &std::path::Path) -> Profile {
    decode(&std::fs::read(path).unwrap()).unwrap()
}

/// Samples (the first sample type) of the functions whose name ends with `name`, anywhere on
/// the stack.
fn samples_in(profile: &Profile, name: &str) -> i64 {
    function_totals(profile, "samples")
        .unwrap()
        .iter()
        .filter(|t| t.function.ends_with(name))
        .map(|t| t.cum)
        .max()
        .unwrap_or(0)
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn a_burst_that_ended_before_the_capture_is_in_cpu_before_and_not_in_the_capture() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = format!("60s@{RECORDER_HZ}Hz");
    let env = [("ONSITE_KINDS", "cpu"), ("ONSITE_CPU_RECORDER", recorder.as_str())];
    let burst_started = SystemTime::now();
    let mut service = Service::start("child_burst_then_quiet", dir.path(), &env);
    service.wait_for_log("CPU flight recorder running", DEADLINE);
    service.wait_until_stdout("CAPTURE-NOW", DEADLINE);
    let capture_asked = SystemTime::now();
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    std::thread::sleep(Duration::from_secs(2));
    service.signal(libc::SIGUSR2);
    let manifests = service.wait_for_manifests(1, DEADLINE);
    let log = service.log_text();

    let before = dump_files(dir.path(), CpuBefore, "pprof");
    assert_eq!(before.len(), 1, "one cpu-before file: {before:?}\n{log}");
    let before = read(&before[0]);
    let capture = read(&dump_files(dir.path(), Cpu, "pprof")[0]);

    // The burst's own CPU time at 49 Hz (a loaded machine gives it less than 5 s of a core).
    let stdout = service.stdout_text();
    let burst_ms: f64 =
        stdout.split("BURST cpu_ms=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let expected = burst_ms / 1e3 * f64::from(RECORDER_HZ);
    let burst = samples_in(&before, "burst_before_the_capture") as f64;
    assert!(
        (burst - expected).abs() <= expected * 0.2 + 2.0,
        "burst in cpu-before: {burst} samples, its CPU time predicts {expected:.0}\n{log}"
    );
    assert_eq!(samples_in(&before, "work_during_the_capture"), 0, "the capture's work is not before it");
    assert_eq!(samples_in(&capture, "burst_before_the_capture"), 0, "the burst is not in the capture's own file");
    assert!(samples_in(&capture, "work_during_the_capture") > 0, "the capture has its own work\n{log}");
    assert!(comments(&before).any(|c| c.contains("CPU flight recorder at 49 Hz")), "the file says what it is");

    // The manifest says which window the file covers: from no later than the burst, up to the
    // capture's start.
    let manifest = &manifests[0].1;
    let window = &manifest["cpu_before"];
    let from = window["from_unix_ms"].as_u64().unwrap_or_else(|| panic!("no window in {manifest}"));
    let until = window["until_unix_ms"].as_u64().unwrap();
    assert!(from <= unix_ms(burst_started) + 2_000, "window starts {from}, burst at {}", unix_ms(burst_started));
    assert!(until >= unix_ms(capture_asked), "window ends {until}, capture asked at {}", unix_ms(capture_asked));
    assert!(until <= manifest["started_at_unix_ms"].as_u64().unwrap() + 1_000);
    let files: Vec<&str> = manifest["files"].as_array().unwrap().iter().filter_map(|f| f["kind"].as_str()).collect();
    assert!(files.contains(&"cpu-before"), "the manifest lists the file: {files:?}");
}

/// Threads with stacks of many shapes come and go (recursion to a varying depth), under a
/// short window at a high rate so the ring wraps many times; the child reports its timers and
/// memory.
#[test]
#[ignore = "child process role"]
fn child_threads_come_and_go() {
    let Some(_onsite) = support::install_as_role("child_threads_come_and_go") else { return };
    support::announce_ready();
    #[inline(never)]
    fn nested(depth: u32) -> u64 {
        if depth == 0 { support::burn_cpu_in_a_known_function(200_000) } else { nested(depth - 1) ^ u64::from(depth) }
    }
    let started = Instant::now();
    let mut rss_after_warm_up = None;
    let mut round = 0u32;
    while started.elapsed() < Duration::from_secs(20) {
        let threads: Vec<_> = (0..4).map(|t| std::thread::spawn(move || nested((round * 4 + t) % 40))).collect();
        for t in threads {
            std::hint::black_box(t.join().unwrap());
        }
        round += 1;
        // Past the first seconds: the test binary's debug info and glibc's per-thread arenas
        // settle in them (over 100 MiB here, later on a loaded machine), alike with or without
        // the recorder, and their timing would swamp what the recorder could add.
        if rss_after_warm_up.is_none() && started.elapsed() > Duration::from_secs(10) {
            rss_after_warm_up = Some(rss_kib());
        }
    }
    std::thread::sleep(Duration::from_millis(1500)); // a rescan and a rotation after the last thread
    println!(
        "RESULT rounds={round} rss_warm={} rss_end={} timers={} threads={} bound={}",
        rss_after_warm_up.unwrap_or(0),
        rss_kib(),
        posix_timers(),
        threads_now(),
        onsite_cpu::flight_recorder::memory_bytes()
    );
    std::thread::sleep(Duration::from_secs(600));
}

fn status_field(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(name)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Anonymous resident memory: the binary's own pages (file-backed, paged in as code runs
/// for the first time) are not what the recorder could add.
fn rss_kib() -> u64 {
    status_field("RssAnon:")
}

fn threads_now() -> u64 {
    status_field("Threads:")
}

/// POSIX timers of this process (`/proc/self/timers` lists each with its `ID:` line).
fn posix_timers() -> usize {
    std::fs::read_to_string("/proc/self/timers").unwrap_or_default().lines().filter(|l| l.starts_with("ID:")).count()
}

/// What a `child_threads_come_and_go` run reported.
struct ChurnResult {
    line: String,
    log: String,
}

impl ChurnResult {
    fn run(recorder: &str) -> std::thread::JoinHandle<ChurnResult> {
        let recorder = recorder.to_owned();
        std::thread::spawn(move || {
            let dir = tempfile::tempdir().unwrap();
            let env = [("ONSITE_KINDS", "cpu"), ("ONSITE_CPU_RECORDER", recorder.as_str()), ("MALLOC_ARENA_MAX", "2")];
            let service = Service::start("child_threads_come_and_go", dir.path(), &env);
            service.wait_until_stdout("RESULT", DEADLINE);
            let stdout = service.stdout_text();
            let line = stdout.lines().find_map(|l| l.split_once("RESULT ").map(|(_, r)| r.to_owned())).unwrap();
            ChurnResult { line, log: service.log_text() }
        })
    }

    fn field(&self, name: &str) -> u64 {
        self.line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{name}="))).unwrap().parse().unwrap()
    }

    fn growth_kib(&self) -> i64 {
        self.field("rss_end") as i64 - self.field("rss_warm") as i64
    }
}

#[test]
fn threads_coming_and_going_leave_no_timer_behind_and_memory_within_the_bound() {
    // The same churn with the recorder off, at the same time: what the process grows by
    // anyway (thread stacks and malloc arenas kept by glibc) is not the recorder's.
    let on = ChurnResult::run("3s@999Hz");
    let off = ChurnResult::run("off");
    let (on, off) = (on.join().unwrap(), off.join().unwrap());
    assert!(on.field("rounds") * 4 > 100, "threads came and went: {}", on.line);
    // One recorder timer per live thread, none for the hundreds that ended.
    assert_eq!(on.field("timers"), on.field("threads"), "recorder timers follow the threads: {}\n{}", on.line, on.log);
    assert_eq!(off.field("timers"), 0, "no recorder, no timer: {}", off.line);
    // The ring and the stack table are static: past the warm-up the recorder adds at most the
    // pages of them not yet touched, whatever the time or the number of threads (8 MiB of
    // slack: two processes' malloc arenas never grow exactly alike).
    let bound_kib = on.field("bound") as i64 / 1024;
    let extra = on.growth_kib() - off.growth_kib();
    assert!(
        extra <= bound_kib + 8 * 1024,
        "with the recorder the process grew {extra} KiB more than without (bound {bound_kib} KiB)\non: {}\noff: {}",
        on.line,
        off.line
    );
}
