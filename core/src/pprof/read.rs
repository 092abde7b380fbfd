use std::collections::HashMap;
use std::fmt;
use std::io::Read;

use flate2::read::GzDecoder;
use prost::Message;

use super::proto::{Profile, Sample};

/// A file that is not a (possibly gzip'd) `profile.proto`.
#[derive(Debug)]
pub struct DecodeError(String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a pprof profile: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// Decodes a pprof file, gzip'd or not.
pub fn decode(bytes: &[u8]) -> Result<Profile, DecodeError> {
    let raw;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(bytes).read_to_end(&mut out).map_err(|e| DecodeError(format!("gzip: {e}")))?;
        raw = out;
        &raw[..]
    } else {
        bytes
    };
    let profile = Profile::decode(bytes).map_err(|e| DecodeError(e.to_string()))?;
    if profile.string_table.first().map(String::as_str) != Some("") {
        return Err(DecodeError("string_table[0] is not empty".into()));
    }
    Ok(profile)
}

/// One function's share of a profile for one sample type, like a row of `go tool pprof -top`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionTotal {
    /// The function name.
    pub function: String,
    /// Sum over samples whose leaf frame is this function.
    pub flat: i64,
    /// Sum over samples with this function anywhere in the stack (counted once per sample).
    pub cum: i64,
}

/// Each sample with its stack as function names, leaf first (inlined functions innermost
/// first, as pprof orders them): the one walk from ids to names that every reader shares.
pub fn sample_stacks(profile: &Profile) -> Vec<(Vec<&str>, &Sample)> {
    let s = |i: i64| profile.string_table.get(i as usize).map(String::as_str).unwrap_or("");
    let functions: HashMap<u64, &str> = profile.function.iter().map(|f| (f.id, s(f.name))).collect();
    let locations: HashMap<u64, Vec<&str>> = profile
        .location
        .iter()
        .map(|l| (l.id, l.line.iter().map(|line| functions.get(&line.function_id).copied().unwrap_or("?")).collect()))
        .collect();
    profile
        .sample
        .iter()
        .map(|sample| {
            let names = sample.location_id.iter().flat_map(|id| locations.get(id).into_iter().flatten().copied());
            (names.collect(), sample)
        })
        .collect()
}

/// Totals per function for the sample type named `sample_type`, by flat value, largest first
/// (ties by cum, then name). `None` when the profile has no such sample type.
pub fn function_totals(profile: &Profile, sample_type: &str) -> Option<Vec<FunctionTotal>> {
    let s = |i: i64| profile.string_table.get(i as usize).map(String::as_str).unwrap_or("");
    let index = profile.sample_type.iter().position(|t| s(t.r#type) == sample_type)?;
    let mut totals: HashMap<&str, (i64, i64)> = HashMap::new();
    for (stack, sample) in sample_stacks(profile) {
        let value = sample.value.get(index).copied().unwrap_or(0);
        let mut seen = Vec::new();
        for (depth, &name) in stack.iter().enumerate() {
            let entry = totals.entry(name).or_default();
            if depth == 0 {
                entry.0 += value;
            }
            if !seen.contains(&name) {
                seen.push(name);
                entry.1 += value;
            }
        }
    }
    let mut rows: Vec<FunctionTotal> = totals
        .into_iter()
        .map(|(function, (flat, cum))| FunctionTotal { function: function.to_owned(), flat, cum })
        .collect();
    rows.sort_by(|a, b| b.flat.cmp(&a.flat).then(b.cum.cmp(&a.cum)).then(a.function.cmp(&b.function)));
    Some(rows)
}
