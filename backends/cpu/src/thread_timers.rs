//! The clock that drives pprof-rs's sampler during a capture: one CPU-time timer per thread.
//!
//! pprof-rs arms one process-wide `setitimer(ITIMER_PROF)`. The kernel checks it on its
//! scheduler tick and sends at most one SIGPROF per tick for the whole process, so a process
//! busy on several cores, or a rate above the tick, loses most of its samples. Here every
//! thread gets its own POSIX timer on its own CPU clock (`timer_create` on the clock
//! `((!tid) << 3) | 6`, delivered to that thread with `SIGEV_THREAD_ID`), first expiring at a
//! random point of the first period so threads started together do not fire together.
//!
//! Which threads: those in `/proc/self/task` at the start, and every thread started during the
//! capture, armed on that thread before its first instruction of service code through
//! [`onsite_core::thread_events`] (the `pthread_create` interposer calls it). A scanner thread
//! rereads `/proc/self/task` while the capture runs: it arms threads the interposer did not
//! see (raw `clone`, a build without onsite-threads: then within [`RESCAN_WITHOUT_HOOK`]) and
//! deletes the timers of threads that ended without telling (`pthread_exit` past the
//! interposer's frame is told; a thread that was never started through it is not).
//!
//! The thread-start and thread-exit listeners run on service threads: they take no lock,
//! allocate nothing and wait for nothing. The table is a fixed array of atomics claimed with
//! one compare-and-swap per slot; a timer id is taken out of its slot with one swap, so exactly
//! one of the exiting thread, the scanner and the stop deletes it, and never twice (a deleted
//! id may be reused at once by a timer the service creates).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use onsite_core::own_work::{OwnThread, current_thread_id};

/// Threads that can hold a timer during one capture (slots are not reused within a capture).
const SLOTS: usize = 8192;
/// How often the scanner rereads `/proc/self/task` when the `pthread_create` interposer is not
/// in the process: a thread started then is sampled from at most this long after its start.
pub(crate) const RESCAN_WITHOUT_HOOK: Duration = Duration::from_millis(10);
/// How often it does so when the interposer arms new threads itself (only threads started
/// past it, and ended threads' timers, are left to the scanner).
const RESCAN_WITH_HOOK: Duration = Duration::from_millis(200);

/// `sigevent.sigev_notify`: deliver to the thread in `sigev_notify_thread_id` (Linux; not in
/// the `libc` crate).
const SIGEV_THREAD_ID: libc::c_int = 4;
/// `clockid_t` bits of a CPU clock: per-thread, and the scheduler's precise runtime.
const CPUCLOCK_PERTHREAD_SCHED: libc::clockid_t = 4 | 2;

const FREE: i32 = 0;
/// A slot whose thread has ended; it stays claimed until the next capture's start.
const ENDED: i32 = -1;
const NO_TIMER: i32 = -1;

/// One thread's timer and the samples it is owed (see `sample_count`).
pub(crate) struct Slot {
    tid: AtomicI32,
    timer: AtomicI32,
    /// Expiries delivered to this thread while another thread's handler was inside pprof-rs:
    /// recorded at this thread's next sample.
    pub(crate) owed: AtomicU32,
}

static TABLE: [Slot; SLOTS] =
    [const { Slot { tid: AtomicI32::new(FREE), timer: AtomicI32::new(NO_TIMER), owed: AtomicU32::new(0) } }; SLOTS];

/// Whether the listeners arm new threads (a capture with per-thread timers runs).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Listener calls between their check of [`ACTIVE`] and their last table write.
static IN_FLIGHT: AtomicU32 = AtomicU32::new(0);
static PERIOD_NS: AtomicU64 = AtomicU64::new(0);

static ARMED: AtomicU64 = AtomicU64::new(0);
static ARMED_AT_START: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);
static LAST_ERRNO: AtomicI32 = AtomicI32::new(0);
static TABLE_FULL: AtomicU64 = AtomicU64::new(0);
/// Owed expiries of threads that ended before they could be recorded.
pub(crate) static OWED_LOST: AtomicU64 = AtomicU64::new(0);

/// Why per-thread timers could not be made.
#[derive(Debug)]
pub(crate) struct Unavailable(pub(crate) String);

/// What the timers did during one capture, for the profile's comments.
#[derive(Debug, Default, Clone)]
pub(crate) struct TimerStats {
    pub(crate) armed_at_start: u64,
    pub(crate) armed: u64,
    pub(crate) failed: u64,
    pub(crate) last_errno: i32,
    pub(crate) table_full: u64,
    pub(crate) owed_lost: u64,
}

/// Per-thread timers running for one capture; [`ThreadTimers::stop`] deletes every one.
pub(crate) struct ThreadTimers {
    scanner: Option<JoinHandle<()>>,
    stop_scanner: Arc<(Mutex<bool>, Condvar)>,
}

impl ThreadTimers {
    /// Arms a timer on every thread of the process at `frequency_hz` of its CPU time. `Err`
    /// when the calling thread's own timer cannot be made (nothing is left armed then).
    pub(crate) fn start(frequency_hz: u32) -> Result<ThreadTimers, Unavailable> {
        // The previous capture's stop left the table free and nothing in flight.
        for slot in &TABLE {
            slot.tid.store(FREE, Ordering::Relaxed);
            slot.owed.store(0, Ordering::Relaxed);
        }
        for counter in [&ARMED, &ARMED_AT_START, &FAILED, &TABLE_FULL, &OWED_LOST] {
            counter.store(0, Ordering::Relaxed);
        }
        LAST_ERRNO.store(0, Ordering::Relaxed);
        PERIOD_NS.store(1_000_000_000 / u64::from(frequency_hz.max(1)), Ordering::Relaxed);

        // This thread first: if its timer cannot be made, no thread's can (an old kernel, a
        // seccomp policy, the timer limit), and the capture falls back to `setitimer`.
        let me = current_thread_id();
        match arm(me) {
            Arm::Armed | Arm::AlreadyArmed => {}
            Arm::Failed(errno) => {
                disarm_all();
                return Err(Unavailable(format!(
                    "timer_create on a thread CPU clock failed: {}",
                    std::io::Error::from_raw_os_error(errno)
                )));
            }
            Arm::Gone | Arm::TableFull => {
                disarm_all();
                return Err(Unavailable("no timer could be armed on the capturing thread".into()));
            }
        }

        static LISTENERS: Once = Once::new();
        LISTENERS.call_once(|| onsite_core::thread_events::set_listeners(on_thread_start, on_thread_exit));
        ACTIVE.store(true, Ordering::SeqCst);
        let tasks = task_ids();
        for &tid in &tasks {
            arm(tid);
        }
        ARMED_AT_START.store(ARMED.load(Ordering::Relaxed), Ordering::Relaxed);

        let interval =
            if onsite_core::thread_events::threads_started() > 0 { RESCAN_WITH_HOOK } else { RESCAN_WITHOUT_HOOK };
        let stop_scanner = Arc::new((Mutex::new(false), Condvar::new()));
        let stop = Arc::clone(&stop_scanner);
        let scanner = std::thread::Builder::new().name("onsite-cpu-scan".into()).spawn(move || {
            let _own = OwnThread::register();
            let (stopped, wake) = &*stop;
            let mut stopped = stopped.lock().unwrap_or_else(PoisonError::into_inner);
            while !*stopped {
                stopped = wake.wait_timeout(stopped, interval).unwrap_or_else(PoisonError::into_inner).0;
                if !*stopped {
                    rescan();
                }
            }
        });
        let scanner = match scanner {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::warn!(error = %e, "onsite: no CPU timer scanner thread; threads it would find go unsampled");
                None
            }
        };
        Ok(ThreadTimers { scanner, stop_scanner })
    }

    /// Deletes every timer of the capture, and says what they did. After this returns no
    /// timer of the capture exists, and no listener call can make one.
    pub(crate) fn stop(mut self) -> TimerStats {
        self.shut_down();
        TimerStats {
            armed_at_start: ARMED_AT_START.load(Ordering::Relaxed),
            armed: ARMED.load(Ordering::Relaxed),
            failed: FAILED.load(Ordering::Relaxed),
            last_errno: LAST_ERRNO.load(Ordering::Relaxed),
            table_full: TABLE_FULL.load(Ordering::Relaxed),
            owed_lost: OWED_LOST.load(Ordering::Relaxed),
        }
    }

    fn shut_down(&mut self) {
        ACTIVE.store(false, Ordering::SeqCst);
        // A listener that saw ACTIVE set finishes its few syscalls; none starts after this.
        while IN_FLIGHT.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        {
            let (stopped, wake) = &*self.stop_scanner;
            *stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
            wake.notify_all();
        }
        if let Some(scanner) = self.scanner.take() {
            let _ = scanner.join();
        }
        disarm_all();
    }
}

impl Drop for ThreadTimers {
    /// Nothing is left behind even if the stopper is dropped without `stop` (a panic).
    fn drop(&mut self) {
        if self.scanner.is_some() || ACTIVE.load(Ordering::SeqCst) {
            self.shut_down();
        }
    }
}

/// The slot holding `tid`'s timer, if it has one this capture. Lock-free and allocation-free
/// (the SIGPROF handler calls it).
pub(crate) fn slot_of(tid: i32) -> Option<&'static Slot> {
    let first = hash(tid);
    for probe in 0..SLOTS {
        let slot = &TABLE[(first + probe) % SLOTS];
        match slot.tid.load(Ordering::Acquire) {
            t if t == tid => return Some(slot),
            FREE => return None,
            _ => {}
        }
    }
    None
}

fn hash(tid: i32) -> usize {
    (tid as u32 as usize).wrapping_mul(2_654_435_761) % SLOTS
}

enum Arm {
    Armed,
    AlreadyArmed,
    /// The thread ended before its timer could be made.
    Gone,
    Failed(i32),
    TableFull,
}

/// Gives `tid` a timer unless it has one. Lock-free and allocation-free (listeners call it).
fn arm(tid: i32) -> Arm {
    let first = hash(tid);
    for probe in 0..SLOTS {
        let slot = &TABLE[(first + probe) % SLOTS];
        let mut seen = slot.tid.load(Ordering::Acquire);
        if seen == FREE {
            match slot.tid.compare_exchange(FREE, tid, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return make_timer(tid, slot),
                Err(now) => seen = now,
            }
        }
        if seen == tid {
            return Arm::AlreadyArmed;
        }
    }
    TABLE_FULL.fetch_add(1, Ordering::Relaxed);
    Arm::TableFull
}

fn make_timer(tid: i32, slot: &Slot) -> Arm {
    match create_timer(tid) {
        Ok(timer) => {
            slot.timer.store(timer, Ordering::Release);
            ARMED.fetch_add(1, Ordering::Relaxed);
            Arm::Armed
        }
        // The clock of a thread that has ended is invalid.
        Err(libc::EINVAL | libc::ESRCH) if tid != current_thread_id() => {
            slot.tid.store(ENDED, Ordering::Release);
            Arm::Gone
        }
        Err(errno) => {
            FAILED.fetch_add(1, Ordering::Relaxed);
            LAST_ERRNO.store(errno, Ordering::Relaxed);
            Arm::Failed(errno)
        }
    }
}

/// Deletes `tid`'s timer, if it has one; its owed samples are counted as lost.
fn disarm(tid: i32) {
    if let Some(slot) = slot_of(tid) {
        release(slot);
        slot.tid.store(ENDED, Ordering::Release);
    }
}

fn release(slot: &Slot) {
    let timer = slot.timer.swap(NO_TIMER, Ordering::AcqRel);
    if timer != NO_TIMER {
        delete_timer(timer);
    }
    let owed = slot.owed.swap(0, Ordering::AcqRel);
    OWED_LOST.fetch_add(u64::from(owed), Ordering::Relaxed);
}

fn disarm_all() {
    for slot in &TABLE {
        if slot.tid.load(Ordering::Acquire) != FREE {
            release(slot);
        }
    }
}

/// Listener: runs on every new thread before its start routine.
fn on_thread_start() {
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    if ACTIVE.load(Ordering::SeqCst) {
        arm(current_thread_id());
    }
    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
}

/// Listener: runs on every thread started through the interposer as it ends.
fn on_thread_exit() {
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    if ACTIVE.load(Ordering::SeqCst) {
        disarm(current_thread_id());
    }
    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
}

/// Arms threads that appeared, deletes the timers of threads that ended (scanner thread).
fn rescan() {
    // Threads holding a timer *before* the listing is read: one of them missing from the
    // listing has ended (a thread armed after this snapshot may be missing because it is newer).
    let armed: Vec<i32> = TABLE.iter().map(|slot| slot.tid.load(Ordering::Acquire)).filter(|&tid| tid > 0).collect();
    let alive: HashSet<i32> = task_ids().into_iter().collect();
    for tid in armed {
        if !alive.contains(&tid) {
            disarm(tid);
        }
    }
    for &tid in &alive {
        arm(tid);
    }
}

/// The kernel thread ids of this process's threads, now.
fn task_ids() -> Vec<i32> {
    match std::fs::read_dir("/proc/self/task") {
        Ok(entries) => {
            entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).filter(|&tid| tid > 0).collect()
        }
        Err(e) => {
            tracing::warn!(error = %e, "onsite: cannot list /proc/self/task; only threads started from now on get a CPU timer");
            Vec::new()
        }
    }
}

/// A SIGPROF timer on `tid`'s CPU clock, armed at the capture's period with a random first
/// expiry in (0, period]. Raw system calls: glibc's `timer_create` wrapper hands back its own
/// `timer_t`, and this must not depend on how it allocates one. Allocation-free.
fn create_timer(tid: i32) -> Result<i32, i32> {
    let clock: libc::clockid_t = ((!tid) << 3) | CPUCLOCK_PERTHREAD_SCHED;
    // SAFETY: all-zero is a valid sigevent (the fields set below are all that is read).
    let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
    event.sigev_notify = SIGEV_THREAD_ID;
    event.sigev_signo = libc::SIGPROF;
    event.sigev_notify_thread_id = tid;
    let mut timer: libc::c_int = 0;
    // SAFETY: the kernel reads the sigevent and writes one int (the kernel's timer_t).
    let rc = unsafe {
        libc::syscall(libc::SYS_timer_create, clock, &mut event as *mut libc::sigevent, &mut timer as *mut libc::c_int)
    };
    if rc != 0 {
        return Err(errno());
    }
    let period = PERIOD_NS.load(Ordering::Relaxed).max(1);
    let first = 1 + random(tid) % period;
    let spec = libc::itimerspec { it_interval: timespec(period), it_value: timespec(first) };
    // SAFETY: `timer` was just created by this process; the kernel reads one itimerspec.
    let rc = unsafe {
        libc::syscall(libc::SYS_timer_settime, timer, 0, &spec as *const libc::itimerspec, std::ptr::null_mut::<u8>())
    };
    if rc != 0 {
        let e = errno();
        delete_timer(timer);
        return Err(e);
    }
    Ok(timer)
}

fn delete_timer(timer: i32) {
    // SAFETY: `timer` is a timer this module created and took out of its slot (so it is
    // deleted exactly once).
    unsafe { libc::syscall(libc::SYS_timer_delete, timer) };
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec { tv_sec: (ns / 1_000_000_000) as libc::time_t, tv_nsec: (ns % 1_000_000_000) as libc::c_long }
}

/// A different value per thread and per call, without a lock or a system random source.
fn random(tid: i32) -> u64 {
    let mut x = monotonic_ns() ^ (u64::from(tid as u32) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// `CLOCK_MONOTONIC` in nanoseconds (async-signal-safe).
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}
