use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flate2::Compression;
use flate2::write::GzEncoder;
use prost::Message;

use super::proto;
use crate::symbols::{self, Mappings, ObjectMapping, Resolved};

/// Whether `function` (a demangled name) belongs to Rust's standard library: `core`, `alloc`,
/// `std`, or an inherent method of a primitive type (`<u64>::wrapping_mul`, `<[T]>::chunks`).
/// A trait implementation counts as the trait's crate (`<Vec<T> as my::Trait>::f` is not std).
pub fn is_std_function(function: &str) -> bool {
    let Some(inner) = function.strip_prefix('<') else {
        return ["core::", "alloc::", "std::"].iter().any(|c| function.starts_with(c));
    };
    if let Some((_, trait_path)) = inner.split_once(" as ") {
        return is_std_function(trait_path);
    }
    const PRIMITIVES: [&str; 18] = [
        "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize", "f32", "f64", "bool",
        "char", "str", "()",
    ];
    let head = inner.split(['>', '<']).next().unwrap_or("");
    PRIMITIVES.contains(&head)
        || ["[", "&", "*const ", "*mut "].iter().any(|p| inner.starts_with(p))
        || is_std_function(inner)
}

/// One symbolised frame: a function, and where in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Demangled function name without the hash suffix, e.g. `demo_mq::store::checksum`.
    pub function: String,
    /// The symbol as linked (mangled), when known.
    pub system_name: Option<String>,
    /// Source file, when debug info has it.
    pub file: Option<String>,
    /// Source line, 0 when unknown.
    pub line: u32,
}

/// Resolves one instruction pointer (a return address, as stack walkers give them) of this
/// process to its frames, innermost inlined function first. Never empty: an address nothing
/// names becomes one frame named after its place in its object (`object+0xADDRESS`), never
/// after a neighbouring symbol. Reads `/proc/self/maps` on every call: to resolve many
/// addresses, use [`resolve_stack`].
pub fn symbolize(ip: usize) -> Vec<Frame> {
    resolve_stack(&[ip]).pop().map(|(_, frames)| frames).unwrap_or_default()
}

/// Resolves the return addresses `ips` of this process with the shared symboliser (see
/// [`crate::symbols::with_shared`]), each to its [`Resolved`] place and its frames (never
/// empty, as [`symbolize`]). Honours this thread's symbolisation deadline: past it, the rest
/// are only placed, not named.
pub fn resolve_stack(ips: &[usize]) -> Vec<(Resolved, Vec<Frame>)> {
    symbols::with_shared(|symbolizer| {
        let mut mappings = symbolizer.process_mappings(false).clone();
        if ips.iter().any(|&ip| ip != 0 && mappings.find(symbols::lookup_address(ip as u64)).is_none()) {
            mappings = symbolizer.process_mappings(true).clone();
        }
        ips.iter()
            .map(|&ip| {
                let address = symbols::lookup_address(ip as u64);
                let resolved = match mappings.find(address) {
                    Some((_, mapping)) if !symbols::past_deadline() => symbolizer.resolve(mapping, address),
                    Some((_, mapping)) => unnamed_in(mapping, address),
                    None => unnamed(),
                };
                let frames = if resolved.frames.is_empty() {
                    vec![Frame { function: resolved.address_name(address), system_name: None, file: None, line: 0 }]
                } else {
                    resolved.frames.clone()
                };
                (resolved, frames)
            })
            .collect()
    })
}

fn unnamed() -> Resolved {
    Resolved { frames: Vec::new(), object: None, object_address: None, file_offset: None, build_id: None }
}

fn unnamed_in(mapping: &ObjectMapping, address: u64) -> Resolved {
    Resolved {
        object: Some(mapping.object_name().to_owned()),
        file_offset: Some(mapping.file_offset_of(address)),
        build_id: mapping.build_id.clone(),
        ..unnamed()
    }
}

/// A location before the profile is built: an address to symbolise then, or frames some other
/// tool already named (at an address, or at none: 0).
#[derive(Debug)]
enum PendingLocation {
    Address(u64),
    Frames { address: u64, frames: Vec<Frame> },
}

#[derive(Debug)]
struct PendingSample {
    locations: Vec<usize>,
    values: Vec<i64>,
    labels: Vec<proto::Label>,
}

/// Builds one `profile.proto` from samples of stacks and values.
///
/// Stacks come either as raw instruction pointers (captured cheaply on a hot path) or as frames
/// some other tool already symbolised (dhat). Stacks are leaf first, as pprof wants them.
/// Addresses are symbolised when the profile is built, once per distinct address, with the
/// process-wide symboliser; each location keeps its runtime address and its real mapping
/// (`/proc/self/maps`, with file offset and build ID), so what this process cannot name (a
/// stripped binary, a deadline passed) can be named later by `go tool pprof` with
/// `PPROF_BINARY_PATH`, or by [`super::symbolize_offline`].
pub struct PprofBuilder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    function_ids: HashMap<(i64, i64, i64), u64>,
    pending: Vec<PendingLocation>,
    by_address: HashMap<u64, usize>,
    by_frames: HashMap<(u64, Vec<Frame>), usize>,
    samples: Vec<PendingSample>,
    profile: proto::Profile,
    value_count: usize,
    skip_frame: Box<dyn Fn(&str) -> bool + Send>,
    deadline: Option<Instant>,
    not_walked: BTreeMap<String, i64>,
}

impl std::fmt::Debug for PprofBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PprofBuilder")
            .field("samples", &self.samples.len())
            .field("locations", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// The text of the one frame a sample whose stack could not be walked is kept under.
pub fn not_walked_frame(reason: &str) -> String {
    format!("[stack not walked: {reason}]")
}

impl PprofBuilder {
    /// A profile whose samples carry one value per `(type, unit)` in `sample_types`, e.g.
    /// `[("samples", "count"), ("cpu", "nanoseconds")]`, with `period` counted in `period_type`.
    pub fn new(sample_types: &[(&str, &str)], period_type: (&str, &str), period: i64) -> Self {
        let mut b = PprofBuilder {
            strings: Vec::new(),
            string_ids: HashMap::new(),
            function_ids: HashMap::new(),
            pending: Vec::new(),
            by_address: HashMap::new(),
            by_frames: HashMap::new(),
            samples: Vec::new(),
            profile: proto::Profile::default(),
            value_count: sample_types.len(),
            skip_frame: Box::new(|_| false),
            deadline: None,
            not_walked: BTreeMap::new(),
        };
        b.string(""); // string_table[0] must be "".
        b.profile.sample_type = sample_types.iter().map(|&(t, u)| b.value_type(t, u)).collect();
        b.profile.period_type = Some(b.value_type(period_type.0, period_type.1));
        b.profile.period = period;
        b
    }

    /// Which sample type `go tool pprof` shows by default (e.g. `inuse_space`).
    pub fn default_sample_type(mut self, sample_type: &str) -> Self {
        self.profile.default_sample_type = self.string(sample_type);
        self
    }

    /// When the profiled interval started and how long it lasted.
    pub fn time_range(mut self, start: SystemTime, duration: Duration) -> Self {
        self.profile.time_nanos = start.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        self.profile.duration_nanos = duration.as_nanos() as i64;
        self
    }

    /// Drops the profiler's own functions (signal trampolines, the allocator hook, the stack
    /// walker: those for which `skip` holds) at the leaf end of every stack: whole frames, and
    /// then the innermost inlined functions of the first frame kept (a lock guard's `drop`
    /// inlined into the function that unlocks), so the leaf is the service's own function.
    /// Only named frames can match: an unnamed one ends the run.
    pub fn skip_leaf_frames(mut self, skip: impl Fn(&str) -> bool + Send + 'static) -> Self {
        self.skip_frame = Box::new(skip);
        self
    }

    /// Stops symbolising at `deadline`: addresses not named by then are written with their
    /// mappings only (readable later with `PPROF_BINARY_PATH`). Without it, the deadline in
    /// force when the profile is built applies (a [`crate::CaptureOutput`] sets one around
    /// its writes).
    pub fn symbolize_until(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the profile's `drop_frames`: readers that symbolise it later (`go tool pprof`)
    /// drop frames whose function fully matches `regex`, and every frame nearer the leaf, the
    /// way [`PprofBuilder::skip_leaf_frames`] does for the frames named here.
    pub fn drop_frames(mut self, regex: &str) -> Self {
        self.profile.drop_frames = self.string(regex);
        self
    }

    /// A free-text comment (`go tool pprof -comments` shows it).
    pub fn comment(&mut self, text: &str) {
        let id = self.string(text);
        self.profile.comment.push(id);
    }

    /// How many samples were added so far.
    pub fn sample_count(&self) -> usize {
        self.samples.len()
    }

    /// Adds one sample whose stack is raw instruction pointers (return addresses), leaf first.
    /// A 0 ends the stack (walkers mark the outermost frame so).
    pub fn add_addresses(&mut self, ips: &[usize], values: &[i64], labels: &[(&str, &str)]) {
        let locations = self.address_locations(ips);
        self.push_sample(locations, values, labels);
    }

    /// Like [`PprofBuilder::add_addresses`], with one more frame named `root` at the root end:
    /// work that is not the service's (`[onsite]`) stays apart from it in every view.
    pub fn add_addresses_under(&mut self, root: &str, ips: &[usize], values: &[i64], labels: &[(&str, &str)]) {
        let mut locations = self.address_locations(ips);
        locations.push(self.frames_location(0, &[pseudo_frame(root)]));
        self.push_sample(locations, values, labels);
    }

    /// Adds one sample whose stack could not be walked, under the one frame
    /// `[stack not walked: REASON]`, and counts it per reason in the profile's comments: its
    /// value stays in the totals without being charged to whatever frame was left.
    pub fn add_not_walked(&mut self, reason: &str, values: &[i64], labels: &[(&str, &str)]) {
        *self.not_walked.entry(reason.to_owned()).or_default() += 1;
        let location = self.frames_location(0, &[pseudo_frame(&not_walked_frame(reason))]);
        self.push_sample(vec![location], values, labels);
    }

    /// Adds one sample whose stack is already symbolised: one entry per physical frame, leaf
    /// first, each holding its inlined functions innermost first.
    pub fn add_frames(&mut self, stack: &[Vec<Frame>], values: &[i64], labels: &[(&str, &str)]) {
        let locations = stack.iter().map(|frames| self.frames_location(0, frames)).collect();
        self.push_sample(locations, values, labels);
    }

    /// Like [`PprofBuilder::add_frames`], each physical frame with the return address it was
    /// named from (0 when unknown), so its location carries its real mapping.
    pub fn add_frames_at(&mut self, stack: &[(usize, Vec<Frame>)], values: &[i64], labels: &[(&str, &str)]) {
        let locations = stack
            .iter()
            .map(|(ip, frames)| {
                let address = if *ip == 0 { 0 } else { symbols::lookup_address(*ip as u64) };
                self.frames_location(address, frames)
            })
            .collect();
        self.push_sample(locations, values, labels);
    }

    /// The finished profile: addresses symbolised (until the deadline), mappings read.
    pub fn build(mut self) -> proto::Profile {
        let deadline = self.deadline.or_else(symbols::deadline);
        let needs_mappings = self
            .pending
            .iter()
            .any(|p| matches!(p, PendingLocation::Address(_) | PendingLocation::Frames { address: 1.., .. }));
        let mappings = if needs_mappings {
            // Read now, not when the capture started: objects loaded during it are included.
            symbols::with_shared(|symbolizer| symbolizer.process_mappings(true).clone())
        } else {
            Mappings::default()
        };
        let resolved = symbols::with_deadline(deadline, || self.resolve(&mappings));
        let locations = self.finish_locations(&mappings, resolved);
        self.finish_samples(&locations);
        for (reason, count) in std::mem::take(&mut self.not_walked) {
            self.comment(&format!(
                "{count} samples kept under {}: their stack could not be walked",
                not_walked_frame(&reason)
            ));
        }
        self.profile.string_table = self.strings;
        self.profile
    }

    /// Writes the finished profile gzip-compressed, as `go tool pprof` and Go's own runtime
    /// write it.
    pub fn write_gzip(self, out: &mut dyn Write) -> io::Result<()> {
        let bytes = self.build().encode_to_vec();
        let mut gz = GzEncoder::new(out, Compression::default());
        gz.write_all(&bytes)?;
        gz.finish()?;
        Ok(())
    }

    fn address_locations(&mut self, ips: &[usize]) -> Vec<usize> {
        let end = ips.iter().position(|&ip| ip == 0).unwrap_or(ips.len());
        ips[..end]
            .iter()
            .map(|&ip| {
                let ip = ip as u64;
                *self.by_address.entry(ip).or_insert_with(|| {
                    self.pending.push(PendingLocation::Address(ip));
                    self.pending.len() - 1
                })
            })
            .collect()
    }

    fn frames_location(&mut self, address: u64, frames: &[Frame]) -> usize {
        let key = (address, frames.to_vec());
        if let Some(&index) = self.by_frames.get(&key) {
            return index;
        }
        self.pending.push(PendingLocation::Frames { address, frames: frames.to_vec() });
        self.by_frames.insert(key, self.pending.len() - 1);
        self.pending.len() - 1
    }

    fn push_sample(&mut self, locations: Vec<usize>, values: &[i64], labels: &[(&str, &str)]) {
        debug_assert_eq!(values.len(), self.value_count, "one value per sample type");
        let labels = labels
            .iter()
            .map(|&(k, v)| proto::Label { key: self.string(k), str: self.string(v), ..Default::default() })
            .collect();
        self.samples.push(PendingSample { locations, values: values.to_vec(), labels });
    }

    /// The frames of every pending address location (empty: not named), and its mapping.
    fn resolve(&self, mappings: &Mappings) -> Vec<(Option<usize>, Vec<Frame>)> {
        let mut skipped = 0usize;
        let resolved = symbols::with_shared(|symbolizer| {
            self.pending
                .iter()
                .map(|pending| match pending {
                    PendingLocation::Address(ip) => {
                        let address = symbols::lookup_address(*ip);
                        let Some((index, mapping)) = mappings.find(address) else { return (None, Vec::new()) };
                        if symbols::past_deadline() {
                            skipped += 1;
                            return (Some(index), Vec::new());
                        }
                        (Some(index), symbolizer.resolve(mapping, address).frames)
                    }
                    PendingLocation::Frames { address, .. } => (mappings.find(*address).map(|(i, _)| i), Vec::new()),
                })
                .collect()
        });
        if skipped > 0 {
            tracing::info!(skipped, "onsite: symbolisation deadline passed; the rest is written unsymbolised");
        }
        resolved
    }

    /// Emits mappings (the main program's first, as pprof expects, then those locations use)
    /// and locations; returns, per pending location, its id and whether it is the profiler's own.
    fn finish_locations(
        &mut self,
        mappings: &Mappings,
        resolved: Vec<(Option<usize>, Vec<Frame>)>,
    ) -> Vec<(u64, bool)> {
        let exe = std::fs::read_link("/proc/self/exe").ok().map(|p| p.display().to_string());
        let mut order: Vec<usize> = Vec::new();
        if let Some(exe) = &exe {
            order.extend(mappings.iter().enumerate().filter(|(_, m)| &m.path == exe).map(|(i, _)| i));
        }
        for (index, _) in &resolved {
            if let Some(i) = index
                && !order.contains(i)
            {
                order.push(*i);
            }
        }
        let all: Vec<&ObjectMapping> = mappings.iter().collect();
        // Per mapping: locations, and how many have functions, files, lines.
        let mut named = vec![(0usize, 0usize, 0usize, 0usize); all.len()];
        let mut ids = Vec::with_capacity(self.pending.len());
        let pending = std::mem::take(&mut self.pending);
        for (pending, (mapping_index, frames)) in pending.into_iter().zip(resolved) {
            let (address, frames) = match pending {
                PendingLocation::Address(ip) => (symbols::lookup_address(ip), frames),
                PendingLocation::Frames { address, frames } => (address, frames),
            };
            if let Some(i) = mapping_index {
                let n = &mut named[i];
                n.0 += 1;
                n.1 += usize::from(!frames.is_empty());
                n.2 += usize::from(!frames.is_empty() && frames.iter().all(|f| f.file.is_some()));
                n.3 += usize::from(!frames.is_empty() && frames.iter().all(|f| f.line > 0));
            }
            let profiler_own = !frames.is_empty() && frames.iter().all(|f| (self.skip_frame)(&f.function));
            let line = self.lines(&frames);
            let id = self.profile.location.len() as u64 + 1;
            let mapping_id = mapping_index.and_then(|i| order.iter().position(|&o| o == i)).map_or(0, |p| p as u64 + 1);
            self.profile.location.push(proto::Location { id, mapping_id, address, line, is_folded: false });
            ids.push((id, profiler_own));
        }
        for (position, &i) in order.iter().enumerate() {
            let mapping = all[i];
            let (locations, functions, files, lines) = named[i];
            // `has_functions` says the object's symbols were read into this file: set when most
            // of its locations got a name (the few left, in padding or a PLT stub, have no
            // symbol to find). A stripped file names only the handful of functions it exports,
            // so its mapping stays without the flag. pprof re-symbolises every location of a
            // mapping with no flag set, overwriting the names already there, and Go's
            // `go tool pprof` does that with an object reader that misnames a Rust PIE binary;
            // so only a mapping that could not be named here is left to readers (a stripped
            // binary, which pprof names from PPROF_BINARY_PATH). Files and lines: only when
            // every location has them.
            let most = |n: usize| locations > 0 && 2 * n >= locations;
            let every = |n: usize| locations > 0 && n == locations;
            let filename = self.string(&mapping.path);
            let build_id = self.string(mapping.build_id.as_deref().unwrap_or(""));
            self.profile.mapping.push(proto::Mapping {
                id: position as u64 + 1,
                memory_start: mapping.start,
                memory_limit: mapping.limit,
                file_offset: mapping.file_offset,
                filename,
                build_id,
                has_functions: most(functions),
                has_filenames: every(files),
                has_line_numbers: every(lines),
                has_inline_frames: every(files),
            });
        }
        ids
    }

    fn finish_samples(&mut self, locations: &[(u64, bool)]) {
        let mut trimmed_locations: HashMap<u64, u64> = HashMap::new();
        for sample in std::mem::take(&mut self.samples) {
            // Only a run of the profiler's own frames at the leaf end is dropped; a skippable
            // function deeper in the stack (a callback through the allocator, say) stays.
            let mut location_id: Vec<u64> =
                sample.locations.iter().map(|&i| locations[i]).skip_while(|&(_, own)| own).map(|(id, _)| id).collect();
            if let Some(leaf) = location_id.first_mut() {
                *leaf = self.trimmed_location(*leaf, &mut trimmed_locations);
            }
            self.profile.sample.push(proto::Sample { location_id, value: sample.values, label: sample.labels });
        }
    }

    /// The location `id` without its innermost inlined functions that `skip_frame` matches
    /// (interned once per location; `id` itself when nothing is trimmed).
    fn trimmed_location(&mut self, id: u64, trimmed_locations: &mut HashMap<u64, u64>) -> u64 {
        if let Some(&trimmed) = trimmed_locations.get(&id) {
            return trimmed;
        }
        let location = &self.profile.location[id as usize - 1];
        let function_name = |function_id: u64| {
            let name = self.profile.function[function_id as usize - 1].name;
            self.strings[name as usize].as_str()
        };
        let own = location.line.iter().take_while(|l| (self.skip_frame)(function_name(l.function_id))).count();
        let trimmed = if own == 0 || own == location.line.len() {
            id
        } else {
            let new_id = self.profile.location.len() as u64 + 1;
            let new_location = proto::Location { id: new_id, line: location.line[own..].to_vec(), ..location.clone() };
            self.profile.location.push(new_location);
            new_id
        };
        trimmed_locations.insert(id, trimmed);
        trimmed
    }

    /// The lines of a location named `frames`, interning their functions.
    fn lines(&mut self, frames: &[Frame]) -> Vec<proto::Line> {
        // Inlined standard-library helpers (`<u64>::wrapping_mul`, `Vec::push`, iterator
        // adapters) are folded into the function they were inlined into: the caller's line
        // still says where, and a flat profile names the service's function instead of
        // spreading its time over a dozen std one-liners. The outermost function of the frame
        // is real (it has a stack frame of its own) and always stays.
        let outermost = frames.len().saturating_sub(1);
        frames
            .iter()
            .enumerate()
            .filter(|&(i, f)| i == outermost || !is_std_function(&f.function))
            .map(|(_, f)| {
                let name = self.string(&f.function);
                let system_name = self.string(f.system_name.as_deref().unwrap_or(&f.function));
                let filename = self.string(f.file.as_deref().unwrap_or(""));
                let function_id = self.function(name, system_name, filename);
                proto::Line { function_id, line: i64::from(f.line), column: 0 }
            })
            .collect()
    }

    fn function(&mut self, name: i64, system_name: i64, filename: i64) -> u64 {
        let next_id = self.profile.function.len() as u64 + 1;
        let id = *self.function_ids.entry((name, system_name, filename)).or_insert(next_id);
        if id == next_id {
            self.profile.function.push(proto::Function { id, name, system_name, filename, start_line: 0 });
        }
        id
    }

    fn value_type(&mut self, r#type: &str, unit: &str) -> proto::ValueType {
        proto::ValueType { r#type: self.string(r#type), unit: self.string(unit) }
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_owned());
        self.string_ids.insert(s.to_owned(), id);
        id
    }
}

/// A frame that is a label rather than code (`[onsite]`, `[main thread]`).
pub fn pseudo_frame(name: &str) -> Frame {
    Frame { function: name.to_owned(), system_name: None, file: None, line: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_library_functions_are_recognised() {
        for f in [
            "core::cmp::Ord::min",
            "alloc::vec::Vec<T>::push",
            "std::thread::spawn",
            "<u64>::wrapping_mul",
            "<[T]>::chunks",
            "<&str>::len",
            "<alloc::vec::Vec<u8> as core::clone::Clone>::clone",
            "<core::slice::iter::Chunks<T> as core::iter::traits::iterator::Iterator>::next",
        ] {
            assert!(is_std_function(f), "{f}");
        }
        for f in [
            "demo_mq::broker::checksum_payload",
            "<demo_mq::broker::Broker>::publish",
            "<alloc::vec::Vec<u8> as demo_mq::Encode>::encode",
            "memcpy",
            "0x7f00",
        ] {
            assert!(!is_std_function(f), "{f}");
        }
    }

    #[test]
    fn inlined_std_helpers_fold_into_their_caller() {
        let frame = |function: &str, line| Frame { function: function.into(), system_name: None, file: None, line };
        let mut b = PprofBuilder::new(&[("samples", "count")], ("samples", "count"), 1);
        // One physical frame: `<u64>::wrapping_mul` inlined into `Ord::min` inlined into the
        // service's function.
        b.add_frames(
            &[vec![frame("<u64>::wrapping_mul", 10), frame("core::cmp::Ord::min", 20), frame("svc::hot", 30)]],
            &[5],
            &[],
        );
        // A physical std frame stays.
        b.add_frames(&[vec![frame("alloc::raw_vec::finish_grow", 1)], vec![frame("svc::grow", 2)]], &[1], &[]);
        let profile = b.build();
        let rows = crate::pprof::function_totals(&profile, "samples").unwrap();
        assert_eq!(rows[0].function, "svc::hot");
        assert_eq!(rows[0].flat, 5);
        assert!(rows.iter().any(|r| r.function == "alloc::raw_vec::finish_grow" && r.flat == 1));
        assert!(!rows.iter().any(|r| r.function.contains("wrapping_mul") || r.function.contains("Ord::min")));
        assert_eq!(profile.location[0].line.len(), 1);
        assert_eq!(profile.location[0].line[0].line, 30, "the caller's line says where the helper was called");
    }
}
