//! Addresses to function names, file and line, through each object's own file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::elf::ElfObject;
use super::maps::{Mappings, ObjectMapping};
use crate::pprof::Frame;

/// Resolves runtime addresses inside [`ObjectMapping`]s to frames, reading each object's file
/// once (memory-mapped; DWARF parsed lazily) and keeping it for the symboliser's life.
///
/// It takes no lock of its own and none of the `backtrace` crate's: a caller that needs one
/// instance across threads wraps it (see [`with_shared`]). An object is only used when its
/// build ID matches the mapping's (read from the loaded object in memory), so a file replaced
/// on disk since it was loaded, or a different build found on a search path, names nothing
/// rather than the wrong thing; a mapping without a build ID reads its own path only while the
/// kernel does not mark that file deleted.
#[derive(Debug, Default)]
pub struct Symbolizer {
    search_path: Vec<PathBuf>,
    process_mappings: Option<Mappings>,
    objects: HashMap<(String, Option<String>), Option<ElfObject>>,
}

/// What a runtime address is: the frames there, innermost inlined function first (empty when
/// nothing names it), and where it is in its object, for a name built from the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The frames, innermost first; empty when the object has no symbols for the address.
    pub frames: Vec<Frame>,
    /// The object's base name (`demo-mq`, `libc.so.6`), when the address is in a mapping.
    pub object: Option<String>,
    /// The address in the object's own address space (what `addr2line -e OBJECT` takes), when
    /// the object's file could be read.
    pub object_address: Option<u64>,
    /// The offset in the object's file, when the address is in a mapping.
    pub file_offset: Option<u64>,
    /// The object's GNU build ID, when it has one.
    pub build_id: Option<String>,
}

impl Resolved {
    /// A name for an address nothing names: `object+0xOFFSET` with the offset in the object's
    /// file (what a profile's mapping gives any reader), the bare address outside every
    /// mapping. For `addr2line -e object`, use [`Resolved::object_address`].
    pub fn address_name(&self, address: u64) -> String {
        match (&self.object, self.file_offset) {
            (Some(object), Some(offset)) => format!("{object}+{offset:#x}"),
            _ => format!("{address:#x}"),
        }
    }
}

impl Symbolizer {
    /// A symboliser for addresses of this process: each mapping's own file is read.
    pub fn new() -> Symbolizer {
        Symbolizer::default()
    }

    /// A symboliser that looks for each object in `dirs` first, the way `go tool pprof` uses
    /// `PPROF_BINARY_PATH`: `DIR/BUILD_ID/NAME`, any file in `DIR/BUILD_ID/`, `DIR/NAME`,
    /// `DIR/PATH`, and then the mapping's own path; the first whose build ID matches is used.
    pub fn with_search_path(dirs: impl IntoIterator<Item = PathBuf>) -> Symbolizer {
        Symbolizer { search_path: dirs.into_iter().collect(), ..Symbolizer::default() }
    }

    /// This process's mappings, read once and kept (`refresh` reads them again: an address
    /// outside all of them may be in an object loaded since).
    pub fn process_mappings(&mut self, refresh: bool) -> &Mappings {
        if refresh || self.process_mappings.is_none() {
            self.process_mappings = Some(Mappings::of_this_process());
        }
        self.process_mappings.get_or_insert_with(Mappings::default)
    }

    /// Resolves runtime `address` (already adjusted to point into the instruction: a return
    /// address minus one) in `mapping`.
    pub fn resolve(&mut self, mapping: &ObjectMapping, address: u64) -> Resolved {
        let file_offset = mapping.file_offset_of(address);
        let mut resolved = Resolved {
            frames: Vec::new(),
            object: Some(mapping.object_name().to_owned()),
            object_address: None,
            file_offset: Some(file_offset),
            build_id: mapping.build_id.clone(),
        };
        if let Some(object) = self.object(mapping)
            && let Some(object_address) = object.address_of_file_offset(file_offset)
        {
            resolved.object_address = Some(object_address);
            resolved.frames = object.frames(object_address);
        }
        resolved
    }

    fn object(&mut self, mapping: &ObjectMapping) -> Option<&ElfObject> {
        if !mapping.is_file() {
            return None;
        }
        let key = (mapping.path.clone(), mapping.build_id.clone());
        if !self.objects.contains_key(&key) {
            let found = self.find_object(mapping);
            self.objects.insert(key.clone(), found);
        }
        self.objects.get(&key).and_then(Option::as_ref)
    }

    fn find_object(&self, mapping: &ObjectMapping) -> Option<ElfObject> {
        let found = self.candidates(mapping).into_iter().find_map(|path| {
            let object = ElfObject::open(&path).ok()?;
            match (&mapping.build_id, &object.build_id) {
                (Some(wanted), Some(found)) if wanted != found => {
                    tracing::debug!(path = %path.display(), wanted, found, "onsite: build ID differs; not used");
                    None
                }
                (Some(_), None) => None,
                _ => Some(object),
            }
        });
        if found.is_none() {
            tracing::debug!(object = mapping.path, "onsite: no readable file with a matching build ID");
        }
        found
    }

    fn candidates(&self, mapping: &ObjectMapping) -> Vec<PathBuf> {
        let name = mapping.object_name();
        let relative = mapping.path.trim_start_matches('/');
        let mut paths = Vec::new();
        for dir in &self.search_path {
            if let Some(id) = &mapping.build_id {
                paths.push(dir.join(id).join(name));
                if let Ok(entries) = std::fs::read_dir(dir.join(id)) {
                    let mut found: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                    found.sort();
                    paths.extend(found);
                }
            }
            paths.push(dir.join(name));
            paths.push(dir.join(relative));
        }
        // A file replaced since it was loaded is used only if its build ID proves it the same.
        if mapping.path_maps_this || mapping.build_id.is_some() {
            paths.push(Path::new(&mapping.path).to_path_buf());
        }
        paths
    }
}

/// The process-wide symboliser of onsite's own profiles and dumps, behind onsite's own lock.
/// Only the control thread symbolises (stopping a capture, the thread dump), so the lock is
/// never contended in a service; nothing holding it ever waits on a lock a service thread
/// holds while allocating, except the allocator's own.
static SHARED: Mutex<Option<Symbolizer>> = Mutex::new(None);

/// Runs `f` with the process-wide symboliser (created on first use).
pub fn with_shared<R>(f: impl FnOnce(&mut Symbolizer) -> R) -> R {
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    f(shared.get_or_insert_with(Symbolizer::new))
}

/// Drops the process-wide symboliser's files and parsed DWARF, so nothing of a capture's
/// symbolisation stays in the service's memory after it (the control thread calls it when a
/// capture, or a thread dump outside one, is written).
pub fn release_shared() {
    let released = SHARED.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(released);
}
