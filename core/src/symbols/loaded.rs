//! The objects the dynamic loader has loaded now (`dl_iterate_phdr`), copied out of its
//! callback: the one list of them, read by the stack walker (their `.eh_frame` in memory) and
//! by [`super::Mappings`] (their build IDs).
//!
//! A loaded object's build ID is read from its own notes in memory, inside the callback (the
//! loader holds its list lock there, so the object cannot be unloaded while its notes are
//! read). The file at the object's path may not be the one that was loaded: a package upgrade
//! replaces it while the service runs, and a profile that took the new file's build ID would
//! send every reader to the wrong file. Nothing but copying and parsing happens inside the
//! callback: it must not call back into the loader (see `stack_walk`'s pins).

use std::ffi::{CStr, CString};

use object::NativeEndian;
use object::elf::{FileHeader64, NT_GNU_BUILD_ID};
use object::read::elf::NoteIterator;

/// One loaded object as `dl_iterate_phdr` showed it.
pub(crate) struct LoadedObject {
    /// The path the loader opened it by; empty for the program itself.
    pub(crate) name: CString,
    /// What its link-time addresses are offset by in memory.
    pub(crate) bias: u64,
    /// Its program headers.
    pub(crate) headers: Vec<libc::Elf64_Phdr>,
    /// Its GNU build ID (lower-case hex), from its notes in memory.
    pub(crate) build_id: Option<String>,
}

impl LoadedObject {
    /// Whether run-time `address` lies in one of its loadable segments.
    pub(crate) fn contains(&self, address: u64) -> bool {
        self.segment_holding(address, 1).is_some()
    }

    /// The loadable segment that holds all of run-time `[address, address + len)`, if one does.
    fn segment_holding(&self, address: u64, len: u64) -> Option<&libc::Elf64_Phdr> {
        self.headers.iter().find(|h| {
            let start = self.bias.wrapping_add(h.p_vaddr);
            h.p_type == libc::PT_LOAD
                && start <= address
                && address - start < h.p_memsz
                && len <= h.p_memsz - (address - start)
        })
    }
}

/// The objects loaded now, in the loader's order (the program first).
pub(crate) fn loaded_objects() -> Vec<LoadedObject> {
    unsafe extern "C" fn each(info: *mut libc::dl_phdr_info, size: libc::size_t, data: *mut libc::c_void) -> i32 {
        if size < std::mem::size_of::<libc::dl_phdr_info>() {
            return 0;
        }
        // SAFETY: the loader passes a valid `info` whose headers and loaded segments stay
        // mapped for the callback; `data` is the `Vec` below.
        unsafe {
            let info = &*info;
            let objects = &mut *(data as *mut Vec<LoadedObject>);
            let headers = if info.dlpi_phdr.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)).to_vec()
            };
            let name = if info.dlpi_name.is_null() { c"" } else { CStr::from_ptr(info.dlpi_name) };
            let build_id = build_id_in_memory(info.dlpi_addr, &headers);
            objects.push(LoadedObject { name: name.to_owned(), bias: info.dlpi_addr, headers, build_id });
        }
        0
    }
    let mut objects: Vec<LoadedObject> = Vec::new();
    // SAFETY: the callback matches the signature and only pushes onto `objects`.
    unsafe { libc::dl_iterate_phdr(Some(each), &mut objects as *mut Vec<LoadedObject> as *mut libc::c_void) };
    objects
}

/// The writable loadable segments of the objects loaded when it was taken: their `.data` and
/// `.bss`, memory that lives as long as its object does. A stack's, a thread-local's or the
/// heap's never does. For telling a `static` from any other place a value may sit, before
/// keeping its address for good; taken once for any number of addresses.
pub struct WritableSegments(Vec<LoadedObject>);

impl std::fmt::Debug for WritableSegments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WritableSegments").field("objects", &self.0.len()).finish()
    }
}

impl WritableSegments {
    /// The segments of the objects loaded now.
    pub fn now() -> WritableSegments {
        WritableSegments(loaded_objects())
    }

    /// Whether `[address, address + len)` lies inside one of them.
    pub fn hold(&self, address: usize, len: usize) -> bool {
        let (Ok(address), Ok(len)) = (u64::try_from(address), u64::try_from(len)) else { return false };
        self.0.iter().any(|object| object.segment_holding(address, len).is_some_and(|h| h.p_flags & libc::PF_W != 0))
    }
}

/// The `NT_GNU_BUILD_ID` note among the object's `PT_NOTE` segments, in hex.
///
/// # Safety
/// The object must stay loaded while this runs (inside `dl_iterate_phdr`'s callback).
unsafe fn build_id_in_memory(bias: u64, headers: &[libc::Elf64_Phdr]) -> Option<String> {
    headers.iter().filter(|h| h.p_type == libc::PT_NOTE && h.p_filesz > 0).find_map(|h| {
        let start = bias.wrapping_add(h.p_vaddr);
        // SAFETY: a note segment lies inside a loadable one (the loader maps it with the
        // object), and the caller keeps the object loaded.
        let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, h.p_filesz as usize) };
        let mut notes = NoteIterator::<FileHeader64<NativeEndian>>::new(NativeEndian, h.p_align, bytes).ok()?;
        while let Ok(Some(note)) = notes.next() {
            if note.name() == b"GNU" && note.n_type(NativeEndian) == NT_GNU_BUILD_ID {
                return Some(super::elf::hex(note.desc()));
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::WritableSegments;

    static WORD: AtomicU32 = AtomicU32::new(0);
    static CONSTANT: u32 = 7;

    thread_local! {
        static PER_THREAD: u32 = const { 0 };
    }

    fn address_of<T>(value: &T) -> usize {
        std::ptr::from_ref(value) as usize
    }

    #[test]
    fn a_mutable_static_is_in_a_writable_segment_and_nothing_else_is() {
        let size = std::mem::size_of::<u32>();
        let segments = WritableSegments::now();
        let in_writable_segment = |address, len| segments.hold(address, len);
        assert!(in_writable_segment(address_of(&WORD), size));
        assert!(!in_writable_segment(address_of(&CONSTANT), size), "an immutable static is read-only");
        let on_stack = AtomicU32::new(0);
        assert!(!in_writable_segment(address_of(&on_stack), size));
        let on_heap = Box::new(AtomicU32::new(0));
        assert!(!in_writable_segment(address_of(&*on_heap), size));
        PER_THREAD.with(|value| assert!(!in_writable_segment(address_of(value), size)));
        let code = a_mutable_static_is_in_a_writable_segment_and_nothing_else_is as fn() as usize;
        assert!(!in_writable_segment(code, 1), "code is not writable");
        assert!(!in_writable_segment(usize::MAX - 1, size));
    }
}
