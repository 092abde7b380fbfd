//! The service the operator names, seen from outside through `/proc`: its pid (from a number or
//! a process name), its environment (where it dumps, which signals it takes), whether it
//! catches a signal at all, and sending it one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use onsite::status;

/// The signal an onsite service toggles captures with unless `ONSITE_TOGGLE_SIGNAL` says.
pub const DEFAULT_TOGGLE: libc::c_int = libc::SIGUSR2;
/// The signal it writes a thread dump on unless `ONSITE_DUMP_SIGNAL` says.
pub const DEFAULT_DUMP: libc::c_int = libc::SIGUSR1;

/// A running process the operator named.
#[derive(Debug)]
pub struct Service {
    pub pid: u32,
    /// Its `/proc/<pid>/comm`.
    pub name: String,
    environ: HashMap<String, String>,
    cwd: Option<PathBuf>,
}

impl Service {
    /// The process `target` names: a pid, or a process name matched against `/proc/*/comm`
    /// (exactly one process must match).
    pub fn find(target: &str) -> Result<Service, String> {
        let pid = match target.parse::<u32>() {
            Ok(pid) => pid,
            Err(_) => pid_of_name(target)?,
        };
        Service::open(pid)
    }

    fn open(pid: u32) -> Result<Service, String> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let name = std::fs::read_to_string(proc.join("comm"))
            .map_err(|e| format!("no process {pid} ({}: {e}); check the pid with `ps -p {pid}`", proc.display()))?
            .trim()
            .to_owned();
        let environ = std::fs::read(proc.join("environ")).map_err(|e| {
            format!(
                "cannot read {}/environ of pid {pid} ({name}): {e}; run onsite as the service's user or as root",
                proc.display()
            )
        })?;
        let environ = environ
            .split(|&b| b == 0)
            .filter_map(|pair| {
                let pair = String::from_utf8_lossy(pair);
                let (k, v) = pair.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect();
        let cwd = std::fs::read_link(proc.join("cwd")).ok();
        Ok(Service { pid, name, environ, cwd })
    }

    /// `name` in the service's environment (as it was when it started).
    pub fn var(&self, name: &str) -> Option<&str> {
        self.environ.get(name).map(String::as_str)
    }

    /// Where the service dumps, as it resolves it: its `ONSITE_DIR`, else its `TMPDIR`, else
    /// `/tmp` (Rust's `std::env::temp_dir`). A relative path is the service's working
    /// directory's. (A dump directory set in code with `Builder::dump_dir` is not visible from
    /// outside: pass `--dir`.)
    pub fn dump_dir(&self) -> PathBuf {
        let dir = match self.var(onsite::vars::DIR).filter(|d| !d.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => self.var("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from),
        };
        match &self.cwd {
            Some(cwd) if dir.is_relative() => cwd.join(dir),
            _ => dir,
        }
    }

    /// The signal the service takes for a job: `overridden` (the operator's `--signal`), else
    /// its variable `var`, else `default`. An error when it is off or its value is one the
    /// service rejected (then the service turned the job off).
    pub fn signal_for(&self, var: &str, default: libc::c_int, overridden: Option<&str>) -> Result<libc::c_int, String> {
        let (text, from) = match (overridden, self.var(var)) {
            (Some(text), _) => (text, "--signal".to_owned()),
            (None, Some(text)) => (text, format!("its {var}")),
            (None, None) => return Ok(default),
        };
        match status::signal_setting(text) {
            Ok(Some(sig)) => Ok(sig),
            Ok(None) => Err(format!(
                "pid {} ({}) has this signal turned off ({from}={text}); nothing was sent",
                self.pid, self.name
            )),
            Err(reason) => Err(format!(
                "{from}={text:?} of pid {} ({}) {reason}; the service turns such a setting off; nothing was sent",
                self.pid, self.name
            )),
        }
    }

    /// Whether the process has a handler for `sig` (`SigCgt` in `/proc/<pid>/status`).
    pub fn catches(&self, sig: libc::c_int) -> Result<bool, String> {
        let path = format!("/proc/{}/status", self.pid);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let mask = text
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .ok_or_else(|| format!("{path} has no SigCgt line"))?;
        Ok((1..=64).contains(&sig) && mask & (1u64 << (sig - 1)) != 0)
    }

    /// Refuses, with what to do, unless the process catches `sig`: its default action would
    /// end (or stop) it.
    pub fn require_catches(&self, sig: libc::c_int, job: &str) -> Result<(), String> {
        if self.catches(sig)? {
            return Ok(());
        }
        let name = status::signal_name(sig);
        Err(format!(
            "pid {} ({}) does not catch {name} (SigCgt in /proc/{}/status), so it has no onsite installed \
             for {job} and {name} would end it; nothing was sent. Install onsite in the service, or if it \
             uses another signal pass --signal",
            self.pid, self.name, self.pid
        ))
    }

    /// Sends `sig`.
    pub fn send(&self, sig: libc::c_int) -> Result<(), String> {
        // SAFETY: kill(2) has no memory preconditions.
        if unsafe { libc::kill(self.pid as libc::pid_t, sig) } == 0 {
            Ok(())
        } else {
            let e = std::io::Error::last_os_error();
            Err(format!("cannot send {} to pid {} ({}): {e}", status::signal_name(sig), self.pid, self.name))
        }
    }

    /// Whether the process still exists.
    pub fn is_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// The one process whose `/proc/<pid>/comm` is `name` (the kernel keeps 15 bytes of it).
fn pid_of_name(name: &str) -> Result<u32, String> {
    let wanted: String = name.chars().take(15).collect();
    let own = std::process::id();
    let mut found: Vec<u32> = std::fs::read_dir("/proc")
        .map_err(|e| format!("cannot list /proc: {e}"))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == wanted))
        .collect();
    found.sort_unstable();
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => Err(format!("no process is named {name:?} (/proc/*/comm); give its pid instead")),
        many => Err(format!(
            "{} processes are named {name:?}: pids {}; give the pid of the one you mean",
            many.len(),
            many.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Polls `probe` every 50 ms until it answers, `limit` passes (`None`) or `give_up` says so.
pub fn wait_for<T>(
    limit: Duration,
    mut give_up: impl FnMut() -> bool,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if start.elapsed() > limit || give_up() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The file in `dir` whose name ends with `suffix` (e.g. `-123-manifest-<stamp>.json`).
pub fn file_ending(dir: &Path, suffix: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(suffix)))
        .map(|e| e.path())
}
