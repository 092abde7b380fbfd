//! The walker on x86_64 Linux: framehop's x86_64 unwinder over the objects loaded when it was
//! built, with fixed rule caches claimed per walk.
//!
//! framehop turns each frame's CFI into a small rule once and caches it by return address, so
//! the repeated stacks a service allocates from cost a cache hit and a stack read per frame
//! (libgcc's unwinder interprets the CFI afresh at every walk).
//!
//! **Registered objects stay loaded until the walker is gone.** Each is pinned with
//! `dlopen(RTLD_NOLOAD)` (one more reference on the object already there, checked to be the
//! same object by its load address and dynamic section) and released with `dlclose` when the
//! walker is dropped, which its owner does only after the stacks it walked were symbolised. A
//! `dlclose` by the service meanwhile only drops its own reference, so the `.eh_frame` bytes a
//! walk reads are never unmapped under it, and a walk needs no loader call. The pins are taken
//! after `dl_iterate_phdr` returns, never inside its callback: it holds the loader's list lock,
//! and `dlopen`/`dlclose` take the loader's main lock, which a `dlopen` elsewhere holds while
//! it waits for the list lock (taking them in that order deadlocked a capture start against a
//! service loading a library). The program itself and the vDSO cannot be unloaded and are not
//! pinned; an object that cannot be pinned is not registered. The price, for the walker's
//! life: a library the service unloads stays mapped until the walker is dropped (its
//! destructors then run on onsite's control thread), and loading it again by the same path
//! meanwhile gets the still-loaded copy back.

use std::cell::UnsafeCell;
use std::ffi::{CStr, c_void};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, FrameAddress, MustNotAllocateDuringUnwind, Unwinder};

use super::{WalkError, Walked};
use crate::symbols::loaded::{LoadedObject, loaded_objects};

/// Section bytes of a loaded object, read in place. Valid while the object stays loaded; see
/// the module docs for why no walk uses them after it was unloaded.
type Bytes = &'static [u8];
type Policy = MustNotAllocateDuringUnwind;

/// The instruction pointer, stack pointer and frame pointer where this is expanded, read
/// together so they describe one instant (the CFI at that `pc` applies to that `sp`). A macro,
/// not a function: the walk must start in a frame that stays live while it runs, and a function
/// that returned its own registers would hand over a frame already gone (debug builds do not
/// always inline, even `#[inline(always)]` across crates).
macro_rules! registers_here {
    () => {{
        let (pc, sp, bp): (u64, u64, u64);
        // SAFETY: reads three registers; touches no memory.
        unsafe {
            std::arch::asm!(
                "lea {pc}, [rip]",
                "mov {sp}, rsp",
                "mov {bp}, rbp",
                pc = out(reg) pc,
                sp = out(reg) sp,
                bp = out(reg) bp,
                options(nomem, nostack, preserves_flags),
            );
        }
        (pc, sp, bp)
    }};
}

/// Walks stacks without locks or allocation over the objects loaded when it was built (see
/// the [module docs](super)). Build it on an ordinary thread; share it by reference with the
/// threads that walk; drop it only once no walk can still be using it.
pub struct Walker {
    unwinder: UnwinderX86_64<Bytes, Policy>,
    /// The registered modules' code, sorted by start: return addresses must fall in here.
    code: Vec<Range<u64>>,
    slots: Box<[CacheSlot]>,
    /// The registered objects, kept loaded; declared last so they are released after
    /// everything that points into them.
    _pins: Vec<Pin>,
}

impl std::fmt::Debug for Walker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Walker").field("modules", &self.code.len()).field("cache_slots", &self.slots.len()).finish()
    }
}

/// One reference on a loaded object, which keeps it loaded until dropped (see the module
/// docs). Null for objects that never unload.
struct Pin(*mut c_void);

// SAFETY: a `dlopen` handle is a token any thread may pass to `dlclose`.
unsafe impl Send for Pin {}
// SAFETY: as above; `Pin` has no methods that use it through `&self`.
unsafe impl Sync for Pin {}

impl Drop for Pin {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a handle from `dlopen`, closed once.
            unsafe { libc::dlclose(self.0) };
        }
    }
}

/// framehop's rule cache is direct-mapped: 509 entries indexed by `address % 509`. Two return
/// addresses of one stack that share an index evict each other at every walk, and each eviction
/// costs a CFI lookup and evaluation (thousands of instructions), so with one cache a walk costs
/// 3,000 or 11,000 instructions depending only on where the loader happened to put the code.
/// Each frame therefore picks one of `WAYS` caches by a hash of its address, which makes those
/// collisions `WAYS` times rarer (and the cache `WAYS` times larger for services with many
/// stacks). The way must not follow from the index: taken from `address / 509`, it put two
/// addresses of one object `509 × 4k` bytes apart (the sampler's own frame and its caller's, in
/// one build) in the same way at the same index, in every process.
const WAYS: usize = 4;
const _: () = assert!(WAYS.is_power_of_two(), "`way` takes the top bits of a hash");

/// A walker's caches, claimed as a whole by one walk at a time.
type Caches = [CacheX86_64<Policy>; WAYS];

/// The cache for the frame whose lookup address is `address`: the top bits of a Fibonacci
/// hash, which mixes every bit of the address (the load base's too) into them.
#[inline(always)]
fn way(address: u64) -> usize {
    (address.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (u64::BITS - WAYS.trailing_zeros())) as usize
}

struct CacheSlot {
    claimed: AtomicBool,
    caches: UnsafeCell<Caches>,
}

// SAFETY: `caches` are only touched by the thread that claimed the slot (`claimed` swapped from
// false to true with Acquire, released with Release), so never by two at once.
unsafe impl Sync for CacheSlot {}

thread_local! {
    /// The low end of this thread's stack (see `STACK_TOP`).
    static STACK_LOW: AtomicUsize = const { AtomicUsize::new(0) };
    /// The top (highest address, exclusive) of this thread's stack; 0 = not asked yet, 1 =
    /// unknown. Written after `STACK_LOW` and read before it, so a signal handler that
    /// interrupts the writing sees 0 (the two cells are this thread's only: the handler runs on
    /// the same thread, so Release/Acquire here only keep the compiler's order).
    static STACK_TOP: AtomicUsize = const { AtomicUsize::new(0) };
}

const TOP_NOT_ASKED: usize = 0;
const TOP_UNKNOWN: usize = 1;

/// Asks for and caches this thread's stack bounds (ordinary context only).
pub(super) fn note_this_thread_stack() {
    store_bounds(ask_stack_bounds());
}

fn store_bounds(bounds: Option<(usize, usize)>) {
    let (low, top) = bounds.unwrap_or((0, TOP_UNKNOWN));
    let _ = STACK_LOW.try_with(|cell| cell.store(low, Ordering::Relaxed));
    let _ = STACK_TOP.try_with(|cell| cell.store(top, Ordering::Release));
}

/// The cached bounds; `None` if unknown or never asked. Async-signal-safe (two reads of this
/// thread's own const-initialised cells, which have no destructor and need no registration).
#[inline(always)]
fn cached_bounds() -> Option<(usize, usize)> {
    let top = STACK_TOP.with(|cell| cell.load(Ordering::Acquire));
    (top > TOP_UNKNOWN).then(|| (STACK_LOW.with(|cell| cell.load(Ordering::Relaxed)), top))
}

/// The cached bounds, asked once per thread if never asked. Not for signal handlers.
#[inline(always)]
fn bounds_asking_once() -> Option<(usize, usize)> {
    if STACK_TOP.with(|cell| cell.load(Ordering::Relaxed)) == TOP_NOT_ASKED {
        store_bounds(ask_stack_bounds());
    }
    cached_bounds()
}

/// `pthread_getattr_np` (for the main thread glibc reads `/proc/self/maps`; any memory it needs
/// comes from libc's malloc, not from this process's global allocator).
pub(super) fn ask_stack_bounds() -> Option<(usize, usize)> {
    // SAFETY: a zeroed attr is what `pthread_getattr_np` initialises; it is destroyed after
    // use; the out-pointers are valid.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut low: *mut c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let rc = libc::pthread_attr_getstack(&attr, &mut low, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        (rc == 0 && !low.is_null()).then(|| (low as usize, low as usize + size))
    }
}

impl Walker {
    /// Registers the objects loaded now and prepares `cache_slots` rule caches (at least one):
    /// as many walks can run at once. Allocates; call on an ordinary thread.
    pub fn new(cache_slots: usize) -> Walker {
        let mut unwinder = UnwinderX86_64::new();
        let mut code = Vec::new();
        let mut pins = Vec::new();
        // Pinned only after the loader's list was read: `dl_iterate_phdr` holds the loader's
        // list lock while it calls back, and `dlopen`/`dlclose` take the loader's main lock,
        // which a `dlopen` elsewhere holds while it waits for the list lock.
        // SAFETY: `getauxval` reads the auxiliary vector; 0 when there is no vDSO.
        let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
        for object in loaded_objects() {
            let Some(pin) = object.pin(vdso) else { continue };
            // Read only now that the object is pinned: its sections stay mapped.
            if let Some((range, module)) = object.module() {
                pins.push(pin);
                code.push(range);
                unwinder.add_module(module);
            }
        }
        code.sort_by_key(|range| range.start);
        let slots = (0..cache_slots.max(1))
            .map(|_| CacheSlot { claimed: AtomicBool::new(false), caches: UnsafeCell::new(new_caches()) })
            .collect();
        Walker { unwinder, code, slots, _pins: pins }
    }

    /// How many loaded objects the walker registered.
    pub fn modules(&self) -> usize {
        self.code.len()
    }

    /// Walks the calling thread's stack from the caller's frame into `ips` (leaf first, the
    /// walker's inlined code at the leaf), or `None` if the walk could not be finished cleanly
    /// (the caller may walk another way). For the allocator: asks `pthread_getattr_np` on a
    /// thread's first walk, so not for signal handlers (see [`Walker::walk_interrupted`]).
    ///
    /// Inlined with the whole walk into the caller: every frame between the walk and the
    /// caller's caller is one more frame to unwind per walk.
    #[inline(always)]
    pub fn walk_here(&self, preferred_slot: usize, ips: &mut [usize]) -> Option<usize> {
        let (low, top) = bounds_asking_once()?;
        let slot = self.claim_slot(preferred_slot)?;
        // SAFETY: this thread claimed the slot.
        let caches = unsafe { &mut *slot.caches.get() };
        let depth = self.walk_here_with(caches, (low, top), ips);
        slot.claimed.store(false, Ordering::Release);
        depth
    }

    /// [`Walker::walk_here`] with a given cache and bounds (for tests).
    #[inline(always)]
    fn walk_here_with(&self, caches: &mut Caches, (low, top): (usize, usize), ips: &mut [usize]) -> Option<usize> {
        let (pc, sp, bp) = registers_here!();
        let (low, top) = (low as u64, top as u64);
        if sp < low || sp >= top {
            return None; // on another stack (a signal's alternate stack, a coroutine's)
        }
        let mut read = |address: u64| {
            if address >= sp && address.checked_add(8).is_some_and(|end| end <= top) {
                // SAFETY: `address..address + 8` lies between this thread's stack pointer and
                // the top of its stack, which is mapped.
                Ok(unsafe { read_word(address) })
            } else {
                Err(())
            }
        };
        match self.walk_frames(caches, (pc, sp, bp), &mut read, ips) {
            Walked { depth, stopped: None } => Some(depth),
            Walked { .. } => None,
        }
    }

    /// Walks the stack of the thread this signal handler interrupted, from the registers in
    /// `context` (the `ucontext_t` given to an `SA_SIGINFO` handler), into `ips`. No lock, no
    /// allocation, no loader call, no `pthread_*` call: async-signal-safe. Reads are checked
    /// against the thread's cached bounds ([`super::note_this_thread_stack`]), or `main_stack`
    /// (the caller passes the main thread's `[stack]` mapping when this is the main thread), or
    /// else made with `process_vm_readv` (see the module docs of [`super`]).
    ///
    /// # Safety
    /// `context` must be the `ucontext_t` the kernel passed to the running signal handler, and
    /// this must be called on the thread it interrupted.
    pub unsafe fn walk_interrupted(
        &self,
        context: *const c_void,
        main_stack: Option<(usize, usize)>,
        preferred_slot: usize,
        ips: &mut [usize],
    ) -> Walked {
        // SAFETY: the caller passes the kernel's ucontext_t for this handler.
        let gregs = unsafe { &(*(context as *const libc::ucontext_t)).uc_mcontext.gregs };
        let pc = gregs[libc::REG_RIP as usize] as u64;
        let sp = gregs[libc::REG_RSP as usize] as u64;
        let bp = gregs[libc::REG_RBP as usize] as u64;
        let Some(slot) = self.claim_slot(preferred_slot) else {
            return Walked { depth: 0, stopped: Some(WalkError::AllCachesBusy) };
        };
        // SAFETY: this thread claimed the slot.
        let caches = unsafe { &mut *slot.caches.get() };
        let bounds = cached_bounds().or(main_stack).filter(|&(low, top)| (low as u64..top as u64).contains(&sp));
        let walked = match bounds {
            Some((_, top)) => {
                let top = top as u64;
                let mut read = |address: u64| {
                    if address >= sp && address.checked_add(8).is_some_and(|end| end <= top) {
                        // SAFETY: between the interrupted stack pointer and the top of the
                        // stack it is on: mapped while the thread lives, and it runs this.
                        Ok(unsafe { read_word(address) })
                    } else {
                        Err(())
                    }
                };
                self.walk_frames(caches, (pc, sp, bp), &mut read, ips)
            }
            None => {
                let refused = std::cell::Cell::new(false);
                // SAFETY: `getpid` cannot fail (and is async-signal-safe).
                let pid = unsafe { libc::getpid() };
                let mut read = |address: u64| {
                    if address < sp {
                        return Err(());
                    }
                    checked_read_word(pid, address).map_err(|errno| {
                        refused.set(errno != libc::EFAULT);
                    })
                };
                let walked = self.walk_frames(caches, (pc, sp, bp), &mut read, ips);
                match walked.stopped {
                    Some(WalkError::ReadOutsideStack) if refused.get() => {
                        Walked { stopped: Some(WalkError::StackUnreadable), ..walked }
                    }
                    _ => walked,
                }
            }
        };
        slot.claimed.store(false, Ordering::Release);
        walked
    }

    /// The registered code range holding `address`, if any.
    fn code_range(&self, address: u64) -> Option<Range<u64>> {
        let after = self.code.partition_point(|range| range.start <= address);
        let range = self.code.get(after.checked_sub(1)?)?;
        range.contains(&address).then(|| range.clone())
    }

    /// A free cache slot, trying `preferred` first; never waits.
    #[inline(always)]
    fn claim_slot(&self, preferred: usize) -> Option<&CacheSlot> {
        // Threads that prefer different slots mostly find their own cache, warm with their
        // own stacks.
        (0..self.slots.len())
            .map(|i| &self.slots[(preferred + i) % self.slots.len()])
            .find(|slot| slot.claimed.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok())
    }

    /// framehop's `UnwindIterator`, with a cache chosen per frame (see `WAYS`), from the frame
    /// whose instruction pointer, stack pointer and frame pointer are `regs`. Stops at a frame
    /// outside the registered code (checked before framehop unwinds it: an unknown address
    /// would get its frame-pointer guess), a refused read, or framehop's error.
    #[inline(always)]
    fn walk_frames<R: FnMut(u64) -> Result<u64, ()>>(
        &self,
        caches: &mut Caches,
        (pc, sp, bp): (u64, u64, u64),
        read: &mut R,
        ips: &mut [usize],
    ) -> Walked {
        let mut regs = UnwindRegsX86_64::new(pc, sp, bp);
        let mut frame = FrameAddress::from_instruction_pointer(pc);
        let mut depth = 0;
        // Most frames of a stack are in the same object as the one before (the service's
        // binary): its range is checked first, before the search over every object's.
        let mut known = 0..0;
        while depth < ips.len() {
            let lookup = frame.address_for_lookup();
            if !known.contains(&lookup) {
                match self.code_range(lookup) {
                    Some(range) => known = range,
                    None => return Walked { depth, stopped: Some(WalkError::OutsideKnownCode) },
                }
            }
            ips[depth] = frame.address() as usize;
            depth += 1;
            if depth == ips.len() {
                break;
            }
            match self.unwinder.unwind_frame(frame, &mut regs, &mut caches[way(lookup)], read) {
                Ok(Some(return_address)) => match FrameAddress::from_return_address(return_address) {
                    Some(next) => frame = next,
                    None => return Walked { depth, stopped: Some(WalkError::UnwindFailed) },
                },
                Ok(None) => break, // the outermost frame says it is the end
                Err(framehop::Error::CouldNotReadStack(_)) => {
                    return Walked { depth, stopped: Some(WalkError::ReadOutsideStack) };
                }
                Err(_) => return Walked { depth, stopped: Some(WalkError::UnwindFailed) },
            }
        }
        Walked { depth, stopped: None }
    }
}

pub(super) fn new_caches() -> Caches {
    std::array::from_fn(|_| CacheX86_64::new_in())
}

/// One word of a thread's stack. Read with an instruction rather than a Rust load: the word may
/// belong to any frame (padding included), which Rust's memory model does not let a pointer
/// read.
///
/// # Safety
/// `address..address + 8` must be mapped and readable.
#[inline(always)]
unsafe fn read_word(address: u64) -> u64 {
    let word: u64;
    // SAFETY: the caller checked that `address..address + 8` is mapped.
    unsafe {
        std::arch::asm!(
            "mov {word}, qword ptr [{address}]",
            address = in(reg) address,
            word = lateout(reg) word,
            options(readonly, nostack, preserves_flags),
        );
    }
    word
}

/// One word of this process's memory through `process_vm_readv` (a system call, so
/// async-signal-safe): an unmapped address is an error (`EFAULT`), not a fault. `Err(errno)`.
/// The process may always read itself this way (the kernel's access check passes for the same
/// thread group), unless a seccomp filter refuses the call.
fn checked_read_word(pid: libc::pid_t, address: u64) -> Result<u64, i32> {
    let mut word = 0u64;
    let local = libc::iovec { iov_base: (&mut word as *mut u64).cast(), iov_len: 8 };
    let remote = libc::iovec { iov_base: address as *mut c_void, iov_len: 8 };
    // SAFETY: `local` is this frame's 8 bytes; `remote` is only read by the kernel, which
    // checks it.
    let read = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if read == 8 {
        Ok(word)
    } else if read < 0 {
        // SAFETY: errno is thread-local; the handler that called this restores it.
        Err(unsafe { *libc::__errno_location() })
    } else {
        Err(libc::EFAULT)
    }
}

impl LoadedObject {
    /// Keeps this object loaded until the pin is dropped; `None` if that cannot be done
    /// for this very object.
    fn pin(&self, vdso: u64) -> Option<Pin> {
        if self.name.is_empty() || self.is_at(vdso) || cfg!(target_env = "musl") {
            // The program itself (listed first, without a name), the vDSO (the kernel's, mapped
            // for the life of the process), and anything on musl, whose `dlclose` never unloads.
            return Some(Pin(std::ptr::null_mut()));
        }
        let dynamic = self.headers.iter().find(|h| h.p_type == libc::PT_DYNAMIC)?;
        pin_by_name(&self.name, self.bias, self.bias.wrapping_add(dynamic.p_vaddr))
    }

    /// Whether the object's ELF header (the start of its first file-backed segment) is loaded
    /// at `address`.
    fn is_at(&self, address: u64) -> bool {
        address != 0
            && self
                .headers
                .iter()
                .any(|h| h.p_type == libc::PT_LOAD && h.p_offset == 0 && self.bias.wrapping_add(h.p_vaddr) == address)
    }

    /// The object's code range (run-time addresses) and its framehop module, if it has
    /// an `.eh_frame_hdr` framehop can use.
    fn module(&self) -> Option<(Range<u64>, framehop::Module<Bytes>)> {
        let executable = self.headers.iter().filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_X != 0);
        let code_start = executable.clone().map(|h| h.p_vaddr).min()?;
        let code_end = executable.map(|h| h.p_vaddr + h.p_memsz).max()?;
        // framehop addresses code relative to the bias in 32 bits.
        u32::try_from(code_end).ok()?;
        let hdr = self.headers.iter().find(|h| h.p_type == libc::PT_GNU_EH_FRAME)?;
        let hdr_bytes = self.bytes(hdr.p_vaddr, hdr.p_memsz)?;
        let eh_frame_start = eh_frame_address(hdr_bytes, hdr.p_vaddr)?;
        // `.eh_frame` ends with a zero terminator somewhere before the end of the segment
        // holding it; lookups go through the header's table, so the exact end is not
        // needed.
        let segment = self
            .headers
            .iter()
            .find(|h| h.p_type == libc::PT_LOAD && (h.p_vaddr..h.p_vaddr + h.p_filesz).contains(&eh_frame_start))?;
        let eh_frame_len = segment.p_vaddr + segment.p_filesz - eh_frame_start;
        let eh_frame = self.bytes(eh_frame_start, eh_frame_len)?;
        let sections = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: Some(code_start..code_end),
            eh_frame_svma: Some(eh_frame_start..eh_frame_start + eh_frame_len),
            eh_frame: Some(eh_frame),
            eh_frame_hdr_svma: Some(hdr.p_vaddr..hdr.p_vaddr + hdr.p_memsz),
            eh_frame_hdr: Some(hdr_bytes),
            ..Default::default()
        };
        let code = self.bias + code_start..self.bias + code_end;
        let name = self.name.to_string_lossy().into_owned();
        Some((code.clone(), framehop::Module::new(name, code, self.bias, sections)))
    }

    /// The loaded bytes at link-time address `address`.
    fn bytes(&self, address: u64, len: u64) -> Option<Bytes> {
        let start = self.bias.checked_add(address)?;
        // SAFETY: a range inside one of the object's loaded segments, mapped for as long
        // as the object stays loaded (see `Bytes`).
        (start != 0 && len > 0).then(|| unsafe { std::slice::from_raw_parts(start as *const u8, len as usize) })
    }
}

/// `dlopen(name, RTLD_NOLOAD)`, kept only if it is the object that was listed with `bias`
/// and its dynamic section at `dynamic` (a name may be loaded twice, or the object may
/// have been unloaded and something else loaded since the list was read).
#[cfg(target_env = "gnu")]
fn pin_by_name(name: &CStr, bias: u64, dynamic: u64) -> Option<Pin> {
    // SAFETY: a valid C string; RTLD_NOLOAD never loads anything, it only counts one more
    // reference on an object already loaded.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return None;
    }
    let pin = Pin(handle);
    let mut map: *const u64 = std::ptr::null();
    // SAFETY: RTLD_DI_LINKMAP writes a `struct link_map *` to the pointer given. Its first
    // fields are `l_addr` (the load bias), `l_name` and `l_ld` (the dynamic section's
    // address), all pointer-sized (<link.h>); the object is pinned, so it stays readable.
    let same = unsafe {
        libc::dlinfo(handle, libc::RTLD_DI_LINKMAP, &mut map as *mut *const u64 as *mut libc::c_void) == 0
            && !map.is_null()
            && *map == bias
            && *map.add(2) == dynamic
    };
    same.then_some(pin)
}

#[cfg(not(target_env = "gnu"))]
fn pin_by_name(_: &CStr, _: u64, _: u64) -> Option<Pin> {
    None
}

/// The link-time address of `.eh_frame`, from the `.eh_frame_hdr` at `hdr_address`
/// (its `eh_frame_ptr`, in the pointer encodings linkers use for it).
fn eh_frame_address(hdr: &[u8], hdr_address: u64) -> Option<u64> {
    const OMIT: u8 = 0xff;
    let (&version, rest) = hdr.split_first()?;
    let &encoding = rest.first()?;
    if version != 1 || encoding == OMIT || hdr.len() < 12 {
        return None;
    }
    let field = &hdr[4..];
    let value = match encoding & 0x0f {
        0x03 => u64::from(u32::from_le_bytes(field[..4].try_into().ok()?)),
        0x0b => i64::from(i32::from_le_bytes(field[..4].try_into().ok()?)) as u64,
        0x04 | 0x0c if field.len() >= 8 => u64::from_le_bytes(field[..8].try_into().ok()?),
        _ => return None,
    };
    match encoding & 0x70 {
        0x00 => Some(value),                                 // absolute
        0x10 => Some((hdr_address + 4).wrapping_add(value)), // relative to the field
        0x30 => Some(hdr_address.wrapping_add(value)),       // relative to the header
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicUsize, Ordering};

    use super::*;

    /// `fast` and `slow` are the same stack from the first frame `fast` shares with `slow`
    /// (each starts inside its own walker), found within `fast`'s first `fast_leaf` frames.
    fn assert_same_stack(fast: &[usize], slow: &[usize], fast_leaf: usize, what: &str) -> usize {
        let from = fast.iter().position(|ip| slow.contains(ip)).unwrap_or_else(|| panic!("a common frame: {what}"));
        let slow_from = slow.iter().position(|ip| *ip == fast[from]).unwrap();
        assert!(from <= fast_leaf && slow_from <= 8, "common part starts late: {from} / {slow_from} ({what})");
        assert_eq!(&fast[from..], &slow[slow_from..], "{what}");
        fast.len() - from
    }

    #[inline(never)]
    fn nest(levels: usize, check: &mut dyn FnMut()) {
        if levels == 0 {
            check();
        } else {
            nest(std::hint::black_box(levels - 1), check);
        }
        std::hint::black_box(());
    }

    /// The caching walk and libgcc's agree on every frame above the walkers' own.
    fn compare_walks_at_depth(levels: usize) {
        let walker = Walker::new(1);
        let mut cache = new_caches();
        let bounds = ask_stack_bounds().expect("this thread's stack bounds");
        nest(levels, &mut || {
            for round in 0..3 {
                // Round 0 fills the rule cache, the others hit it.
                let mut fast_ips = [0usize; 128];
                let fast_depth = walker.walk_here_with(&mut cache, bounds, &mut fast_ips).expect("the walk finishes");
                let mut slow_ips = [0usize; 128];
                let slow_depth = crate::stack_walk::libgcc_walk(&mut slow_ips);
                let what = format!("round {round}, {levels} levels");
                let common = assert_same_stack(&fast_ips[..fast_depth], &slow_ips[..slow_depth], 3, &what);
                assert!(common > levels, "the nesting is in the stack");
            }
        });
    }

    #[test]
    fn the_caching_walk_matches_libgcc_on_this_thread_and_a_spawned_one() {
        compare_walks_at_depth(5);
        compare_walks_at_depth(40);
        std::thread::spawn(|| compare_walks_at_depth(12)).join().unwrap();
    }

    #[test]
    fn a_walk_that_leaves_the_stack_bounds_is_refused() {
        let walker = Walker::new(1);
        let mut cache = new_caches();
        let mut ips = [0usize; 64];
        // A "top" just above the current frame: reading the callers' frames is out of bounds.
        let here = &ips as *const _ as usize;
        assert_eq!(walker.walk_here_with(&mut cache, (here - 4096, here + 64), &mut ips), None);
        // A stack pointer below the thread's stack: another stack, not walked.
        assert_eq!(walker.walk_here_with(&mut cache, (here + 4096, here + 8192), &mut ips), None);
    }

    #[test]
    fn a_walker_with_every_cache_claimed_refuses_rather_than_waits() {
        let walker = Walker::new(2);
        let first = walker.claim_slot(0).expect("a free slot");
        let second = walker.claim_slot(0).expect("the other slot");
        let mut ips = [0usize; 16];
        assert_eq!(walker.walk_here(0, &mut ips), None);
        first.claimed.store(false, Ordering::Release);
        assert!(walker.walk_here(0, &mut ips).is_some());
        second.claimed.store(false, Ordering::Release);
    }

    #[test]
    fn process_vm_readv_reads_this_process_and_refuses_unmapped_addresses() {
        let word = std::hint::black_box(0x1234_5678_9abc_def0u64);
        // SAFETY: no preconditions.
        let pid = unsafe { libc::getpid() };
        assert_eq!(checked_read_word(pid, &word as *const u64 as u64), Ok(0x1234_5678_9abc_def0));
        assert_eq!(checked_read_word(pid, 8), Err(libc::EFAULT));
    }

    // The handler walk: a real signal, its ucontext_t, the walker published for the handler.
    static HANDLER_WALKER: AtomicPtr<Walker> = AtomicPtr::new(std::ptr::null_mut());
    static HANDLER_IPS: [AtomicUsize; 128] = [const { AtomicUsize::new(0) }; 128];
    static HANDLER_DEPTH: AtomicUsize = AtomicUsize::new(0);
    static HANDLER_STOPPED: AtomicI32 = AtomicI32::new(-1);

    extern "C" fn walk_in_handler(_: i32, _: *mut libc::siginfo_t, context: *mut c_void) {
        // SAFETY: published below for the length of the signal's delivery.
        let walker = unsafe { &*HANDLER_WALKER.load(Ordering::Acquire) };
        let mut ips = [0usize; 128];
        // SAFETY: the kernel's context, on the interrupted thread.
        let walked = unsafe { walker.walk_interrupted(context, None, 0, &mut ips) };
        for (slot, ip) in HANDLER_IPS.iter().zip(&ips[..walked.depth]) {
            slot.store(*ip, Ordering::Relaxed);
        }
        HANDLER_DEPTH.store(walked.depth, Ordering::Relaxed);
        HANDLER_STOPPED.store(walked.stopped.map_or(0, |e| i32::from(e.code())), Ordering::Release);
    }

    /// Signals this thread and returns what the handler walked, and libgcc's walk from here.
    #[inline(never)]
    fn interrupt_this_thread(signal: i32) -> (Vec<usize>, Option<WalkError>, Vec<usize>) {
        HANDLER_STOPPED.store(-1, Ordering::Relaxed);
        // SAFETY: signals this very thread; the handler is installed.
        unsafe { libc::pthread_kill(libc::pthread_self(), signal) };
        let mut slow = [0usize; 128];
        let slow_depth = crate::stack_walk::libgcc_walk(&mut slow);
        let stopped = HANDLER_STOPPED.load(Ordering::Acquire);
        assert!(stopped >= 0, "the handler ran");
        let depth = HANDLER_DEPTH.load(Ordering::Relaxed);
        let ips = HANDLER_IPS[..depth].iter().map(|ip| ip.load(Ordering::Relaxed)).collect();
        (ips, WalkError::from_code(stopped as u8), slow[..slow_depth].to_vec())
    }

    #[test]
    fn a_signal_handler_walks_the_interrupted_stack_with_and_without_known_bounds() {
        let signal = libc::SIGRTMIN() + 7;
        let walker = Walker::new(1);
        HANDLER_WALKER.store(&walker as *const Walker as *mut Walker, Ordering::Release);
        // SAFETY: an SA_SIGINFO handler for a signal nothing else in the tests uses; put back
        // to the default afterwards.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = walk_in_handler as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
        }
        let check = |levels: usize, what: &str| {
            nest(levels, &mut || {
                let (fast, stopped, slow) = interrupt_this_thread(signal);
                assert_eq!(stopped, None, "{what}: {fast:x?}");
                // The walk starts in libc's pthread_kill, below `interrupt_this_thread`: the
                // common part with libgcc's walk from inside it starts at its caller.
                let common = assert_same_stack(&fast, &slow, 8, what);
                assert!(common > levels, "{what}: the nesting is in the stack");
            })
        };
        // A new thread's bounds are unknown (no hook in this test): process_vm_readv.
        std::thread::scope(|s| s.spawn(|| check(6, "bounds unknown")).join().unwrap());
        // Noted bounds: direct reads.
        std::thread::scope(|s| {
            s.spawn(|| {
                note_this_thread_stack();
                assert!(cached_bounds().is_some());
                check(9, "bounds noted");
            })
            .join()
            .unwrap()
        });
        // SAFETY: back to the default action.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
        HANDLER_WALKER.store(std::ptr::null_mut(), Ordering::Release);
    }
}
