//! The clocks that drive CPU sampling: one CPU-time timer per thread, in two independent sets:
//! [`CAPTURE`] drives pprof-rs's sampler during a capture, [`RECORDER`] the always-on flight
//! recorder (see `recorder`). Each set's signals carry the set's tag in their `sigval`, so
//! the one SIGPROF handler (`sample_count`) knows which clock a signal came from.
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

/// Threads that can hold a timer of one set at once (an ended thread's slot is reused).
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
/// A slot whose thread has ended: a lookup probes past it, an arm may reuse it.
const ENDED: i32 = -1;
const NO_TIMER: i32 = -1;

/// The `sigval` of a capture timer's signals.
pub(crate) const TAG_CAPTURE: usize = 0x6f6e_7369_7465_0001;
/// The `sigval` of a flight-recorder timer's signals.
pub(crate) const TAG_RECORDER: usize = 0x6f6e_7369_7465_0002;

/// One thread's timer and the samples it is owed (see `sample_count`).
pub(crate) struct Slot {
    tid: AtomicI32,
    timer: AtomicI32,
    /// Expiries delivered to this thread while another thread's handler was inside pprof-rs:
    /// recorded at this thread's next sample.
    pub(crate) owed: AtomicU32,
}

/// One set of per-thread timers: a fixed table of slots and what its timers did.
pub(crate) struct TimerSet {
    table: [Slot; SLOTS],
    /// Carried in every signal of this set's timers.
    tag: usize,
    /// Whether the listeners arm new threads.
    active: AtomicBool,
    /// Listener calls between their check of `active` and their last table write.
    in_flight: AtomicU32,
    period_ns: AtomicU64,
    armed: AtomicU64,
    armed_at_start: AtomicU64,
    failed: AtomicU64,
    last_errno: AtomicI32,
    table_full: AtomicU64,
    /// Owed expiries of threads that ended before they could be recorded.
    owed_lost: AtomicU64,
}

/// The timers of a running capture.
pub(crate) static CAPTURE: TimerSet = TimerSet::new(TAG_CAPTURE);
/// The flight recorder's timers.
pub(crate) static RECORDER: TimerSet = TimerSet::new(TAG_RECORDER);

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

/// Per-thread timers of one set, running; [`ThreadTimers::stop`] deletes every one.
pub(crate) struct ThreadTimers {
    set: &'static TimerSet,
    scanner: Option<JoinHandle<()>>,
    stop_scanner: Arc<(Mutex<bool>, Condvar)>,
}

/// How a set finds threads the `pthread_create` interposer did not tell it about.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rescan {
    /// A scanner thread of the set's own rereads `/proc/self/task` ([`RESCAN_WITH_HOOK`] or
    /// [`RESCAN_WITHOUT_HOOK`] apart).
    OwnThread,
    /// The owner calls [`ThreadTimers::rescan`] itself.
    ByOwner,
}

impl ThreadTimers {
    /// Arms a timer of `set` on every thread of the process at `frequency_hz` of its CPU time.
    /// `Err` when the calling thread's own timer cannot be made (nothing is left armed then).
    pub(crate) fn start(
        set: &'static TimerSet,
        frequency_hz: u32,
        rescan: Rescan,
    ) -> Result<ThreadTimers, Unavailable> {
        // The set's previous stop left its table free of timers and nothing in flight.
        for slot in &set.table {
            slot.tid.store(FREE, Ordering::Relaxed);
            slot.owed.store(0, Ordering::Relaxed);
        }
        for counter in [&set.armed, &set.armed_at_start, &set.failed, &set.table_full, &set.owed_lost] {
            counter.store(0, Ordering::Relaxed);
        }
        set.last_errno.store(0, Ordering::Relaxed);
        set.period_ns.store(1_000_000_000 / u64::from(frequency_hz.max(1)), Ordering::Relaxed);

        // This thread first: if its timer cannot be made, no thread's can (an old kernel, a
        // seccomp policy, the timer limit), and the capture falls back to `setitimer`.
        let me = current_thread_id();
        match set.arm(me) {
            Arm::Armed | Arm::AlreadyArmed => {}
            Arm::Failed(errno) => {
                set.disarm_all();
                return Err(Unavailable(format!(
                    "timer_create on a thread CPU clock failed: {}",
                    std::io::Error::from_raw_os_error(errno)
                )));
            }
            Arm::Gone | Arm::TableFull => {
                set.disarm_all();
                return Err(Unavailable("no timer could be armed on the capturing thread".into()));
            }
        }

        static LISTENERS: Once = Once::new();
        LISTENERS.call_once(|| onsite_core::thread_events::set_listeners(on_thread_start, on_thread_exit));
        set.active.store(true, Ordering::SeqCst);
        let tasks = task_ids();
        for &tid in &tasks {
            set.arm(tid);
        }
        set.armed_at_start.store(set.armed.load(Ordering::Relaxed), Ordering::Relaxed);

        let stop_scanner = Arc::new((Mutex::new(false), Condvar::new()));
        let scanner = match rescan {
            Rescan::ByOwner => None,
            Rescan::OwnThread => Self::spawn_scanner(set, Arc::clone(&stop_scanner)),
        };
        Ok(ThreadTimers { set, scanner, stop_scanner })
    }

    fn spawn_scanner(set: &'static TimerSet, stop: Arc<(Mutex<bool>, Condvar)>) -> Option<JoinHandle<()>> {
        let interval =
            if onsite_core::thread_events::threads_started() > 0 { RESCAN_WITH_HOOK } else { RESCAN_WITHOUT_HOOK };
        let scanner = std::thread::Builder::new().name("onsite-cpu-scan".into()).spawn(move || {
            let _own = OwnThread::register();
            let (stopped, wake) = &*stop;
            let mut stopped = stopped.lock().unwrap_or_else(PoisonError::into_inner);
            while !*stopped {
                stopped = wake.wait_timeout(stopped, interval).unwrap_or_else(PoisonError::into_inner).0;
                if !*stopped {
                    set.rescan();
                }
            }
        });
        match scanner {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::warn!(error = %e, "onsite: no CPU timer scanner thread; threads it would find go unsampled");
                None
            }
        }
    }

    /// Arms threads that appeared and deletes the timers of threads that ended (for a set
    /// started with [`Rescan::ByOwner`]; an ordinary thread, never a handler).
    pub(crate) fn rescan(&self) {
        self.set.rescan();
    }

    /// Deletes every timer of the set, and says what they did. After this returns no timer
    /// of the set exists, and no listener call can make one.
    pub(crate) fn stop(mut self) -> TimerStats {
        self.shut_down();
        let set = self.set;
        TimerStats {
            armed_at_start: set.armed_at_start.load(Ordering::Relaxed),
            armed: set.armed.load(Ordering::Relaxed),
            failed: set.failed.load(Ordering::Relaxed),
            last_errno: set.last_errno.load(Ordering::Relaxed),
            table_full: set.table_full.load(Ordering::Relaxed),
            owed_lost: set.owed_lost.load(Ordering::Relaxed),
        }
    }

    fn shut_down(&mut self) {
        let set = self.set;
        set.active.store(false, Ordering::SeqCst);
        // A listener that saw `active` set finishes its few syscalls; none starts after this.
        while set.in_flight.load(Ordering::SeqCst) != 0 {
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
        set.disarm_all();
    }
}

impl Drop for ThreadTimers {
    /// Nothing is left behind even if the stopper is dropped without `stop` (a panic).
    fn drop(&mut self) {
        if self.scanner.is_some() || self.set.active.load(Ordering::SeqCst) {
            self.shut_down();
        }
    }
}

/// In a fork's child: the parent's timers were not inherited (POSIX timers never are), so
/// both sets forget theirs without deleting anything, and arm no new thread. Called from
/// the child's atfork handler: stores only.
pub(crate) fn forget_after_fork() {
    for set in [&CAPTURE, &RECORDER] {
        set.active.store(false, Ordering::SeqCst);
        set.in_flight.store(0, Ordering::SeqCst);
        for slot in &set.table {
            slot.timer.store(NO_TIMER, Ordering::Relaxed);
        }
    }
}

/// The slot holding `tid`'s capture timer, if it has one this capture. Lock-free and
/// allocation-free (the SIGPROF handler calls it).
pub(crate) fn slot_of(tid: i32) -> Option<&'static Slot> {
    CAPTURE.slot_of(tid)
}

enum Arm {
    Armed,
    AlreadyArmed,
    /// The thread ended before its timer could be made.
    Gone,
    Failed(i32),
    TableFull,
}

impl TimerSet {
    const fn new(tag: usize) -> TimerSet {
        TimerSet {
            table: [const { Slot { tid: AtomicI32::new(FREE), timer: AtomicI32::new(NO_TIMER), owed: AtomicU32::new(0) } };
                SLOTS],
            tag,
            active: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            period_ns: AtomicU64::new(0),
            armed: AtomicU64::new(0),
            armed_at_start: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_errno: AtomicI32::new(0),
            table_full: AtomicU64::new(0),
            owed_lost: AtomicU64::new(0),
        }
    }

    /// Threads holding a timer of this set now.
    pub(crate) fn armed_now(&self) -> usize {
        self.table.iter().filter(|slot| slot.timer.load(Ordering::Relaxed) != NO_TIMER).count()
    }

    fn slot_of(&self, tid: i32) -> Option<&Slot> {
        let first = hash(tid);
        for probe in 0..SLOTS {
            let slot = &self.table[(first + probe) % SLOTS];
            match slot.tid.load(Ordering::Acquire) {
                t if t == tid => return Some(slot),
                FREE => return None,
                _ => {}
            }
        }
        None
    }

    /// Gives `tid` a timer unless it has one. Lock-free and allocation-free (listeners call it).
    /// A slot of an ended thread is reused, so a set that runs for the process's life (the
    /// recorder's) does not fill up as threads come and go; `tid` is looked for along its
    /// whole probe sequence first, so reuse never gives one thread two timers (except if its
    /// start listener and a rescan arm it at the same instant: then it is sampled twice as
    /// often until it ends).
    fn arm(&self, tid: i32) -> Arm {
        if self.slot_of(tid).is_some() {
            return Arm::AlreadyArmed;
        }
        let first = hash(tid);
        for probe in 0..SLOTS {
            let slot = &self.table[(first + probe) % SLOTS];
            let mut seen = slot.tid.load(Ordering::Acquire);
            if seen == FREE || seen == ENDED {
                match slot.tid.compare_exchange(seen, tid, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return self.make_timer(tid, slot),
                    Err(now) => seen = now,
                }
            }
            if seen == tid {
                return Arm::AlreadyArmed;
            }
        }
        self.table_full.fetch_add(1, Ordering::Relaxed);
        Arm::TableFull
    }

    fn make_timer(&self, tid: i32, slot: &Slot) -> Arm {
        match create_timer(tid, self.period_ns.load(Ordering::Relaxed), self.tag) {
            Ok(timer) => {
                slot.timer.store(timer, Ordering::Release);
                self.armed.fetch_add(1, Ordering::Relaxed);
                Arm::Armed
            }
            // The clock of a thread that has ended is invalid.
            Err(libc::EINVAL | libc::ESRCH) if tid != current_thread_id() => {
                slot.tid.store(ENDED, Ordering::Release);
                Arm::Gone
            }
            Err(errno) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.last_errno.store(errno, Ordering::Relaxed);
                Arm::Failed(errno)
            }
        }
    }

    /// Deletes `tid`'s timer, if it has one; its owed samples are counted as lost.
    fn disarm(&self, tid: i32) {
        if let Some(slot) = self.slot_of(tid) {
            self.release(slot);
            slot.tid.store(ENDED, Ordering::Release);
        }
    }

    fn release(&self, slot: &Slot) {
        let timer = slot.timer.swap(NO_TIMER, Ordering::AcqRel);
        if timer != NO_TIMER {
            delete_timer(timer);
        }
        let owed = slot.owed.swap(0, Ordering::AcqRel);
        self.owed_lost.fetch_add(u64::from(owed), Ordering::Relaxed);
    }

    fn disarm_all(&self) {
        for slot in &self.table {
            if slot.tid.load(Ordering::Acquire) != FREE {
                self.release(slot);
            }
        }
    }

    fn on_thread_start(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.active.load(Ordering::SeqCst) {
            self.arm(current_thread_id());
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    fn on_thread_exit(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.active.load(Ordering::SeqCst) {
            self.disarm(current_thread_id());
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Arms threads that appeared, deletes the timers of threads that ended.
    fn rescan(&self) {
        // Threads holding a timer *before* the listing is read: one of them missing from the
        // listing has ended (a thread armed after this snapshot may be missing because it is
        // newer).
        let armed: Vec<i32> =
            self.table.iter().map(|slot| slot.tid.load(Ordering::Acquire)).filter(|&tid| tid > 0).collect();
        let alive: HashSet<i32> = task_ids().into_iter().collect();
        for tid in armed {
            if !alive.contains(&tid) {
                self.disarm(tid);
            }
        }
        for &tid in &alive {
            self.arm(tid);
        }
    }
}

fn hash(tid: i32) -> usize {
    (tid as u32 as usize).wrapping_mul(2_654_435_761) % SLOTS
}

/// Listener: runs on every new thread before its start routine.
fn on_thread_start() {
    CAPTURE.on_thread_start();
    RECORDER.on_thread_start();
}

/// Listener: runs on every thread started through the interposer as it ends.
fn on_thread_exit() {
    CAPTURE.on_thread_exit();
    RECORDER.on_thread_exit();
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

/// A SIGPROF timer on `tid`'s CPU clock, armed at `period` (ns) with a random first expiry in
/// (0, period], its signals carrying `tag`. Raw system calls: glibc's `timer_create` wrapper
/// hands back its own `timer_t`, and this must not depend on how it allocates one.
/// Allocation-free.
fn create_timer(tid: i32, period: u64, tag: usize) -> Result<i32, i32> {
    let clock: libc::clockid_t = ((!tid) << 3) | CPUCLOCK_PERTHREAD_SCHED;
    // SAFETY: all-zero is a valid sigevent (the fields set below are all that is read).
    let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
    event.sigev_notify = SIGEV_THREAD_ID;
    event.sigev_signo = libc::SIGPROF;
    event.sigev_notify_thread_id = tid;
    event.sigev_value = libc::sigval { sival_ptr: tag as *mut libc::c_void };
    let mut timer: libc::c_int = 0;
    // SAFETY: the kernel reads the sigevent and writes one int (the kernel's timer_t).
    let rc = unsafe {
        libc::syscall(libc::SYS_timer_create, clock, &mut event as *mut libc::sigevent, &mut timer as *mut libc::c_int)
    };
    if rc != 0 {
        return Err(errno());
    }
    let period = period.max(1);
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
