//! Helpers for tests that run a real child process with onsite installed and talk to it with
//! real signals. The child is this same test executable, re-run by onsite-core's
//! `test_support` to execute one `#[ignore]`d test function that plays the service.

#![allow(dead_code, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use onsite_core::ProfileKind;
use onsite_core::test_support::{ChildTest, RunningChild, dump_files};

/// Tells the parent that onsite is installed and the workload runs. Said on stdout and then on
/// stderr: the two pipes are read by separate threads, so the parent waits for both, and what
/// install logged before it is in the log once the service is ready.
pub fn announce_ready() {
    println!("{READY}");
    std::io::Write::write_all(&mut std::io::stderr(), format!("{READY}\n").as_bytes()).unwrap();
}

/// The line a child prints once ready; libtest may print its own text before it on that line.
pub const READY: &str = "ONSITE-TEST-CHILD-READY";

/// How long a service may take to say it is ready.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// A running service; killed on drop so a failing test leaves nothing behind.
pub struct Service {
    child: RunningChild,
    pub dir: PathBuf,
}

impl Service {
    /// Starts this executable as the service `role` (the name of the ignored child test),
    /// dumping into `dir`, and waits until it says it is ready.
    pub fn start(role: &str, dir: &Path, env: &[(&str, &str)]) -> Service {
        Service::start_child(ChildTest::new(role), READY, dir, env)
    }

    /// Starts the service binary `program` dumping into `dir`, and waits until its stdout says
    /// `ready`.
    pub fn start_program(program: &Path, ready: &str, dir: &Path, env: &[(&str, &str)]) -> Service {
        Service::start_child(ChildTest::program(program, &[]), ready, dir, env)
    }

    /// Starts `child` (a [`ChildTest::new`] with more said about it, such as its arguments) as
    /// the service, as [`Service::start`] does.
    pub fn start_test(child: ChildTest, dir: &Path, env: &[(&str, &str)]) -> Service {
        Service::start_child(child, READY, dir, env)
    }

    fn start_child(child: ChildTest, ready: &str, dir: &Path, env: &[(&str, &str)]) -> Service {
        let mut child = child.env("ONSITE_DIR", dir).env("RUST_LOG", "info");
        for (k, v) in env {
            child = child.env(k, v);
        }
        let mut service = Service { child: child.spawn(), dir: dir.to_owned() };
        let started = Instant::now();
        // A role child (announce_ready) says it on stderr too; a program only on stdout.
        let on_stderr = ready == READY;
        while !service.child.stdout().contains(ready) || (on_stderr && !service.log_text().contains(ready)) {
            if !service.is_alive() {
                panic!("the child exited before it was ready; its log:\n{}", service.log_text());
            }
            if started.elapsed() > READY_DEADLINE {
                panic!("the child did not get ready in {READY_DEADLINE:?}; its log:\n{}", service.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        service
    }

    pub fn pid(&self) -> i32 {
        self.child.pid() as i32
    }

    pub fn signal(&mut self, sig: i32) {
        self.child.signal(sig);
    }

    pub fn is_alive(&mut self) -> bool {
        self.child.is_alive()
    }

    /// What the service has logged so far (its stderr).
    pub fn log_text(&self) -> String {
        self.child.stderr()
    }

    /// Waits for the child to exit by itself (killing it and failing after `deadline`).
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        self.child.wait(deadline).status
    }

    /// Polls `found` until it gives a value; fails after `deadline` saying what was awaited
    /// (`awaited` is asked then) and showing the child's log.
    fn wait_until<T>(
        &self,
        deadline: Duration,
        awaited: impl Fn() -> String,
        mut found: impl FnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = found() {
                return value;
            }
            if start.elapsed() > deadline {
                panic!("{} within {deadline:?}; the child's log:\n{}", awaited(), self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `count` dump files of `kind` with extension `ext` exist, and returns them
    /// sorted.
    pub fn wait_for_files(&self, kind: ProfileKind, ext: &str, count: usize, deadline: Duration) -> Vec<PathBuf> {
        self.wait_until(
            deadline,
            || format!("expected {count} {kind} .{ext} files, found {:?}", dump_files(&self.dir, kind, ext)),
            || Some(dump_files(&self.dir, kind, ext)).filter(|files| files.len() >= count),
        )
    }

    /// What the service printed on stdout so far.
    pub fn stdout_text(&self) -> String {
        self.child.stdout()
    }

    /// Waits until the service's stdout contains `text`.
    pub fn wait_until_stdout(&self, text: &str, deadline: Duration) {
        self.wait_until(
            deadline,
            || format!("the child never printed {text:?}; its log:\n{}", self.log_text()),
            || self.child.stdout().contains(text).then_some(()),
        );
    }

    /// Waits until the log contains `text`.
    pub fn wait_for_log(&self, text: &str, deadline: Duration) {
        self.wait_for_log_count(text, 1, deadline);
    }

    /// Waits until the log contains `text` at least `count` times.
    pub fn wait_for_log_count(&self, text: &str, count: usize, deadline: Duration) {
        self.wait_until(
            deadline,
            || match count {
                1 => format!("the child's log never said {text:?}"),
                _ => format!("the child's log never said {text:?} {count} times"),
            },
            || (self.log_text().matches(text).count() >= count).then_some(()),
        );
    }

    /// Waits until `count` manifests exist, and returns them, oldest first.
    pub fn wait_for_manifests(&self, count: usize, deadline: Duration) -> Vec<(PathBuf, serde_json::Value)> {
        self.wait_until(
            deadline,
            || format!("expected {count} manifests, found {}", manifests(&self.dir).len()),
            || Some(manifests(&self.dir)).filter(|found| found.len() >= count),
        )
    }
}

/// Work that stays on the CPU in one function the profile must name.
#[inline(never)]
pub fn burn_cpu_in_a_known_function(rounds: u64) -> u64 {
    // Operators only, no iterator: in the tests' unoptimised build a `Range` iterator's methods
    // are real calls, and would take the flat samples this function is meant to have.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut i = 0;
    while i < rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x ^= i;
        i += 1;
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

/// In the child playing `name`: logs to stderr and installs onsite (from the environment).
/// `None` in any other process, where the role's test has nothing to do.
pub fn install_as_role(name: &str) -> Option<onsite::Onsite> {
    if onsite_core::test_support::role().as_deref() != Some(name) {
        return None;
    }
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).init();
    Some(onsite::install().unwrap())
}

/// As [`install_as_role`], with onsite's `tracing` layer under the log, so trace captures
/// record the role's spans.
pub fn install_traced_as_role(name: &str) -> Option<onsite::Onsite> {
    use tracing_subscriber::prelude::*;
    if onsite_core::test_support::role().as_deref() != Some(name) {
        return None;
    }
    tracing_subscriber::registry()
        .with(onsite::trace::layer())
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false))
        .init();
    Some(onsite::install().expect("install"))
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
    dump_files(dir, ProfileKind::Manifest, "json")
        .into_iter()
        .map(|p| {
            let json = read_json(&p);
            (p, json)
        })
        .collect()
}

/// An HTTP answer: status, headers (names lower-cased) and body.
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` with `headers` (whole header lines), read to the end (onsite's server closes
/// each connection); a read that waits two minutes fails the test.
pub fn http_get(addr: std::net::SocketAddr, path: &str, headers: &[&str]) -> HttpAnswer {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("GET {path}: no header"));
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = raw[split + 4..].to_vec();
    HttpAnswer { status, headers, body }
}
