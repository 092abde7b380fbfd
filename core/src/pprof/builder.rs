use std::collections::HashMap;
use std::ffi::c_void;
use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flate2::Compression;
use flate2::write::GzEncoder;
use prost::Message;

use super::proto;

/// An interned location, and whether it is one of the profiler's own frames.
#[derive(Debug, Clone, Copy)]
struct LocationId {
    id: u64,
    profiler_own: bool,
}

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

/// Resolves one instruction pointer (a return address, as stack walkers give them) to its
/// frames, innermost inlined function first. Never empty: an address without a symbol becomes
/// a frame named by the address, so a sample never loses a level.
pub fn symbolize(ip: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    // `backtrace::resolve` treats the address as a return address (looks up `ip - 1`), which
    // attributes a call to the line that made it.
    backtrace::resolve(ip as *mut c_void, |sym| {
        let function = match sym.name() {
            // `{:#}` drops the `::h0123abcd` hash Rust symbols carry.
            Some(name) => format!("{name:#}"),
            None => format!("{ip:#x}"),
        };
        frames.push(Frame {
            function,
            system_name: sym.name().and_then(|n| n.as_str().map(str::to_owned)),
            file: sym.filename().map(|f| f.display().to_string()),
            line: sym.lineno().unwrap_or(0),
        });
    });
    if frames.is_empty() {
        frames.push(Frame { function: format!("{ip:#x}"), system_name: None, file: None, line: 0 });
    }
    frames
}

/// Builds one `profile.proto` from samples of stacks and values.
///
/// Stacks come either as raw instruction pointers (captured cheaply on a hot path and
/// symbolised here, once per distinct address) or as frames some other tool already
/// symbolised (pprof-rs). Stacks are leaf first, as pprof wants them.
pub struct PprofBuilder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<proto::Function>,
    function_ids: HashMap<(i64, i64, i64), u64>,
    locations: Vec<proto::Location>,
    location_by_address: HashMap<usize, LocationId>,
    location_by_frames: HashMap<Vec<Frame>, LocationId>,
    samples: Vec<proto::Sample>,
    profile: proto::Profile,
    value_count: usize,
    skip_frame: Box<dyn Fn(&str) -> bool + Send>,
    trimmed_locations: HashMap<u64, u64>,
}

impl std::fmt::Debug for PprofBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PprofBuilder")
            .field("samples", &self.samples.len())
            .field("locations", &self.locations.len())
            .finish_non_exhaustive()
    }
}

impl PprofBuilder {
    /// A profile whose samples carry one value per `(type, unit)` in `sample_types`, e.g.
    /// `[("samples", "count"), ("cpu", "nanoseconds")]`, with `period` counted in `period_type`.
    pub fn new(sample_types: &[(&str, &str)], period_type: (&str, &str), period: i64) -> Self {
        let mut b = PprofBuilder {
            strings: Vec::new(),
            string_ids: HashMap::new(),
            functions: Vec::new(),
            function_ids: HashMap::new(),
            locations: Vec::new(),
            location_by_address: HashMap::new(),
            location_by_frames: HashMap::new(),
            samples: Vec::new(),
            profile: proto::Profile::default(),
            value_count: sample_types.len(),
            skip_frame: Box::new(|_| false),
            trimmed_locations: HashMap::new(),
        };
        b.string(""); // string_table[0] must be "".
        b.profile.sample_type = sample_types.iter().map(|&(t, u)| b.value_type(t, u)).collect();
        b.profile.period_type = Some(b.value_type(period_type.0, period_type.1));
        b.profile.period = period;
        let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
        // One mapping that says "already symbolised", so `go tool pprof` does not try (and
        // fail) to symbolise addresses itself.
        let filename = b.string(&exe);
        b.profile.mapping = vec![proto::Mapping {
            id: 1,
            memory_start: 0,
            memory_limit: u64::MAX,
            filename,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
            ..Default::default()
        }];
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
    pub fn skip_leaf_frames(mut self, skip: impl Fn(&str) -> bool + Send + 'static) -> Self {
        self.skip_frame = Box::new(skip);
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

    /// Adds one sample whose stack is raw instruction pointers, leaf first.
    pub fn add_addresses(&mut self, ips: &[usize], values: &[i64], labels: &[(&str, &str)]) {
        let mut ids = Vec::with_capacity(ips.len());
        for &ip in ips {
            let id = match self.location_by_address.get(&ip) {
                Some(&id) => id,
                None => {
                    let frames = symbolize(ip);
                    let id = self.new_location(ip as u64, &frames);
                    self.location_by_address.insert(ip, id);
                    id
                }
            };
            ids.push(id);
        }
        self.push_sample(ids, values, labels);
    }

    /// Adds one sample whose stack is already symbolised: one entry per physical frame, leaf
    /// first, each holding its inlined functions innermost first.
    pub fn add_frames(&mut self, stack: &[Vec<Frame>], values: &[i64], labels: &[(&str, &str)]) {
        let mut ids = Vec::with_capacity(stack.len());
        for frames in stack {
            let id = match self.location_by_frames.get(frames) {
                Some(&id) => id,
                None => {
                    let id = self.new_location(0, frames);
                    self.location_by_frames.insert(frames.clone(), id);
                    id
                }
            };
            ids.push(id);
        }
        self.push_sample(ids, values, labels);
    }

    /// The finished profile.
    pub fn build(mut self) -> proto::Profile {
        self.profile.sample = self.samples;
        self.profile.location = self.locations;
        self.profile.function = self.functions;
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

    fn push_sample(&mut self, ids: Vec<LocationId>, values: &[i64], labels: &[(&str, &str)]) {
        debug_assert_eq!(values.len(), self.value_count, "one value per sample type");
        // Only a run of the profiler's own frames at the leaf end is dropped; a skippable
        // function deeper in the stack (a callback through the allocator, say) stays.
        let mut location_id: Vec<u64> = ids.iter().skip_while(|l| l.profiler_own).map(|l| l.id).collect();
        if let Some(leaf) = location_id.first_mut() {
            *leaf = self.trimmed_location(*leaf);
        }
        let label = labels
            .iter()
            .map(|&(k, v)| proto::Label { key: self.string(k), str: self.string(v), ..Default::default() })
            .collect();
        self.samples.push(proto::Sample { location_id, value: values.to_vec(), label });
    }

    /// The location `id` without its innermost inlined functions that `skip_frame` matches
    /// (interned once per location; `id` itself when nothing is trimmed).
    fn trimmed_location(&mut self, id: u64) -> u64 {
        if let Some(&trimmed) = self.trimmed_locations.get(&id) {
            return trimmed;
        }
        let location = &self.locations[id as usize - 1];
        let function_name = |function_id: u64| {
            let name = self.functions[function_id as usize - 1].name;
            self.strings[name as usize].as_str()
        };
        let own = location.line.iter().take_while(|l| (self.skip_frame)(function_name(l.function_id))).count();
        let trimmed = if own == 0 || own == location.line.len() {
            id
        } else {
            let new_id = self.locations.len() as u64 + 1;
            let new_location = proto::Location { id: new_id, line: location.line[own..].to_vec(), ..location.clone() };
            self.locations.push(new_location);
            new_id
        };
        self.trimmed_locations.insert(id, trimmed);
        trimmed
    }

    /// Interns a location for `frames` at `address`.
    fn new_location(&mut self, address: u64, frames: &[Frame]) -> LocationId {
        let profiler_own = frames.iter().all(|f| (self.skip_frame)(&f.function));
        // Inlined standard-library helpers (`<u64>::wrapping_mul`, `Vec::push`, iterator
        // adapters) are folded into the function they were inlined into: the caller's line
        // still says where, and a flat profile names the service's function instead of
        // spreading its time over a dozen std one-liners. The outermost function of the frame
        // is real (it has a stack frame of its own) and always stays.
        let outermost = frames.len().saturating_sub(1);
        let line = frames
            .iter()
            .enumerate()
            .filter(|&(i, f)| i == outermost || !is_std_function(&f.function))
            .map(|(_, f)| {
                let name = self.string(&f.function);
                let system_name = self.string(f.system_name.as_deref().unwrap_or(&f.function));
                let filename = self.string(f.file.as_deref().unwrap_or(""));
                let next_id = self.functions.len() as u64 + 1;
                let function_id = *self.function_ids.entry((name, system_name, filename)).or_insert(next_id);
                if function_id == next_id {
                    self.functions.push(proto::Function { id: next_id, name, system_name, filename, start_line: 0 });
                }
                proto::Line { function_id, line: i64::from(f.line), column: 0 }
            })
            .collect();
        let id = self.locations.len() as u64 + 1;
        self.locations.push(proto::Location { id, mapping_id: 1, address, line, is_folded: false });
        LocationId { id, profiler_own }
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
