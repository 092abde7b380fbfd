//! Keeping the dump directory tidy: at most N captures and M bytes of onsite's own files,
//! oldest captures removed first.
//!
//! A file is onsite's own only if *all* of these hold, so nothing else is ever removed:
//! - its name is exactly `{command}-{pid}-{kind}-{timestamp}.{ext}` with this process's
//!   command, a numeric pid (this run's or an earlier run's of the same service), a known
//!   kind, onsite's timestamp form and an extension onsite writes;
//! - it is a regular file (not a symlink, whose target is never looked at, nor a directory);
//! - it belongs to this process's user.
//!
//! Files sharing pid and timestamp are one capture and go together.
//!
//! What is never removed, whatever the limits say:
//! - the newest capture, and every capture of this process still running or just written (a
//!   capture's `cpu-before` file is written at its start, and a pull's passes must not take it);
//! - the captures of another process of the same command that is still alive (two instances
//!   sharing a dump directory would otherwise remove each other's files as they are written);
//!   they do not count against this process's limits either, so each live instance keeps its
//!   own N captures and M bytes. Alive means `kill(pid, 0)` finds it. A dead instance's pid reused by another process keeps
//!   that instance's files a while longer, which errs on the side of keeping; an instance in
//!   another pid namespace sharing the directory looks dead, and only a directory per instance
//!   (`ONSITE_DIR`) keeps its files apart.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use onsite_core::{DumpDir, ProfileKind};

use crate::env;

/// Captures kept by default.
pub const DEFAULT_MAX_CAPTURES: usize = 50;
/// Bytes of onsite's files kept by default (256 MiB: the dump directory is often a tmpfs,
/// which is memory).
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

/// The limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) max_captures: Option<usize>,
    pub(crate) max_bytes: Option<u64>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { max_captures: Some(DEFAULT_MAX_CAPTURES), max_bytes: Some(DEFAULT_MAX_BYTES) }
    }
}

impl Settings {
    pub(crate) fn apply_env(&mut self, env: &mut env::Reader) {
        env.set_shown(
            crate::vars::RETAIN_CAPTURES,
            &mut self.max_captures,
            |text| {
                unlimited_or(text, |t| match t.parse::<usize>() {
                    Ok(n) if n >= 1 => Ok(n),
                    _ => Err("expected a number of captures (at least 1) or `unlimited`".into()),
                })
            },
            |n| n.map_or("unlimited".to_owned(), |n| n.to_string()),
        );
        env.set_shown(
            crate::vars::RETAIN_BYTES,
            &mut self.max_bytes,
            |text| unlimited_or(text, |t| crate::auto::parse_size(t).map_err(|e| format!("{e}; or `unlimited`"))),
            |n| n.map_or("unlimited".to_owned(), |n| format!("{n} bytes")),
        );
    }
}

fn unlimited_or<T>(text: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Option<T>, String> {
    if text.eq_ignore_ascii_case("unlimited") { Ok(None) } else { parse(text).map(Some) }
}

impl crate::Builder {
    /// Keep at most this many captures' files in the dump directory (`None`: no limit;
    /// default 50). `ONSITE_RETAIN_CAPTURES` overrides it.
    pub fn retain_captures(mut self, captures: Option<usize>) -> Self {
        self.retention.max_captures = captures.map(|n| n.max(1));
        self
    }

    /// Keep at most this many bytes of onsite's files in the dump directory (`None`: no
    /// limit; default 256 MiB). The newest capture is kept even if it alone is larger.
    /// `ONSITE_RETAIN_BYTES` overrides it.
    pub fn retain_bytes(mut self, bytes: Option<u64>) -> Self {
        self.retention.max_bytes = bytes;
        self
    }
}

/// One capture's files, as found in the directory.
#[derive(Debug)]
struct Group {
    files: Vec<(PathBuf, u64)>,
    bytes: u64,
}

/// What one pass removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Removed {
    pub(crate) captures: usize,
    pub(crate) files: Vec<PathBuf>,
    pub(crate) bytes: u64,
}

/// Removes the oldest captures of `dir`'s command until both limits hold. The newest capture
/// is never removed, nor this process's captures stamped as in `keep` (the one just written,
/// those still running), nor another live process's (see the module docs).
pub(crate) fn enforce(dir: &DumpDir, limits: Settings, keep: &[&str]) -> Removed {
    let mut removed = Removed::default();
    if limits.max_captures.is_none() && limits.max_bytes.is_none() {
        return removed;
    }
    let this_process = std::process::id();
    let mut groups = own_captures(dir.dir(), dir.command());
    // Another live instance's captures are its own to keep, and not counted against this one's
    // limits: each instance keeps its own N captures.
    groups.retain(|(_, _, (pid, _)), _| *pid == this_process || !is_alive(*pid));
    let mut count = groups.len();
    let mut total: u64 = groups.values().map(|g| g.bytes).sum();
    let over = |count: usize, total: u64| {
        limits.max_captures.is_some_and(|n| count > n) || limits.max_bytes.is_some_and(|m| total > m)
    };
    for ((_, _, (pid, stamp)), group) in groups.iter().take(groups.len().saturating_sub(1)) {
        if !over(count, total) {
            break;
        }
        if *pid == this_process && keep.contains(&stamp.as_str()) {
            continue;
        }
        for (path, bytes) in &group.files {
            // unlink(2) removes a name and never follows it; a directory is refused.
            match std::fs::remove_file(path) {
                Ok(()) => {
                    removed.files.push(path.clone());
                    removed.bytes += bytes;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "onsite: retention could not remove an old dump")
                }
            }
        }
        removed.captures += 1;
        count -= 1;
        total = total.saturating_sub(group.bytes);
    }
    if removed.captures > 0 {
        tracing::info!(
            dir = %dir.dir().display(),
            captures = removed.captures,
            files = removed.files.len(),
            bytes = removed.bytes,
            kept_captures = count,
            kept_bytes = total,
            "onsite: removed the oldest captures to stay within the retention limits"
        );
    }
    removed
}

/// Whether a process `pid` exists (`kill(pid, 0)`: `EPERM` means it exists as another user's).
fn is_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// onsite's own files in `dir`, grouped by capture, oldest first. The key sorts by time:
/// (timestamp, sequence within the millisecond, pid).
fn own_captures(dir: &Path, command: &str) -> BTreeMap<(String, u32, (u32, String)), Group> {
    let mut groups: BTreeMap<(String, u32, (u32, String)), Group> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return groups };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(own) = parse_own_name(name, command) else { continue };
        // DirEntry::metadata is lstat: a symlink is seen as a symlink, its target never.
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.file_type().is_file() || meta.uid() != uid {
            continue;
        }
        let group = groups
            .entry((own.time.to_owned(), own.sequence, (own.pid, own.stamp.to_owned())))
            .or_insert_with(|| Group { files: Vec::new(), bytes: 0 });
        group.files.push((entry.path(), meta.len()));
        group.bytes += meta.len();
    }
    groups
}

/// Every extension onsite's backends write (`CaptureOutput::write` calls): a name with any
/// other, such as someone's `….pprof.bak` copy, is not onsite's file.
const OWN_EXTENSIONS: [&str; 5] = ["pprof", "svg", "json", "txt", "dhat.json"];

/// The parts of one of onsite's own file names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OwnName<'a> {
    pub(crate) pid: u32,
    pub(crate) kind: ProfileKind,
    /// The whole timestamp, sequence suffix included, as in the name.
    pub(crate) stamp: &'a str,
    /// The time part only (`20261127T121530.123Z`).
    pub(crate) time: &'a str,
    pub(crate) sequence: u32,
}

/// Parses `{command}-{pid}-{kind}-{timestamp}.{ext}`; `None` for anything else.
pub(crate) fn parse_own_name<'a>(name: &'a str, command: &str) -> Option<OwnName<'a>> {
    let rest = name.strip_prefix(command)?.strip_prefix('-')?;
    let (pid, rest) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let pid: u32 = pid.parse().ok()?;
    // A kind's name may itself hold a dash (`cpu-before`): the longest name that fits wins.
    let (kind, rest) = ProfileKind::FILES
        .into_iter()
        .filter_map(|k| Some((k, rest.strip_prefix(k.as_str())?.strip_prefix('-')?)))
        .max_by_key(|(k, _)| k.as_str().len())?;
    // 20261127T121530.123Z, then an optional -N, then .ext
    let time = rest.get(..20)?;
    let b = time.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if !(digits(0..8) && b[8] == b'T' && digits(9..15) && b[15] == b'.' && digits(16..19) && b[19] == b'Z') {
        return None;
    }
    let after_time = &rest[20..];
    let (sequence, sequence_len) = match after_time.strip_prefix('-') {
        Some(after) => {
            let digits = after.find('.')?;
            if digits == 0 || !after[..digits].bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            (after[..digits].parse().ok()?, 1 + digits)
        }
        None => (0, 0),
    };
    let stamp = &rest[..20 + sequence_len];
    let rest = &rest[20 + sequence_len..];
    let ext = rest.strip_prefix('.')?;
    if !OWN_EXTENSIONS.contains(&ext) {
        return None;
    }
    Some(OwnName { pid, kind, stamp, time, sequence })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: usize) {
        std::fs::write(path, vec![b'x'; bytes]).unwrap();
    }

    /// The pid of a process that has ended (an earlier run's, as far as retention can tell).
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    /// The byte limit removes oldest captures (all their files) until the rest fit, across
    /// earlier pids of the same command, and keeps the capture just written and those of
    /// another instance still running.
    #[test]
    fn the_byte_limit_removes_whole_captures_oldest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DumpDir::new(tmp.path());
        let name = |pid: u32, kind: &str, stamp: &str, ext: &str| {
            tmp.path().join(format!("{}-{pid}-{kind}-{stamp}.{ext}", dir.command()))
        };
        let (earlier, this) = (dead_pid(), std::process::id());
        // Another instance of the same command, alive, with the oldest capture of all.
        let mut other = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        write(&name(other.id(), "cpu", "20240101T000000.000Z", "pprof"), 100);
        let stamps = ["20250101T000000.000Z", "20250101T000000.000Z-1", "20250101T000000.001Z", "20260101T000000.000Z"];
        for (i, stamp) in stamps.iter().enumerate() {
            let pid = if i < 2 { earlier } else { this };
            write(&name(pid, "cpu", stamp, "pprof"), 100);
            write(&name(pid, "manifest", stamp, "json"), 10);
        }
        let limits = Settings { max_captures: None, max_bytes: Some(250) };
        let removed = enforce(&dir, limits, &[stamps[2]]);
        // 4 captures of 110 count (the live instance's is neither counted nor removed): 440
        // bytes, two must go, the third is protected as `keep`, so the two oldest go (the
        // earlier run's).
        assert_eq!(removed.captures, 2);
        assert_eq!(removed.bytes, 220);
        let mut left: Vec<String> =
            std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left.len(), 5, "{left:?}");
        assert!(name(other.id(), "cpu", "20240101T000000.000Z", "pprof").exists(), "{left:?}");
        assert!(left.iter().all(|n| !n.contains(&format!("-{earlier}-"))), "{left:?}");
        // Once that instance has ended, its capture is an earlier run's like any other: 320
        // bytes over 250, and it is the oldest.
        other.kill().unwrap();
        other.wait().unwrap();
        let removed = enforce(&dir, limits, &[]);
        assert_eq!(removed.captures, 1, "the ended instance's capture, the oldest");
        assert!(!name(other.id(), "cpu", "20240101T000000.000Z", "pprof").exists());
        // Unlimited removes nothing.
        let none = enforce(&dir, Settings { max_captures: None, max_bytes: None }, &[]);
        assert_eq!(none, Removed::default());
        // The newest capture stays even when it alone is over the byte limit.
        let removed = enforce(&dir, Settings { max_captures: None, max_bytes: Some(1) }, &[]);
        assert_eq!(removed.captures, 1);
        let left = std::fs::read_dir(tmp.path()).unwrap().count();
        assert_eq!(left, 2);
        assert!(name(this, "cpu", stamps[3], "pprof").exists());
    }

    #[test]
    fn own_names_parse_and_look_alikes_do_not() {
        let n = parse_own_name("svc-42-cpu-20261127T121530.123Z.pprof", "svc").unwrap();
        assert_eq!(
            (n.pid, n.kind, n.stamp, n.time, n.sequence),
            (42, ProfileKind::Cpu, "20261127T121530.123Z", "20261127T121530.123Z", 0)
        );
        let n = parse_own_name("demo-mq-7-memory-20261127T121530.123Z-3.dhat.json", "demo-mq").unwrap();
        assert_eq!((n.kind, n.stamp, n.sequence), (ProfileKind::Memory, "20261127T121530.123Z-3", 3));
        assert!(parse_own_name("svc-42-threadcreate-20261127T121530.123Z.pprof", "svc").is_some());
        let n = parse_own_name("svc-42-cpu-before-20261127T121530.123Z.pprof", "svc").unwrap();
        assert_eq!((n.kind, n.stamp), (ProfileKind::CpuBefore, "20261127T121530.123Z"));
        for other in [
            "other-42-cpu-20261127T121530.123Z.pprof",        // another command
            "svc2-42-cpu-20261127T121530.123Z.pprof",         // a command with ours as a prefix
            "svc-x42-cpu-20261127T121530.123Z.pprof",         // pid not a number
            "svc-42-heap-20261127T121530.123Z.pprof",         // unknown kind
            "svc-42-CPU-20261127T121530.123Z.pprof",          // not how onsite writes kinds
            "svc-42-cpu-20261127T121530.123Z",                // no extension
            "svc-42-cpu-20261127T121530.123Z.",               // empty extension
            "svc-42-cpu-20261127T121530.123Z.pprof.bak",      // someone's copy
            "svc-42-cpu-20261127T121530.123Z.png",            // not an extension onsite writes
            "svc-42-cpu-2026-11-27.pprof",                    // not onsite's timestamp
            "svc-42-cpu-20261127T121530.123Z-x.pprof",        // bad sequence
            ".svc-42-cpu-20261127T121530.123Z.pprof.9.0.tmp", // a temporary file
            "svc-42-cpu-20261127T121530.123Zé.pprof",
        ] {
            assert_eq!(parse_own_name(other, "svc"), None, "{other}");
        }
    }
}
