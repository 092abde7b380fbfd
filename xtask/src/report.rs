//! Reading profiles for people: the top of a pprof file, like `go tool pprof -top`.

use std::path::Path;

use onsite_core::pprof::{FunctionTotal, decode, function_totals, proto::Profile};

/// The sample type a reader shows by default: the profile's `default_sample_type`, else the
/// last one (Go's convention).
pub(crate) fn default_sample_type(profile: &Profile) -> Option<String> {
    let s = |i: i64| profile.string_table.get(i as usize).cloned().unwrap_or_default();
    if profile.default_sample_type != 0 {
        return Some(s(profile.default_sample_type));
    }
    profile.sample_type.last().map(|t| s(t.r#type))
}

/// The unit of `sample_type`.
fn unit(profile: &Profile, sample_type: &str) -> String {
    let s = |i: i64| profile.string_table.get(i as usize).cloned().unwrap_or_default();
    profile.sample_type.iter().find(|t| s(t.r#type) == sample_type).map(|t| s(t.unit)).unwrap_or_default()
}

fn read(file: &Path) -> Result<Profile, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    decode(&bytes).map_err(|e| format!("{}: {e}", file.display()))
}

/// The default sample type of the profile in `file`.
pub(crate) fn default_sample_type_of(file: &Path) -> Result<Option<String>, String> {
    Ok(default_sample_type(&read(file)?))
}

/// Rows of `file` for `sample_type` (its default when `None`), largest flat first.
pub(crate) fn top(file: &Path, sample_type: Option<&str>) -> Result<(String, String, Vec<FunctionTotal>), String> {
    let profile = read(file)?;
    let sample_type = match sample_type {
        Some(t) => t.to_owned(),
        None => default_sample_type(&profile).ok_or_else(|| format!("{}: no sample types", file.display()))?,
    };
    let rows = function_totals(&profile, &sample_type)
        .ok_or_else(|| format!("{} has no sample type {sample_type}", file.display()))?;
    Ok((sample_type.clone(), unit(&profile, &sample_type), rows))
}

/// Prints the top `n` rows of `file` by `sample_type` (default: the profile's own default).
pub(crate) fn print_top(file: &Path, n: usize, sample_type: Option<&str>) -> Result<Vec<FunctionTotal>, String> {
    let (sample_type, unit, rows) = top(file, sample_type)?;
    let total: i64 = rows.iter().map(|r| r.flat).sum();
    println!(
        "  {} — by {sample_type} ({unit}), total {}",
        file.file_name().unwrap_or_default().to_string_lossy(),
        human(total, &unit)
    );
    println!("  {:>12} {:>6} {:>12}  function", "flat", "flat%", "cum");
    for row in rows.iter().filter(|r| r.flat > 0).take(n) {
        let pct = if total > 0 { 100.0 * row.flat as f64 / total as f64 } else { 0.0 };
        println!("  {:>12} {:>5.1}% {:>12}  {}", human(row.flat, &unit), pct, human(row.cum, &unit), row.function);
    }
    Ok(rows)
}

/// A value in its unit, the way pprof prints it.
pub(crate) fn human(v: i64, unit: &str) -> String {
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

/// Prints how many spans of each name a Chrome trace file holds (begin or complete events).
pub(crate) fn print_span_counts(file: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let events: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| format!("{} is not a JSON array of events: {e}", file.display()))?;
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for event in &events {
        if matches!(event["ph"].as_str(), Some("B" | "X")) {
            *counts.entry(event["name"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        }
    }
    println!("  {} events; spans by name:", events.len());
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    for (name, count) in counts.iter().take(10) {
        println!("  {count:>10}  {name}");
    }
    Ok(())
}

/// Prints the first `lines` lines of a text file.
pub(crate) fn print_head(file: &Path, lines: usize) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    for line in text.lines().take(lines) {
        println!("  {line}");
    }
    let total = text.lines().count();
    if total > lines {
        println!("  … {} more lines in {}", total - lines, file.display());
    }
    Ok(())
}
