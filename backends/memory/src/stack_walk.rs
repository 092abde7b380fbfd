//! Stack walks for sampled allocations, from inside the global allocator.
//!
//! libgcc's unwinder (what `backtrace::trace_unsynchronized` calls) finds and interprets the
//! DWARF CFI of every frame afresh: ~20,000 instructions (2.5–3 µs) per walk, which at tens of
//! thousands of samples per second per thread is most of a sampled capture's cost. On x86_64
//! Linux a sampled capture instead walks with `framehop`, which turns each frame's CFI into a
//! small rule once and caches it by return address, so the repeated stacks a service allocates
//! from cost a cache hit and a stack read per frame. libgcc stays the fallback for any walk
//! framehop cannot finish cleanly.
//!
//! Why this is safe inside the allocator:
//!
//! - **No allocation while walking**: framehop runs with `MustNotAllocateDuringUnwind` (gimli's
//!   evaluation state in fixed arrays inside the cache); everything that allocates (the module
//!   list, the caches) is built by [`install`] at capture start, on the control thread, before
//!   the allocator starts sampling. (A stray allocation would still not recurse: the sampler's
//!   per-thread `busy` flag is set for the whole walk.)
//! - **Modules are registered at start**, from `dl_iterate_phdr`: each loaded object's
//!   `PT_GNU_EH_FRAME` (`.eh_frame_hdr`) and the `.eh_frame` it points to, read in place in
//!   memory (no files opened, so a binary replaced on disk by a deployment does not matter).
//!   A walk that meets a return address outside the registered modules (code `dlopen`ed after
//!   start, JIT code) stops and the sample is walked by libgcc instead.
//! - **Registered objects stay loaded until the walker is gone**: each is pinned with
//!   `dlopen(RTLD_NOLOAD)` (one more reference on the object already there, checked to be the
//!   same object by its load address and dynamic section) and released with `dlclose` by
//!   [`uninstall`], which the capture's stop calls only after the file is written, so the
//!   frames are also symbolised while their objects are loaded. A `dlclose` by the service
//!   during the capture then only drops its own reference, so the `.eh_frame` bytes a walk
//!   reads are never unmapped under it, and a walk needs no loader call (an earlier version
//!   asked `dl_iterate_phdr` for the unload count on every walk: the loader's lock, shared by
//!   all sampling threads, cost more than the walk). The pins are taken after
//!   `dl_iterate_phdr` returns, never inside its callback: it holds the loader's list lock,
//!   and `dlopen`/`dlclose` take the loader's main lock, which a `dlopen` elsewhere holds
//!   while it waits for the list lock (taking them in that order deadlocked a capture start
//!   against a service loading a library). The program itself cannot be unloaded and is not
//!   pinned; an object that cannot be pinned is not registered (its frames go to libgcc).
//!   The price, for the length of a capture: a library the service unloads stays mapped
//!   until the capture ends (its destructors then run on onsite's control thread), and
//!   loading it again by the same path meanwhile gets the still-loaded copy back.
//! - **Reads stay on this thread's stack**: a rule derived from bad or missing CFI could point
//!   anywhere, so the walk reads only words between its own stack pointer and the top of the
//!   thread's stack (from `pthread_getattr_np`, once per thread, cached in a const-initialised
//!   thread-local without destructor); any other read ends the walk (libgcc takes over).
//! - **No lock a thread can wait on**: framehop needs a mutable cache per walk. There is a
//!   fixed set of [`CACHE_SLOTS`] caches, each claimed with one compare-and-swap and released
//!   after the walk. A thread never waits for a slot: it tries its preferred one, then the
//!   others, and if all are claimed it walks with libgcc. So a thread that is preempted, stopped
//!   by a debugger or interrupted by a signal while holding a slot delays nobody, and a signal
//!   handler that allocates on the same thread (not async-signal-safe anyway) cannot deadlock
//!   on it (and is not sampled: `busy`). A global `Mutex` would make every sampling thread wait
//!   behind a holder that may be descheduled for a whole time slice.
//! - **Bounded**: at most `ips.len()` frames (and framehop stops a walk whose stack pointer
//!   does not move up), so a walk cannot loop.
//! - **Lifetime**: the walker is published in [`WALKER`] before the mode turns to sampled and
//!   is only used inside the sampler's counted (`in_flight`) section; [`uninstall`] runs after
//!   the stop has waited for those to finish.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) use fast::{install, uninstall};

use std::sync::atomic::{AtomicU64, Ordering};

/// Walks done by libgcc since the capture started. (The caching walks are not counted: a
/// counter every sampling thread writes would bounce between the cores at every sample.)
static FALLBACK_WALKS: AtomicU64 = AtomicU64::new(0);

/// How many of this capture's stacks were walked by libgcc so far.
pub(crate) fn fallback_walks() -> u64 {
    FALLBACK_WALKS.load(Ordering::Relaxed)
}

fn reset_counts() {
    FALLBACK_WALKS.store(0, Ordering::Relaxed);
}

/// Fills `ips` with this thread's stack, leaf first (the walker's own frames included; the
/// writer drops them), and returns how many frames it wrote. Only called from the sampler's
/// counted section (see the module docs).
///
/// Inlined (with the walk) into the sampler's out-of-line paths: every frame of onsite's own
/// between the walk and the service's code is one more frame to unwind per sample.
#[inline(always)]
pub(crate) fn capture(ips: &mut [usize]) -> usize {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if let Some(depth) = fast::walk(ips) {
        return depth;
    }
    FALLBACK_WALKS.fetch_add(1, Ordering::Relaxed);
    libgcc_walk(ips)
}

/// The fallback: libgcc's DWARF unwinder through `backtrace`.
#[inline(never)]
fn libgcc_walk(ips: &mut [usize]) -> usize {
    let mut depth = 0;
    // SAFETY: `trace_unsynchronized` is unsafe only because it does not take backtrace's
    // global lock; it walks this thread's own stack, and the closure neither allocates nor
    // unwinds.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            if frame.ip().is_null() || depth == ips.len() {
                return false; // the end of the stack, or of the buffer
            }
            ips[depth] = frame.ip() as usize;
            depth += 1;
            depth < ips.len()
        });
    }
    depth
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub(crate) fn install() {
    reset_counts();
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub(crate) fn uninstall() {}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod fast {
    use std::cell::{Cell, UnsafeCell};
    use std::ffi::{CStr, CString};
    use std::ops::Range;
    use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

    use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
    use framehop::{ExplicitModuleSectionInfo, FrameAddress, MustNotAllocateDuringUnwind, Unwinder};

    /// framehop caches that walks can claim at once; more threads sampling at the same instant
    /// walk with libgcc.
    pub(super) const CACHE_SLOTS: usize = 8;

    /// Section bytes of a loaded object, read in place. Valid while the object stays loaded;
    /// see the module docs for why no walk uses them after it was unloaded.
    type Bytes = &'static [u8];
    type Policy = MustNotAllocateDuringUnwind;

    /// The running capture's walker, or null. See the module docs for its lifetime.
    static WALKER: AtomicPtr<Walker> = AtomicPtr::new(std::ptr::null_mut());

    pub(super) struct Walker {
        unwinder: UnwinderX86_64<Bytes, Policy>,
        /// The registered modules' code, sorted by start: return addresses must fall in here.
        code: Vec<Range<u64>>,
        slots: Box<[CacheSlot]>,
        /// The registered objects, kept loaded; declared last so they are released after
        /// everything that points into them.
        _pins: Vec<Pin>,
    }

    /// One reference on a loaded object, which keeps it loaded until dropped (see the module
    /// docs). Null for objects that never unload.
    struct Pin(*mut libc::c_void);

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

    /// framehop's rule cache is direct-mapped: 509 entries indexed by `address % 509`. Two
    /// return addresses of one stack that share an index evict each other at every walk, and
    /// each eviction costs a CFI lookup and evaluation (thousands of instructions), so with one
    /// cache a walk costs 3,000 or 11,000 instructions depending only on where the loader
    /// happened to put the code. Each frame therefore picks one of `WAYS` caches by another
    /// part of its address, which makes those collisions `WAYS` times rarer (and the cache
    /// `WAYS` times larger for services with many stacks).
    const WAYS: usize = 4;
    const RULE_CACHE_ENTRIES: u64 = 509;

    /// A walker's caches, claimed as a whole by one walk at a time.
    type Caches = [CacheX86_64<Policy>; WAYS];

    /// The cache for the frame whose lookup address is `address`.
    fn way(address: u64) -> usize {
        ((address / RULE_CACHE_ENTRIES) % WAYS as u64) as usize
    }

    struct CacheSlot {
        claimed: AtomicBool,
        caches: UnsafeCell<Caches>,
    }

    // SAFETY: `caches` are only touched by the thread that claimed the slot (`claimed` swapped
    // from false to true with Acquire, released with Release), so never by two at once.
    unsafe impl Sync for CacheSlot {}

    thread_local! {
        /// The top (highest address, exclusive) of this thread's stack; 0 = not asked yet,
        /// 1 = unknown (walks on this thread go to libgcc).
        static STACK_TOP: Cell<usize> = const { Cell::new(0) };
    }

    /// Builds the walker for a capture and publishes it. Called on the control thread before
    /// the allocator starts sampling (it allocates).
    pub(crate) fn install() {
        super::reset_counts();
        let walker = Box::new(Walker::new());
        tracing::debug!(modules = walker.code.len(), "onsite: memory stack walker registered the loaded objects");
        let old = WALKER.swap(Box::into_raw(walker), Ordering::AcqRel);
        if !old.is_null() {
            // SAFETY: came from `Box::into_raw` below/above; no capture runs, so nobody uses it.
            drop(unsafe { Box::from_raw(old) });
        }
    }

    /// Takes the walker down. Called after the stop waited for every sample in progress.
    pub(crate) fn uninstall() {
        let old = WALKER.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !old.is_null() {
            // SAFETY: came from `Box::into_raw` in `install`; the stop has waited for every
            // counted call, and only those use the walker.
            drop(unsafe { Box::from_raw(old) });
        }
    }

    /// The caching walk of this thread's stack into `ips`, or `None` if it could not be
    /// finished cleanly (the caller walks with libgcc then).
    #[inline(always)]
    pub(super) fn walk(ips: &mut [usize]) -> Option<usize> {
        let walker = WALKER.load(Ordering::Acquire);
        if walker.is_null() {
            return None;
        }
        // SAFETY: published by `install`, freed by `uninstall` only after every counted call
        // (this one included: see `capture`) has finished.
        let walker = unsafe { &*walker };
        let top = stack_top()?;
        let slot = walker.claim_slot()?;
        // SAFETY: this thread claimed the slot.
        let caches = unsafe { &mut *slot.caches.get() };
        let depth = walker.walk(caches, top, ips);
        slot.claimed.store(false, Ordering::Release);
        depth
    }

    impl Walker {
        pub(super) fn new() -> Walker {
            let mut unwinder = UnwinderX86_64::new();
            let mut code = Vec::new();
            let mut pins = Vec::new();
            // Pinned only after the loader's list was read: `dl_iterate_phdr` holds the
            // loader's list lock while it calls back, and `dlopen`/`dlclose` take the loader's
            // main lock, which a `dlopen` elsewhere holds while it waits for the list lock.
            for object in loaded_objects() {
                let Some(pin) = object.pin() else { continue };
                // Read only now that the object is pinned: its sections stay mapped.
                if let Some((range, module)) = object.module() {
                    pins.push(pin);
                    code.push(range);
                    unwinder.add_module(module);
                }
            }
            code.sort_by_key(|range| range.start);
            let slots = (0..CACHE_SLOTS)
                .map(|_| CacheSlot { claimed: AtomicBool::new(false), caches: UnsafeCell::new(new_caches()) })
                .collect();
            Walker { unwinder, code, slots, _pins: pins }
        }

        fn knows(&self, address: u64) -> bool {
            let after = self.code.partition_point(|range| range.start <= address);
            after > 0 && self.code[after - 1].contains(&address)
        }

        /// A free cache slot, trying this thread's preferred one first; never waits.
        fn claim_slot(&self) -> Option<&CacheSlot> {
            // Threads numbered in turn prefer different slots, so each mostly finds its own
            // cache, warm with its own stacks.
            let preferred = crate::in_flight::thread_number();
            (0..self.slots.len())
                .map(|i| &self.slots[(preferred + i) % self.slots.len()])
                .find(|slot| slot.claimed.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok())
        }

        /// Walks from this function's own frame. `None` when a frame is outside the
        /// registered code, a read falls outside `[stack pointer, top)`, or framehop gives up
        /// before the end of the stack.
        #[inline(always)]
        pub(super) fn walk(&self, caches: &mut Caches, top: usize, ips: &mut [usize]) -> Option<usize> {
            let (pc, sp, bp) = registers();
            let top = top as u64;
            if sp >= top {
                return None; // on another stack (a signal's alternate stack)
            }
            let mut read_stack = |address: u64| {
                if address >= sp && address.checked_add(8).is_some_and(|end| end <= top) {
                    Ok(read_word(address))
                } else {
                    Err(())
                }
            };
            // framehop's `UnwindIterator`, with a cache chosen per frame (see `WAYS`).
            let mut regs = UnwindRegsX86_64::new(pc, sp, bp);
            let mut frame = FrameAddress::from_instruction_pointer(pc);
            let mut depth = 0;
            while depth < ips.len() {
                let lookup = frame.address_for_lookup();
                // Checked before framehop unwinds this frame: an unknown address would get its
                // frame-pointer guess.
                if !self.knows(lookup) {
                    return None;
                }
                ips[depth] = frame.address() as usize;
                depth += 1;
                if depth == ips.len() {
                    break;
                }
                match self.unwinder.unwind_frame(frame, &mut regs, &mut caches[way(lookup)], &mut read_stack) {
                    Ok(Some(return_address)) => frame = FrameAddress::from_return_address(return_address)?,
                    Ok(None) => break, // the outermost frame says it is the end
                    Err(_) => return None,
                }
            }
            Some(depth)
        }
    }

    pub(super) fn new_caches() -> Caches {
        std::array::from_fn(|_| CacheX86_64::new_in())
    }

    /// This point's instruction pointer, stack pointer and frame pointer, read together so
    /// they describe one instant (the caller's CFI at `pc` applies to `sp`).
    #[inline(always)]
    fn registers() -> (u64, u64, u64) {
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
    }

    /// One word of this thread's stack. Read with an instruction rather than a Rust load: the
    /// word may belong to any frame (padding included), which Rust's memory model does not
    /// let a pointer read.
    #[inline(always)]
    fn read_word(address: u64) -> u64 {
        let word: u64;
        // SAFETY: the caller checked that `address..address + 8` lies in this thread's stack,
        // between the current stack pointer and the stack's top, which is mapped.
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

    /// The top of this thread's stack, asked once per thread.
    fn stack_top() -> Option<usize> {
        let top = STACK_TOP.with(|cached| {
            if cached.get() == 0 {
                cached.set(ask_stack_top().unwrap_or(1));
            }
            cached.get()
        });
        (top > 1).then_some(top)
    }

    /// `pthread_getattr_np` (for the main thread glibc reads `/proc/self/maps`; any memory it
    /// needs comes from libc's malloc, not from this allocator).
    pub(super) fn ask_stack_top() -> Option<usize> {
        // SAFETY: a zeroed attr is what `pthread_getattr_np` initialises; it is destroyed
        // after use; the out-pointers are valid.
        unsafe {
            let mut attr: libc::pthread_attr_t = std::mem::zeroed();
            if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
                return None;
            }
            let mut low: *mut libc::c_void = std::ptr::null_mut();
            let mut size: libc::size_t = 0;
            let rc = libc::pthread_attr_getstack(&attr, &mut low, &mut size);
            libc::pthread_attr_destroy(&mut attr);
            (rc == 0 && !low.is_null()).then(|| low as usize + size)
        }
    }

    /// One loaded object as `dl_iterate_phdr` showed it, copied out of the callback.
    struct LoadedObject {
        name: CString,
        bias: u64,
        headers: Vec<libc::Elf64_Phdr>,
    }

    /// The objects loaded now. Nothing but copying happens inside the loader's callback.
    fn loaded_objects() -> Vec<LoadedObject> {
        unsafe extern "C" fn each(info: *mut libc::dl_phdr_info, size: libc::size_t, data: *mut libc::c_void) -> i32 {
            if size < std::mem::size_of::<libc::dl_phdr_info>() {
                return 0;
            }
            // SAFETY: the loader passes a valid `info`; `data` is the `Vec` below.
            unsafe {
                let info = &*info;
                let objects = &mut *(data as *mut Vec<LoadedObject>);
                let headers = if info.dlpi_phdr.is_null() {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)).to_vec()
                };
                let name = if info.dlpi_name.is_null() { c"" } else { CStr::from_ptr(info.dlpi_name) };
                objects.push(LoadedObject { name: name.to_owned(), bias: info.dlpi_addr, headers });
            }
            0
        }
        let mut objects: Vec<LoadedObject> = Vec::new();
        // SAFETY: the callback matches the signature and only pushes onto `objects`.
        unsafe { libc::dl_iterate_phdr(Some(each), &mut objects as *mut Vec<LoadedObject> as *mut libc::c_void) };
        objects
    }

    impl LoadedObject {
        /// Keeps this object loaded until the pin is dropped; `None` if that cannot be done
        /// for this very object.
        fn pin(&self) -> Option<Pin> {
            if self.name.is_empty() || cfg!(target_env = "musl") {
                // The program itself (listed first, without a name), and anything on musl,
                // whose `dlclose` never unloads.
                return Some(Pin(std::ptr::null_mut()));
            }
            let dynamic = self.headers.iter().find(|h| h.p_type == libc::PT_DYNAMIC)?;
            pin_by_name(&self.name, self.bias, self.bias.wrapping_add(dynamic.p_vaddr))
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
}

#[cfg(all(test, target_arch = "x86_64", target_os = "linux"))]
mod tests {
    use super::*;

    /// The caching walk and libgcc's agree on every frame above the walkers' own.
    fn compare_walks_at_depth(levels: usize) {
        #[inline(never)]
        fn nest(levels: usize, check: &mut dyn FnMut()) {
            if levels == 0 {
                check();
            } else {
                nest(std::hint::black_box(levels - 1), check);
            }
            std::hint::black_box(());
        }
        let walker = fast::Walker::new();
        let mut cache = fast::new_caches();
        let top = fast::ask_stack_top().expect("this thread's stack top");
        nest(levels, &mut || {
            for round in 0..3 {
                // Round 0 fills the rule cache, the others hit it.
                let mut fast_ips = [0usize; 128];
                let fast_depth = walker.walk(&mut cache, top, &mut fast_ips).expect("the caching walk finishes");
                let mut slow_ips = [0usize; 128];
                let slow_depth = libgcc_walk(&mut slow_ips);
                let fast = &fast_ips[..fast_depth];
                let slow = &slow_ips[..slow_depth];
                // Both start inside their own walker; from the closure's return address on
                // they must be the same stack.
                let from = fast.iter().position(|ip| slow.contains(ip)).expect("a common frame");
                let slow_from = slow.iter().position(|ip| *ip == fast[from]).unwrap();
                assert!(from <= 3 && slow_from <= 6, "common part starts late: {from} / {slow_from}");
                assert_eq!(&fast[from..], &slow[slow_from..], "round {round}, {levels} levels");
                assert!(fast.len() - from > levels, "the nesting is in the stack");
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
        let walker = fast::Walker::new();
        let mut cache = fast::new_caches();
        let mut ips = [0usize; 64];
        // A "top" just above the current frame: reading the callers' frames is out of bounds.
        let here = &ips as *const _ as usize;
        assert_eq!(walker.walk(&mut cache, here + 64, &mut ips), None);
    }
}
