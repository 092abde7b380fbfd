//! Running demo-mq for a demo: building it, starting the broker and its load generator as
//! children that cannot outlive us, and reading what they leave behind.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn step(text: &str) {
    println!("\n==> {text}");
}

/// A child process that is stopped (SIGTERM, then SIGKILL) and reaped when dropped, and that
/// dies with us even if we are killed or interrupted: the kernel sends it SIGKILL when this
/// process ends (`PR_SET_PDEATHSIG`).
pub(crate) struct Managed {
    pub(crate) child: Child,
}

impl Managed {
    pub(crate) fn spawn(name: &str, cmd: &mut Command) -> Result<Managed, String> {
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

    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub(crate) fn signal(&self, sig: i32) {
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

/// demo-mq's broker and load generator, running.
pub(crate) struct DemoMq {
    // Field order is drop order: the load stops before the broker.
    pub(crate) load: Option<Managed>,
    pub(crate) server: Managed,
    pub(crate) dumps: PathBuf,
    pub(crate) log: PathBuf,
}

impl DemoMq {
    /// Builds demo-mq in release, empties `target/{dump_dir_name}`, starts the broker dumping
    /// there with `env` added, and starts `load_seconds` of load against it.
    pub(crate) fn start(dump_dir_name: &str, env: &[(&str, &str)], load_seconds: u64) -> Result<DemoMq, String> {
        step("building demo-mq (release)");
        crate::cargo(&["build", "--release", "--quiet", "-p", "demo-mq"])?;
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::workspace_root().join("target"));
        let bin = target.join("release/demo-mq");
        let dumps = target.join(dump_dir_name);
        if dumps.exists() {
            std::fs::remove_dir_all(&dumps).map_err(|e| format!("cannot clear {}: {e}", dumps.display()))?;
        }
        std::fs::create_dir_all(&dumps).map_err(|e| format!("cannot create {}: {e}", dumps.display()))?;
        let log = dumps.join("demo-mq.log");

        step("starting demo-mq");
        let log_file = std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let mut server = Managed::spawn(
            "demo-mq serve",
            Command::new(&bin)
                .args(["serve", "--addr", "127.0.0.1:0"])
                .env("ONSITE_DIR", &dumps)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log_file),
        )?;
        let addr = read_listen_address(&mut server.child, &log)?;
        println!("  demo-mq pid {} listening on {addr}; dumps go to {}", server.pid(), dumps.display());
        let load = Managed::spawn(
            "demo-mq load",
            Command::new(&bin)
                .args(["load", "--addr", &addr, "--seconds", &load_seconds.to_string()])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        Ok(DemoMq { load: Some(load), server, dumps, log })
    }

    pub(crate) fn pid(&self) -> i32 {
        self.server.pid()
    }

    /// An error if the broker has exited.
    pub(crate) fn check_running(&mut self) -> Result<(), String> {
        match self.server.child.try_wait() {
            Ok(Some(status)) => Err(format!("demo-mq exited ({status}); see {}", self.log.display())),
            _ => Ok(()),
        }
    }

    /// Waits until the broker's log mentions `text`.
    pub(crate) fn wait_for_log(&self, text: &str, limit: Duration) -> Result<String, String> {
        wait_for(limit, || log_line(&self.log, text))
            .ok_or_else(|| format!("demo-mq's log never said {text:?} within {limit:?}; see {}", self.log.display()))
    }

    /// The broker's resident memory now.
    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// demo-mq's dump files (not its log) with their sizes, sorted by name.
    pub(crate) fn files(&self) -> Vec<(PathBuf, u64)> {
        let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(&self.dumps)
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
}

/// `demo-mq-{pid}-{kind}-{timestamp}.{ext}` → `kind`.
pub(crate) fn kind_of(path: &Path) -> String {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // The command itself contains a dash: skip `demo`, `mq` and the pid. One kind has a dash
    // of its own.
    let rest: Vec<&str> = name.splitn(4, '-').collect();
    match rest.get(3) {
        Some(rest) if rest.starts_with("cpu-before-") => "cpu-before".to_owned(),
        _ => name.split('-').nth(3).unwrap_or("").to_owned(),
    }
}

/// Polls `probe` every 100 ms until it answers or `limit` passes.
pub(crate) fn wait_for<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The first line of the log at `path` containing `text`.
fn log_line(path: &Path, text: &str) -> Option<String> {
    let log = std::fs::read_to_string(path).ok()?;
    log.lines().find(|l| l.contains(text)).map(str::to_owned)
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
