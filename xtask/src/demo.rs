//! `cargo xtask demo`: the operator's experience, end to end, on demo-mq.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::report;

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// How long the capture runs, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Exit with an error unless every planted problem is found (what CI runs).
    #[arg(long)]
    pub(crate) strict: bool,
    /// Send no signal: let an automatic rule (a sustained memory rule scaled to the demo) start
    /// the capture.
    #[arg(long)]
    pub(crate) auto: bool,
}

/// A problem demo-mq plants, and where a profile must show it.
struct Planted {
    kind: &'static str,
    sample_type: &'static str,
    function: &'static str,
    /// It must rank within this many rows by flat value.
    within: usize,
}

const PLANTED: &[Planted] = &[
    Planted { kind: "cpu", sample_type: "cpu", function: "demo_mq::broker::checksum_payload", within: 2 },
    Planted { kind: "memory", sample_type: "inuse_space", function: "demo_mq::broker::record_ack", within: 1 },
    Planted { kind: "mutex", sample_type: "delay", function: "demo_mq::broker::update_delivery_stats", within: 1 },
    Planted {
        kind: "threadcreate",
        sample_type: "alive",
        function: "demo_mq::broker::Broker::spawn_consumer_watchdog",
        within: 1,
    },
];

/// A child process that is killed (and reaped) when dropped, and also dies with us: the
/// kernel sends it SIGKILL if this process ends first, even by Ctrl-C or a kill.
struct Managed {
    child: Child,
}

impl Managed {
    fn spawn(name: &'static str, cmd: &mut Command) -> Result<Managed, String> {
        // SAFETY: prctl is async-signal-safe; this runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Managed { child })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

pub(crate) fn run(args: &DemoArgs) -> Result<(), String> {
    if args.auto {
        return crate::auto_demo::run(args);
    }
    let root = crate::workspace_root();
    step("building demo-mq (release)");
    crate::cargo(&["build", "--release", "--quiet", "-p", "demo-mq"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/demo-mq");
    let dumps = target.join("onsite-demo");
    if dumps.exists() {
        std::fs::remove_dir_all(&dumps).map_err(|e| format!("cannot clear {}: {e}", dumps.display()))?;
    }
    std::fs::create_dir_all(&dumps).map_err(|e| format!("cannot create {}: {e}", dumps.display()))?;
    let log_path = dumps.join("demo-mq.log");

    step("starting demo-mq");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut server = Managed::spawn(
        "demo-mq serve",
        Command::new(&bin)
            .args(["serve", "--addr", "127.0.0.1:0"])
            .env("ONSITE_DIR", &dumps)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log),
    )?;
    let addr = read_listen_address(&mut server.child, &log_path)?;
    let pid = server.pid();
    println!("  demo-mq pid {pid} listening on {addr}; dumps go to {}", dumps.display());

    let load_seconds = args.seconds + 30;
    let _load = Managed::spawn(
        "demo-mq load",
        Command::new(&bin)
            .args(["load", "--addr", &addr, "--seconds", &load_seconds.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    step("driving load (2 producers, 2 consumers) for a 2 s warm-up");
    std::thread::sleep(Duration::from_secs(2));

    let rss_before = rss_bytes(pid);
    step("starting a capture");
    println!("  $ kill -USR2 {pid}");
    server.signal(libc::SIGUSR2);
    wait_for_log(&log_path, "capture started", 1, Duration::from_secs(30))?;

    let bar = ProgressBar::new(args.seconds * 10);
    bar.set_style(
        ProgressStyle::with_template("  capturing [{bar:40}] {elapsed}/{msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    bar.set_message(format!("{}s", args.seconds));
    let thread_dump_at = args.seconds * 10 / 2;
    for tick in 0..args.seconds * 10 {
        if tick == thread_dump_at {
            bar.println(format!("  $ kill -USR1 {pid}    (every thread's stack, while the capture runs)"));
            server.signal(libc::SIGUSR1);
        }
        std::thread::sleep(Duration::from_millis(100));
        bar.inc(1);
        if let Ok(Some(status)) = server.child.try_wait() {
            bar.abandon();
            return Err(format!("demo-mq exited during the capture ({status}); see {}", log_path.display()));
        }
    }
    bar.finish();

    step("stopping the capture");
    println!("  $ kill -USR2 {pid}");
    server.signal(libc::SIGUSR2);
    let spinner = ProgressBar::new_spinner();
    spinner.set_message("writing profiles…");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let stopped = wait_for_log(&log_path, "capture stopped", 1, Duration::from_secs(180));
    spinner.finish_and_clear();
    stopped?;
    let rss_after = rss_bytes(pid);
    drop(_load);
    drop(server);

    step("files written");
    let files = list_files(&dumps);
    for (path, size) in &files {
        println!("  {:>10}  {}", report::human(*size as i64, "bytes"), path.display());
    }
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "  demo-mq's RSS grew from {} to {} during the capture (+{})",
            report::human(before as i64, "bytes"),
            report::human(after as i64, "bytes"),
            report::human(after.saturating_sub(before) as i64, "bytes"),
        );
    }

    let mut missed = Vec::new();
    for (path, _) in files.iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "pprof")) {
        let kind = kind_of(path);
        step(&format!("{kind} profile, decoded in Rust"));
        report::print_top(path, 8, None)?;
        for planted in PLANTED.iter().filter(|p| p.kind == kind) {
            if report::default_sample_type_of(path)?.as_deref() != Some(planted.sample_type) {
                report::print_top(path, 5, Some(planted.sample_type))?;
            }
            let rows = report::top(path, Some(planted.sample_type))?.2;
            let rank = rows.iter().filter(|r| r.flat > 0).position(|r| r.function == planted.function);
            let (function, within, by) = (planted.function, planted.within, planted.sample_type);
            match rank {
                Some(r) if r < within => println!("  ✔ {function} is #{} by {by} in the {kind} profile", r + 1),
                _ => {
                    println!("  ✘ {function} is not in the top {within} by {by} of the {kind} profile");
                    missed.push(format!("{kind}: {function}"));
                }
            }
        }
    }
    for (path, _) in files.iter().filter(|(p, _)| kind_of(p) == "trace") {
        step("trace (Chrome Trace Event JSON: open it in https://ui.perfetto.dev or chrome://tracing)");
        report::print_span_counts(path)?;
    }
    for (path, _) in files.iter().filter(|(p, _)| kind_of(p) == "threads") {
        step("SIGUSR1 thread dump (first threads)");
        report::print_head(path, 40)?;
    }
    for kind in ["cpu", "memory", "mutex", "block", "trace", "threadcreate", "threads"] {
        if !files.iter().any(|(p, _)| kind_of(p) == kind) {
            missed.push(format!("no {kind} file was written"));
        }
    }
    println!();
    println!("  Open them: go tool pprof -http=: <file.pprof>   (or -top), the .svg in a browser.");
    println!("  demo-mq's own log: {}", log_path.display());
    if !missed.is_empty() && args.strict {
        return Err(format!("planted problems not found: {}", missed.join("; ")));
    }
    Ok(())
}

fn step(text: &str) {
    println!("\n==> {text}");
}

/// `demo-mq-{pid}-{kind}-{timestamp}.{ext}` → `kind`.
fn kind_of(path: &Path) -> String {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // The command itself contains a dash: skip `demo`, `mq` and the pid.
    name.split('-').nth(3).unwrap_or("").to_owned()
}

fn read_listen_address(child: &mut Child, log: &Path) -> Result<String, String> {
    let stdout = child.stdout.take().ok_or("demo-mq has no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("listening on ") {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| format!("demo-mq did not start listening; see {}", log.display()))
}

/// Waits until `text` occurs `count` times in the log at `path`.
fn wait_for_log(path: &Path, text: &str, count: usize, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.matches(text).count() >= count {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!("demo-mq's log never said {text:?} within {limit:?}; see {}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rss_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn list_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("demo-mq-"))
                .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}
