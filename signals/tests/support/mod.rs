//! Helpers for tests that run a real child process with onsite installed and talk to it with
//! real signals. The child is this same test executable, re-run with `ONSITE_TEST_ROLE` set
//! and a filter selecting one `#[ignore]`d test function that plays the service.

#![allow(dead_code, clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const ROLE_VAR: &str = "ONSITE_TEST_ROLE";

/// The role this process plays, if it is a child.
pub fn role() -> Option<String> {
    std::env::var(ROLE_VAR).ok()
}

/// Tells the parent that onsite is installed and the workload runs.
pub fn announce_ready() {
    println!("{READY}");
}

/// The line a child prints once ready; libtest may print its own text before it on that line.
const READY: &str = "ONSITE-TEST-CHILD-READY";

/// A running child; killed on drop so a failing test leaves nothing behind.
pub struct Service {
    pub child: Child,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Service {
    /// Starts this executable as the service `role` (the name of the ignored child test),
    /// dumping into `dir`, and waits until it says it is ready.
    pub fn start(role: &str, dir: &Path, env: &[(&str, &str)]) -> Service {
        let log = dir.with_extension("log");
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", role, "--ignored", "--nocapture", "--test-threads=1"])
            .env(ROLE_VAR, role)
            .env("ONSITE_DIR", dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: resetting signal dispositions between fork and exec is async-signal-safe.
        // The child must start with SIGINT at its default even if this runner ignores it.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(READY) {
                    let _ = tx.send(());
                }
            }
        });
        let service = Service { child, dir: dir.to_owned(), log };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!("the child did not get ready in 60 s; its log:\n{}", service.log_text());
        }
        service
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "kill failed");
    }

    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the child to exit by itself.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > deadline {
                panic!("the child did not exit within {deadline:?}; its log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `count` files whose names end with `suffix` exist, and returns them sorted.
    pub fn wait_for_files(&self, suffix: &str, count: usize, deadline: Duration) -> Vec<PathBuf> {
        let start = Instant::now();
        loop {
            let files = files_ending_with(&self.dir, suffix);
            if files.len() >= count {
                return files;
            }
            if start.elapsed() > deadline {
                panic!(
                    "expected {count} *{suffix} files within {deadline:?}, found {files:?}; the child's log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log contains `text`.
    pub fn wait_for_log(&self, text: &str, deadline: Duration) {
        let start = Instant::now();
        while !self.log_text().contains(text) {
            if start.elapsed() > deadline {
                panic!("the child's log never said {text:?} within {deadline:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn files_ending_with(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(suffix) && !n.starts_with('.'))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Work that stays on the CPU in one function the profile must name.
#[inline(never)]
pub fn burn_cpu_in_a_known_function(rounds: u64) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    std::hint::black_box(x)
}

/// Threads that allocate and free heavily, forever.
pub fn spawn_allocating_threads(n: usize) {
    for t in 0..n {
        std::thread::Builder::new()
            .name(format!("allocator-{t}"))
            .spawn(move || {
                let mut keep: Vec<Vec<u8>> = Vec::new();
                let mut i: usize = t;
                loop {
                    i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let v = vec![(i & 0xff) as u8; 16 + (i >> 40) % 4096];
                    if keep.len() < 256 {
                        keep.push(v);
                    } else {
                        keep[(i >> 20) % 256] = v;
                    }
                }
            })
            .unwrap();
    }
}

/// The service body shared by child roles: log to stderr, install onsite, say ready, burn CPU.
pub fn run_service(allocating_threads: usize) -> ! {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).init();
    let _onsite = match onsite::install() {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(3);
        }
    };
    spawn_allocating_threads(allocating_threads);
    announce_ready();
    // Half the time on the CPU in the known function, half asleep, so several test services
    // can share a 2-core machine.
    loop {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(10) {
            burn_cpu_in_a_known_function(100_000);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The env var naming a file whose appearance makes [`run_spiking_service`] start threads.
pub const SPIKE_FILE_VAR: &str = "ONSITE_TEST_SPIKE_FILE";

/// Threads [`run_spiking_service`] starts when its spike file appears.
pub const SPIKE_THREADS: usize = 60;

/// A quiet service (onsite installed, mostly asleep) that starts [`SPIKE_THREADS`] idle
/// threads once the file named by `ONSITE_TEST_SPIKE_FILE` exists: a metric the parent
/// test moves when it chooses.
pub fn run_spiking_service() -> ! {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let _onsite = match onsite::install() {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(3);
        }
    };
    let spike = std::env::var_os(SPIKE_FILE_VAR).map(PathBuf::from);
    announce_ready();
    let mut spiked = false;
    loop {
        if !spiked && spike.as_deref().is_some_and(Path::exists) {
            spiked = true;
            for n in 0..SPIKE_THREADS {
                std::thread::Builder::new()
                    .name(format!("spike-{n}"))
                    .spawn(|| {
                        loop {
                            std::thread::park();
                        }
                    })
                    .unwrap();
            }
            tracing::info!("spiked: started {SPIKE_THREADS} threads");
        }
        burn_cpu_in_a_known_function(10_000);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Voluntary context switches of the child's control thread so far: each is one time it went
/// to sleep, so the count moves only when the thread wakes up. The child must log at debug
/// level for `onsite` (the thread's id is in that line).
pub fn control_thread_wakeups(service: &Service) -> u64 {
    let log = service.log_text();
    let line = log.lines().find(|l| l.contains("onsite: control thread running")).expect("the debug line with the tid");
    let tid = line.split("tid=").nth(1).and_then(|t| t.split_whitespace().next()).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", service.pid())).unwrap();
    let count = status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")).unwrap();
    count.trim().parse().unwrap()
}

/// A manifest file, parsed.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

/// The `{command}` part of the child's dump file names: this test executable's file name.
pub fn command_name() -> String {
    std::env::current_exe().unwrap().file_name().unwrap().to_str().unwrap().to_owned()
}

/// The manifests in `dir`, oldest first, parsed.
pub fn manifests(dir: &Path) -> Vec<(PathBuf, serde_json::Value)> {
    files_ending_with(dir, ".json")
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_str().unwrap().contains("-manifest-"))
        .map(|p| {
            let json = read_json(&p);
            (p, json)
        })
        .collect()
}

impl Service {
    /// Waits until `count` manifests exist, and returns them, oldest first.
    pub fn wait_for_manifests(&self, count: usize, deadline: Duration) -> Vec<(PathBuf, serde_json::Value)> {
        let start = Instant::now();
        loop {
            let found = manifests(&self.dir);
            if found.len() >= count {
                return found;
            }
            if start.elapsed() > deadline {
                panic!(
                    "expected {count} manifests within {deadline:?}, found {}; the child's log:\n{}",
                    found.len(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Service {
    /// Waits until the log contains `text` at least `count` times.
    pub fn wait_for_log_count(&self, text: &str, count: usize, deadline: Duration) {
        let start = Instant::now();
        while self.log_text().matches(text).count() < count {
            if start.elapsed() > deadline {
                panic!("the child's log never said {text:?} {count} times within {deadline:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
