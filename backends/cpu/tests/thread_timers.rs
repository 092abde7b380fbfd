//! Per-thread CPU timers, as a service meets them: a child process (with onsite-threads' `pthread_create`
//! interposer linked, as in a service using the `onsite` crate) runs busy threads started before
//! and during a capture, captures through the `Profiler` API, and the parent decodes the profile
//! and compares each thread's samples with that thread's own CPU time from
//! `/proc/thread-self/schedstat` (never with wall time: the machine may be loaded).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use onsite_core::ProfileKind::Cpu;
use onsite_core::pprof::{decode, proto::Profile};
use onsite_core::test_support::{self, ChildTest, the_dump_file};
use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, Profiler};
use onsite_cpu::CpuProfiler;

const DIR_ENV: &str = "ONSITE_CPU_TEST_DIR";
const HZ: u32 = 999;

fn child_dir(role: &str) -> Option<PathBuf> {
    (test_support::role()? == role).then(|| PathBuf::from(std::env::var(DIR_ENV).unwrap()))
}

fn run_child(role: &str, dir: &Path) -> String {
    let out = ChildTest::new(role).env(DIR_ENV, dir).run(Duration::from_secs(120));
    out.stdout
}

/// This thread's CPU time so far, from the kernel's scheduler statistics (nanoseconds).
fn own_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    stat.split_whitespace().next().unwrap().parse().unwrap()
}

#[inline(never)]
fn spin_until(done: impl Fn() -> bool) {
    let mut x = 1u64;
    while !done() {
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        std::hint::black_box(x);
    }
}

/// Records `(thread name, CPU ns during the capture)` for each thread, written by the child.
type CpuTimes = Arc<std::sync::Mutex<Vec<(String, u64)>>>;

fn spawn_busy(
    name: &str,
    times: &CpuTimes,
    until: impl Fn(u64) -> bool + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let (name, times) = (name.to_string(), Arc::clone(times));
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let start = own_cpu_ns();
            spin_until(|| until(own_cpu_ns() - start));
            let used = own_cpu_ns() - start;
            times.lock().unwrap().push((name, used));
        })
        .unwrap()
}

fn capture(profiler: &mut CpuProfiler, dir: &Path, during: impl FnOnce()) {
    std::fs::create_dir_all(dir).unwrap();
    let stopper = profiler.start().expect("cpu capture starts");
    during();
    stopper.stop(&CaptureOutput::new(DumpDir::new(dir), CaptureStamp::now())).expect("cpu capture writes");
}

fn read_profile(dir: &Path) -> Profile {
    decode(&std::fs::read(the_dump_file(dir, Cpu, "pprof")).unwrap()).unwrap()
}

fn comments(profile: &Profile) -> Vec<&str> {
    onsite_core::pprof::comments(profile).collect()
}

/// Samples per `thread` label.
fn samples_by_thread(profile: &Profile) -> HashMap<String, i64> {
    let key = profile.string_table.iter().position(|s| s == "thread").expect("a thread label") as i64;
    let mut by = HashMap::new();
    for sample in &profile.sample {
        let name = sample.label.iter().find(|l| l.key == key).map(|l| profile.string_table[l.str as usize].clone());
        *by.entry(name.unwrap_or_default()).or_insert(0) += sample.value[0];
    }
    by
}

#[test]
fn each_threads_samples_match_its_own_cpu_time_at_999_hz() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = run_child("child_threads_before_and_during", dir.path());
    let times: Vec<(String, u64)> = stdout
        .lines()
        // libtest's "test … ... " may precede the first line.
        .filter_map(|l| l.rfind("cpu ").map(|at| &l[at + 4..]))
        .map(|l| {
            let (name, ns) = l.split_once(' ').unwrap();
            (name.to_string(), ns.parse().unwrap())
        })
        .collect();
    assert_eq!(times.len(), 2 + 2 + 6, "every worker reported its CPU time: {stdout}");
    let profile = read_profile(&dir.path().join("capture"));
    let by_thread = samples_by_thread(&profile);
    let period_ns = 1e9 / f64::from(HZ);
    let mut report = String::new();
    let mut bad = Vec::new();
    // The short threads are judged together: a thread's CPU timer is checked on the scheduler
    // tick, so what a thread used after its last check is never sampled, and on a loaded
    // machine that is a large, random part of 50 ms (a known gap, counted in the profile's
    // comments as not delivered). Each long thread is judged alone.
    let (mut short_got, mut short_expected) = (0.0, 0.0);
    for (name, ns) in &times {
        let expected = *ns as f64 / period_ns;
        let got = by_thread.get(name).copied().unwrap_or(0) as f64;
        let ratio = got / expected;
        report += &format!("{name}: {got} samples, CPU time predicts {expected:.0} ({ratio:.3})\n");
        if name.starts_with("short-") {
            short_got += got;
            short_expected += expected;
        } else if !(0.85..=1.15).contains(&ratio) {
            bad.push(name.clone());
        }
    }
    let short_ratio = short_got / short_expected;
    report += &format!("short threads together: {short_got} samples of {short_expected:.0} ({short_ratio:.3})\n");
    if !(0.85..=1.15).contains(&short_ratio) {
        bad.push("the short threads together".into());
    }
    assert!(bad.is_empty(), "threads off by more than 15%: {bad:?}\n{report}comments: {:#?}", comments(&profile));
    assert!(
        comments(&profile).iter().any(|c| c.contains("a CPU-time timer per thread")),
        "the profile says which clock drove it: {:#?}",
        comments(&profile)
    );
}

#[test]
#[ignore = "child role"]
fn child_threads_before_and_during() {
    let Some(dir) = child_dir("child_threads_before_and_during") else { return };
    onsite_threads::hook_status(); // links the `pthread_create` interposer, as the `onsite` crate does
    let mut profiler = CpuProfiler::new(HZ, false);
    // A first, short capture: later ones start warm, like every capture after a service's first.
    capture(&mut profiler, &dir.join("warm-up"), || std::thread::sleep(Duration::from_millis(20)));

    let times: CpuTimes = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let before: Vec<_> = (0..2)
        .map(|i| {
            let stop = Arc::clone(&stop);
            // Their CPU time is measured from the capture's start (they wait for it spinning
            // on a flag they read only, so it costs no CPU before).
            let (name, times) = (format!("before-{i}"), Arc::clone(&times));
            let go = Arc::new(AtomicBool::new(false));
            let go2 = Arc::clone(&go);
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    while !go2.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let start = own_cpu_ns();
                    spin_until(|| stop.load(Ordering::Relaxed));
                    times.lock().unwrap().push((name, own_cpu_ns() - start));
                })
                .unwrap();
            (go, handle)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));

    capture(&mut profiler, &dir.join("capture"), || {
        for (go, _) in &before {
            go.store(true, Ordering::Release);
        }
        let long: Vec<_> =
            (0..2).map(|i| spawn_busy(&format!("during-{i}"), &times, |used| used >= 400_000_000)).collect();
        // Short-lived threads, one after another: each lives for 50 ms of its own CPU time.
        // They are joined only at the end: pprof-rs tells threads apart by `pthread_t`, which
        // a joined thread hands on to the next one.
        let mut short = Vec::new();
        for i in 0..6 {
            let reported = times.lock().unwrap().len();
            short.push(spawn_busy(&format!("short-{i}"), &times, |used| used >= 50_000_000));
            while times.lock().unwrap().len() == reported {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for t in short {
            t.join().unwrap();
        }
        for t in long {
            t.join().unwrap();
        }
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        for (_, t) in before {
            t.join().unwrap();
        }
    });
    #[allow(clippy::print_stdout)]
    for (name, ns) in times.lock().unwrap().iter() {
        println!("cpu {name} {ns}");
    }
}

#[test]
fn a_capture_with_per_thread_timers_off_still_works_and_says_it_fell_back() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_fallback", dir.path());
    let profile = read_profile(dir.path());
    let total: i64 = profile.sample.iter().map(|s| s.value[0]).sum();
    assert!(total > 0, "the setitimer clock still samples");
    let comments = comments(&profile);
    assert!(
        comments.iter().any(|c| c.contains("setitimer(ITIMER_PROF)") && c.contains("switched off")),
        "the profile says it fell back: {comments:#?}"
    );
    assert!(!comments.iter().any(|c| c.contains("a CPU-time timer per thread")), "{comments:#?}");
}

#[test]
#[ignore = "child role"]
fn child_fallback() {
    let Some(dir) = child_dir("child_fallback") else { return };
    let mut profiler = CpuProfiler::new(99, false).per_thread_timers(false);
    capture(&mut profiler, &dir, || {
        let start = own_cpu_ns();
        spin_until(|| own_cpu_ns() - start >= 300_000_000);
    });
}

/// POSIX timers this process has now (`/proc/self/timers`, one `ID:` line per timer).
fn process_timers() -> usize {
    std::fs::read_to_string("/proc/self/timers")
        .expect("/proc/self/timers (Linux with CONFIG_CHECKPOINT_RESTORE)")
        .lines()
        .filter(|l| l.starts_with("ID:"))
        .count()
}

#[test]
fn fifty_captures_while_threads_come_and_go_leave_no_timer_behind() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = run_child("child_cycles", dir.path());
    assert!(stdout.contains("timers after: 0"), "{stdout}");
}

#[test]
#[ignore = "child role"]
fn child_cycles() {
    let Some(dir) = child_dir("child_cycles") else { return };
    onsite_threads::hook_status();
    assert_eq!(process_timers(), 0, "no timer before the first capture");
    let stop = Arc::new(AtomicBool::new(false));
    // Threads come and go all through the cycles: each lives a few milliseconds.
    let churn = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let workers: Vec<_> = (0..3)
                    .map(|_| {
                        std::thread::spawn(|| {
                            let start = own_cpu_ns();
                            spin_until(|| own_cpu_ns() - start >= 2_000_000);
                        })
                    })
                    .collect();
                for w in workers {
                    w.join().unwrap();
                }
            }
        })
    };
    let mut profiler = CpuProfiler::new(HZ, false);
    let mut most_during = 0;
    for cycle in 0..50 {
        capture(&mut profiler, &dir.join(cycle.to_string()), || {
            std::thread::sleep(Duration::from_millis(15));
            most_during = most_during.max(process_timers());
        });
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    assert!(most_during > 0, "captures had timers while they ran");
    #[allow(clippy::print_stdout)]
    {
        println!("timers during (most): {most_during}");
        println!("timers after: {}", process_timers());
    }
}
