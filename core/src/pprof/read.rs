use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::PathBuf;

use flate2::read::GzDecoder;
use prost::Message;

use super::proto::{self, Profile, Sample};
use crate::symbols::{ObjectMapping, Symbolizer};

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
/// first, as pprof orders them): the one walk from ids to names that every reader shares. A
/// location without functions is named after its place, `object+0xOFFSET` (the base name of
/// its mapping's file and the offset in that file), or its bare address outside any mapping:
/// never after a neighbouring symbol.
pub fn sample_stacks(profile: &Profile) -> Vec<(Vec<Cow<'_, str>>, &Sample)> {
    let s = |i: i64| string_at(profile, i);
    let functions: HashMap<u64, &str> = profile.function.iter().map(|f| (f.id, s(f.name))).collect();
    let mappings: HashMap<u64, &proto::Mapping> = profile.mapping.iter().map(|m| (m.id, m)).collect();
    let locations: HashMap<u64, Vec<Cow<'_, str>>> = profile
        .location
        .iter()
        .map(|l| {
            let names: Vec<Cow<'_, str>> = if l.line.is_empty() {
                vec![Cow::Owned(match mappings.get(&l.mapping_id) {
                    Some(m) if (m.memory_start..m.memory_limit).contains(&l.address) => {
                        let object = object_name(s(m.filename));
                        format!("{object}+{:#x}", l.address - m.memory_start + m.file_offset)
                    }
                    _ => format!("{:#x}", l.address),
                })]
            } else {
                l.line
                    .iter()
                    .map(|line| Cow::Borrowed(functions.get(&line.function_id).copied().unwrap_or("?")))
                    .collect()
            };
            (l.id, names)
        })
        .collect();
    profile
        .sample
        .iter()
        .map(|sample| {
            let names = sample.location_id.iter().flat_map(|id| locations.get(id).into_iter().flatten().cloned());
            (names.collect(), sample)
        })
        .collect()
}

fn object_name(path: &str) -> &str {
    path.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or(path)
}

/// Names the function-less locations of `profile` from unstripped copies of its objects, the
/// way pprof does with `PPROF_BINARY_PATH`: each mapping's object is looked up in
/// `search_path` (by build ID and file name; see [`Symbolizer::with_search_path`]) and, failing
/// that, at its own path, and is used only when its build ID matches. Then, as pprof does, the
/// profile's `drop_frames` are dropped from every sample. Returns how many locations were named.
///
/// Unlike pprof, which skips a mapping marked `has_functions`, this looks at every location
/// without a name in every mapping: a mapping most of whose locations were named when it was
/// written is marked, and the rest (those a symbolisation deadline left) are named here.
/// Locations that have names keep them.
pub fn symbolize_offline(profile: &mut Profile, search_path: &[PathBuf]) -> usize {
    let s = |p: &Profile, i: i64| string_at(p, i).to_owned();
    let mappings: HashMap<u64, ObjectMapping> = profile
        .mapping
        .iter()
        .map(|m| {
            let build_id = Some(s(profile, m.build_id)).filter(|b| !b.is_empty());
            let mapping = ObjectMapping {
                start: m.memory_start,
                limit: m.memory_limit,
                file_offset: m.file_offset,
                path: s(profile, m.filename),
                build_id,
                // Offline, the mapping's own path is the reader's file: used as any other
                // candidate, matched by build ID when the profile has one.
                path_maps_this: true,
            };
            (m.id, mapping)
        })
        .collect();
    let mut symbolizer = Symbolizer::with_search_path(search_path.iter().cloned());
    let mut strings: HashMap<String, i64> =
        profile.string_table.iter().enumerate().map(|(i, s)| (s.clone(), i as i64)).collect();
    let mut string = |table: &mut Vec<String>, text: &str| -> i64 {
        *strings.entry(text.to_owned()).or_insert_with(|| {
            table.push(text.to_owned());
            table.len() as i64 - 1
        })
    };
    let mut named = 0;
    let mut named_mappings = Vec::new();
    for index in 0..profile.location.len() {
        let location = &profile.location[index];
        let Some(mapping) = mappings.get(&location.mapping_id) else { continue };
        if !location.line.is_empty() || !mapping.contains(location.address) {
            continue;
        }
        // A location's address already points into its instruction (the builder stores a
        // return address minus one), so it is looked up as it is.
        let frames = symbolizer.resolve(mapping, location.address).frames;
        if frames.is_empty() {
            continue;
        }
        let mut lines = Vec::with_capacity(frames.len());
        for frame in &frames {
            let name = string(&mut profile.string_table, &frame.function);
            let system_name =
                string(&mut profile.string_table, frame.system_name.as_deref().unwrap_or(&frame.function));
            let filename = string(&mut profile.string_table, frame.file.as_deref().unwrap_or(""));
            let id = profile.function.len() as u64 + 1;
            profile.function.push(proto::Function { id, name, system_name, filename, start_line: 0 });
            lines.push(proto::Line { function_id: id, line: i64::from(frame.line), column: 0 });
        }
        let mapping_id = profile.location[index].mapping_id;
        profile.location[index].line = lines;
        named_mappings.push(mapping_id);
        named += 1;
    }
    for mapping in profile.mapping.iter_mut().filter(|m| named_mappings.contains(&m.id)) {
        mapping.has_functions = true;
    }
    if named > 0 {
        apply_drop_frames(profile);
    }
    named
}

/// Drops the frames the profile's `drop_frames` names, as pprof does once a profile's frames
/// have names: in each sample, the first location from the root with a function that matches
/// the whole expression goes, with everything it called. (The writer trims its own frames by
/// name at the leaf already when it can name them; this does it for frames named later.)
fn apply_drop_frames(profile: &mut Profile) {
    let pattern = string_at(profile, profile.drop_frames).to_owned();
    if pattern.is_empty() {
        return;
    }
    let Ok(drop) = regex::Regex::new(&format!("^(?:{pattern})$")) else {
        tracing::debug!(%pattern, "onsite: the profile's drop_frames is not a regular expression; kept every frame");
        return;
    };
    let names: HashMap<u64, &str> = profile.function.iter().map(|f| (f.id, string_at(profile, f.name))).collect();
    let dropped: HashMap<u64, bool> = profile
        .location
        .iter()
        .map(|l| (l.id, l.line.iter().any(|line| names.get(&line.function_id).is_some_and(|n| drop.is_match(n)))))
        .collect();
    for sample in &mut profile.sample {
        // Leaf first: the root's end is the last entry.
        if let Some(from_root) = sample.location_id.iter().rev().position(|id| dropped.get(id) == Some(&true)) {
            let keep_from = sample.location_id.len() - from_root;
            sample.location_id.drain(..keep_from);
        }
    }
}

/// Totals per function for the sample type named `sample_type`, by flat value, largest first
/// (ties by cum, then name). `None` when the profile has no such sample type.
pub fn function_totals(profile: &Profile, sample_type: &str) -> Option<Vec<FunctionTotal>> {
    let index = sample_type_index(profile, sample_type)?;
    Some(totals_by_function(
        sample_stacks(profile)
            .into_iter()
            .map(|(stack, sample)| (stack, sample.value.get(index).copied().unwrap_or(0))),
    ))
}

/// The profile's comments, in order (what `go tool pprof -comments` prints).
pub fn comments(profile: &Profile) -> impl Iterator<Item = &str> {
    profile.comment.iter().map(|&i| string_at(profile, i))
}

/// The position of the sample type named `sample_type` in the profile's values.
pub fn sample_type_index(profile: &Profile, sample_type: &str) -> Option<usize> {
    profile.sample_type.iter().position(|t| string_at(profile, t.r#type) == sample_type)
}

/// The string at `index` of the profile's string table; empty for an index outside it (a
/// reader never panics on a malformed profile).
pub fn string_at(profile: &Profile, index: i64) -> &str {
    profile.string_table.get(index as usize).map_or("", String::as_str)
}

/// Totals per function over `samples` (each a stack, leaf first, and its value), by flat
/// value, largest first (ties by cum, then name): what [`function_totals`] does for one
/// profile, for any set of samples (such as one profile's minus another's, as `pprof -base`).
pub fn totals_by_function<'a>(samples: impl IntoIterator<Item = (Vec<Cow<'a, str>>, i64)>) -> Vec<FunctionTotal> {
    let mut totals: HashMap<Cow<'a, str>, (i64, i64)> = HashMap::new();
    for (stack, value) in samples {
        let mut seen = Vec::new();
        for (depth, name) in stack.iter().enumerate() {
            let entry = totals.entry(name.clone()).or_default();
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
        .map(|(function, (flat, cum))| FunctionTotal { function: function.into_owned(), flat, cum })
        .collect();
    rows.sort_by(|a, b| b.flat.cmp(&a.flat).then(b.cum.cmp(&a.cum)).then(a.function.cmp(&b.function)));
    rows
}
