//! One ELF file, memory-mapped read-only: its build ID, its loadable segments (to turn file
//! offsets into the addresses its symbols and DWARF use), its DWARF (through `addr2line`) and
//! its symbol table.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ObjectSymbolTable, SymbolKind};

use crate::pprof::Frame;

/// A byte range of a memory-mapped file, cheap to clone: the reader type DWARF is parsed with,
/// so the parsed context can live beside the map it reads without copying sections.
#[derive(Debug, Clone)]
struct MappedBytes {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl Deref for MappedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

// SAFETY: the bytes live in a read-only mapping owned by the `Arc`, which never moves them and
// keeps them mapped while any clone exists; clones point at the same bytes.
unsafe impl stable_deref_trait::StableDeref for MappedBytes {}
// SAFETY: as above; a clone shares the same `Arc<Mmap>` and range.
unsafe impl stable_deref_trait::CloneStableDeref for MappedBytes {}

type Reader = gimli::EndianReader<gimli::RunTimeEndian, MappedBytes>;

/// A loadable segment: file bytes `[offset, offset + size)` are loaded at `address` (the
/// object's own address space, before any load bias).
#[derive(Debug, Clone, Copy)]
struct Segment {
    offset: u64,
    size: u64,
    address: u64,
}

/// A function symbol: `[address, address + size)`, its name at `name` in the file.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    address: u64,
    size: u64,
    name_start: usize,
    name_len: usize,
}

/// An opened ELF file.
pub(crate) struct ElfObject {
    map: Arc<Mmap>,
    pub(crate) build_id: Option<String>,
    segments: Vec<Segment>,
    dwarf: Option<addr2line::Context<Reader>>,
    symbols: Vec<Symbol>,
}

impl std::fmt::Debug for ElfObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElfObject")
            .field("build_id", &self.build_id)
            .field("dwarf", &self.dwarf.is_some())
            .field("symbols", &self.symbols.len())
            .finish_non_exhaustive()
    }
}

/// Lower-case hex, as `readelf -n` and `go tool pprof` print build IDs.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn map_file(path: &Path) -> Result<Arc<Mmap>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: the map is read-only and private. A file truncated underneath it would fault on
    // access; loaded objects are not rewritten in place by package managers (they replace
    // the file), and a file found by search path is the operator's copy.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| format!("cannot map {}: {e}", path.display()))?;
    Ok(Arc::new(map))
}

/// The GNU build ID of the ELF file at `path`, in hex; `None` for anything else.
pub(crate) fn build_id_of_file(path: &str) -> Option<String> {
    let map = map_file(Path::new(path)).ok()?;
    let file = object::File::parse(&**map).ok()?;
    file.build_id().ok().flatten().map(hex)
}

impl ElfObject {
    /// Opens and indexes the ELF file at `path`. DWARF units are parsed lazily, on first use.
    pub(crate) fn open(path: &Path) -> Result<ElfObject, String> {
        let map = map_file(path)?;
        let file = object::File::parse(&**map).map_err(|e| format!("{}: not an ELF file: {e}", path.display()))?;
        let build_id = file.build_id().ok().flatten().map(hex);
        let segments = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                Segment { offset, size, address: s.address() }
            })
            .collect();
        let symbols = function_symbols(&file, &map);
        let dwarf = load_dwarf(&file, &map);
        Ok(ElfObject { map, build_id, segments, dwarf, symbols })
    }

    /// The object's own address (the one its symbols and DWARF use) of file offset `offset`.
    pub(crate) fn address_of_file_offset(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| (s.offset..s.offset + s.size).contains(&offset))
            .map(|s| offset - s.offset + s.address)
    }

    /// The frames at object address `address`, innermost inlined function first: from DWARF
    /// when it covers the address, else the function symbol containing it (checked against the
    /// symbol's size, so an address past the end of the last known function gets no name).
    pub(crate) fn frames(&self, address: u64) -> Vec<Frame> {
        let mut frames = Vec::new();
        if let Some(dwarf) = &self.dwarf
            && let Ok(mut iter) = dwarf.find_frames(address).skip_all_loads()
        {
            while let Ok(Some(frame)) = iter.next() {
                let Some(function) = frame.function.as_ref().and_then(|f| f.raw_name().ok()) else { continue };
                let (function, system_name) = names(&function);
                let location = frame.location.as_ref();
                frames.push(Frame {
                    function,
                    system_name,
                    file: location.and_then(|l| l.file).map(str::to_owned),
                    line: location.and_then(|l| l.line).unwrap_or(0),
                });
            }
        }
        if frames.is_empty()
            && let Some(name) = self.symbol(address)
        {
            let (function, system_name) = names(name);
            frames.push(Frame { function, system_name, file: None, line: 0 });
        }
        frames
    }

    /// The name of the function symbol containing `address`.
    fn symbol(&self, address: u64) -> Option<&str> {
        let at = self.symbols.partition_point(|s| s.address <= address).checked_sub(1)?;
        let symbol = self.symbols[at];
        if address - symbol.address >= symbol.size {
            return None;
        }
        std::str::from_utf8(self.map.get(symbol.name_start..symbol.name_start + symbol.name_len)?).ok()
    }
}

/// A symbol's demangled name without the Rust hash (`{:#}`), and the linked name when it
/// differs.
fn names(raw: &str) -> (String, Option<String>) {
    match rustc_demangle::try_demangle(raw) {
        Ok(demangled) => (format!("{demangled:#}"), Some(raw.to_owned())),
        Err(_) => (raw.to_owned(), None),
    }
}

/// Function symbols with a size, sorted by address: from `.symtab`, or `.dynsym` when the file
/// has no `.symtab` (a stripped file still exports a few names). Symbols without a size are
/// left out rather than stretched to the next one, so no address is given a neighbour's name.
fn function_symbols(file: &object::File<'_>, map: &Mmap) -> Vec<Symbol> {
    let table = file.symbol_table().or_else(|| file.dynamic_symbol_table());
    let base = map.as_ptr() as usize;
    let mut symbols: Vec<Symbol> = table
        .into_iter()
        .flat_map(|t| t.symbols())
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.size() > 0)
        .filter_map(|s| {
            let name = s.name_bytes().ok()?;
            let name_start = (name.as_ptr() as usize).checked_sub(base)?;
            (name_start + name.len() <= map.len()).then_some(Symbol {
                address: s.address(),
                size: s.size(),
                name_start,
                name_len: name.len(),
            })
        })
        .collect();
    symbols.sort_by_key(|s| (s.address, std::cmp::Reverse(s.size)));
    symbols.dedup_by_key(|s| s.address);
    symbols
}

/// The file's DWARF, when it has a `.debug_info` stored uncompressed (compressed debug
/// sections are not read: such a file is named from its symbol table).
fn load_dwarf(file: &object::File<'_>, map: &Arc<Mmap>) -> Option<addr2line::Context<Reader>> {
    let endian = if file.is_little_endian() { gimli::RunTimeEndian::Little } else { gimli::RunTimeEndian::Big };
    let section = |name: &str| -> Option<MappedBytes> {
        let section = file.section_by_name(name)?;
        let range = section.compressed_file_range().ok()?;
        if range.format != object::CompressionFormat::None {
            return None;
        }
        let (start, len) = (usize::try_from(range.offset).ok()?, usize::try_from(range.compressed_size).ok()?);
        (start.checked_add(len)? <= map.len()).then(|| MappedBytes { map: map.clone(), start, len })
    };
    section(".debug_info").filter(|s| !s.is_empty())?;
    let empty = MappedBytes { map: map.clone(), start: 0, len: 0 };
    let dwarf = gimli::Dwarf::load(|id| -> Result<Reader, gimli::Error> {
        Ok(Reader::new(section(id.name()).unwrap_or_else(|| empty.clone()), endian))
    })
    .ok()?;
    addr2line::Context::from_dwarf(dwarf).ok()
}
