//! The all-threads dump (SIGUSR1): every thread's name, id, state and symbolised stack.
//!
//! Each thread is sent a real-time signal with `tgkill`; its handler walks its own stack into a
//! pre-allocated slot (no allocation, no lock, no I/O) and marks the slot answered. The dumping
//! thread waits for the answers up to a deadline, then symbolises and writes the file. A thread
//! that blocks the signal, or is stuck where signals are not delivered, is listed as not
//! answering (with the last user-space address the kernel shows for it), never waited on longer.
//!
//! The handler is installed for the length of one dump only. Afterwards the signal is set to
//! "ignore" (which discards any instance still pending at a thread that blocks it) and then its
//! earlier disposition is put back, so nothing of the dump outlives it.

use std::ffi::{c_int, c_void};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use onsite_core::pprof::resolve_stack;
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

struct Slot {
    tid: AtomicI32,
    state: AtomicU32,
    /// The interrupted instruction (from the signal's context), to find where the handler's own
    /// frames end.
    pc: AtomicUsize,
    depth: AtomicUsize,
    ips: [AtomicUsize; DEPTH],
}

static SLOT_TABLE: [Slot; SLOTS] = [const {
    Slot {
        tid: AtomicI32::new(0),
        state: AtomicU32::new(FREE),
        pc: AtomicUsize::new(0),
        depth: AtomicUsize::new(0),
        ips: [const { AtomicUsize::new(0) }; DEPTH],
    }
}; SLOTS];

/// One dump at a time (the handler and the slots are shared).
static DUMPING: Mutex<()> = Mutex::new(());

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

/// The handler: finds the slot asked of this thread and walks the stack into it.
extern "C" fn on_dump_signal(_signal: c_int, _info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: errno is thread-local; reading and restoring it is what a handler must do.
    let errno = unsafe { *libc::__errno_location() };
    let tid = gettid();
    if let Some(slot) = SLOT_TABLE.iter().find(|s| s.tid.load(Ordering::Acquire) == tid)
        && slot.state.compare_exchange(REQUESTED, WRITING, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    {
        slot.pc.store(interrupted_pc(context), Ordering::Relaxed);
        let mut depth = 0;
        // SAFETY: walks this thread's own stack; the closure only stores into the slot. The
        // unwinder finds frames through `_dl_find_object` (glibc ≥ 2.35, libgcc ≥ 12), which
        // takes no lock: see README.md for older systems.
        unsafe {
            backtrace::trace_unsynchronized(|frame| {
                let ip = frame.ip() as usize;
                if ip == 0 {
                    return false; // The end of the stack.
                }
                slot.ips[depth].store(ip, Ordering::Relaxed);
                depth += 1;
                depth < DEPTH
            });
        }
        slot.depth.store(depth, Ordering::Relaxed);
        slot.state.store(ANSWERED, Ordering::Release);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

#[allow(unused_variables)]
fn interrupted_pc(context: *mut c_void) -> usize {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
        unsafe { (*(context as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RIP as usize] as usize }
    }
    #[cfg(all(target_os = "linux", target_arch = "aarch64"))]
    {
        // SAFETY: as above.
        unsafe { (*(context as *const libc::ucontext_t)).uc_mcontext.pc as usize }
    }
    #[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"))))]
    {
        0
    }
}

/// What one thread's entry in the dump says.
enum Answer {
    Stack(Vec<usize>),
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
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
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
}

/// Asks `tids` (at most [`SLOTS`]) for their stacks and waits for them until `deadline`.
fn ask(tids: &[i32], signal: c_int, deadline: Instant) -> Vec<Answer> {
    let pid = std::process::id() as i32;
    // Slots left by an earlier dump whose handler answered late are free again; one whose
    // handler is still writing stays out of use.
    for slot in &SLOT_TABLE {
        if matches!(slot.state.load(Ordering::Acquire), ANSWERED | ABANDONED) {
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
        let waiting = assigned
            .iter()
            .flatten()
            .any(|&i| matches!(SLOT_TABLE[i].state.load(Ordering::Acquire), REQUESTED | WRITING));
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
        if slot.state.load(Ordering::Acquire) != ANSWERED {
            // Still writing past the deadline: the slot stays out of use until it finishes.
            *answer = Some(Answer::Silent);
            continue;
        }
        let depth = slot.depth.load(Ordering::Relaxed);
        let ips: Vec<usize> = slot.ips[..depth].iter().map(|ip| ip.load(Ordering::Relaxed)).collect();
        let pc = slot.pc.load(Ordering::Relaxed);
        // The frames before the interrupted instruction are the handler's and the kernel's
        // signal trampoline.
        let ips = match ips.iter().position(|&ip| ip == pc) {
            Some(at) => ips[at..].to_vec(),
            None => ips,
        };
        *answer = Some(Answer::Stack(ips));
        slot.tid.store(0, Ordering::Release);
        slot.state.store(FREE, Ordering::Release);
    }
    answers.into_iter().map(|a| a.unwrap_or(Answer::Silent)).collect()
}

/// The calling thread's own stack, without this crate's frames.
fn own_stack() -> Vec<usize> {
    // Room for every frame before the walk: `backtrace::trace` holds the backtrace crate's
    // global lock, and an allocation under it would wait for the allocator's lock (dhat's),
    // whose holder may be waiting for the backtrace lock in its own walk.
    let mut ips = Vec::with_capacity(DEPTH);
    backtrace::trace(|frame| {
        let ip = frame.ip() as usize;
        if ip == 0 {
            return false;
        }
        ips.push(ip);
        ips.len() < DEPTH
    });
    ips
}

/// Frames of the dump machinery itself, dropped at the leaf end of the dumping thread's stack.
fn is_own_frame(function: &str) -> bool {
    function.starts_with("backtrace::")
        || function.starts_with("onsite_threads::dump::")
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
        ["std::", "core::", "alloc::", "backtrace::", "onsite_threads::", "_Unwind_", "<"]
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
    let _one_at_a_time = DUMPING.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let end = started + deadline;
    let me = gettid();
    let tids: Vec<i32> = crate::profile::task_ids().into_iter().filter(|&t| t != me).collect();

    let previous = install_handler(signal).map_err(err)?;
    let mut answers = Vec::with_capacity(tids.len());
    for round in tids.chunks(SLOTS) {
        answers.extend(ask(round, signal, end));
    }
    restore_handler(signal, &previous);
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
            answer: Answer::Stack(own_stack()),
        },
    );
    threads.sort_by_key(|t| t.tid);

    let creators: std::collections::HashMap<i32, u32> = hook::live_threads().into_iter().collect();
    let pid = std::process::id() as i32;
    let answered = threads.iter().filter(|t| matches!(t.answer, Answer::Stack(_))).count();
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
