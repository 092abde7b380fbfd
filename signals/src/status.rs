//! What an operator's tool can learn about a running service from outside it: whether a
//! capture is running right now, and how the service's signal settings read.
//!
//! While a capture starts and runs (whoever started it: the toggle signal, an API call or a
//! rule) the dump directory holds `{command}-{pid}-capturing.json`: the capture's stamp, why it
//! started, its kinds, whether they have all started (`running`) and when it stops by itself.
//! It is written through onsite's file writer (all or nothing, 0600) before the kinds start,
//! replaced in one rename once they have, and removed once the manifest is written, so a tool
//! that sees it gone can read the manifest. `onsite capture` uses it to wait for a running
//! capture rather than toggle it off. The name has no kind and no timestamp, so retention never
//! takes it for a dump.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use onsite_core::{CaptureOutput, DumpDir, ProfileKind, write_new_file};
use serde_json::{Value, json};

use crate::manifest::Trigger;

/// The end of the marker's name, after `{command}-{pid}-`.
pub const MARKER_SUFFIX: &str = "capturing.json";

/// Writes the marker of a capture that is starting in `out` (replacing one a crashed run of
/// this pid may have left): from now on a toggle would stop it. A failure is logged: the
/// capture itself goes on.
pub(crate) fn capture_starting(out: &CaptureOutput, trigger: &Trigger, kinds: &[ProfileKind], length: Duration) {
    let path = marker_path(out.dump_dir());
    let _ = std::fs::remove_file(&path);
    if let Err(e) = write_new_file(&path, |w| write_marker(w, out, trigger, kinds, length, false)) {
        tracing::warn!(error = %e, "onsite: could not write the running-capture marker; `onsite capture` will not see this capture running");
    }
}

/// Marks the capture as running: its kinds have started, and it stops by itself `length` from
/// now. The marker is replaced in one rename, so a reader sees the old one or the new one.
pub(crate) fn capture_running(out: &CaptureOutput, trigger: &Trigger, kinds: &[ProfileKind], length: Duration) {
    let path = marker_path(out.dump_dir());
    let next = path.with_extension("json.next");
    let _ = std::fs::remove_file(&next);
    let written = write_new_file(&next, |w| write_marker(w, out, trigger, kinds, length, true))
        .map_err(|e| e.to_string())
        .and_then(|_| std::fs::rename(&next, &path).map_err(|e| format!("could not rename {}: {e}", next.display())));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&next);
        tracing::warn!(error = %e, "onsite: could not update the running-capture marker");
    }
}

fn write_marker(
    w: &mut dyn std::io::Write,
    out: &CaptureOutput,
    trigger: &Trigger,
    kinds: &[ProfileKind],
    length: Duration,
    running: bool,
) -> std::io::Result<()> {
    let unix_ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let value = json!({
        "pid": out.dump_dir().pid(),
        "command": out.dump_dir().command(),
        "capture": out.stamp().as_str(),
        "running": running,
        // A length no clock can add (only a builder setting gives one) stops at the end of time.
        "stops_by_unix_ms": SystemTime::now().checked_add(length).map_or(u64::MAX, unix_ms),
        "started_by": crate::manifest::trigger_json(trigger),
        "kinds": kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
    });
    serde_json::to_writer(&mut *w, &value).map_err(std::io::Error::from)
}

/// Removes the marker once the capture's manifest is written.
pub(crate) fn capture_stopped(dir: &DumpDir) {
    let path = marker_path(dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "onsite: could not remove the running-capture marker")
        }
    }
}

fn marker_path(dir: &DumpDir) -> PathBuf {
    dir.dir().join(format!("{}{MARKER_SUFFIX}", dir.own_prefix()))
}

/// A capture the marker says is running.
#[derive(Debug, Clone)]
pub struct RunningCapture {
    /// The marker file.
    pub path: PathBuf,
    /// The capture's stamp, as in its files' names.
    pub capture: String,
    /// Why it started, as the manifest's `started_by` says it.
    pub started_by: Value,
    /// Its kinds.
    pub kinds: Vec<String>,
    /// Whether its kinds have started (`false` while they are starting, which can take a
    /// moment: a toggle then would stop it as soon as it has started).
    pub running: bool,
    /// When it stops by itself (its maximum, or its rule's, duration), in ms since the epoch.
    pub stops_by_unix_ms: u64,
}

/// The capture running in process `pid` dumping into `dir`, if its marker is there. A marker
/// that cannot be read or parsed counts as none.
pub fn running_capture(dir: &Path, pid: u32) -> Option<RunningCapture> {
    let suffix = format!("-{pid}-{MARKER_SUFFIX}");
    let entries = std::fs::read_dir(dir).ok()?;
    entries.filter_map(Result::ok).find_map(|entry| {
        let name = entry.file_name();
        if !name.to_str()?.ends_with(&suffix) {
            return None;
        }
        let text = std::fs::read_to_string(entry.path()).ok()?;
        let value: Value = serde_json::from_str(&text).ok()?;
        Some(RunningCapture {
            path: entry.path(),
            capture: value["capture"].as_str()?.to_owned(),
            started_by: value["started_by"].clone(),
            kinds: value["kinds"].as_array()?.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect(),
            running: value["running"].as_bool().unwrap_or(false),
            stops_by_unix_ms: value["stops_by_unix_ms"].as_u64().unwrap_or(0),
        })
    })
}

/// A signal setting (`ONSITE_TOGGLE_SIGNAL`, `ONSITE_DUMP_SIGNAL`) as the service reads it:
/// `Some(signal)`, `None` for `off`, or why the service would reject it.
pub fn signal_setting(text: &str) -> Result<Option<libc::c_int>, String> {
    crate::env::parse_signal_or_off(text)
}

/// A signal's name as onsite writes it (`SIGUSR2`, `SIGRTMIN+5`).
pub fn signal_name(signal: libc::c_int) -> String {
    crate::env::signal_name(signal)
}
