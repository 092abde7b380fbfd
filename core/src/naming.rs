//! Dump naming: `{command}-{pid}-{kind}-{timestamp}.{ext}` in one dump directory.
//!
//! Why it looks like this: go-zero names files `{cmd}-{pid}-{kind}-{MMDDhhmmss}`, which has no
//! year and one-second resolution, so two captures in one second overwrite each other. onsite's
//! timestamp is UTC in ISO 8601 basic form with milliseconds (`20261127T121530.123Z`), and a
//! process-wide sequence makes every [`CaptureStamp`] distinct even within one millisecond.

use std::env;
use std::ffi::OsStr;
use std::fmt;
use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::kind::ProfileKind;

/// Where dumps go and what they are called: the directory, the command name and the pid.
#[derive(Debug, Clone)]
pub struct DumpDir {
    dir: PathBuf,
    command: String,
    pid: u32,
}

impl DumpDir {
    /// A dump directory at `dir` for this process. The directory is not touched here; see
    /// [`DumpDir::ensure_exists`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DumpDir { dir: dir.into(), command: command_name(), pid: std::process::id() }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `{command}` part of file names: the file name of argv\[0\].
    pub fn command(&self) -> &str {
        &self.command
    }

    /// The `{pid}` part of file names: this process's own id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Creates the directory (and its parents) if it is missing; new directories get mode 0700
    /// because dumps reveal the service's code and data.
    pub fn ensure_exists(&self) -> io::Result<()> {
        DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)
    }

    /// The full path of one file of one capture.
    pub fn path(&self, stamp: &CaptureStamp, kind: ProfileKind, ext: &str) -> PathBuf {
        self.dir.join(self.file_name(stamp, kind, ext))
    }

    /// The file name (no directory) of one file of one capture.
    pub fn file_name(&self, stamp: &CaptureStamp, kind: ProfileKind, ext: &str) -> String {
        format!("{}-{}-{}-{}.{}", self.command, self.pid, kind.as_str(), stamp, ext)
    }

    /// The prefix every file this process writes starts with (`{command}-{pid}-`).
    pub fn own_prefix(&self) -> String {
        format!("{}-{}-", self.command, self.pid)
    }
}

/// The timestamp shared by all files of one capture. Two stamps made by one process are never
/// equal: a stamp within the same millisecond as the previous one gets a `-N` sequence suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CaptureStamp {
    text: String,
    at: SystemTime,
}

/// The last stamp issued in this process, to detect two captures in the same millisecond.
static LAST_STAMP: Mutex<Option<(u64, u32)>> = Mutex::new(None);

impl CaptureStamp {
    /// A new stamp for a capture starting now.
    pub fn now() -> Self {
        Self::at(SystemTime::now())
    }

    /// A stamp for a capture starting at `at` (still unique within the process).
    pub fn at(at: SystemTime) -> Self {
        let millis = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64;
        let (millis, seq) = {
            // A poisoned lock only means another thread panicked mid-update of two integers;
            // the value is still usable.
            let mut last = LAST_STAMP.lock().unwrap_or_else(|e| e.into_inner());
            let next = match *last {
                // Same millisecond, or the clock stepped back: count on from the previous
                // stamp so a name can never repeat.
                Some((prev, prev_seq)) if millis <= prev => (prev, prev_seq + 1),
                _ => (millis, 0),
            };
            *last = Some(next);
            next
        };
        let text = match seq {
            0 => format_utc_millis(millis),
            n => format!("{}-{n}", format_utc_millis(millis)),
        };
        CaptureStamp { text, at }
    }

    /// When the capture started.
    pub fn time(&self) -> SystemTime {
        self.at
    }

    /// The stamp as it appears in file names.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for CaptureStamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `20261127T121530.123Z` for a time given as milliseconds since the Unix epoch.
pub fn format_utc_millis(millis: u64) -> String {
    let secs = millis / 1000;
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, millis % 1000)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`), so naming needs no date-time dependency.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The file name of argv\[0\], made safe for a file name; `unknown` if there is none.
fn command_name() -> String {
    let arg0 = env::args_os().next();
    let base = arg0.as_deref().map(Path::new).and_then(Path::file_name).map(OsStr::to_string_lossy).unwrap_or_default();
    let safe: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+') { c } else { '_' })
        .collect();
    let safe = safe.trim_start_matches('.');
    if safe.is_empty() { "unknown".to_owned() } else { safe.to_owned() }
}

/// A configuration value that was rejected: names the setting, the value and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The environment variable or builder setting.
    pub setting: String,
    /// The value as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// A rejected `value` of `setting`, because of `reason`.
    pub fn new(setting: impl Into<String>, value: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError { setting: setting.into(), value: value.into(), reason: reason.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}: {}", self.setting, self.value, self.reason)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_format_has_year_date_time_and_millis() {
        // 2026-11-27 12:15:30.123 UTC
        assert_eq!(format_utc_millis(1_795_781_730_123), "20261127T121530.123Z");
        assert_eq!(format_utc_millis(0), "19700101T000000.000Z");
        // A leap day.
        assert_eq!(format_utc_millis(951_782_400_000), "20000229T000000.000Z");
    }

    #[test]
    fn stamps_in_the_same_millisecond_differ() {
        let at = SystemTime::now() + Duration::from_secs(3600);
        let a = CaptureStamp::at(at);
        let b = CaptureStamp::at(at);
        let c = CaptureStamp::at(at - Duration::from_secs(10));
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_ne!(a, c);
    }

    #[test]
    fn names_follow_the_documented_pattern() {
        let dir = DumpDir::new("/dumps");
        let stamp = CaptureStamp::now();
        let path = dir.path(&stamp, ProfileKind::Cpu, "pprof");
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(&format!("{}-{}-cpu-", dir.command(), std::process::id())));
        assert!(name.ends_with(&format!("{stamp}.pprof")));
        assert_eq!(path.parent(), Some(Path::new("/dumps")));
    }
}
