//! Helpers for onsite's own tests, and for services' tests if they like: never for production
//! code. Compiled only with the `test-support` feature, which a test crate turns on in its
//! `[dev-dependencies]`.
//!
//! Much of what onsite does is process-wide (signal handlers, the global allocator, the
//! `pthread_create` hook, one tracing layer), so tests run it in a child process: the test
//! executable itself, re-run to execute one `#[ignore]`d test that plays a role.
//!
//! - [`ChildTest`]: starts that child with a role and variables (or another program, such as a
//!   service binary the test built), and either runs it to the end
//!   within a deadline ([`ChildTest::run`], [`ChildTest::output`]) or hands back the
//!   [`RunningChild`] to signal and watch ([`ChildTest::spawn`]).
//! - [`role`]: the child's side, which role it plays (none outside such a child).
//! - [`dump_files`], [`the_dump_file`]: the dump files of one kind in a directory.

use std::ffi::OsStr;
use std::io::{ErrorKind, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ProfileKind;

/// The variable that tells a child which role it plays. Set only by [`ChildTest`]: an
/// `#[ignore]`d child test run by hand (`cargo test -- --ignored`) sees none and does nothing.
pub const ROLE_VAR: &str = "ONSITE_TEST_ROLE";

/// The role this process plays, if it is a child started by [`ChildTest`].
pub fn role() -> Option<String> {
    std::env::var(ROLE_VAR).ok()
}

/// How often a wait looks at the child again.
const POLL: Duration = Duration::from_millis(20);

/// How much of each output stream a failure message shows (its end).
const SHOWN_BYTES: usize = 8 * 1024;

/// A test's child process: this test executable, re-run to execute the `#[ignore]`d test `test`
/// alone (`--exact test --ignored --nocapture --test-threads=1`) in a role ([`ChildTest::new`]),
/// or another program ([`ChildTest::program`]).
///
/// Its stdin is empty, its stdout and stderr are collected, and it starts with SIGINT at its
/// default disposition even if this runner ignores it.
#[derive(Debug)]
pub struct ChildTest {
    command: Command,
    test: String,
    role: String,
    progress: Option<Progress>,
    /// Whether the child is a libtest executable running one test (not [`ChildTest::program`]).
    libtest: bool,
}

impl ChildTest {
    /// The child executing the test named `test` (its path within the test crate, as libtest
    /// names it), in the role of the same name unless [`ChildTest::role`] says otherwise.
    pub fn new(test: &str) -> Self {
        let exe = std::env::current_exe().expect("the path of this test executable");
        let mut command = child_command(exe);
        command.args(["--exact", test, "--ignored", "--nocapture", "--test-threads=1"]);
        ChildTest { command, test: test.to_owned(), role: test.to_owned(), progress: None, libtest: true }
    }

    /// Another program as the child (a service binary the test built, `cargo` itself), run
    /// with `args` and the same care: empty stdin, collected output, SIGINT at its default, a
    /// deadline on every wait, killed when dropped. It plays no role and runs no libtest test.
    pub fn program(program: impl AsRef<OsStr>, args: &[&str]) -> Self {
        let name = Path::new(program.as_ref()).display().to_string();
        let mut command = child_command(program);
        command.args(args);
        ChildTest { command, test: name.clone(), role: name, progress: None, libtest: false }
    }

    /// The role the child plays, read there with [`role`], when one child test plays several.
    pub fn role(mut self, role: &str) -> Self {
        self.role = role.to_owned();
        self
    }

    /// Adds an argument after the others, which may be any bytes (a libtest child reads its
    /// arguments as UTF-8, so only a child with its own `main` takes one that is not).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    /// Sets a variable in the child's environment.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// For a long child that rewrites the file at `path` as it goes: while waiting, the child
    /// is killed and the test fails when that file's content stays the same for `stall`, so a
    /// hang shows where it happened and well before the deadline.
    pub fn progress_file(mut self, path: impl Into<PathBuf>, stall: Duration) -> Self {
        self.progress = Some(Progress { path: path.into(), stall });
        self
    }

    /// Starts the child and returns at once.
    pub fn spawn(mut self) -> RunningChild {
        let mut who = if self.role == self.test {
            format!("child role {}", self.role)
        } else {
            format!("child role {} (test {})", self.role, self.test)
        };
        if self.libtest {
            self.command.env(ROLE_VAR, &self.role);
        } else {
            who = format!("child program {}", self.test);
        }
        let mut child = self.command.spawn().unwrap_or_else(|e| panic!("{who} could not be started: {e}"));
        let stdout = Stream::collect(child.stdout.take().expect("stdout is piped"));
        let stderr = Stream::collect(child.stderr.take().expect("stderr is piped"));
        RunningChild { child, who, stdout, stderr, progress: self.progress, libtest: self.libtest }
    }

    /// Runs the child to its end and returns its output, whatever its exit status; the test
    /// fails (the child killed) if it still runs after `deadline`.
    pub fn output(self, deadline: Duration) -> ChildOutput {
        self.spawn().wait(deadline)
    }

    /// Runs the child to its end and returns its output; the test fails if the child fails
    /// (showing its output) or still runs after `deadline` (killing it).
    pub fn run(self, deadline: Duration) -> ChildOutput {
        let mut child = self.spawn();
        let output = child.wait(deadline);
        assert!(
            output.status.success(),
            "{} failed: {}\n{}",
            child.who,
            output.status,
            shown(&output.stdout, &output.stderr)
        );
        output
    }
}

/// `program` with an empty stdin, piped output, and SIGINT at its default disposition even if
/// this runner ignores it.
fn child_command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: between fork and exec, sigaction (behind signal) is async-signal-safe and
    // touches nothing but this (child) process's disposition.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    command
}

/// What a finished child left: its exit status and everything it wrote.
#[derive(Debug)]
pub struct ChildOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output (libtest's lines included), lossily decoded.
    pub stdout: String,
    /// Its standard error, lossily decoded.
    pub stderr: String,
}

/// A child started by [`ChildTest::spawn`]; killed and reaped when dropped, so a failing test
/// leaves no process behind.
#[derive(Debug)]
pub struct RunningChild {
    child: Child,
    who: String,
    stdout: Stream,
    stderr: Stream,
    progress: Option<Progress>,
    libtest: bool,
}

impl RunningChild {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends it signal `signal`; the test fails if it has already exited.
    pub fn signal(&mut self, signal: libc::c_int) {
        if let Some(status) = self.child.try_wait().expect("waitpid on the child") {
            panic!("{} exited ({status}) before signal {signal} could be sent\n{}", self.who, self.shown());
        }
        let pid = libc::pid_t::try_from(self.pid()).expect("a pid fits pid_t");
        // SAFETY: kill(2) on our own child, which was just seen running and is reaped only by
        // this handle, so the pid is still its own (at worst a zombie, which ignores it).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "sending signal {signal} to {}: {}", self.who, std::io::Error::last_os_error());
    }

    /// Whether it has not exited yet.
    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().expect("waitpid on the child").is_none()
    }

    /// What it has written to its standard output so far.
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// What it has written to its standard error so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Waits for it to exit by itself and returns its output, whatever its exit status. Fails
    /// the test, killing the child, if it still runs after `deadline` or stalls (see
    /// [`ChildTest::progress_file`]).
    pub fn wait(&mut self, deadline: Duration) -> ChildOutput {
        let started = Instant::now();
        let mut watch = self.progress.as_ref().map(|p| ProgressWatch::new(p.clone()));
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid on the child") {
                // Its pipes close with it, unless it handed them on to a process still running:
                // then what has arrived by the deadline is all there is.
                if (self.stdout.is_closed() && self.stderr.is_closed()) || started.elapsed() > deadline {
                    self.stdout.join_if_closed();
                    self.stderr.join_if_closed();
                    let output = ChildOutput { status, stdout: self.stdout(), stderr: self.stderr() };
                    // libtest says this first; a child test name that matches nothing (a typo,
                    // a missing `#[ignore]`d test) would otherwise pass, having run nothing. (A
                    // child ended by a signal may have been stopped before it said anything.)
                    assert!(
                        !self.libtest || output.status.code().is_none() || output.stdout.contains("running 1 test"),
                        "{} ran no test: is it the name of an #[ignore]d test in this test crate?\n{}",
                        self.who,
                        self.shown()
                    );
                    return output;
                }
            } else if started.elapsed() > deadline {
                self.kill();
                panic!("{} still running after {deadline:?}; killed\n{}", self.who, self.shown());
            } else if let Some(stalled) = watch.as_mut().and_then(ProgressWatch::stalled) {
                self.kill();
                panic!("{} {stalled}; killed\n{}", self.who, self.shown());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Kills it, reaps it, and gives its output (the pipes' ends) a moment to arrive.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let grace = Instant::now();
        while !(self.stdout.is_closed() && self.stderr.is_closed()) && grace.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(POLL);
        }
    }

    fn shown(&self) -> String {
        shown(&self.stdout(), &self.stderr())
    }
}

impl Drop for RunningChild {
    fn drop(&mut self) {
        self.kill();
        // The readers end with the pipes; a grandchild still holding them would keep them
        // open, and those readers are left to end with it rather than block this drop.
        self.stdout.join_if_closed();
        self.stderr.join_if_closed();
    }
}

/// One output stream of the child, read to its end by a thread of its own so the child never
/// blocks on a full pipe, and readable while the child runs.
#[derive(Debug)]
struct Stream {
    bytes: Arc<Mutex<Vec<u8>>>,
    /// `None` once joined.
    reader: Option<JoinHandle<()>>,
}

impl Stream {
    fn collect(mut pipe: impl Read + Send + 'static) -> Stream {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&bytes);
        let reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => sink.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        });
        Stream { bytes, reader: Some(reader) }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// Whether the pipe has reached its end (every writer closed it).
    fn is_closed(&self) -> bool {
        self.reader.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Joins the reader if it has finished (so no thread is left behind).
    fn join_if_closed(&mut self) {
        if self.is_closed()
            && let Some(reader) = self.reader.take()
        {
            let _ = reader.join();
        }
    }
}

#[derive(Debug, Clone)]
struct Progress {
    path: PathBuf,
    stall: Duration,
}

/// The progress file's last content and since when it has had it.
struct ProgressWatch {
    progress: Progress,
    last: String,
    since: Instant,
}

impl ProgressWatch {
    fn new(progress: Progress) -> Self {
        ProgressWatch { progress, last: String::new(), since: Instant::now() }
    }

    /// What to say if the file has stayed the same for too long.
    fn stalled(&mut self) -> Option<String> {
        let now = std::fs::read_to_string(&self.progress.path).unwrap_or_default();
        if now != self.last {
            self.last = now;
            self.since = Instant::now();
        }
        (self.since.elapsed() > self.progress.stall)
            .then(|| format!("made no progress for {:?} (last progress {:?})", self.progress.stall, self.last))
    }
}

/// Both streams for a failure message, each cut to its end.
fn shown(stdout: &str, stderr: &str) -> String {
    format!("--- stdout ---\n{}\n--- stderr ---\n{}", tail(stdout), tail(stderr))
}

fn tail(text: &str) -> String {
    if text.len() <= SHOWN_BYTES {
        return text.to_owned();
    }
    let start = text.floor_char_boundary(text.len() - SHOWN_BYTES);
    format!("[{start} bytes before this left out]\n{}", &text[start..])
}

/// The dump files of `kind` with extension `ext` in `dir` (named `…-{kind}-{stamp}.{ext}`),
/// sorted by name. A directory that does not exist holds none. The stamp starts with a digit,
/// so `cpu` never matches a `cpu-before` file.
pub fn dump_files(dir: &Path, kind: ProfileKind, ext: &str) -> Vec<PathBuf> {
    let (infix, suffix) = (format!("-{kind}-"), format!(".{ext}"));
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("cannot read {}: {e}", dir.display()),
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display())).path())
        .filter(|path| {
            path.file_name().and_then(OsStr::to_str).is_some_and(|name| {
                name.ends_with(&suffix)
                    && name
                        .match_indices(&infix)
                        .any(|(at, _)| name[at + infix.len()..].starts_with(|c: char| c.is_ascii_digit()))
            })
        })
        .collect();
    files.sort();
    files
}

/// The one dump file of `kind` with extension `ext` in `dir`; the test fails, naming what it
/// found, if there is none or more than one.
pub fn the_dump_file(dir: &Path, kind: ProfileKind, ext: &str) -> PathBuf {
    let mut files = dump_files(dir, kind, ext);
    assert_eq!(files.len(), 1, "expected one {kind} .{ext} file in {}, found {files:?}", dir.display());
    files.pop().expect("one file")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(30);

    fn child(name: &str) -> ChildTest {
        ChildTest::new(&format!("test_support::tests::{name}"))
    }

    #[test]
    #[ignore = "child process of the tests below"]
    fn child_plays_a_role() {
        match role().as_deref() {
            Some("talk") => {
                std::io::Write::write_all(&mut std::io::stdout(), b"to stdout\n").unwrap();
                std::io::Write::write_all(&mut std::io::stderr(), b"to stderr\n").unwrap();
            }
            Some("fail") => panic!("failing as asked"),
            Some("hang") => std::thread::sleep(Duration::from_secs(3600)),
            _ => {}
        }
    }

    #[test]
    fn a_child_runs_in_its_role_with_its_variables_and_its_output_is_collected() {
        let out = child("child_plays_a_role").role("talk").env("ONSITE_TEST_UNUSED", "1").run(DEADLINE);
        assert!(out.stdout.contains("to stdout"), "{out:?}");
        assert!(out.stderr.contains("to stderr"), "{out:?}");
    }

    #[test]
    #[should_panic(expected = "child role fail (test test_support::tests::child_plays_a_role) failed")]
    fn a_failing_child_fails_the_test_naming_its_role() {
        child("child_plays_a_role").role("fail").run(DEADLINE);
    }

    #[test]
    fn output_returns_a_failed_childs_output() {
        let out = child("child_plays_a_role").role("fail").output(DEADLINE);
        assert!(!out.status.success());
        assert!(out.stdout.contains("failing as asked") || out.stderr.contains("failing as asked"), "{out:?}");
    }

    #[test]
    #[should_panic(expected = "child role hang (test test_support::tests::child_plays_a_role) still running after")]
    fn a_child_past_its_deadline_is_killed_and_fails_the_test() {
        child("child_plays_a_role").role("hang").run(Duration::from_millis(500));
    }

    #[test]
    #[should_panic(expected = "made no progress for")]
    fn a_child_whose_progress_file_stays_the_same_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        child("child_plays_a_role")
            .role("hang")
            .progress_file(dir.path().join("progress"), Duration::ZERO)
            .run(DEADLINE);
    }

    #[test]
    fn a_running_child_is_signalled_and_killed_when_dropped() {
        let mut running = child("child_plays_a_role").role("hang").spawn();
        assert!(running.is_alive());
        running.signal(libc::SIGTERM);
        let out = running.wait(DEADLINE);
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&out.status), Some(libc::SIGTERM));

        let running = child("child_plays_a_role").role("hang").spawn();
        let pid = running.pid();
        drop(running);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped");
    }

    #[test]
    fn dump_files_are_those_of_the_kind_and_extension() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "svc-1-cpu-20250101T000000.000Z.pprof",
            "svc-1-cpu-20250101T000000.000Z.svg",
            "svc-1-memory-20250101T000000.000Z.pprof",
            ".svc-1-cpu-20250101T000000.001Z.pprof.1.0.tmp",
            "svc-1-cpu-20250101T000000.002Z.pprof",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let names = |files: Vec<PathBuf>| -> Vec<String> {
            files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect()
        };
        assert_eq!(
            names(dump_files(dir.path(), ProfileKind::Cpu, "pprof")),
            ["svc-1-cpu-20250101T000000.000Z.pprof", "svc-1-cpu-20250101T000000.002Z.pprof"]
        );
        assert_eq!(
            names(vec![the_dump_file(dir.path(), ProfileKind::Memory, "pprof")]),
            ["svc-1-memory-20250101T000000.000Z.pprof"]
        );
        assert!(dump_files(&dir.path().join("missing"), ProfileKind::Cpu, "pprof").is_empty());
    }
}
