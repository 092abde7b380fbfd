//! One capture's story: why it started (from its manifest) and, for each of its files, what it
//! says — the top functions of every profile by its main sample type, the heap's in-use top,
//! the threads still alive by creating stack, trace span counts, a thread dump's first lines.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::top::{ProfileTop, default_sample_type, read_profile, sample_types};
use super::{ReportError, Style, base_name, fit, human};

/// Rows shown per profile in a capture's report.
pub const ROWS: usize = 8;
/// Lines of a thread dump shown in a capture's report.
pub const DUMP_LINES: usize = 40;

/// A capture's manifest, parsed (its format: the `onsite` crate's README, "The manifest").
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest file.
    pub path: PathBuf,
    /// Its content.
    pub json: Value,
}

impl Manifest {
    /// Reads the manifest at `path`; the error names it.
    pub fn read(path: &Path) -> Result<Manifest, ReportError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ReportError(format!("cannot read {}: {e}", path.display())))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| ReportError(format!("{} is not a capture manifest (not JSON: {e})", path.display())))?;
        if json["capture"].as_str().is_none() || !json["files"].is_array() {
            return Err(ReportError(format!("{} is JSON but not a capture manifest", path.display())));
        }
        Ok(Manifest { path: path.to_owned(), json })
    }

    /// The capture's stamp (`20261127T121530.123Z`).
    pub fn capture(&self) -> &str {
        self.json["capture"].as_str().unwrap_or("")
    }

    /// The service's pid.
    pub fn pid(&self) -> u64 {
        self.json["pid"].as_u64().unwrap_or(0)
    }

    /// When the capture started, ms since the epoch.
    pub fn started_unix_ms(&self) -> u64 {
        self.json["started_at_unix_ms"].as_u64().unwrap_or(0)
    }

    /// The kinds it contains.
    pub fn kinds(&self) -> Vec<String> {
        self.json["kinds"].as_array().into_iter().flatten().filter_map(|k| k.as_str().map(str::to_owned)).collect()
    }

    /// Its files (not the manifest itself) as listed: paths beside the manifest, and sizes.
    pub fn files(&self) -> Vec<(PathBuf, String, u64)> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        self.json["files"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| {
                let name = f["name"].as_str()?;
                Some((dir.join(name), f["kind"].as_str().unwrap_or("").to_owned(), f["bytes"].as_u64().unwrap_or(0)))
            })
            .collect()
    }

    /// Bytes of its files, the manifest included.
    pub fn total_bytes(&self) -> u64 {
        let own = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        self.files().iter().map(|(_, _, bytes)| bytes).sum::<u64>() + own
    }

    /// Why it started, in a few words: `SIGUSR2`, `API call`, `rule "mem>80%for3m"`.
    pub fn why(&self) -> String {
        why(&self.json["started_by"])
    }

    /// What the rule that started it saw (its reason and the metric's history), if a rule did.
    pub fn rule_story(&self) -> Option<String> {
        let by = &self.json["started_by"];
        if by["trigger"].as_str() != Some("rule") {
            return None;
        }
        let history: Vec<&str> =
            by["history"].as_array().into_iter().flatten().filter_map(|p| p["value_shown"].as_str()).collect();
        Some(format!(
            "{}; {} {} samples: {}",
            by["reason"].as_str().unwrap_or("it held"),
            history.len(),
            by["metric"].as_str().unwrap_or("metric"),
            history.join(" "),
        ))
    }
}

/// Why a capture started, from a manifest's (or the running-capture marker's) `started_by`.
pub fn why(started_by: &Value) -> String {
    match started_by["trigger"].as_str() {
        Some("signal") => started_by["signal"].as_str().unwrap_or("a signal").to_owned(),
        Some("api") => "API call".to_owned(),
        Some("rule") => format!("rule {:?}", started_by["rule"].as_str().unwrap_or("?")),
        _ => "unknown".to_owned(),
    }
}

/// How many spans of each name a Chrome trace file holds (begin or complete events).
#[derive(Debug, Clone)]
pub struct SpanCounts {
    /// The file.
    pub path: PathBuf,
    /// All events in it.
    pub events: usize,
    /// Spans by name, most first.
    pub by_name: Vec<(String, usize)>,
}

impl SpanCounts {
    /// Reads the trace at `path`.
    pub fn read(path: &Path) -> Result<SpanCounts, ReportError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ReportError(format!("cannot read {}: {e}", path.display())))?;
        let events: Vec<Value> = serde_json::from_str(&text)
            .map_err(|e| ReportError(format!("{} is not a JSON array of trace events: {e}", path.display())))?;
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for event in &events {
            if matches!(event["ph"].as_str(), Some("B" | "X")) {
                *counts.entry(event["name"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
            }
        }
        let mut by_name: Vec<(String, usize)> = counts.into_iter().collect();
        by_name.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
        Ok(SpanCounts { path: path.to_owned(), events: events.len(), by_name })
    }

    /// The `n` most frequent span names as text.
    pub fn render(&self, n: usize, style: Style) -> String {
        let mut out = String::new();
        let heading = format!("{}: {} events; spans by name", base_name(&self.path), self.events);
        let _ = writeln!(out, "  {}", style.heading(&fit(&heading, super::WIDTH - 2)));
        for (name, count) in self.by_name.iter().take(n) {
            let _ = writeln!(out, "  {count:>10}  {}", fit(name, super::WIDTH - 14));
        }
        out
    }

    /// For scripts.
    pub fn to_json(&self) -> Value {
        json!({
            "file": self.path.display().to_string(),
            "events": self.events,
            "spans": self.by_name.iter().map(|(name, count)| json!({ "name": name, "count": count })).collect::<Vec<_>>(),
        })
    }
}

/// The first lines of a text file (a thread dump).
#[derive(Debug, Clone)]
pub struct TextHead {
    /// The file.
    pub path: PathBuf,
    /// Its first lines.
    pub lines: Vec<String>,
    /// How many lines it has.
    pub total: usize,
}

impl TextHead {
    /// The first `lines` lines of `path` (`usize::MAX`: all).
    pub fn read(path: &Path, lines: usize) -> Result<TextHead, ReportError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ReportError(format!("cannot read {}: {e}", path.display())))?;
        Ok(TextHead {
            path: path.to_owned(),
            lines: text.lines().take(lines).map(str::to_owned).collect(),
            total: text.lines().count(),
        })
    }

    /// As text, with a line saying where the rest is.
    pub fn render(&self, style: Style) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "  {}", style.heading(&fit(&base_name(&self.path), super::WIDTH - 2)));
        for line in &self.lines {
            let _ = writeln!(out, "  {line}");
        }
        if self.total > self.lines.len() {
            let _ = writeln!(out, "  … {} more lines in {}", self.total - self.lines.len(), self.path.display());
        }
        out
    }

    /// For scripts.
    pub fn to_json(&self) -> Value {
        json!({ "file": self.path.display().to_string(), "lines": self.lines, "total_lines": self.total })
    }
}

/// What one file of a capture says.
#[derive(Debug, Clone)]
pub enum Section {
    /// A pprof profile: its top by its main sample type, then the other views a reader wants
    /// (`inuse_space` of a heap, `alive` of threadcreate) when they are not the main one.
    Profile {
        /// The kind, from the manifest or the file's name.
        kind: String,
        /// The tops, main first.
        tops: Vec<ProfileTop>,
    },
    /// A Chrome trace.
    Trace(SpanCounts),
    /// A thread dump.
    Threads(TextHead),
    /// A file read elsewhere (a flamegraph SVG, dhat's JSON): where it is.
    Other {
        /// The file.
        path: PathBuf,
        /// What opens it.
        hint: &'static str,
    },
    /// A file that could not be read: why.
    Unreadable(ReportError),
}

/// Sample types shown beside a profile's main one when it has them.
const SECOND_VIEWS: [&str; 2] = ["inuse_space", "alive"];

impl Section {
    /// The section for the file at `path` (of `kind`, if known).
    pub fn read(path: &Path, kind: Option<&str>) -> Section {
        let name = base_name(path);
        let result = if name.ends_with(".pprof") {
            read_profile(path).and_then(|profile| {
                let main = default_sample_type(&profile);
                let mut tops = vec![ProfileTop::of(&profile, path, main.as_deref())?];
                for view in SECOND_VIEWS {
                    if main.as_deref() != Some(view) && sample_types(&profile).iter().any(|t| t == view) {
                        tops.push(ProfileTop::of(&profile, path, Some(view))?);
                    }
                }
                let kind = kind.map(str::to_owned).unwrap_or_else(|| kind_in_name(&name).unwrap_or("profile").into());
                Ok(Section::Profile { kind, tops })
            })
        } else if name.ends_with(".dhat.json") {
            Ok(Section::Other { path: path.to_owned(), hint: "open it in Valgrind's dh_view.html" })
        } else if name.ends_with(".json") {
            SpanCounts::read(path).map(Section::Trace)
        } else if name.ends_with(".txt") {
            TextHead::read(path, DUMP_LINES).map(Section::Threads)
        } else if name.ends_with(".svg") {
            Ok(Section::Other { path: path.to_owned(), hint: "a flamegraph: open it in a browser" })
        } else {
            Err(ReportError(format!("{} is not a file onsite writes (.pprof, .json, .txt, .svg)", path.display())))
        };
        result.unwrap_or_else(Section::Unreadable)
    }

    /// The section's kind (`cpu`, `trace`, `threads`, …).
    pub fn kind(&self) -> String {
        match self {
            Section::Profile { kind, .. } => kind.clone(),
            Section::Trace(_) => "trace".to_owned(),
            Section::Threads(_) => "threads".to_owned(),
            Section::Other { path, .. } => {
                let name = base_name(path);
                let ext = if name.ends_with(".dhat.json") {
                    "dhat.json"
                } else {
                    name.rsplit_once('.').map_or("", |(_, ext)| ext)
                };
                format!("{} ({ext})", kind_in_name(&name).unwrap_or("file"))
            }
            Section::Unreadable(_) => "unreadable".to_owned(),
        }
    }

    /// As text.
    pub fn render(&self, style: Style) -> String {
        match self {
            Section::Profile { tops, .. } => {
                let mut out = String::new();
                if let Some(first) = tops.first() {
                    let _ = writeln!(out, "  {}", fit(&base_name(&first.path), super::WIDTH - 2));
                }
                for (i, top) in tops.iter().enumerate() {
                    out.push_str(&top.render(if i == 0 { ROWS } else { 5 }, style));
                }
                out
            }
            Section::Trace(spans) => spans.render(10, style),
            Section::Threads(head) => head.render(style),
            Section::Other { path, hint } => format!("  {}\n  {hint}\n", style.heading(&fit(&base_name(path), 78))),
            Section::Unreadable(e) => format!("  {}\n", style.warn(&e.0)),
        }
    }

    /// For scripts.
    pub fn to_json(&self) -> Value {
        let mut value = match self {
            Section::Profile { tops, .. } => {
                json!({ "tops": tops.iter().map(|t| t.to_json(ROWS)).collect::<Vec<_>>() })
            }
            Section::Trace(spans) => spans.to_json(),
            Section::Threads(head) => head.to_json(),
            Section::Other { path, hint } => json!({ "file": path.display().to_string(), "hint": hint }),
            Section::Unreadable(e) => json!({ "error": e.0 }),
        };
        value["kind"] = json!(self.kind());
        value
    }
}

/// `{command}-{pid}-{kind}-{timestamp}.{ext}` → `kind` (the command may hold dashes: the kind
/// is the word after the numeric pid that comes before a timestamp).
pub(crate) fn kind_in_name(name: &str) -> Option<&str> {
    let words: Vec<&str> = name.split('-').collect();
    (1..words.len().saturating_sub(1)).rev().find_map(|i| {
        let pid = words[i - 1];
        let stamp = words[i + 1];
        // Bytes, not a `str` slice: a name may hold any character right after the digits.
        let is_stamp =
            stamp.len() > 9 && stamp.as_bytes()[..8].iter().all(u8::is_ascii_digit) && stamp.as_bytes()[8] == b'T';
        (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && is_stamp).then_some(words[i])
    })
}

/// A capture's report: its manifest, when there is one, and a section per file.
#[derive(Debug, Clone)]
pub struct CaptureReport {
    /// The capture's manifest (`None` when loose files were given).
    pub manifest: Option<Manifest>,
    /// One section per file.
    pub sections: Vec<Section>,
}

impl CaptureReport {
    /// The report of the capture whose manifest is at `path`; only `kinds` when given.
    pub fn for_manifest(path: &Path, kinds: Option<&[String]>) -> Result<CaptureReport, ReportError> {
        let manifest = Manifest::read(path)?;
        let sections = manifest
            .files()
            .iter()
            .filter(|(_, kind, _)| kinds.is_none_or(|k| k.iter().any(|w| w == kind)))
            .map(|(file, kind, _)| Section::read(file, Some(kind)))
            .collect::<Vec<_>>();
        let mut sections = sections;
        // The order a reader wants (CPU first), not the order the files were written in.
        sections.sort_by_key(|s| {
            let kind = s.kind();
            let word = kind.split(' ').next().unwrap_or("");
            onsite_core::ProfileKind::CAPTURED.iter().position(|k| k.as_str() == word).unwrap_or(usize::MAX)
        });
        Ok(CaptureReport { manifest: Some(manifest), sections })
    }

    /// The report of what `paths` name: a manifest (that capture), a dump directory (its newest
    /// capture), or any files onsite wrote (each read as what it is).
    pub fn for_paths(paths: &[PathBuf], kinds: Option<&[String]>) -> Result<CaptureReport, ReportError> {
        match paths {
            [] => Err(ReportError("name a manifest, a dump directory or files".into())),
            [one] if one.is_dir() => {
                let listing = super::Listing::read(one)?;
                let newest = listing.entries.iter().find_map(|e| e.manifest.as_ref()).ok_or_else(|| {
                    ReportError(format!("{} holds no capture manifest (*-manifest-*.json)", one.display()))
                })?;
                CaptureReport::for_manifest(&newest.path, kinds)
            }
            [one] if base_name(one).contains("-manifest-") && base_name(one).ends_with(".json") => {
                CaptureReport::for_manifest(one, kinds)
            }
            files => {
                for file in files {
                    if !file.exists() {
                        return Err(ReportError(format!("{} does not exist", file.display())));
                    }
                }
                Ok(CaptureReport { manifest: None, sections: files.iter().map(|f| Section::read(f, None)).collect() })
            }
        }
    }

    /// The section of `kind`'s first profile top, if the report has one.
    pub fn profile(&self, kind: &str) -> Option<&[ProfileTop]> {
        self.sections.iter().find_map(|s| match s {
            Section::Profile { kind: k, tops } if k == kind => Some(tops.as_slice()),
            _ => None,
        })
    }

    /// As text: the capture's heading (when, why, what), then every section.
    pub fn render(&self, style: Style) -> String {
        let mut out = String::new();
        if let Some(m) = &self.manifest {
            let j = &m.json;
            let heading =
                format!("capture {} of {} pid {}", m.capture(), j["command"].as_str().unwrap_or("?"), m.pid());
            let _ = writeln!(out, "{}", style.heading(&fit(&heading, super::WIDTH)));
            let lines = [
                format!("started by {}, stopped by {}", m.why(), j["stopped_by"].as_str().unwrap_or("?")),
                format!(
                    "at {} for {:.1}s; {} files, {}",
                    j["started_at"].as_str().unwrap_or("?"),
                    j["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                    m.files().len() + 1,
                    human(m.total_bytes() as i64, "bytes"),
                ),
                format!("kinds {}", m.kinds().join(",")),
                format!("in {}", m.path.parent().unwrap_or(Path::new(".")).display()),
            ];
            for line in lines.iter().flat_map(|l| wrap(l, super::WIDTH - 2)) {
                let _ = writeln!(out, "  {line}");
            }
            if let Some(story) = m.rule_story() {
                for line in wrap(&story, super::WIDTH - 4) {
                    let _ = writeln!(out, "    {line}");
                }
            }
            for failed in j["failed"].as_array().into_iter().flatten() {
                let text = format!(
                    "{} failed: {}",
                    failed["kind"].as_str().unwrap_or("?"),
                    failed["error"].as_str().unwrap_or("?")
                );
                for line in wrap(&text, super::WIDTH - 2) {
                    let _ = writeln!(out, "  {}", style.warn(&line));
                }
            }
        }
        for section in &self.sections {
            let _ = writeln!(out, "\n{}", style.heading(&format!("== {}", section.kind())));
            out.push_str(&section.render(style));
        }
        out
    }

    /// For scripts: the manifest as written, and every section.
    pub fn to_json(&self) -> Value {
        json!({
            "manifest": self.manifest.as_ref().map(|m| json!({ "path": m.path.display().to_string(), "content": m.json })),
            "why": self.manifest.as_ref().map(Manifest::why),
            "sections": self.sections.iter().map(Section::to_json).collect::<Vec<_>>(),
        })
    }
}

/// `text` in lines of at most `width` characters, broken at spaces (a longer word is cut,
/// keeping its end).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let word = fit(word, width);
        let word = word.as_str();
        let last = lines.last_mut().expect("never empty");
        if !last.is_empty() && last.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_owned());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_names_whose_command_has_dashes() {
        assert_eq!(kind_in_name("demo-mq-123-memory-20261127T121530.123Z.pprof"), Some("memory"));
        assert_eq!(kind_in_name("svc-9-threadcreate-20261127T121530.123Z-2.pprof"), Some("threadcreate"));
        assert_eq!(kind_in_name("notes.txt"), None);
        // A multi-byte character where the `T` would be, or inside the digits, is no stamp.
        assert_eq!(kind_in_name("svc-9-cpu-20261127é1530.pprof"), None);
        assert_eq!(kind_in_name("svc-9-cpu-2026112€T121530.pprof"), None);
        assert_eq!(kind_in_name("svc-9-cpu-12345678ü"), None);
        assert_eq!(kind_in_name("é-9-cpu-20261127T121530.123Z.pprof"), Some("cpu"));
    }

    #[test]
    fn wrapping_keeps_to_the_width() {
        let lines = wrap("a bb ccc dddd eeeee", 8);
        assert!(lines.iter().all(|l| l.chars().count() <= 8), "{lines:?}");
        assert_eq!(lines.join(" "), "a bb ccc dddd eeeee");
    }
}
