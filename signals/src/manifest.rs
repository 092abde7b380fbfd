//! The per-capture manifest, `{command}-{pid}-manifest-{timestamp}.json`, written last: why the
//! capture started (a signal, an API call, an HTTP request, or which rule with the metric
//! history that fired it), why it stopped, its kinds, its files with their sizes, what failed,
//! which kinds other captures held, and who wrote it.

use std::time::{SystemTime, UNIX_EPOCH};

use onsite_core::{CaptureError, CaptureOutput, ProfileKind, WrittenFile, format_utc_millis};
use serde_json::{Value, json};

use crate::auto::watch::{Firing, show};

/// What started a capture.
#[derive(Debug, Clone)]
pub(crate) enum Trigger {
    /// The toggle signal, this one.
    Signal(libc::c_int),
    Api,
    Rule(Box<Firing>),
    /// A client asked for this capture (over HTTP) and waits for its bytes.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    Pull {
        requested_by: String,
    },
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Signal(sig) => f.write_str(&crate::env::signal_name(*sig)),
            Trigger::Api => f.write_str("API call"),
            Trigger::Rule(firing) => write!(f, "rule {:?}", firing.text),
            Trigger::Pull { requested_by } => f.write_str(requested_by),
        }
    }
}

/// Everything a manifest records about one finished capture.
pub(crate) struct Record<'a> {
    pub(crate) trigger: &'a Trigger,
    pub(crate) stopped_by: String,
    pub(crate) started: SystemTime,
    pub(crate) stopped: SystemTime,
    pub(crate) kinds: &'a [ProfileKind],
    pub(crate) files: &'a [(ProfileKind, WrittenFile)],
    pub(crate) failures: &'a [(ProfileKind, String)],
    /// The window the `cpu-before` file covers, if one was written.
    pub(crate) before_window: Option<crate::backends::Window>,
    /// Kinds the capture would have recorded but another capture (a pull) held, with its holder.
    pub(crate) held_elsewhere: &'a [(ProfileKind, String)],
}

/// Writes the manifest through `out` (so it is all-or-nothing, 0600, named like the rest).
pub(crate) fn write(out: &CaptureOutput, record: &Record<'_>) -> Result<WrittenFile, CaptureError> {
    let value = to_json(out, record);
    out.write(ProfileKind::Manifest, "json", |w| {
        serde_json::to_writer_pretty(&mut *w, &value)?;
        w.write_all(b"\n")
    })
}

fn to_json(out: &CaptureOutput, r: &Record<'_>) -> Value {
    let dir = out.dump_dir();
    let files: Vec<Value> = r
        .files
        .iter()
        .map(|(kind, f)| {
            json!({
                "name": f.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                "kind": kind.as_str(),
                "bytes": f.bytes,
            })
        })
        .collect();
    let failed: Vec<Value> = r.failures.iter().map(|(k, e)| json!({ "kind": k.as_str(), "error": e })).collect();
    let held: Vec<Value> =
        r.held_elsewhere.iter().map(|(k, by)| json!({ "kind": k.as_str(), "held_by": by })).collect();
    json!({
        "onsite_version": env!("CARGO_PKG_VERSION"),
        "command": dir.command(),
        "pid": dir.pid(),
        "executable": std::env::current_exe().ok().map(|p| p.display().to_string()),
        "capture": out.stamp().as_str(),
        "dir": dir.dir().display().to_string(),
        "started_at": iso(r.started),
        "started_at_unix_ms": unix_ms(r.started),
        "stopped_at": iso(r.stopped),
        "stopped_at_unix_ms": unix_ms(r.stopped),
        "duration_ms": r.stopped.duration_since(r.started).map_or(0, |d| d.as_millis() as u64),
        "started_by": trigger_json(r.trigger),
        "stopped_by": r.stopped_by,
        "kinds": r.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
        "files": files,
        "failed": failed,
        "cpu_before": r.before_window.map(|(from, until)| json!({
            "from": iso(from),
            "from_unix_ms": unix_ms(from),
            "until": iso(until),
            "until_unix_ms": unix_ms(until),
            "seconds": until.duration_since(from).map_or(0.0, |d| d.as_secs_f64()),
        })),
        "held_elsewhere": held,
    })
}

pub(crate) fn trigger_json(trigger: &Trigger) -> Value {
    match trigger {
        Trigger::Signal(sig) => json!({ "trigger": "signal", "signal": crate::env::signal_name(*sig) }),
        Trigger::Api => json!({ "trigger": "api" }),
        Trigger::Pull { requested_by } => json!({ "trigger": "http", "request": requested_by }),
        Trigger::Rule(f) => json!({
            "trigger": "rule",
            "rule": f.text,
            "metric": f.metric.as_str(),
            "unit": f.unit.as_str(),
            "value": f.value,
            "value_shown": show(f.value, f.unit),
            "reason": f.reason,
            "limit": f.limit,
            "capture_ms": f.capture.as_millis() as u64,
            "cooldown_ms": f.cooldown.as_millis() as u64,
            "history": f.history.iter().map(|p| json!({
                "at": iso_ms(p.unix_ms),
                "unix_ms": p.unix_ms,
                "value": p.value,
                "value_shown": show(p.value, f.unit),
            })).collect::<Vec<_>>(),
        }),
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn iso(t: SystemTime) -> String {
    iso_ms(unix_ms(t))
}

/// `2026-11-27T12:15:30.123Z` (RFC 3339), from the basic form the file names use.
fn iso_ms(ms: u64) -> String {
    let b = format_utc_millis(ms);
    format!("{}-{}-{}T{}:{}:{}", &b[0..4], &b[4..6], &b[6..8], &b[9..11], &b[11..13], &b[13..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(iso_ms(1_795_781_730_123), "2026-11-27T12:15:30.123Z");
    }
}
