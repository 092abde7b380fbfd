//! The executable mappings of this process, from `/proc/self/maps`, as pprof's `Mapping`s.

use std::collections::HashMap;
use std::path::Path;

/// One executable mapping of a loaded object (the program, a shared library, the vDSO): the
/// `r-x` range of its code in memory and where that range starts in the file. A runtime
/// address `a` in `[start, limit)` is byte `a - start + file_offset` of the file; a reader
/// with the same file (matched by build ID) turns that into the object's own addresses
/// through its program headers, which is what `go tool pprof` does with `PPROF_BINARY_PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMapping {
    /// First address of the mapping.
    pub start: u64,
    /// One past its last address.
    pub limit: u64,
    /// Offset in the file of the byte mapped at `start`.
    pub file_offset: u64,
    /// The file, as the kernel names it (` (deleted)` trimmed), or a pseudo-name such as
    /// `[vdso]`.
    pub path: String,
    /// The GNU build ID (the `NT_GNU_BUILD_ID` note) in lower-case hex, when the object has
    /// one: read from the loaded object in memory, so it is the build that runs even when the
    /// file at `path` has been replaced since.
    pub build_id: Option<String>,
    /// Whether the file at `path` may still be the one mapped: `false` when the kernel marks
    /// the mapping's file deleted (replaced or removed since it was loaded). A symboliser then
    /// reads `path` only to find a file whose build ID matches, never on trust.
    pub path_maps_this: bool,
}

impl ObjectMapping {
    /// Whether `address` lies in this mapping.
    pub fn contains(&self, address: u64) -> bool {
        (self.start..self.limit).contains(&address)
    }

    /// The file offset of the byte at runtime address `address` (which must be inside).
    pub fn file_offset_of(&self, address: u64) -> u64 {
        address - self.start + self.file_offset
    }

    /// The object's base name (`demo-mq`, `libc.so.6`, `[vdso]`), for `object+0xoffset`.
    pub fn object_name(&self) -> &str {
        object_name(&self.path)
    }

    /// Whether the file is a real file that a symboliser could open (not `[vdso]`,
    /// `[vsyscall]`, an anonymous or `memfd:` mapping).
    pub fn is_file(&self) -> bool {
        self.path.starts_with('/') && !self.path.starts_with("/memfd:") && !self.path.starts_with("/dev/")
    }
}

/// The base name of `path`, or `path` itself when it has none (`[vdso]`).
pub(crate) fn object_name(path: &str) -> &str {
    Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or(path)
}

/// A file-backed line of `/proc/<pid>/maps`, as [`Mappings::parse`] asks about it.
#[derive(Debug, Clone, Copy)]
pub struct MappedFile<'a> {
    /// The path, ` (deleted)` trimmed.
    pub path: &'a str,
    /// The first address mapped.
    pub start: u64,
    /// Whether the kernel marked the file deleted.
    pub deleted: bool,
}

/// The executable mappings of one process, sorted by address.
#[derive(Debug, Clone, Default)]
pub struct Mappings {
    objects: Vec<ObjectMapping>,
}

impl Mappings {
    /// This process's executable mappings now, each with its object's build ID: from the
    /// loaded object's notes in memory, or, for a file mapped without the loader, from the
    /// file if the kernel does not mark it deleted. A `/proc/self/maps` that cannot be read
    /// gives no mappings (logged): every address is then unnamed rather than misnamed.
    pub fn of_this_process() -> Mappings {
        match std::fs::read_to_string("/proc/self/maps") {
            Ok(text) => {
                let loaded = super::loaded::loaded_objects();
                let mut from_files: HashMap<String, Option<String>> = HashMap::new();
                Mappings::parse(&text, |file| match loaded.iter().find(|o| o.contains(file.start)) {
                    Some(object) => object.build_id.clone(),
                    None if file.deleted => None,
                    None => from_files
                        .entry(file.path.to_owned())
                        .or_insert_with(|| super::elf::build_id_of_file(file.path))
                        .clone(),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "onsite: cannot read /proc/self/maps; profiles carry no mappings");
                Mappings::default()
            }
        }
    }

    /// Parses the text of a `/proc/<pid>/maps` file: one mapping per executable range of a
    /// file-backed object (or a named pseudo-object such as `[vdso]`), adjacent ranges of one
    /// file that continue each other in the file merged into one. `build_id` gives the build ID
    /// of a mapped file (only asked for real files). Lines that do not parse are skipped.
    pub fn parse(maps: &str, mut build_id: impl FnMut(MappedFile<'_>) -> Option<String>) -> Mappings {
        let mut objects: Vec<ObjectMapping> = Vec::new();
        for line in maps.lines() {
            let Some((start, limit, file_offset, path, deleted)) = parse_line(line) else { continue };
            if let Some(last) = objects.last_mut()
                && last.path == path
                && last.limit == start
                && last.file_offset + (last.limit - last.start) == file_offset
            {
                last.limit = limit;
                continue;
            }
            let mut object = ObjectMapping {
                start,
                limit,
                file_offset,
                path: path.to_owned(),
                build_id: None,
                path_maps_this: !deleted,
            };
            if object.is_file() {
                object.build_id = build_id(MappedFile { path, start, deleted });
            }
            objects.push(object);
        }
        objects.sort_by_key(|o| o.start);
        Mappings { objects }
    }

    /// The mapping holding `address`, and its index in [`Mappings::iter`]'s order.
    pub fn find(&self, address: u64) -> Option<(usize, &ObjectMapping)> {
        let at = self.objects.partition_point(|o| o.limit <= address);
        self.objects.get(at).filter(|o| o.contains(address)).map(|o| (at, o))
    }

    /// Every mapping, by address.
    pub fn iter(&self) -> impl Iterator<Item = &ObjectMapping> {
        self.objects.iter()
    }

    /// How many mappings there are.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

/// `start-limit perms offset dev inode path` → the executable ranges worth a mapping, and
/// whether the file is marked deleted.
fn parse_line(line: &str) -> Option<(u64, u64, u64, &str, bool)> {
    let mut fields = line.splitn(6, ' ');
    let (range, perms, offset, _dev, inode) =
        (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?);
    let path = fields.next().unwrap_or("").trim_start();
    if perms.as_bytes().get(2) != Some(&b'x') {
        return None;
    }
    let (start, limit) = range.split_once('-')?;
    let (start, limit) = (u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(limit, 16).ok()?);
    let offset = u64::from_str_radix(offset, 16).ok()?;
    let (path, deleted) = match path.strip_suffix(" (deleted)") {
        Some(path) => (path, true),
        None => (path, false),
    };
    // Anonymous executable memory (JIT code, the unpopulated head of a huge-page text mapping)
    // has no file to symbolise from: its addresses stay outside every mapping.
    if path.is_empty() || (inode == "0" && !path.starts_with('[')) {
        return None;
    }
    Some((start, limit, offset, path, deleted))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c1a00000-55d0c1a40000 r--p 00000000 fd:01 1234                       /srv/demo-mq
55d0c1a40000-55d0c1c00000 r-xp 00040000 fd:01 1234                       /srv/demo-mq
55d0c1c00000-55d0c1c10000 r-xp 00200000 fd:01 1234                       /srv/demo-mq
55d0c1c10000-55d0c1c20000 rw-p 00210000 fd:01 1234                       /srv/demo-mq
7f00000000-7f00001000 rwxp 00000000 00:00 0 
7f7d7797c000-7f7d77b36000 r-xp 00028000 fc:01 1180226                    /lib/x86_64-linux-gnu/libc.so.6 (deleted)
7ffc34343000-7ffc34345000 r-xp 00000000 00:00 0                          [vdso]
garbage line
";

    #[test]
    fn executable_ranges_become_mappings_and_continuing_ranges_merge() {
        let mut asked = Vec::new();
        let mappings = Mappings::parse(MAPS, |file| {
            asked.push((file.path.to_owned(), file.deleted));
            Some(format!("id-of-{}", object_name(file.path)))
        });
        let all: Vec<_> = mappings.iter().collect();
        assert_eq!(all.len(), 3, "{all:?}");
        assert_eq!(
            *all[0],
            ObjectMapping {
                start: 0x55d0c1a40000,
                limit: 0x55d0c1c10000,
                file_offset: 0x40000,
                path: "/srv/demo-mq".into(),
                build_id: Some("id-of-demo-mq".into()),
                path_maps_this: true,
            }
        );
        assert_eq!(all[1].path, "/lib/x86_64-linux-gnu/libc.so.6", "the deleted marker is trimmed");
        assert!(!all[1].path_maps_this, "and remembered");
        assert_eq!(all[1].file_offset, 0x28000);
        assert_eq!(all[2].path, "[vdso]");
        assert_eq!(all[2].build_id, None, "pseudo-objects are not opened");
        assert_eq!(asked, [("/srv/demo-mq".to_owned(), false), ("/lib/x86_64-linux-gnu/libc.so.6".to_owned(), true)]);

        let (index, found) = mappings.find(0x55d0c1a40010).unwrap();
        assert_eq!(index, 0);
        assert_eq!(found.file_offset_of(0x55d0c1a40010), 0x40010);
        assert_eq!(found.object_name(), "demo-mq");
        assert!(mappings.find(0x55d0c1a00010).is_none(), "read-only data is not code");
        assert!(mappings.find(0x7f00000010).is_none(), "anonymous code has no mapping");
        assert!(mappings.find(0).is_none());
    }
}
