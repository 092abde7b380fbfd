//! The one stack walker for places that must not block: inside the global allocator (memory's
//! sampled stacks) and inside a signal handler (the all-threads dump).
//!
//! libgcc's unwinder (what `backtrace::trace*` calls) finds each frame's object through the
//! loader (`_dl_find_object` on glibc ≥ 2.35, `dl_iterate_phdr` and the loader's lock before
//! that), may reach malloc on older glibc, and interprets each frame's DWARF CFI afresh
//! (~20,000 instructions per walk). A thread interrupted while it holds the loader's lock or
//! malloc's would deadlock a walk done in its signal handler, and in the allocator that cost is
//! paid per sample. [`Walker`] is built beforehand on an ordinary thread (the control thread)
//! and then walks without any of that:
//!
//! - **Objects registered up front**: the objects loaded when the walker is built, from
//!   `dl_iterate_phdr` (their `.eh_frame_hdr` and `.eh_frame`, read in place in memory, no
//!   file opened), each pinned with `dlopen(RTLD_NOLOAD)` so it stays mapped until the walker
//!   is dropped (see the x86_64 module for the details and the loader-lock ordering). A walk
//!   that meets a return address outside them (code `dlopen`ed since, JIT code) stops and says
//!   so ([`WalkError::OutsideKnownCode`]).
//! - **No allocation while walking**: framehop with `MustNotAllocateDuringUnwind` (gimli's
//!   evaluation state in fixed arrays inside the caches); everything that allocates happens in
//!   [`Walker::new`].
//! - **No lock a thread can wait on**: framehop needs a mutable rule cache per walk. A walker
//!   has a fixed set of cache slots, each claimed with one compare-and-swap and released after
//!   the walk; a walk that finds every slot claimed does not wait, it fails with
//!   [`WalkError::AllCachesBusy`]. A thread preempted, stopped or interrupted while it holds a
//!   slot delays nobody.
//! - **Reads stay on the walked thread's stack**: a rule from bad or missing CFI could point
//!   anywhere, so every read is checked before it is made: either it lies between the walk's
//!   starting stack pointer and the top of the thread's stack (known bounds, see below), or it
//!   is made with `process_vm_readv` on this very process, which returns an error for an
//!   unmapped address instead of faulting. Anything else ends the walk.
//! - **Bounded**: at most `ips.len()` frames, and framehop stops a walk whose stack pointer does
//!   not move up.
//!
//! **Stack bounds.** `pthread_getattr_np` is not async-signal-safe (it allocates, and for the
//! main thread reads `/proc/self/maps`), so a signal handler never asks for them. Each thread's
//! bounds are cached in a const-initialised thread-local without destructor (two words, written
//! low then top, so a handler that interrupts the write sees "unknown", never half of it):
//!
//! - [`note_this_thread_stack`] fills it on an ordinary thread: the `pthread_create` hook calls
//!   it at the start of every thread it sees, before the thread's own code runs;
//! - an allocator walk ([`Walker::walk_here`]) asks `pthread_getattr_np` itself on the thread's
//!   first walk (libc's malloc, never this process's global allocator, serves what it needs);
//! - a handler walk ([`Walker::walk_interrupted`]) only reads the cache; for the main thread its
//!   caller may pass bounds it found outside the handler (the `[stack]` mapping); a thread with
//!   neither is read through `process_vm_readv`, where a read can fail but not fault.
//!
//! Where libgcc's unwinder is still used (never in a signal handler): the memory sampler's
//! fallback in the allocator (a walk this walker could not finish: code loaded after the start,
//! all cache slots busy, unknown bounds), the `pthread_create` hook, the lock profiles' slow
//! paths and the dumping thread's own stack — ordinary thread contexts where the loader's lock
//! can be waited for.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod framehop_x86_64;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub use framehop_x86_64::Walker;

/// Why a walk stopped before the end of the stack (or did not start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WalkError {
    /// A frame's code is outside the objects registered when the walker was built.
    OutsideKnownCode = 1,
    /// A frame's unwind rule points outside the thread's stack.
    ReadOutsideStack = 2,
    /// The unwind information of a frame could not be used (missing or inconsistent).
    UnwindFailed = 3,
    /// Every cache slot of the walker was in use by other walks.
    AllCachesBusy = 4,
    /// The thread's stack bounds are unknown and `process_vm_readv` on this process is refused
    /// (a seccomp filter, say).
    StackUnreadable = 5,
    /// The walk's stack pointer is outside the thread's known stack (an alternate signal stack
    /// or a coroutine's).
    OnAnotherStack = 6,
    /// This platform has no lock-free walker (only x86_64 Linux has).
    Unsupported = 7,
}

impl WalkError {
    /// The error with this [`WalkError::code`], if any.
    pub fn from_code(code: u8) -> Option<WalkError> {
        use WalkError::*;
        [OutsideKnownCode, ReadOutsideStack, UnwindFailed, AllCachesBusy, StackUnreadable, OnAnotherStack, Unsupported]
            .into_iter()
            .find(|e| e.code() == code)
    }

    /// A small non-zero number for this error, for storing in an atomic from a signal handler.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// What happened, for a person reading a dump.
    pub fn describe(self) -> &'static str {
        match self {
            WalkError::OutsideKnownCode => "a frame is in code loaded after the walk was prepared (dlopen, JIT)",
            WalkError::ReadOutsideStack => "a frame's unwind rule points outside the thread's stack",
            WalkError::UnwindFailed => "a frame's unwind information is missing or inconsistent",
            WalkError::AllCachesBusy => "every walker cache was in use by other threads' walks",
            WalkError::StackUnreadable => {
                "its stack bounds are unknown and process_vm_readv on this process is refused"
            }
            WalkError::OnAnotherStack => "it runs on a stack other than its thread stack (alternate or coroutine)",
            WalkError::Unsupported => "onsite walks stacks in signal handlers only on x86_64 Linux",
        }
    }
}

impl std::fmt::Display for WalkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// The result of a walk: how many frames were written (leaf first), and why it stopped early,
/// if it did (the frames written are still right).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walked {
    /// Frames written to the buffer.
    pub depth: usize,
    /// `None` when the walk reached the end of the stack or filled the buffer.
    pub stopped: Option<WalkError>,
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod unsupported {
    use super::{WalkError, Walked};

    /// Elsewhere than x86_64 Linux there is no lock-free walker: every walk fails with
    /// [`WalkError::Unsupported`] (callers in ordinary contexts use libgcc's instead).
    #[derive(Debug)]
    pub struct Walker(());

    impl Walker {
        /// A walker that cannot walk.
        pub fn new(_cache_slots: usize) -> Walker {
            Walker(())
        }

        /// Always `None`.
        #[inline(always)]
        pub fn walk_here(&self, _preferred_slot: usize, _ips: &mut [usize]) -> Option<usize> {
            None
        }

        /// Always [`WalkError::Unsupported`].
        ///
        /// # Safety
        /// As on x86_64 Linux.
        pub unsafe fn walk_interrupted(
            &self,
            _context: *const std::ffi::c_void,
            _main_stack: Option<(usize, usize)>,
            _preferred_slot: usize,
            _ips: &mut [usize],
        ) -> Walked {
            Walked { depth: 0, stopped: Some(WalkError::Unsupported) }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub use unsupported::Walker;

/// The fallback walk, for ordinary threads only: libgcc's DWARF unwinder (through the
/// `backtrace` crate, without its global lock) over the calling thread's own stack, into `ips`
/// leaf first; returns how many frames it wrote. Never call it from a signal handler: libgcc
/// may take the loader's lock and, on older glibc, allocate (that is what [`Walker`] is for).
/// It allocates nothing itself, and its own frame is `onsite_core::stack_walk::libgcc_walk`.
#[inline(never)]
pub fn libgcc_walk(ips: &mut [usize]) -> usize {
    let mut depth = 0;
    // SAFETY: `trace_unsynchronized` is unsafe only because it skips the crate's global lock
    // (which serialises dbghelp on Windows); on Linux it walks with the system unwinder, which
    // is thread-safe, and the closure only writes into `ips`.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            // The walk ends on a null return address at the thread's outermost frame.
            if frame.ip().is_null() || depth == ips.len() {
                return false;
            }
            ips[depth] = frame.ip() as usize;
            depth += 1;
            depth < ips.len()
        });
    }
    depth
}

/// Caches the calling thread's stack bounds for later walks of it, signal handlers' included.
/// Call on an ordinary thread (it asks `pthread_getattr_np`), not in a signal handler.
pub fn note_this_thread_stack() {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    framehop_x86_64::note_this_thread_stack();
}

/// The `[stack]` mapping of `/proc/self/maps` (the main thread's stack: `(low, top)`), read on
/// an ordinary thread. Between its low end as read and its top, the stack is mapped for as long
/// as the process lives (it only grows down); a walk starting below that low end is refused by
/// the bounds check.
pub fn main_thread_stack() -> Option<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|line| line.ends_with("[stack]"))?;
    let (low, high) = line.split_whitespace().next()?.split_once('-')?;
    Some((usize::from_str_radix(low, 16).ok()?, usize::from_str_radix(high, 16).ok()?))
}
