//! Reading captures for people, without Go: the tops of profiles (like `go tool pprof -top`),
//! a capture's whole story from its manifest, two profiles compared, and a dump directory's
//! captures. The `onsite` command and `cargo xtask demo` print through this one module
//! (feature `report`).
//!
//! Every reader returns data ([`ProfileTop`], [`CaptureReport`], [`Diff`], [`Listing`]) with a
//! `to_json` for scripts and a `render` into text that fits an 80-column terminal; nothing here
//! prints.

mod capture;
mod diff;
mod listing;
mod top;

pub use capture::{CaptureReport, DUMP_LINES, Manifest, ROWS, Section, SpanCounts, TextHead, why};
pub use diff::{Diff, DiffRow};
pub use listing::{Entry, Listing};
pub use top::{ProfileTop, default_sample_type, read_profile};

use std::fmt;

/// The width text output fits in.
pub const WIDTH: usize = 80;

/// Why a report could not be made: names the path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportError(pub String);

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReportError {}

impl From<String> for ReportError {
    fn from(message: String) -> Self {
        ReportError(message)
    }
}

/// How text is styled: plain, or with ANSI bold headings (only for a terminal that wants it;
/// the caller decides).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    /// Whether to use ANSI colour and bold.
    pub colour: bool,
}

impl Style {
    /// A heading line.
    pub fn heading(self, text: &str) -> String {
        if self.colour { format!("\x1b[1m{text}\x1b[0m") } else { text.to_owned() }
    }

    /// Something that grew (a diff's positive delta) or went wrong.
    pub fn warn(self, text: &str) -> String {
        if self.colour { format!("\x1b[31m{text}\x1b[0m") } else { text.to_owned() }
    }

    /// Something that shrank or is fine.
    pub fn good(self, text: &str) -> String {
        if self.colour { format!("\x1b[32m{text}\x1b[0m") } else { text.to_owned() }
    }
}

/// A value in its unit, the way pprof prints it.
pub fn human(v: i64, unit: &str) -> String {
    if v < 0 {
        return format!("-{}", human(v.checked_neg().unwrap_or(i64::MAX), unit));
    }
    let f = v as f64;
    match unit {
        "nanoseconds" if f >= 1e9 => format!("{:.2}s", f / 1e9),
        "nanoseconds" if f >= 1e6 => format!("{:.2}ms", f / 1e6),
        "nanoseconds" if f >= 1e3 => format!("{:.2}us", f / 1e3),
        "nanoseconds" => format!("{v}ns"),
        "bytes" if f >= 1024.0 * 1024.0 * 1024.0 => format!("{:.2}GiB", f / (1024.0 * 1024.0 * 1024.0)),
        "bytes" if f >= 1024.0 * 1024.0 => format!("{:.2}MiB", f / (1024.0 * 1024.0)),
        "bytes" if f >= 1024.0 => format!("{:.2}KiB", f / 1024.0),
        "bytes" => format!("{v}B"),
        _ => v.to_string(),
    }
}

/// `text` cut to `width` characters, keeping its end (a function's own name is at the end of
/// its path) behind a `…`.
pub fn fit(text: &str, width: usize) -> String {
    let count = text.chars().count();
    if count <= width || width == 0 {
        return text.to_owned();
    }
    let keep: String = text.chars().skip(count - (width - 1)).collect();
    format!("…{keep}")
}

/// The base name of `path`, for headings.
pub(crate) fn base_name(path: &std::path::Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_like_pprof() {
        assert_eq!(human(1536, "bytes"), "1.50KiB");
        assert_eq!(human(-2 * 1024 * 1024, "bytes"), "-2.00MiB");
        assert_eq!(human(2_500_000, "nanoseconds"), "2.50ms");
        assert_eq!(human(7, "count"), "7");
    }

    #[test]
    fn long_names_keep_their_end() {
        assert_eq!(fit("a::b::c", 10), "a::b::c");
        let cut = fit("demo_mq::broker::Broker::spawn_consumer_watchdog", 20);
        assert_eq!(cut.chars().count(), 20);
        assert!(cut.starts_with('…') && cut.ends_with("consumer_watchdog"), "{cut}");
    }
}
