//! What always-on heap sampling costs real code: demo-mq's broker under its own load
//! generator, with `ONSITE_MEMORY_ALWAYS=on` and without, in one run.
//!
//! `cargo bench -p demo-mq --bench heap_always`. Each round starts a fresh broker per setting
//! (which goes first alternates round by round), drives it with the load generator unpaced for
//! `ONSITE_BENCH_ROUND_SECS` (default 4) and counts the messages acked: messages per second of
//! wall time (the headline: what a client sees), and per CPU-second the broker ran (less
//! sensitive to other processes on the machine). A round's ratio is on / off of its two runs;
//! the report gives the median over `ONSITE_BENCH_ROUNDS` (default 12) rounds with quartiles.
//! Under `cargo test --benches` (no `--bench`), one short round checks that it runs.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEMO_MQ: &str = env!("CARGO_BIN_EXE_demo-mq");

/// One broker run: messages acked per wall-clock second and per CPU-second of the broker.
struct Run {
    per_wall: f64,
    per_cpu: f64,
}

/// The broker, killed when dropped.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The broker's user + system CPU time so far, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the broker's /proc stat");
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("a stat line").1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

fn run(always_on: bool, seconds: u64, dir: &Path) -> Run {
    let mut child = Command::new(DEMO_MQ)
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env("ONSITE_DIR", dir)
        .env("ONSITE_MEMORY_ALWAYS", if always_on { "on" } else { "off" })
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo-mq serve starts");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let broker = Broker(child);
    let mut line = String::new();
    stdout.read_line(&mut line).expect("demo-mq prints where it listens");
    let addr =
        line.strip_prefix("listening on ").and_then(|rest| rest.split_whitespace().next()).expect(&line).to_owned();
    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    let mut load = Command::new(DEMO_MQ)
        .args(["load", "--addr", &addr, "--seconds", &seconds.to_string(), "--rate", "1000000"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("demo-mq load starts");
    let mut log = String::new();
    load.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(load.wait().unwrap().success(), "demo-mq load failed:\n{log}");
    let wall = started.elapsed();
    let cpu = cpu_time(pid) - cpu_before;
    drop(broker);
    let acked: f64 = log
        .split_whitespace()
        .find_map(|word| word.strip_prefix("acked="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the load generator's totals:\n{log}"));
    Run { per_wall: acked / wall.as_secs_f64(), per_cpu: acked / cpu.as_secs_f64() }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(default)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[allow(clippy::print_stdout)] // a benchmark's report is its output
fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let rounds = if quick { 1 } else { env_number("ONSITE_BENCH_ROUNDS", 12) as usize };
    let seconds = if quick { 1 } else { env_number("ONSITE_BENCH_ROUND_SECS", 4) };
    let dir = tempfile::tempdir().unwrap();
    let load_before = load_average();
    let (mut wall_ratios, mut cpu_ratios) = (Vec::new(), Vec::new());
    let (mut on_runs, mut off_runs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (on, off) = if round % 2 == 0 {
            let off = run(false, seconds, dir.path());
            (run(true, seconds, dir.path()), off)
        } else {
            let on = run(true, seconds, dir.path());
            (on, run(false, seconds, dir.path()))
        };
        wall_ratios.push(on.per_wall / off.per_wall);
        cpu_ratios.push(on.per_cpu / off.per_cpu);
        on_runs.push(on);
        off_runs.push(off);
    }
    if quick {
        println!("quick check that the benchmark runs (one short round, likely a debug build): not a measurement");
    }
    println!(
        "demo-mq under its load generator (2 producers, 2 consumers, unpaced), {rounds} rounds of {seconds} s per \
         setting; load average before {load_before}, after {}",
        load_average()
    );
    println!();
    println!(
        "| messages acked | off (median) | always-on (median) | ratio on/off, median of rounds | quartiles | min–max |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (title, ratios, pick) in [
        ("per second (headline)", &mut wall_ratios, (|r: &Run| r.per_wall) as fn(&Run) -> f64),
        ("per broker CPU-second", &mut cpu_ratios, |r: &Run| r.per_cpu),
    ] {
        ratios.sort_by(f64::total_cmp);
        let median_of = |runs: &[Run]| {
            let mut values: Vec<f64> = runs.iter().map(pick).collect();
            values.sort_by(f64::total_cmp);
            quantile(&values, 0.5)
        };
        println!(
            "| {title} | {:.0} | {:.0} | **{:.3}** | {:.3}–{:.3} | {:.3}–{:.3} |",
            median_of(&off_runs),
            median_of(&on_runs),
            quantile(ratios, 0.5),
            quantile(ratios, 0.25),
            quantile(ratios, 0.75),
            ratios[0],
            ratios[ratios.len() - 1],
        );
    }
}
