//! The all-threads dump (SIGUSR1): every thread's name, id, state and symbolised stack.
//!
//! Each thread is sent a real-time signal with `tgkill`; its handler walks its stack from the
//! interrupted registers (the `ucontext_t` of its `SA_SIGINFO` handler) with onsite-core's
//! lock-free walker into a pre-allocated slot, and marks the slot answered. The dumping thread
//! waits for the answers up to a deadline, then symbolises and writes the file. A thread that
//! blocks the signal, or is stuck where signals are not delivered, is listed as not answering
//! (with the last user-space address the kernel shows for it), never waited on longer.
//!
//! **What the handler does, and why it cannot block**: it finds its slot by thread id (atomic
//! loads), claims it with one compare-and-swap, walks with the dump's [`Walker`] (no lock, no
//! allocation, no loader or `pthread_*` call: see `onsite_core::stack_walk`), stores the frames
//! with atomic stores, and restores `errno`. It never unwinds with libgcc, which can take the
//! loader's lock (and on older glibc reach malloc) that the interrupted thread may hold. A
//! thread the walker cannot walk is written as `[stack not walked: <reason>]`; a walk that
//! finds every walker cache claimed by other threads' handlers says so and is asked again
//! (its thread is not waited for by anyone meanwhile).
//!
//! **The walker's life**: the dumping thread builds it before the first signal and publishes
//! it for the handlers; after the last answer it is dropped, unless a handler is still inside
//! a walk (a thread descheduled in its handler past the deadline), in which case it is kept
//! until a later dump finds no handler left inside it. Stack bounds for the handlers: each
//! thread's own cached bounds (noted by the `pthread_create` hook when the thread started), the
//! `[stack]` mapping for the main thread (read here, before signalling), or reads checked by
//! the kernel (`process_vm_readv`) for a thread with neither.
//!
//! The handler is installed for the length of one dump only. Afterwards the signal is set to
//! "ignore" (which discards any instance still pending at a thread that blocks it) and then its
//! earlier disposition is put back, so nothing of the dump outlives it.

use std::ffi::{c_int, c_void};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use onsite_core::pprof::resolve_stack;
use onsite_core::stack_walk::{self, WalkError, Walker};
use onsite_core::{CaptureError, CaptureOutput, ProfileKind, WrittenFile, format_utc_millis};

use crate::hook::{self, NO_STACK, gettid};

/// Frames kept per thread (the handler's own few at the leaf are dropped when written).
const DEPTH: usize = 128;
/// Threads asked at once; a process with more is dumped in rounds of this many.
const SLOTS: usize = 256;

const FREE: u32 = 0;
const REQUESTED: u32 = 1;
const WRITING: u32 = 2;
const ANSWERED: u32 = 3;
const ABANDONED: u32 = 4;
/// The handler found every walker cache claimed: to be asked again.
const BUSY: u32 = 5;

/// Walker caches, so as many handlers can walk at once; a handler that finds none free is
/// asked again.
const WALKER_CACHES: usize = 16;

struct Slot {
    tid: AtomicI32,
    state: AtomicU32,
    depth: AtomicUsize,
    /// Why the walk stopped early (a `WalkError` code), 0 if it did not.
    stopped: AtomicU8,
    ips: [AtomicUsize; DEPTH],
}

static SLOT_TABLE: [Slot; SLOTS] = [const {
    Slot {
        tid: AtomicI32::new(0),
        state: AtomicU32::new(FREE),
        depth: AtomicUsize::new(0),
        stopped: AtomicU8::new(0),
        ips: [const { AtomicUsize::new(0) }; DEPTH],
    }
}; SLOTS];

/// The running dump's walker for the handlers, or null.
static DUMP_WALKER: AtomicPtr<Walker> = AtomicPtr::new(std::ptr::null_mut());
/// The main thread's stack (`[stack]` of `/proc/self/maps`), read before the dump's signals:
/// low end, top (0 when unknown).
static MAIN_STACK: [AtomicUsize; 2] = [const { AtomicUsize::new(0) }; 2];
/// Walkers of earlier dumps that a late handler may still be inside (see the module docs);
/// only the dumping thread touches them. Atomics, not a mutex, so a forked child can forget
/// them whatever the parent's dumping thread was doing.
static LINGERING: [AtomicPtr<Walker>; 4] = [const { AtomicPtr::new(std::ptr::null_mut()) }; 4];

/// One dump at a time (the handler and the slots are shared). An atomic flag rather than a
/// mutex so that a forked child, where the dumping thread no longer exists, can let it go.
static DUMPING: AtomicBool = AtomicBool::new(false);
/// The dump signal while the dump's handler is installed (0 otherwise), and whether it was
/// ignored before (else it had the default action: the dump refuses a signal with a handler).
static HANDLER_INSTALLED: AtomicI32 = AtomicI32::new(0);
static PREVIOUSLY_IGNORED: AtomicBool = AtomicBool::new(false);

/// Holds [`DUMPING`] for one dump.
struct OneDumpAtATime;

impl OneDumpAtATime {
    /// Waits for a running dump to end (dumps run on ordinary threads, each bounded by its
    /// deadline).
    fn take() -> OneDumpAtATime {
        while DUMPING.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        OneDumpAtATime
    }
}

impl Drop for OneDumpAtATime {
    fn drop(&mut self) {
        DUMPING.store(false, Ordering::Release);
    }
}

/// Whether a handler may still be inside a walk.
fn a_handler_is_writing() -> bool {
    SLOT_TABLE.iter().any(|slot| slot.state.load(Ordering::Acquire) == WRITING)
}

/// Drops the walkers of earlier dumps if no handler can still be inside one, builds this dump's
/// and publishes it with the main thread's stack bounds (before any signal is sent).
fn publish_walker() -> *mut Walker {
    if !a_handler_is_writing() {
        for lingering in &LINGERING {
            let old = lingering.swap(std::ptr::null_mut(), Ordering::AcqRel);
            if !old.is_null() {
                // SAFETY: from `Box::into_raw` in this function; no handler is inside a walk
                // and none can start one with it (it is not published any more).
                drop(unsafe { Box::from_raw(old) });
            }
        }
    }
    let (low, top) = stack_walk::main_thread_stack().unwrap_or((0, 0));
    MAIN_STACK[0].store(low, Ordering::Relaxed);
    MAIN_STACK[1].store(top, Ordering::Relaxed);
    let walker = Box::into_raw(Box::new(Walker::new(WALKER_CACHES)));
    DUMP_WALKER.store(walker, Ordering::Release);
    walker
}

/// Unpublishes this dump's walker (after its last signal was answered or abandoned) and drops
/// it, or keeps it for later if a late handler may still be inside it.
fn retire_walker(walker: *mut Walker) {
    DUMP_WALKER.store(std::ptr::null_mut(), Ordering::Release);
    if !a_handler_is_writing() {
        // SAFETY: from `Box::into_raw` in `publish_walker`; unpublished, and no handler is
        // inside a walk (a handler claims its slot as WRITING before it loads the walker).
        drop(unsafe { Box::from_raw(walker) });
        return;
    }
    if !LINGERING
        .iter()
        .any(|slot| slot.compare_exchange(std::ptr::null_mut(), walker, Ordering::AcqRel, Ordering::Relaxed).is_ok())
    {
        tracing::warn!("onsite: threads dump walkers kept for late signal handlers: leaking one");
    }
}

/// The default signal for asking a thread for its stack: `SIGRTMIN+4`. glibc keeps the first
/// real-time signals for itself, and `SIGRTMIN()` already accounts for those.
pub fn default_dump_signal() -> c_int {
    libc::SIGRTMIN() + 4
}

fn signal_name(signal: c_int) -> String {
    let offset = signal - libc::SIGRTMIN();
    if (0..=libc::SIGRTMAX() - libc::SIGRTMIN()).contains(&offset) {
        format!("SIGRTMIN+{offset} ({signal})")
    } else {
        format!("signal {signal}")
    }
}

/// The handler: finds the slot asked of this thread and walks the interrupted stack into it
/// (see the module docs for why nothing here can block).
extern "C" fn on_dump_signal(_signal: c_int, _info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: errno is thread-local; reading and restoring it is what a handler must do.
    let errno = unsafe { *libc::__errno_location() };
    let tid = gettid();
    if let Some((index, slot)) = SLOT_TABLE.iter().enumerate().find(|(_, s)| s.tid.load(Ordering::Acquire) == tid)
        && slot.state.compare_exchange(REQUESTED, WRITING, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    {
        let mut ips = [0usize; DEPTH];
        let walker = DUMP_WALKER.load(Ordering::Acquire);
        let walked = if walker.is_null() || context.is_null() {
            stack_walk::Walked { depth: 0, stopped: Some(WalkError::Unsupported) }
        } else {
            let main = MAIN_STACK.each_ref().map(|bound| bound.load(Ordering::Relaxed));
            let main = (tid == std::process::id() as i32 && main[1] != 0).then_some((main[0], main[1]));
            // SAFETY: the dumping thread keeps the walker alive while any slot is WRITING (see
            // the module docs); `context` is the kernel's, and this is the interrupted thread.
            unsafe { (*walker).walk_interrupted(context, main, index, &mut ips) }
        };
        for (to, &ip) in slot.ips.iter().zip(&ips[..walked.depth]) {
            to.store(ip, Ordering::Relaxed);
        }
        slot.depth.store(walked.depth, Ordering::Relaxed);
        slot.stopped.store(walked.stopped.map_or(0, WalkError::code), Ordering::Relaxed);
        let busy = walked.depth == 0 && walked.stopped == Some(WalkError::AllCachesBusy);
        slot.state.store(if busy { BUSY } else { ANSWERED }, Ordering::Release);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// What one thread's entry in the dump says.
enum Answer {
    Stack(Vec<usize>),
    /// The frames walked before the walk stopped, and why it stopped.
    Cut(Vec<usize>, WalkError),
    /// The handler ran but could not walk the stack.
    NotWalked(WalkError),
    Silent,
    Exited,
}

struct ThreadInfo {
    tid: i32,
    name: String,
    state: String,
    answer: Answer,
}

fn read_task_file(tid: i32, file: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/{file}")).ok()
}

/// The one-letter state and its meaning from `/proc/self/task/<tid>/stat`.
fn task_state(tid: i32) -> String {
    let Some(stat) = read_task_file(tid, "stat") else { return "?".into() };
    // The name is in parentheses and may contain anything; the state follows the last ')'.
    let letter = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).unwrap_or("?");
    let meaning = match letter {
        "R" => "running",
        "S" => "sleeping",
        "D" => "uninterruptible wait",
        "T" | "t" => "stopped",
        "Z" => "zombie",
        _ => "",
    };
    if meaning.is_empty() { letter.to_owned() } else { format!("{letter} ({meaning})") }
}

/// Whether `/proc/self/task/<tid>/status` says the thread blocks `signal`.
fn blocks_signal(tid: i32, signal: c_int) -> bool {
    read_task_file(tid, "status")
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("SigBlk:").map(|v| v.trim().to_owned())))
        .and_then(|mask| u64::from_str_radix(&mask, 16).ok())
        .is_some_and(|mask| mask & (1u64 << (signal - 1)) != 0)
}

/// The user-space pc of a thread blocked in a system call, from `/proc/self/task/<tid>/syscall`
/// ("nr args... sp pc"); `None` while it runs.
fn syscall_pc(tid: i32) -> Option<usize> {
    let text = read_task_file(tid, "syscall")?;
    let fields: Vec<&str> = text.split_whitespace().collect();
    if fields.len() < 3 {
        return None;
    }
    usize::from_str_radix(fields.last()?.trim_start_matches("0x"), 16).ok()
}

/// Installs the handler for `signal`, returning the disposition to put back afterwards.
fn install_handler(signal: c_int) -> Result<libc::sigaction, String> {
    // SAFETY: sigaction with valid pointers; the zeroed struct is a valid "no action" value.
    unsafe {
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(signal, std::ptr::null(), &mut previous) != 0 {
            return Err(format!(
                "cannot read the action of {}: {}",
                signal_name(signal),
                std::io::Error::last_os_error()
            ));
        }
        if previous.sa_sigaction != libc::SIG_DFL && previous.sa_sigaction != libc::SIG_IGN {
            return Err(format!(
                "{} already has a handler in this process; choose another signal for the threads dump \
                 (ONSITE_THREADS_DUMP_SIGNAL)",
                signal_name(signal)
            ));
        }
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_dump_signal as *const () as usize;
        // SA_RESTART: most interrupted system calls resume by themselves.
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        PREVIOUSLY_IGNORED.store(previous.sa_sigaction == libc::SIG_IGN, Ordering::Relaxed);
        HANDLER_INSTALLED.store(signal, Ordering::SeqCst);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            HANDLER_INSTALLED.store(0, Ordering::SeqCst);
            return Err(format!(
                "cannot install a handler for {}: {}",
                signal_name(signal),
                std::io::Error::last_os_error()
            ));
        }
        Ok(previous)
    }
}

/// Drops any instance of `signal` still pending at a thread that blocks it (setting "ignore" does
/// that), then puts `previous` back.
fn restore_handler(signal: c_int, previous: &libc::sigaction) {
    // SAFETY: as in install_handler.
    unsafe {
        let mut ignore: libc::sigaction = std::mem::zeroed();
        ignore.sa_sigaction = libc::SIG_IGN;
        libc::sigemptyset(&mut ignore.sa_mask);
        libc::sigaction(signal, &ignore, std::ptr::null_mut());
        libc::sigaction(signal, previous, std::ptr::null_mut());
    }
    HANDLER_INSTALLED.store(0, Ordering::SeqCst);
}

/// In a forked child (from `pthread_atfork`; only the forking thread exists, async-signal-safe
/// calls only): no dump runs here, whatever the parent's dumping thread was doing. The dump's
/// handler, if the fork came during a dump, goes back to the earlier disposition (the child's
/// signals are its own; a pending instance of the dump signal is dropped with it); the slots,
/// the walkers (leaked: the child's copies of the parent's, never walked with here) and the
/// one-at-a-time flag are let go.
pub(crate) fn forget_in_fork_child() {
    let signal = HANDLER_INSTALLED.swap(0, Ordering::SeqCst);
    if signal != 0 {
        // SAFETY: sigaction is async-signal-safe; the zeroed struct is "default, no flags".
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_IGN;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
            if !PREVIOUSLY_IGNORED.load(Ordering::Relaxed) {
                action.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
    }
    DUMP_WALKER.store(std::ptr::null_mut(), Ordering::SeqCst);
    for lingering in &LINGERING {
        lingering.store(std::ptr::null_mut(), Ordering::Relaxed);
    }
    for slot in &SLOT_TABLE {
        slot.tid.store(0, Ordering::Relaxed);
        slot.state.store(FREE, Ordering::Relaxed);
    }
    DUMPING.store(false, Ordering::SeqCst);
}

/// Asks `tids` (at most [`SLOTS`]) for their stacks and waits for them until `deadline`.
fn ask(tids: &[i32], signal: c_int, deadline: Instant) -> Vec<Answer> {
    let pid = std::process::id() as i32;
    // Slots left by an earlier dump whose handler answered late are free again; one whose
    // handler is still writing stays out of use.
    for slot in &SLOT_TABLE {
        if matches!(slot.state.load(Ordering::Acquire), ANSWERED | ABANDONED | BUSY) {
            slot.tid.store(0, Ordering::Release);
            slot.state.store(FREE, Ordering::Release);
        }
    }
    let mut assigned: Vec<Option<usize>> = Vec::with_capacity(tids.len());
    let mut free =
        SLOT_TABLE.iter().enumerate().filter(|(_, s)| s.state.load(Ordering::Acquire) == FREE).map(|(i, _)| i);
    let mut answers: Vec<Option<Answer>> = Vec::with_capacity(tids.len());
    for &tid in tids {
        let Some(index) = free.next() else {
            assigned.push(None);
            answers.push(Some(Answer::Silent));
            continue;
        };
        let slot = &SLOT_TABLE[index];
        slot.tid.store(tid, Ordering::Release);
        slot.state.store(REQUESTED, Ordering::Release);
        // SAFETY: tgkill with our own pid; a wrong tid is an error, not harm.
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
        if rc != 0 {
            slot.state.store(FREE, Ordering::Release);
            slot.tid.store(0, Ordering::Release);
            assigned.push(None);
            answers.push(Some(Answer::Exited));
        } else {
            assigned.push(Some(index));
            answers.push(None);
        }
    }
    loop {
        let mut waiting = false;
        for (answer, index) in answers.iter_mut().zip(&mut assigned) {
            let Some(i) = *index else { continue };
            let slot = &SLOT_TABLE[i];
            match slot.state.load(Ordering::Acquire) {
                REQUESTED | WRITING => waiting = true,
                // Every walker cache was claimed when it walked: ask again (its handler is done).
                BUSY if Instant::now() < deadline => {
                    slot.state.store(REQUESTED, Ordering::Release);
                    // SAFETY: as above.
                    if unsafe { libc::syscall(libc::SYS_tgkill, pid, slot.tid.load(Ordering::Relaxed), signal) } != 0 {
                        slot.state.store(FREE, Ordering::Release);
                        slot.tid.store(0, Ordering::Release);
                        *index = None;
                        *answer = Some(Answer::Exited);
                    } else {
                        waiting = true;
                    }
                }
                _ => {}
            }
        }
        if !waiting || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for (answer, index) in answers.iter_mut().zip(&assigned) {
        let Some(index) = *index else { continue };
        let slot = &SLOT_TABLE[index];
        if slot.state.compare_exchange(REQUESTED, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            *answer = Some(Answer::Silent);
            continue;
        }
        let state = slot.state.load(Ordering::Acquire);
        if state == BUSY {
            *answer = Some(Answer::NotWalked(WalkError::AllCachesBusy));
        } else if state != ANSWERED {
            // Still writing past the deadline: the slot stays out of use until it finishes.
            *answer = Some(Answer::Silent);
            continue;
        } else {
            let depth = slot.depth.load(Ordering::Relaxed);
            let ips: Vec<usize> = slot.ips[..depth].iter().map(|ip| ip.load(Ordering::Relaxed)).collect();
            // The walk starts at the interrupted instruction: no frame of the handler's.
            *answer = Some(match WalkError::from_code(slot.stopped.load(Ordering::Relaxed)) {
                None => Answer::Stack(ips),
                Some(why) if ips.is_empty() => Answer::NotWalked(why),
                Some(why) => Answer::Cut(ips, why),
            });
        }
        slot.tid.store(0, Ordering::Release);
        slot.state.store(FREE, Ordering::Release);
    }
    answers.into_iter().map(|a| a.unwrap_or(Answer::Silent)).collect()
}

/// The calling thread's own stack (an ordinary thread, not a handler): with the dump's walker,
/// or libgcc's unwinder if it cannot finish.
fn own_stack(walker: &Walker) -> Vec<usize> {
    let mut ips = vec![0usize; DEPTH];
    let depth = walker.walk_here(0, &mut ips).unwrap_or_else(|| stack_walk::libgcc_walk(&mut ips));
    ips.truncate(depth);
    ips
}

/// Frames of the dump machinery itself, dropped at the leaf end of the dumping thread's stack.
fn is_own_frame(function: &str) -> bool {
    function.starts_with("backtrace::")
        || function.starts_with("onsite_threads::dump::")
        || function.starts_with("onsite_core::stack_walk::")
        || function.starts_with("_Unwind_")
}

/// The frames of a stack as text lines, leaf first. A frame nothing names is written as its
/// place in its object, `object+0xOFFSET (build id …, addr2line -e object 0xADDRESS)`, so it
/// can be named later from an unstripped copy.
fn write_stack(text: &mut String, ips: &[usize], skip_own_leaf_frames: bool) {
    let mut skipping = skip_own_leaf_frames;
    let mut n = 0;
    for (&ip, (resolved, frames)) in ips.iter().zip(resolve_stack(ips)) {
        if skipping && frames.iter().all(|f| is_own_frame(&f.function)) {
            continue;
        }
        skipping = false;
        if resolved.frames.is_empty() {
            let _ = write!(text, "    #{n:<3} {:#x} {}", ip, frames[0].function);
            let mut details = Vec::new();
            if let Some(id) = &resolved.build_id {
                details.push(format!("build id {id}"));
            }
            if let (Some(object), Some(at)) = (&resolved.object, resolved.object_address) {
                details.push(format!("addr2line -e {object} {at:#x}"));
            }
            if !details.is_empty() {
                let _ = write!(text, " ({})", details.join(", "));
            }
            text.push('\n');
        }
        for frame in resolved.frames {
            let _ = write!(text, "    #{n:<3} {:#x} {}", ip, frame.function);
            if let Some(file) = &frame.file {
                let _ = write!(text, "\n           at {file}:{}", frame.line);
            }
            text.push('\n');
        }
        n += 1;
    }
}

/// The first frame of a creating stack that is the caller's code rather than std's or ours.
fn creator(stack: u32) -> Option<String> {
    let ips = hook::stack(stack as usize)?;
    let plumbing = |f: &str| {
        ["std::", "core::", "alloc::", "backtrace::", "onsite_threads::", "onsite_core::", "_Unwind_", "<"]
            .iter()
            .any(|p| f.starts_with(p))
            || f == "pthread_create"
            || f == "__wrap_pthread_create"
    };
    resolve_stack(&ips).into_iter().flat_map(|(_, frames)| frames).find(|f| !plumbing(&f.function)).map(|f| {
        match f.file {
            Some(file) => format!("{} at {file}:{}", f.function, f.line),
            None => f.function,
        }
    })
}

/// Writes `…-threads-….txt`: every thread's name, id, state and stack, asked of each thread with
/// `signal` and waited for at most `deadline` in all. Safe to call while a capture runs, from
/// any ordinary thread (never from a signal handler).
pub fn dump_all_threads_with_signal(
    out: &CaptureOutput,
    deadline: Duration,
    signal: c_int,
) -> Result<WrittenFile, CaptureError> {
    let err = |m: String| CaptureError::new(ProfileKind::Threads, m);
    if !(libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&signal) {
        return Err(err(format!(
            "{} is not a signal the dump can borrow: use a real-time one (SIGRTMIN..SIGRTMAX)",
            signal_name(signal)
        )));
    }
    crate::fork::register_child_handler();
    let _one_at_a_time = OneDumpAtATime::take();
    let started = Instant::now();
    // A deadline no clock can add (`Duration::MAX` from a builder) waits a year instead of panicking.
    let end = onsite_core::instant_after(started, deadline);
    let me = gettid();
    let tids: Vec<i32> = crate::profile::task_ids().into_iter().filter(|&t| t != me).collect();

    let walker = publish_walker();
    let previous = match install_handler(signal) {
        Ok(previous) => previous,
        Err(message) => {
            retire_walker(walker);
            return Err(err(message));
        }
    };
    let mut answers = Vec::with_capacity(tids.len());
    for round in tids.chunks(SLOTS) {
        answers.extend(ask(round, signal, end));
    }
    restore_handler(signal, &previous);
    // SAFETY: published by `publish_walker` above and retired only below.
    let own = own_stack(unsafe { &*walker });
    retire_walker(walker);
    let elapsed = started.elapsed();

    let mut threads: Vec<ThreadInfo> = tids
        .iter()
        .zip(answers)
        .map(|(&tid, answer)| ThreadInfo {
            tid,
            name: read_task_file(tid, "comm").map(|n| n.trim_end().to_owned()).unwrap_or_default(),
            state: task_state(tid),
            answer,
        })
        .collect();
    threads.insert(
        0,
        ThreadInfo {
            tid: me,
            name: read_task_file(me, "comm").map(|n| n.trim_end().to_owned()).unwrap_or_default(),
            state: "R (running: writing this dump)".into(),
            answer: Answer::Stack(own),
        },
    );
    threads.sort_by_key(|t| t.tid);

    let creators: std::collections::HashMap<i32, u32> = hook::live_threads().into_iter().collect();
    let pid = std::process::id() as i32;
    let answered = threads
        .iter()
        .filter(|t| matches!(t.answer, Answer::Stack(_) | Answer::Cut(..) | Answer::NotWalked(_)))
        .count();
    let mut text = String::new();
    let _ = writeln!(text, "onsite threads dump");
    let _ = writeln!(
        text,
        "pid {pid}, command {}, at {} UTC",
        out.dump_dir().command(),
        format_utc_millis(
            out.started_at().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
        )
    );
    let _ = writeln!(
        text,
        "threads: {}, answered: {answered}, asked with {} within {deadline:?} (took {elapsed:.1?})",
        threads.len(),
        signal_name(signal)
    );
    for thread in &threads {
        let _ = write!(text, "\nthread {} \"{}\" state {}", thread.tid, thread.name, thread.state);
        if thread.tid == pid {
            text.push_str(", main thread");
        } else if let Some(&stack) = creators.get(&thread.tid) {
            match (stack != NO_STACK).then(|| creator(stack)).flatten() {
                Some(c) => {
                    let _ = write!(text, ", created by {c}");
                }
                None => text.push_str(", creating stack not recorded"),
            }
        }
        text.push('\n');
        match &thread.answer {
            Answer::Stack(ips) => write_stack(&mut text, ips, thread.tid == me),
            Answer::Cut(ips, why) => {
                write_stack(&mut text, ips, false);
                let _ = writeln!(text, "    [stack walk stopped: {why}]");
            }
            Answer::NotWalked(why) => {
                let _ = writeln!(text, "    [stack not walked: {why}]");
            }
            Answer::Exited => text.push_str("    (exited during the dump)\n"),
            Answer::Silent => {
                let why = if blocks_signal(thread.tid, signal) {
                    format!("it blocks {}", signal_name(signal))
                } else {
                    "it may be stuck where signals are not delivered".to_owned()
                };
                let _ = writeln!(text, "    (did not answer within the deadline: {why})");
                if let Some(pc) = syscall_pc(thread.tid) {
                    text.push_str("    in a system call, returning to:\n");
                    write_stack(&mut text, &[pc], false);
                }
            }
        }
    }
    out.write(ProfileKind::Threads, "txt", |w| w.write_all(text.as_bytes()))
}

/// [`dump_all_threads_with_signal`] with the default signal, `SIGRTMIN+4`.
pub fn dump_all_threads(out: &CaptureOutput, deadline: Duration) -> Result<WrittenFile, CaptureError> {
    dump_all_threads_with_signal(out, deadline, default_dump_signal())
}
