//! A dump directory's captures, newest first: when, why, kinds, size — from their manifests;
//! and the thread dumps, which have none.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde_json::{Value, json};

use super::capture::{Manifest, kind_in_name};
use super::{ReportError, Style, fit, human};

/// One capture or thread dump in a directory.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When it started, ms since the epoch.
    pub unix_ms: u64,
    /// Its stamp, as in its files' names.
    pub capture: String,
    /// The service's pid.
    pub pid: u64,
    /// Why: the trigger of a capture, `thread dump` for a thread dump.
    pub why: String,
    /// Its kinds.
    pub kinds: Vec<String>,
    /// Its files' bytes.
    pub bytes: u64,
    /// The capture's manifest, or the thread dump's file.
    pub path: PathBuf,
    /// The parsed manifest (`None` for a thread dump).
    pub manifest: Option<Manifest>,
}

/// The captures of a dump directory, newest first.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The directory.
    pub dir: PathBuf,
    /// Its captures and thread dumps, newest first.
    pub entries: Vec<Entry>,
    /// Manifests that could not be read, with why.
    pub unreadable: Vec<ReportError>,
}

impl Listing {
    /// Reads `dir`'s manifests and thread dumps.
    pub fn read(dir: &Path) -> Result<Listing, ReportError> {
        let read = std::fs::read_dir(dir).map_err(|e| {
            ReportError(format!(
                "cannot list {}: {e}; name the service's dump directory (its ONSITE_DIR)",
                dir.display()
            ))
        })?;
        let mut entries = Vec::new();
        let mut unreadable = Vec::new();
        for file in read.filter_map(Result::ok) {
            let name = file.file_name().to_string_lossy().into_owned();
            match kind_in_name(&name) {
                Some("manifest") if name.ends_with(".json") => match Manifest::read(&file.path()) {
                    Ok(m) => entries.push(Entry {
                        unix_ms: m.started_unix_ms(),
                        capture: m.capture().to_owned(),
                        pid: m.pid(),
                        why: m.why(),
                        kinds: m.kinds(),
                        bytes: m.total_bytes(),
                        path: m.path.clone(),
                        manifest: Some(m),
                    }),
                    Err(e) => unreadable.push(e),
                },
                Some("threads") if name.ends_with(".txt") => {
                    let meta = file.metadata().ok();
                    let unix_ms = meta
                        .as_ref()
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_millis() as u64);
                    let words: Vec<&str> = name.split("-threads-").collect();
                    let pid = words[0].rsplit('-').next().and_then(|p| p.parse().ok()).unwrap_or(0);
                    let capture = words.get(1).and_then(|s| s.strip_suffix(".txt")).unwrap_or("").to_owned();
                    entries.push(Entry {
                        unix_ms,
                        capture,
                        pid,
                        why: "thread dump".to_owned(),
                        kinds: vec!["threads".to_owned()],
                        bytes: meta.map_or(0, |m| m.len()),
                        path: file.path(),
                        manifest: None,
                    });
                }
                _ => {}
            }
        }
        entries.sort_by(|a, b| b.unix_ms.cmp(&a.unix_ms).then(b.capture.cmp(&a.capture)));
        Ok(Listing { dir: dir.to_owned(), entries, unreadable })
    }

    /// As text, one line per entry.
    pub fn render(&self, style: Style) -> String {
        let mut out = String::new();
        let heading = format!("{}: {} captures and thread dumps, newest first", self.dir.display(), self.entries.len());
        let _ = writeln!(out, "{}", style.heading(&fit(&heading, super::WIDTH)));
        if !self.entries.is_empty() {
            let _ = writeln!(out, "{:<20} {:>7} {:<22} {:>9}  kinds", "when (UTC)", "pid", "why", "size");
        }
        for e in &self.entries {
            let kinds = fit(&e.kinds.join(","), super::WIDTH - 63);
            let _ = writeln!(
                out,
                "{:<20} {:>7} {:<22} {:>9}  {kinds}",
                when(e.unix_ms),
                e.pid,
                fit(&e.why, 22),
                human(e.bytes as i64, "bytes"),
            );
        }
        for e in &self.unreadable {
            let _ = writeln!(out, "{}", style.warn(&e.0));
        }
        out
    }

    /// For scripts.
    pub fn to_json(&self) -> Value {
        json!({
            "dir": self.dir.display().to_string(),
            "entries": self.entries.iter().map(|e| json!({
                "started_at_unix_ms": e.unix_ms,
                "capture": e.capture,
                "pid": e.pid,
                "why": e.why,
                "kinds": e.kinds,
                "bytes": e.bytes,
                "path": e.path.display().to_string(),
            })).collect::<Vec<_>>(),
            "unreadable": self.unreadable.iter().map(|e| e.0.clone()).collect::<Vec<_>>(),
        })
    }
}

/// `2026-11-27 12:15:30` (UTC) from ms since the epoch.
fn when(unix_ms: u64) -> String {
    let b = onsite_core::format_utc_millis(unix_ms);
    format!("{}-{}-{} {}:{}:{}", &b[0..4], &b[4..6], &b[6..8], &b[9..11], &b[11..13], &b[13..15])
}
