//! Two profiles of one kind compared: which functions grew most (the heap of two captures is
//! the classic leak hunt), and `go tool pprof -base` (the later profile minus the earlier one,
//! read as one profile).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use onsite_core::pprof::{FunctionTotal, function_totals, sample_stacks, sample_type_index, totals_by_function};
use serde_json::{Value, json};

use super::top::{chosen_sample_type, read_profile, sample_types, unit};
use super::{ReportError, Style, base_name, fit, human};

/// One function in both profiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffRow {
    /// The function.
    pub function: String,
    /// Its flat value before and after.
    pub flat: (i64, i64),
    /// Its cumulative value before and after.
    pub cum: (i64, i64),
}

impl DiffRow {
    /// How much its flat value grew (negative: shrank).
    pub fn flat_delta(&self) -> i64 {
        self.flat.1 - self.flat.0
    }

    /// How much its cumulative value grew.
    pub fn cum_delta(&self) -> i64 {
        self.cum.1 - self.cum.0
    }
}

/// The comparison of two profiles by one sample type.
#[derive(Debug, Clone)]
pub struct Diff {
    /// The earlier profile.
    pub before: PathBuf,
    /// The later profile.
    pub after: PathBuf,
    /// The sample type compared.
    pub sample_type: String,
    /// Its unit.
    pub unit: String,
    /// The totals before and after.
    pub totals: (i64, i64),
    /// Every function of either, most grown (flat) first.
    pub rows: Vec<DiffRow>,
    /// `after - before` read as one profile, as `go tool pprof -base before after` shows it:
    /// per function flat and cum of the subtracted samples, largest change first.
    pub based: Vec<FunctionTotal>,
}

impl Diff {
    /// Compares `before` and `after` by `sample_type` (the later profile's default when
    /// `None`). The two must be profiles of one kind: the same sample types.
    pub fn read(before: &Path, after: &Path, sample_type: Option<&str>) -> Result<Diff, ReportError> {
        let (old, new) = (read_profile(before)?, read_profile(after)?);
        if sample_types(&old) != sample_types(&new) {
            return Err(ReportError(format!(
                "{} ({}) and {} ({}) are not profiles of one kind; compare two cpu, two memory, … profiles",
                before.display(),
                sample_types(&old).join(","),
                after.display(),
                sample_types(&new).join(","),
            )));
        }
        let sample_type = chosen_sample_type(&new, after, sample_type)?;
        let index = sample_type_index(&new, &sample_type).unwrap_or(0);
        let (old_rows, new_rows) = (
            function_totals(&old, &sample_type).unwrap_or_default(),
            function_totals(&new, &sample_type).unwrap_or_default(),
        );
        let totals = (old_rows.iter().map(|r| r.flat).sum(), new_rows.iter().map(|r| r.flat).sum());
        let mut by_function: HashMap<String, DiffRow> = HashMap::new();
        for (rows, after) in [(old_rows, false), (new_rows, true)] {
            for row in rows {
                let entry = by_function.entry(row.function.clone()).or_insert_with(|| DiffRow {
                    function: row.function,
                    flat: (0, 0),
                    cum: (0, 0),
                });
                if after {
                    (entry.flat.1, entry.cum.1) = (row.flat, row.cum);
                } else {
                    (entry.flat.0, entry.cum.0) = (row.flat, row.cum);
                }
            }
        }
        let mut rows: Vec<DiffRow> = by_function.into_values().collect();
        rows.sort_by(|a, b| {
            b.flat_delta()
                .cmp(&a.flat_delta())
                .then(b.cum_delta().cmp(&a.cum_delta()))
                .then(a.function.cmp(&b.function))
        });
        // The earlier profile's samples count negative, as pprof's -base subtracts them.
        let value = |sample: &onsite_core::pprof::proto::Sample| sample.value.get(index).copied().unwrap_or(0);
        let samples = sample_stacks(&new)
            .into_iter()
            .map(|(stack, s)| (stack, value(s)))
            .chain(sample_stacks(&old).into_iter().map(|(stack, s)| (stack, -value(s))))
            .map(|(stack, v)| (stack.into_iter().map(|n| Cow::Owned(n.into_owned())).collect::<Vec<_>>(), v));
        let mut based = totals_by_function(samples);
        based.retain(|r| r.flat != 0 || r.cum != 0);
        based.sort_by(|a, b| b.flat.abs().cmp(&a.flat.abs()).then(b.cum.abs().cmp(&a.cum.abs())));
        Ok(Diff {
            before: before.to_owned(),
            after: after.to_owned(),
            unit: unit(&new, &sample_type),
            sample_type,
            totals,
            rows,
            based,
        })
    }

    /// The `n` functions that grew most, then the `n` that shrank most, as text.
    pub fn render(&self, n: usize, style: Style) -> String {
        let mut out = String::new();
        let u = &self.unit;
        let heading = format!("by {} ({u})", self.sample_type);
        let _ = writeln!(out, "  {}", style.heading(&fit(&heading, super::WIDTH - 2)));
        let _ = writeln!(out, "  before {}  {}", human(self.totals.0, u), fit(&base_name(&self.before), 56));
        let _ = writeln!(out, "  after  {}  {}", human(self.totals.1, u), fit(&base_name(&self.after), 56));
        let grew: Vec<&DiffRow> = self.rows.iter().filter(|r| r.flat_delta() > 0).take(n).collect();
        let shrank: Vec<&DiffRow> = self.rows.iter().rev().filter(|r| r.flat_delta() < 0).take(n).collect();
        for (title, rows) in [("grew most (flat)", grew), ("shrank most (flat)", shrank)] {
            let _ = writeln!(out, "\n  {title}");
            if rows.is_empty() {
                let _ = writeln!(out, "  (none)");
                continue;
            }
            let _ = writeln!(out, "  {:>10} {:>10} {:>10}  function", "delta", "before", "after");
            for row in rows {
                let delta = format!("{:>10}", signed(row.flat_delta(), u));
                let delta = if row.flat_delta() > 0 { style.warn(&delta) } else { style.good(&delta) };
                let _ = writeln!(
                    out,
                    "  {delta} {:>10} {:>10}  {}",
                    human(row.flat.0, u),
                    human(row.flat.1, u),
                    fit(&row.function, super::WIDTH - 36)
                );
            }
        }
        out
    }

    /// `after - before` as `go tool pprof -top -base before after` shows it.
    pub fn render_based(&self, n: usize, style: Style) -> String {
        let mut out = String::new();
        let u = &self.unit;
        let total = self.totals.1 - self.totals.0;
        let _ = writeln!(out, "  {}", fit(&base_name(&self.after), super::WIDTH - 2));
        let _ = writeln!(out, "  minus {}", fit(&base_name(&self.before), super::WIDTH - 8));
        let heading = format!("by {} ({u}), total {}", self.sample_type, signed(total, u));
        let _ = writeln!(out, "  {}", style.heading(&heading));
        let _ = writeln!(out, "  {:>10} {:>6} {:>10}  function", "flat", "flat%", "cum");
        let whole: i64 = self.based.iter().map(|r| r.flat.abs()).sum();
        for row in self.based.iter().filter(|r| r.flat != 0).take(n) {
            let pct = if whole != 0 { 100.0 * row.flat as f64 / whole as f64 } else { 0.0 };
            let _ = writeln!(
                out,
                "  {:>10} {:>5.1}% {:>10}  {}",
                signed(row.flat, u),
                pct,
                signed(row.cum, u),
                fit(&row.function, super::WIDTH - 33)
            );
        }
        out
    }

    /// For scripts: the `n` rows that changed most either way, and the `-base` view.
    pub fn to_json(&self, n: usize) -> Value {
        let row = |r: &DiffRow| {
            json!({
                "function": r.function,
                "flat_before": r.flat.0, "flat_after": r.flat.1, "flat_delta": r.flat_delta(),
                "cum_before": r.cum.0, "cum_after": r.cum.1, "cum_delta": r.cum_delta(),
            })
        };
        json!({
            "before": self.before.display().to_string(),
            "after": self.after.display().to_string(),
            "sample_type": self.sample_type,
            "unit": self.unit,
            "total_before": self.totals.0,
            "total_after": self.totals.1,
            "grew": self.rows.iter().filter(|r| r.flat_delta() > 0).take(n).map(row).collect::<Vec<_>>(),
            "shrank": self.rows.iter().rev().filter(|r| r.flat_delta() < 0).take(n).map(row).collect::<Vec<_>>(),
            "base": self.based.iter().filter(|r| r.flat != 0).take(n).map(|r| json!({
                "function": r.function, "flat": r.flat, "cum": r.cum,
            })).collect::<Vec<_>>(),
        })
    }
}

fn signed(v: i64, unit: &str) -> String {
    if v > 0 { format!("+{}", human(v, unit)) } else { human(v, unit) }
}
