//! The CPU flight recorder: low-rate CPU sampling that runs all the time, into a ring of the
//! last few minutes, so a capture can also show what the CPU did *before* it began (the spike
//! that made a rule fire, the burst that was over when a human reacted).
//!
//! - **Clock**: a second set of per-thread CPU-time timers ([`thread_timers::RECORDER`]), at
//!   the recorder's own rate (19 Hz by default), independent of any capture's. Their signals
//!   carry the recorder's tag, so the one SIGPROF handler (`sample_count`) hands them here and
//!   never to pprof-rs.
//! - **Stacks**: walked in the handler from the interrupted registers by core's lock-free
//!   walker ([`onsite_core::stack_walk::Walker::walk_interrupted`]), never by libgcc's.
//! - **Ring**: [`RING_SLOTS`] time slots of `window / (RING_SLOTS - 1)` each. A slot holds one
//!   counter per entry of one shared [`StackTable`] of distinct stacks. The handler adds to the
//!   slot of the current time, which the recorder's thread prepared (zeroed and stamped with
//!   its epoch) one slot ahead; so the handler never clears anything, and a slot the thread
//!   has not prepared in time counts its samples as lost, named, instead of mixing two times.
//! - **Bounded memory**: everything is fixed at compile time and allocated once, in `static`s
//!   ([`memory_bytes`]: ~2.7 MiB, whatever the number of threads or the window), plus the
//!   walker's caches and one kernel timer per thread. A stack that finds the table full is
//!   counted in its slot as a named loss. The recorder's thread frees, at every rotation, the
//!   entries no slot counts any more, with the handlers paused for that instant (a handler
//!   that meets the pause does not wait: it counts its sample as lost).
//!
//! - **Beside pprof-rs**: while a pprof-rs guard is registered (a capture, or the warm-up at
//!   the profiler's creation), the handler in front of pprof-rs's still hands recorder signals
//!   here; each time a guard goes away (it leaves SIGPROF ignored) the handler is put back.
//!   Only in the instant between a guard registering and the handler going in front of it do
//!   recorder signals reach pprof-rs instead (a capture's start: under a millisecond).
//!
//! Handler path (async-signal-safe): atomics, `clock_gettime`, `gettid`, the walker, the
//! stack table's `intern`; no lock, no allocation, nothing waited for. The ordinary-thread
//! side (rotation, rescans, snapshot) takes one mutex between its own operations only.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use onsite_core::own_work::{OwnThread, is_own_thread_id};
use onsite_core::pprof::PprofBuilder;
use onsite_core::stack_walk::{WalkError, Walker};
use onsite_core::{CaptureError, CaptureOutput, ProfileKind, StackTable, WrittenFile};

use crate::sample_count;
use crate::thread_timers::{self, Rescan, ThreadTimers, monotonic_ns};

/// Slots of the ring: the one being written, and the ones before it that the window covers.
pub const RING_SLOTS: usize = 31;
/// Distinct stacks the recorder can hold at once (over the whole window).
pub const STACKS: usize = 4096;
/// Frames kept per stack (deeper stacks are cut at the root end).
pub const DEPTH: usize = 64;
/// The recorder's default rate: low enough to cost nothing measurable, prime so it never runs
/// in step with a service's periodic work.
pub const DEFAULT_HZ: u32 = 19;
/// The recorder's default window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);

/// Marks, as the stack's last (root) entry, a sample of one of onsite's own threads: no code
/// lives at address 1.
const OWN_MARKER: usize = 1;
/// Walker cache slots: handlers on this many threads at once walk; more count as lost.
const WALKER_CACHES: usize = 8;
/// Kinds of [`WalkError`] (codes 1..=7), counted per slot when a walk found no frame.
const WALK_ERRORS: usize = 8;

struct TimeSlot {
    /// Which slot of time (`CLOCK_MONOTONIC / slot length`) this holds; 0 while unused.
    epoch: AtomicU64,
    counts: [AtomicU32; STACKS],
    /// Samples whose stack found the stack table full.
    table_full: AtomicU64,
    /// Samples whose walk found no frame, by [`WalkError`] code.
    not_walked: [AtomicU64; WALK_ERRORS],
}

static STACK_TABLE: StackTable<STACKS, DEPTH> = StackTable::new(64);
static RING: [TimeSlot; RING_SLOTS] = [const {
    TimeSlot {
        epoch: AtomicU64::new(0),
        counts: [const { AtomicU32::new(0) }; STACKS],
        table_full: AtomicU64::new(0),
        not_walked: [const { AtomicU64::new(0) }; WALK_ERRORS],
    }
}; RING_SLOTS];

/// Slot length in ns; 0 while no recorder runs (the handler then records nothing).
static SLOT_NS: AtomicU64 = AtomicU64::new(0);
static WALKER: AtomicPtr<Walker> = AtomicPtr::new(std::ptr::null_mut());
/// The main thread's stack (`[stack]` mapping), found outside the handler.
static MAIN_STACK: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
/// Set while the recorder's thread changes the stack table or the walker.
static PAUSED: AtomicBool = AtomicBool::new(false);
static IN_HANDLER: AtomicU32 = AtomicU32::new(0);
/// Samples that met the pause.
static LOST_PAUSED: AtomicU64 = AtomicU64::new(0);
/// Samples that found their time slot not yet prepared.
static LOST_LATE: AtomicU64 = AtomicU64::new(0);
/// Walks that met code outside the walker's objects (then the walker is rebuilt).
static OUTSIDE_KNOWN_CODE: AtomicU64 = AtomicU64::new(0);
/// One recorder per process.
static RUNNING: AtomicBool = AtomicBool::new(false);
/// Serialises the rotation's clearing and freeing with a snapshot's reading.
static MAINTENANCE: Mutex<()> = Mutex::new(());

/// The fixed memory the recorder's ring and stack table take (allocated once, in `static`s).
pub fn memory_bytes() -> usize {
    std::mem::size_of_val(&STACK_TABLE) + std::mem::size_of_val(&RING)
}

fn new_walker() -> *mut Walker {
    Box::into_raw(Box::new(Walker::new(WALKER_CACHES)))
}

/// A running flight recorder. Dropping it (or [`FlightRecorder::stop`]) deletes its timers
/// and joins its thread.
#[derive(Debug)]
pub struct FlightRecorder {
    window: Duration,
    hz: u32,
    thread: Option<JoinHandle<()>>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    started_wall: SystemTime,
    started_mono: u64,
}

/// Why the recorder could not start.
#[derive(Debug)]
pub struct RecorderError(pub String);

impl std::fmt::Display for RecorderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RecorderError {}

impl FlightRecorder {
    /// Starts sampling every thread at `hz` of its CPU time into a ring covering `window`.
    /// Only one recorder runs per process; it needs per-thread timers (no `setitimer`
    /// fallback: that clock belongs to captures).
    pub fn start(window: Duration, hz: u32) -> Result<FlightRecorder, RecorderError> {
        if RUNNING.swap(true, Ordering::SeqCst) {
            return Err(RecorderError("a CPU flight recorder already runs in this process".into()));
        }
        let slot_ns = (window.as_nanos() / (RING_SLOTS as u128 - 1)).clamp(1_000_000, u128::from(u64::MAX)) as u64;
        WALKER.store(new_walker(), Ordering::Release);
        if let Some((low, top)) = onsite_core::stack_walk::main_thread_stack() {
            MAIN_STACK[0].store(low, Ordering::Relaxed);
            MAIN_STACK[1].store(top, Ordering::Relaxed);
        }
        {
            let _m = MAINTENANCE.lock().unwrap_or_else(PoisonError::into_inner);
            STACK_TABLE.clear(|_| {});
            for slot in &RING {
                clear_slot(slot);
                slot.epoch.store(0, Ordering::Relaxed);
            }
            for counter in [&LOST_PAUSED, &LOST_LATE, &OUTSIDE_KNOWN_CODE] {
                counter.store(0, Ordering::Relaxed);
            }
            let now = monotonic_ns() / slot_ns;
            prepare(now);
            prepare(now + 1);
            SLOT_NS.store(slot_ns, Ordering::Release);
        }
        if let Err(e) = sample_count::install_alone() {
            return Err(Self::undo(RecorderError(format!("cannot handle SIGPROF: {e}"))));
        }
        let timers = match ThreadTimers::start(&thread_timers::RECORDER, hz.max(1), Rescan::ByOwner) {
            Ok(timers) => timers,
            Err(e) => return Err(Self::undo(RecorderError(format!("no per-thread CPU timers: {}", e.0)))),
        };
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new().name("onsite-cpu-rec".into()).spawn(move || rotate(timers, slot_ns, &stop))
        };
        let thread = match thread {
            Ok(thread) => thread,
            // The timers were moved into the closure that was never run, and dropped with it.
            Err(e) => return Err(Self::undo(RecorderError(format!("cannot start its thread: {e}")))),
        };
        tracing::info!(
            window = ?window,
            hz,
            memory_kib = memory_bytes() / 1024,
            "onsite: CPU flight recorder running; every capture also writes the CPU of the window before it"
        );
        Ok(FlightRecorder {
            window,
            hz,
            thread: Some(thread),
            stop,
            started_wall: SystemTime::now(),
            started_mono: monotonic_ns(),
        })
    }

    fn undo(error: RecorderError) -> RecorderError {
        SLOT_NS.store(0, Ordering::Release);
        pause_handlers();
        let walker = WALKER.swap(std::ptr::null_mut(), Ordering::AcqRel);
        PAUSED.store(false, Ordering::SeqCst);
        if !walker.is_null() {
            // SAFETY: made by Box::into_raw in `new_walker`; no handler holds it (paused above).
            drop(unsafe { Box::from_raw(walker) });
        }
        sample_count::release_if_alone();
        RUNNING.store(false, Ordering::SeqCst);
        error
    }

    /// The window the recorder keeps.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// What the ring holds now, up to this instant: taken at a capture's start, written once
    /// the capture runs ([`BeforeSnapshot::write`]).
    pub fn snapshot(&self) -> BeforeSnapshot {
        let _m = MAINTENANCE.lock().unwrap_or_else(PoisonError::into_inner);
        let slot_ns = SLOT_NS.load(Ordering::Acquire).max(1);
        let now = monotonic_ns();
        let current = now / slot_ns;
        let oldest = current.saturating_sub(RING_SLOTS as u64 - 2);
        let in_window: Vec<&TimeSlot> = RING
            .iter()
            .filter(|s| {
                let e = s.epoch.load(Ordering::Acquire);
                e != 0 && (oldest..=current).contains(&e)
            })
            .collect();
        let mut stacks = Vec::new();
        for index in 0..STACKS {
            let count: u64 = in_window.iter().map(|s| u64::from(s.counts[index].load(Ordering::Relaxed))).sum();
            if count > 0
                && let Some(ips) = STACK_TABLE.get(index)
            {
                stacks.push((ips, count));
            }
        }
        let mut not_walked = [0u64; WALK_ERRORS];
        for slot in &in_window {
            for (total, n) in not_walked.iter_mut().zip(&slot.not_walked) {
                *total += n.load(Ordering::Relaxed);
            }
        }
        let from_mono = (oldest * slot_ns).max(self.started_mono);
        BeforeSnapshot {
            hz: self.hz,
            stacks,
            table_full: in_window.iter().map(|s| s.table_full.load(Ordering::Relaxed)).sum(),
            not_walked,
            lost_paused: LOST_PAUSED.load(Ordering::Relaxed),
            lost_late: LOST_LATE.load(Ordering::Relaxed),
            from: self.started_wall + Duration::from_nanos(from_mono - self.started_mono),
            until: self.started_wall + Duration::from_nanos(now.saturating_sub(self.started_mono)),
        }
    }

    /// Deletes the recorder's timers and joins its thread.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        {
            let (stopped, wake) = &*self.stop;
            *stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
            wake.notify_all();
        }
        // The thread stops the timers before it returns.
        let _ = thread.join();
        let _ = Self::undo(RecorderError(String::new()));
    }
}

impl Drop for FlightRecorder {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The ring's content at one instant, ready to be written as the `cpu-before` file.
#[derive(Debug)]
pub struct BeforeSnapshot {
    hz: u32,
    stacks: Vec<(Vec<usize>, u64)>,
    table_full: u64,
    not_walked: [u64; WALK_ERRORS],
    lost_paused: u64,
    lost_late: u64,
    from: SystemTime,
    until: SystemTime,
}

impl BeforeSnapshot {
    /// The wall-clock window the snapshot covers: from the oldest slot kept (or the recorder's
    /// start) to the moment it was taken.
    pub fn window(&self) -> (SystemTime, SystemTime) {
        (self.from, self.until)
    }

    /// Writes the snapshot as `…-cpu-before-….pprof` of the capture `out`.
    pub fn write(self, out: &CaptureOutput) -> Result<WrittenFile, CaptureError> {
        let err = |m: String| CaptureError::new(ProfileKind::CpuBefore, m);
        let period_ns = 1_000_000_000 / i64::from(self.hz.max(1));
        let span = self.until.duration_since(self.from).unwrap_or_default();
        let mut builder =
            PprofBuilder::new(&[("samples", "count"), ("cpu", "nanoseconds")], ("cpu", "nanoseconds"), period_ns)
                .time_range(self.from, span)
                .symbolize_until(out.symbolize_deadline());
        let mut recorded = 0u64;
        for (ips, count) in &self.stacks {
            let values = [*count as i64, *count as i64 * period_ns];
            recorded += count;
            match ips.split_last() {
                Some((&OWN_MARKER, service)) => builder.add_addresses_under("[onsite]", service, &values, &[]),
                _ => builder.add_addresses(ips, &values, &[]),
            }
        }
        for (code, &n) in self.not_walked.iter().enumerate() {
            if n > 0 {
                let reason = WalkError::from_code(code as u8).map_or("unknown", WalkError::describe);
                builder.add_not_walked(reason, &[n as i64, n as i64 * period_ns], &[]);
            }
        }
        if self.table_full > 0 {
            let values = [self.table_full as i64, self.table_full as i64 * period_ns];
            builder.add_not_walked("the flight recorder's stack table was full", &values, &[]);
        }
        builder.comment(&format!(
            "onsite: CPU flight recorder at {} Hz of each thread's CPU time: the {:.1}s before this capture began \
             ({} to {}), {recorded} samples",
            self.hz,
            span.as_secs_f64(),
            onsite_core::format_utc_millis(unix_ms(self.from)),
            onsite_core::format_utc_millis(unix_ms(self.until)),
        ));
        builder.comment(&format!(
            "onsite: recorder losses since it started: {} samples met its table maintenance, {} found their time \
             slot not ready; in this window {} found the stack table full",
            self.lost_paused, self.lost_late, self.table_full
        ));
        let mut bytes = Vec::new();
        builder.write_gzip(&mut bytes).map_err(|e| err(format!("encoding: {e}")))?;
        out.write(ProfileKind::CpuBefore, "pprof", |w| w.write_all(&bytes))
    }
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Called by the SIGPROF handler for a recorder timer's signal: `expiries` samples of the
/// interrupted stack. Async-signal-safe (see the module docs).
pub(crate) fn on_recorder_signal(expiries: u32, context: *mut libc::c_void) {
    // SAFETY: errno is thread-local; a handler restores what it found.
    let errno = unsafe { *libc::__errno_location() };
    IN_HANDLER.fetch_add(1, Ordering::SeqCst);
    if PAUSED.load(Ordering::SeqCst) {
        LOST_PAUSED.fetch_add(u64::from(expiries), Ordering::Relaxed);
    } else {
        record(expiries, context);
    }
    IN_HANDLER.fetch_sub(1, Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

fn record(expiries: u32, context: *mut libc::c_void) {
    let slot_ns = SLOT_NS.load(Ordering::Acquire);
    let walker = WALKER.load(Ordering::Acquire);
    if slot_ns == 0 || walker.is_null() || context.is_null() {
        return;
    }
    let epoch = monotonic_ns() / slot_ns;
    let slot = &RING[(epoch % RING_SLOTS as u64) as usize];
    if slot.epoch.load(Ordering::Acquire) != epoch {
        LOST_LATE.fetch_add(u64::from(expiries), Ordering::Relaxed);
        return;
    }
    let tid = onsite_core::own_work::current_thread_id();
    let main = [MAIN_STACK[0].load(Ordering::Relaxed), MAIN_STACK[1].load(Ordering::Relaxed)];
    let main = (tid == std::process::id() as i32 && main[1] != 0).then_some((main[0], main[1]));
    let mut ips = [0usize; DEPTH];
    // SAFETY: the walker stays alive while any handler is inside (it is replaced or freed only
    // with the handlers paused and none inside); `context` is the kernel's, on this thread.
    let walked = unsafe { (*walker).walk_interrupted(context, main, tid as usize, &mut ips[..DEPTH - 1]) };
    if walked.stopped == Some(WalkError::OutsideKnownCode) {
        OUTSIDE_KNOWN_CODE.fetch_add(1, Ordering::Relaxed);
    }
    if walked.depth == 0 {
        let code = walked.stopped.map_or(WalkError::UnwindFailed.code(), WalkError::code) as usize;
        slot.not_walked[code.min(WALK_ERRORS - 1)].fetch_add(u64::from(expiries), Ordering::Relaxed);
        return;
    }
    let mut depth = walked.depth;
    if is_own_thread_id(tid) {
        ips[depth] = OWN_MARKER;
        depth += 1;
    }
    match STACK_TABLE.intern(&ips[..depth]) {
        Some(index) => slot.counts[index].fetch_add(expiries, Ordering::Relaxed),
        None => slot.table_full.fetch_add(u64::from(expiries), Ordering::Relaxed) as u32,
    };
}

/// Zeroes a slot's counters (only those that are not zero, so untouched pages stay untouched).
fn clear_slot(slot: &TimeSlot) {
    for count in &slot.counts {
        if count.load(Ordering::Relaxed) != 0 {
            count.store(0, Ordering::Relaxed);
        }
    }
    slot.table_full.store(0, Ordering::Relaxed);
    for n in &slot.not_walked {
        n.store(0, Ordering::Relaxed);
    }
}

/// Makes the slot of `epoch` ready for the handlers (zeroed, then stamped). The slot it
/// replaces is the oldest of the ring, outside every window.
fn prepare(epoch: u64) {
    let slot = &RING[(epoch % RING_SLOTS as u64) as usize];
    if slot.epoch.load(Ordering::Acquire) == epoch {
        return;
    }
    // Unstamped first, so a handler late enough to still aim at the old epoch counts as late.
    slot.epoch.store(0, Ordering::Release);
    clear_slot(slot);
    slot.epoch.store(epoch, Ordering::Release);
}

/// Sets the pause and waits until no handler is inside (each finishes in a bounded time: it
/// waits for nothing). Ordinary threads only.
fn pause_handlers() {
    PAUSED.store(true, Ordering::SeqCst);
    while IN_HANDLER.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
}

/// The recorder's thread: once per slot, prepares the next slot, frees the stack entries no
/// slot counts any more, rebuilds the walker if code was loaded since it was built, and arms
/// threads the `pthread_create` hook did not report.
fn rotate(timers: ThreadTimers, slot_ns: u64, stop: &(Mutex<bool>, Condvar)) {
    let _own = OwnThread::register();
    let mut outside_seen = 0;
    let (stopped, wake) = stop;
    let mut stopped_now = stopped.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let now = monotonic_ns();
        let next = (now / slot_ns + 1) * slot_ns;
        // A rescan at least every second, so threads started without the hook are sampled soon.
        let wait = Duration::from_nanos((next - now).min(1_000_000_000));
        stopped_now = wake.wait_timeout(stopped_now, wait).unwrap_or_else(PoisonError::into_inner).0;
        if *stopped_now {
            break;
        }
        timers.rescan();
        let current = monotonic_ns() / slot_ns;
        let _m = MAINTENANCE.lock().unwrap_or_else(PoisonError::into_inner);
        prepare(current);
        if RING[((current + 1) % RING_SLOTS as u64) as usize].epoch.load(Ordering::Acquire) == current + 1 {
            continue; // This slot's maintenance is done.
        }
        prepare(current + 1);
        let outside = OUTSIDE_KNOWN_CODE.load(Ordering::Relaxed);
        let new_walker = (outside != outside_seen).then(new_walker);
        outside_seen = outside;
        pause_handlers();
        STACK_TABLE.retain(|index| RING.iter().any(|s| s.counts[index].load(Ordering::Relaxed) != 0), |_| {});
        let old_walker = new_walker.map(|w| WALKER.swap(w, Ordering::AcqRel));
        PAUSED.store(false, Ordering::SeqCst);
        if let Some(old) = old_walker.filter(|w| !w.is_null()) {
            // SAFETY: made by Box::into_raw; swapped out while no handler was inside.
            drop(unsafe { Box::from_raw(old) });
        }
    }
    drop(stopped_now);
    let _ = timers.stop();
}

/// Whether a flight recorder runs in this process.
pub fn is_running() -> bool {
    RUNNING.load(Ordering::SeqCst)
}

/// After a capture's pprof-rs guard is gone (it leaves SIGPROF ignored): puts the handler
/// back for the recorder, if one runs.
pub(crate) fn after_capture() {
    sample_count::detach_pprof();
    if is_running()
        && let Err(e) = sample_count::install_alone()
    {
        tracing::warn!(error = %e, "onsite: the CPU flight recorder lost its SIGPROF handler after a capture");
    }
}

/// Threads holding a recorder timer now (for tests and the log).
pub fn timers_armed() -> usize {
    thread_timers::RECORDER.armed_now()
}

/// In a fork's child: the parent's recorder timers and thread did not come along; the child
/// records nothing (its `FlightRecorder` handle, if any, only cleans up). Stores only.
pub fn forget_after_fork() {
    SLOT_NS.store(0, Ordering::SeqCst);
    thread_timers::forget_after_fork();
}
