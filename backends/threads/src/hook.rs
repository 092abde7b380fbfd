//! The `pthread_create` hook: records every thread's creating stack in fixed-size, lock-free
//! tables, and which live thread came from which stack.
//!
//! Everything here runs inside other people's `pthread_create` calls, so it allocates nothing
//! on the creating side, takes no lock, and never fails the creation: when a table is full the
//! thread is still created, only counted as "stack unknown".
//!
//! The creating stack is walked with libgcc's unwinder (through `backtrace`): the hook runs on
//! an ordinary thread inside `pthread_create` (which takes libc's own locks anyway), never in a
//! signal handler or the allocator, and it runs whether or not a capture does, so it cannot
//! borrow a capture's walker (onsite-core's lock-free one pins every loaded object for its
//! life, which the hook's would be the process's).
//!
//! **Room for each capture**: [`compact`], at the start of each threadcreate capture, empties
//! every stack no live or starting thread came from, so a capture starts with room whatever
//! earlier ones saw, and "alive at the stop" still names the stack of every thread created
//! before. Creations mark their time inside the table ([`INTERNING`]); the compaction sets
//! [`COMPACTING`] (creations that start then skip the table: counted, stack unknown), waits
//! until none is inside, and keeps the stacks that a pending slot or a live entry points to.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use onsite_core::StackTable;

/// Frames kept per creating stack (including a few of the hook's own, dropped when written).
pub(crate) const MAX_DEPTH: usize = 64;
/// Distinct creating stacks remembered at once (see [`compact`]).
pub(crate) const STACKS: usize = 1024;
/// Threads being started at the same moment (created, not yet running their first line).
const PENDING: usize = 256;
/// Live threads whose creating stack is known.
const LIVE: usize = 8192;

/// The stack index of a thread whose creating stack did not fit in the table.
pub(crate) const NO_STACK: u32 = u32::MAX;

type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;
/// The same routine called as one that may unwind: `pthread_exit` and cancellation unwind
/// (forced) through the trampoline, which must not turn that into an abort.
type StartRoutineUnwind = extern "C-unwind" fn(*mut c_void) -> *mut c_void;
type PthreadCreate =
    unsafe extern "C" fn(*mut libc::pthread_t, *const libc::pthread_attr_t, StartRoutine, *mut c_void) -> c_int;

/// The stacks that created threads; each creation probes the whole table before giving up.
static STACK_TABLE: StackTable<STACKS, MAX_DEPTH> = StackTable::new(STACKS);
/// Threads created from each stack of [`STACK_TABLE`] since the stack was added (only grows
/// while it is in the table; reset when [`compact`] empties its entry).
static CREATED: [AtomicU64; STACKS] = [const { AtomicU64::new(0) }; STACKS];
/// Creations between their look into [`STACK_TABLE`] and the count of the created thread.
static INTERNING: AtomicUsize = AtomicUsize::new(0);
/// Set while [`compact`] runs: creations then leave [`STACK_TABLE`] alone.
static COMPACTING: AtomicBool = AtomicBool::new(false);
/// Threads created whose stack found no room in [`STACK_TABLE`].
static CREATED_WITHOUT_STACK: AtomicU64 = AtomicU64::new(0);
/// Every thread creation the hook saw (tells whether it is in the path at all).
static HOOK_CALLS: AtomicU64 = AtomicU64::new(0);

/// A thread created but not yet started: what the trampoline must run, and its stack.
struct Pending {
    taken: AtomicU8,
    start: AtomicUsize,
    arg: AtomicUsize,
    stack: AtomicUsize,
}

static PENDING_TABLE: [Pending; PENDING] = [const {
    Pending {
        taken: AtomicU8::new(0),
        start: AtomicUsize::new(0),
        arg: AtomicUsize::new(0),
        stack: AtomicUsize::new(0),
    }
}; PENDING];

/// Live threads: `tid << 32 | stack index` (`NO_STACK` when unknown), 0 when free.
static LIVE_TABLE: [AtomicU64; LIVE] = [const { AtomicU64::new(0) }; LIVE];

thread_local! {
    /// Set while this thread is inside the hook, so a nested creation (none is expected) is
    /// passed straight through rather than recursing.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
    /// This thread's entry in [`LIVE_TABLE`], cleared when the thread exits.
    static LIVE_ENTRY: LiveEntry = const { LiveEntry { index: Cell::new(usize::MAX), packed: Cell::new(0) } };
}

/// Where this thread is in [`LIVE_TABLE`], and what it wrote there.
struct LiveEntry {
    index: Cell<usize>,
    packed: Cell<u64>,
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        if let Some(entry) = LIVE_TABLE.get(self.index.get()) {
            // Only if it is still this thread's (a forked child clears the table it inherits,
            // and the slot may hold another thread since).
            let _ = entry.compare_exchange(self.packed.get(), 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

/// What a creation does around the real `pthread_create`.
///
/// # Safety
/// The arguments are those of `pthread_create`, and `real` is the real one.
unsafe fn create_hooked(
    real: PthreadCreate,
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    if IN_HOOK.with(|h| h.replace(true)) {
        // SAFETY: the caller's own arguments, passed on unchanged.
        return unsafe { real(thread, attr, start, arg) };
    }
    HOOK_CALLS.fetch_add(1, Ordering::Relaxed);
    let mut ips = [0usize; MAX_DEPTH];
    // libgcc's walk, not core's `Walker`: the hook is always on, and a `Walker` pins every
    // loaded object while it lives; this is an ordinary thread inside `pthread_create`.
    let depth = onsite_core::stack_walk::libgcc_walk(&mut ips);
    // Until the creation is counted, the stack's entry may be pointed to by nothing else: it
    // must not be emptied meanwhile (see `compact`).
    INTERNING.fetch_add(1, Ordering::SeqCst);
    let stack = if COMPACTING.load(Ordering::SeqCst) { None } else { STACK_TABLE.intern(&ips[..depth]) };
    let pending =
        PENDING_TABLE.iter().position(|p| p.taken.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_ok());
    let rc = match pending {
        Some(i) => {
            let p = &PENDING_TABLE[i];
            p.start.store(start as usize, Ordering::Relaxed);
            p.arg.store(arg as usize, Ordering::Relaxed);
            p.stack.store(stack.unwrap_or(NO_STACK as usize), Ordering::Relaxed);
            // SAFETY: as the caller's call, with our trampoline (which runs `start(arg)`) in
            // its place; `i` travels as the argument. pthread_create publishes the stores
            // above to the new thread.
            let rc = unsafe { real(thread, attr, trampoline_as_c(), i as *mut c_void) };
            if rc != 0 {
                p.taken.store(0, Ordering::Release);
            }
            rc
        }
        // Every pending slot is busy: create the thread as is, counted but not tracked alive.
        // SAFETY: the caller's own arguments.
        None => unsafe { real(thread, attr, start, arg) },
    };
    if rc == 0 {
        match stack {
            Some(index) => CREATED[index].fetch_add(1, Ordering::Relaxed),
            None => CREATED_WITHOUT_STACK.fetch_add(1, Ordering::Relaxed),
        };
    }
    INTERNING.fetch_sub(1, Ordering::SeqCst);
    IN_HOOK.with(|h| h.set(false));
    rc
}

fn trampoline_as_c() -> StartRoutine {
    // SAFETY: same signature and calling convention; only the unwind attribute differs, and
    // the caller (the new thread's libc start code) lets a forced unwind through.
    unsafe { std::mem::transmute::<StartRoutineUnwind, StartRoutine>(trampoline) }
}

/// The first function of every hooked thread: notes the thread as alive with its creating
/// stack, then runs what the creator asked for.
extern "C-unwind" fn trampoline(index: *mut c_void) -> *mut c_void {
    let p = &PENDING_TABLE[index as usize];
    let start = p.start.load(Ordering::Acquire);
    let arg = p.arg.load(Ordering::Acquire);
    let stack = p.stack.load(Ordering::Acquire);
    // Registered before the pending slot is let go, so `compact` always finds the stack
    // pointed to by one or the other.
    register_live(stack as u32);
    p.taken.store(0, Ordering::Release);
    // This thread's stack bounds, for walks of it in a signal handler (the threads dump).
    onsite_core::stack_walk::note_this_thread_stack();
    // SAFETY: `start` was a `StartRoutine` stored by `create_hooked`; calling it as one that may
    // unwind lets `pthread_exit` from C start routines pass through this frame.
    let start = unsafe { std::mem::transmute::<usize, StartRoutineUnwind>(start) };
    onsite_core::thread_events::run_thread(|| start(arg as *mut c_void))
}

fn register_live(stack: u32) {
    let tid = gettid();
    let packed = (u64::from(tid as u32) << 32) | u64::from(stack);
    let first = (tid as usize).wrapping_mul(2_654_435_761) % LIVE;
    for probe in 0..LIVE {
        let index = (first + probe) % LIVE;
        if LIVE_TABLE[index].compare_exchange(0, packed, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            // Registers the exit-time destructor that frees the entry.
            let _ = LIVE_ENTRY.try_with(|e| {
                e.index.set(index);
                e.packed.set(packed);
            });
            return;
        }
    }
}

pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail; it is async-signal-safe.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Empties every stack of the table that no live or starting thread was created from (see the
/// module docs), resetting its count. Called at the start of a threadcreate capture, on the
/// control thread; waits only for creations in progress (each a `pthread_create` call).
pub(crate) fn compact() {
    COMPACTING.store(true, Ordering::SeqCst);
    while INTERNING.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
    let mut kept = vec![false; STACKS];
    let mut keep = |stack: usize| {
        if let Some(k) = kept.get_mut(stack) {
            *k = true;
        }
    };
    // Pending slots first: a starting thread registers itself live before it lets its pending
    // slot go, so one read after the other cannot miss it.
    for p in &PENDING_TABLE {
        if p.taken.load(Ordering::Acquire) != 0 {
            keep(p.stack.load(Ordering::Acquire));
        }
    }
    for (_, stack) in live_threads() {
        keep(stack as usize);
    }
    STACK_TABLE.retain(|index| kept[index], |index| CREATED[index].store(0, Ordering::Relaxed));
    COMPACTING.store(false, Ordering::SeqCst);
}

/// In a forked child (from `pthread_atfork`; only the forking thread exists): the creations
/// and the compaction that were in progress in the parent's other threads never finish here,
/// so their marks go; their pending slots and the parent's live threads are not this process's.
pub(crate) fn forget_in_fork_child() {
    INTERNING.store(0, Ordering::SeqCst);
    COMPACTING.store(false, Ordering::SeqCst);
    for p in &PENDING_TABLE {
        p.taken.store(0, Ordering::Relaxed);
    }
    for entry in &LIVE_TABLE {
        entry.store(0, Ordering::Relaxed);
    }
    // This thread's entry went with the others; its exit clears its entry only if the entry
    // still holds what it wrote there, so a slot reused meanwhile is left alone.
}

/// How many threads each stack created so far, by stack index.
pub(crate) fn created_counts() -> Vec<u64> {
    CREATED.iter().map(|created| created.load(Ordering::Relaxed)).collect()
}

/// Threads created so far whose stack did not fit in the table.
pub(crate) fn created_without_stack() -> u64 {
    CREATED_WITHOUT_STACK.load(Ordering::Relaxed)
}

/// The creating stack at `index` (leaf first, the hook's own frames included).
pub(crate) fn stack(index: usize) -> Option<Vec<usize>> {
    STACK_TABLE.get(index)
}

/// Live hooked threads: `(tid, stack index or NO_STACK)`.
pub(crate) fn live_threads() -> Vec<(i32, u32)> {
    LIVE_TABLE
        .iter()
        .map(|e| e.load(Ordering::Acquire))
        .filter(|&packed| packed != 0)
        .map(|packed| ((packed >> 32) as u32 as i32, packed as u32))
        .collect()
}

/// Whether (and how much) the hook is in this process's `pthread_create` path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookStatus {
    /// The hook is linked in; `threads_seen` creations went through it so far.
    Active {
        /// Thread creations the hook saw since the process started.
        threads_seen: u64,
    },
    /// A static build without the `wrap` feature: no thread creation is recorded.
    StaticBuildWithoutWrap,
}

/// Whether the hook is active. The `onsite` crate calls this at install, which also makes sure
/// this crate (and so the exported `pthread_create`) is linked into the service, and registers
/// this crate's `pthread_atfork` child handler (see `fork`).
#[inline(never)]
pub fn hook_status() -> HookStatus {
    crate::fork::register_child_handler();
    if cfg!(all(target_feature = "crt-static", not(feature = "wrap"))) {
        HookStatus::StaticBuildWithoutWrap
    } else {
        HookStatus::Active { threads_seen: HOOK_CALLS.load(Ordering::Relaxed) }
    }
}

/// The interposer for dynamically linked builds: the executable's own `pthread_create` comes
/// before libc's for every caller (Rust's std, rayon, tokio, and C libraries loaded later), and
/// forwards to the next one, libc's, found with `dlsym(RTLD_NEXT)`.
///
/// # Safety
/// As `pthread_create(3)`.
#[cfg(not(target_feature = "crt-static"))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    let mut real = REAL.load(Ordering::Acquire);
    if real == 0 {
        // SAFETY: a valid NUL-terminated name; RTLD_NEXT finds libc's definition.
        real = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) } as usize;
        if real == 0 {
            // No libc after us (cannot happen in a dynamically linked build): say so the only
            // way pthread_create can.
            return libc::ENOSYS;
        }
        REAL.store(real, Ordering::Release);
    }
    // SAFETY: `real` is libc's pthread_create, which has this signature.
    let real = unsafe { std::mem::transmute::<usize, PthreadCreate>(real) };
    // SAFETY: the caller's arguments, as pthread_create(3) requires them.
    unsafe { create_hooked(real, thread, attr, start, arg) }
}

#[cfg(all(target_feature = "crt-static", feature = "wrap"))]
unsafe extern "C" {
    /// The real `pthread_create`, under the name the linker's `--wrap=pthread_create` gives it.
    fn __real_pthread_create(
        thread: *mut libc::pthread_t,
        attr: *const libc::pthread_attr_t,
        start: StartRoutine,
        arg: *mut c_void,
    ) -> c_int;
}

/// The hook for static builds: with `-Wl,--wrap=pthread_create` every call to `pthread_create`
/// in the program comes here, and `__real_pthread_create` is libc's.
///
/// # Safety
/// As `pthread_create(3)`.
#[cfg(all(target_feature = "crt-static", feature = "wrap"))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __wrap_pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: the caller's arguments; `__real_pthread_create` is libc's pthread_create.
    unsafe { create_hooked(__real_pthread_create, thread, attr, start, arg) }
}
