//! The top of one profile by one sample type, like `go tool pprof -top`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use onsite_core::pprof::{FunctionTotal, decode, function_totals, proto::Profile, string_at};
use serde_json::{Value, json};

use super::{ReportError, Style, fit, human};

/// Reads and decodes the pprof file at `path`; the error names it.
pub fn read_profile(path: &Path) -> Result<Profile, ReportError> {
    let bytes = std::fs::read(path).map_err(|e| ReportError(format!("cannot read {}: {e}", path.display())))?;
    decode(&bytes).map_err(|e| ReportError(format!("{}: {e}", path.display())))
}

/// The sample type a reader shows by default: the profile's `default_sample_type`, else the
/// last one (Go's convention).
pub fn default_sample_type(profile: &Profile) -> Option<String> {
    if profile.default_sample_type != 0 {
        return Some(string_at(profile, profile.default_sample_type).to_owned());
    }
    profile.sample_type.last().map(|t| string_at(profile, t.r#type).to_owned())
}

/// Every sample type of `profile`, in order.
pub(crate) fn sample_types(profile: &Profile) -> Vec<String> {
    profile.sample_type.iter().map(|t| string_at(profile, t.r#type).to_owned()).collect()
}

/// The unit of `sample_type` in `profile`.
pub(crate) fn unit(profile: &Profile, sample_type: &str) -> String {
    profile
        .sample_type
        .iter()
        .find(|t| string_at(profile, t.r#type) == sample_type)
        .map(|t| string_at(profile, t.unit).to_owned())
        .unwrap_or_default()
}

/// `sample_type`, or the profile's default when `None`; an error naming `path` when the
/// profile has no such type.
pub(crate) fn chosen_sample_type(profile: &Profile, path: &Path, wanted: Option<&str>) -> Result<String, ReportError> {
    let types = sample_types(profile);
    match wanted {
        Some(t) if types.iter().any(|have| have == t) => Ok(t.to_owned()),
        Some(t) => Err(ReportError(format!(
            "{} has no sample type {t:?}; it has {}",
            path.display(),
            if types.is_empty() { "none".to_owned() } else { types.join(", ") }
        ))),
        None => default_sample_type(profile).ok_or_else(|| ReportError(format!("{}: no sample types", path.display()))),
    }
}

/// The functions of one profile by one sample type, largest flat value first.
#[derive(Debug, Clone)]
pub struct ProfileTop {
    /// The file.
    pub path: PathBuf,
    /// The sample type shown.
    pub sample_type: String,
    /// Its unit.
    pub unit: String,
    /// The sum over all samples.
    pub total: i64,
    /// One row per function, largest flat first.
    pub rows: Vec<FunctionTotal>,
}

impl ProfileTop {
    /// The top of the profile at `path` by `sample_type` (its default when `None`).
    pub fn read(path: &Path, sample_type: Option<&str>) -> Result<ProfileTop, ReportError> {
        let profile = read_profile(path)?;
        ProfileTop::of(&profile, path, sample_type)
    }

    /// The top of an already decoded `profile` (read from `path`).
    pub fn of(profile: &Profile, path: &Path, sample_type: Option<&str>) -> Result<ProfileTop, ReportError> {
        let sample_type = chosen_sample_type(profile, path, sample_type)?;
        let rows = function_totals(profile, &sample_type).unwrap_or_default();
        let total = rows.iter().map(|r| r.flat).sum();
        Ok(ProfileTop { path: path.to_owned(), unit: unit(profile, &sample_type), sample_type, total, rows })
    }

    /// The 0-based rank of `function` among the rows with a flat value, if it has one.
    pub fn rank(&self, function: &str) -> Option<usize> {
        self.rows.iter().filter(|r| r.flat != 0).position(|r| r.function == function)
    }

    /// The top `n` rows as text: a heading (the sample type and total), then
    /// `flat flat% cum function`. The caller names the file.
    pub fn render(&self, n: usize, style: Style) -> String {
        let mut out = String::new();
        let heading = format!("by {} ({}), total {}", self.sample_type, self.unit, human(self.total, &self.unit));
        let _ = writeln!(out, "  {}", style.heading(&fit(&heading, super::WIDTH - 2)));
        let shown: Vec<&FunctionTotal> = self.rows.iter().filter(|r| r.flat != 0).take(n).collect();
        if shown.is_empty() {
            let _ = writeln!(out, "  (no samples)");
            return out;
        }
        let _ = writeln!(out, "  {:>10} {:>6} {:>10}  function", "flat", "flat%", "cum");
        for row in shown {
            let pct = if self.total != 0 { 100.0 * row.flat as f64 / self.total as f64 } else { 0.0 };
            let _ = writeln!(
                out,
                "  {:>10} {:>5.1}% {:>10}  {}",
                human(row.flat, &self.unit),
                pct,
                human(row.cum, &self.unit),
                fit(&row.function, super::WIDTH - 33)
            );
        }
        out
    }

    /// The top `n` rows for scripts (full function names).
    pub fn to_json(&self, n: usize) -> Value {
        json!({
            "file": self.path.display().to_string(),
            "sample_type": self.sample_type,
            "unit": self.unit,
            "total": self.total,
            "rows": self.rows.iter().filter(|r| r.flat != 0).take(n).map(|r| json!({
                "function": r.function,
                "flat": r.flat,
                "cum": r.cum,
            })).collect::<Vec<_>>(),
        })
    }
}
