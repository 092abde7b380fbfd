//! A SIGPROF handler in front of pprof-rs's: counts what the kernel delivered, and keeps two
//! threads' samples from colliding inside pprof-rs.
//!
//! pprof-rs's handler takes its one lock with `try_write` for the whole stack walk and drops
//! the sample when the lock is held. With a timer per thread, two threads on two cores are
//! interrupted on the same scheduler tick (the kernel checks CPU timers on its tick, and ticks
//! are aligned across cores), so without care about half the samples would be dropped there.
//! This handler lets one thread at a time into pprof-rs through a gate (one compare-and-swap);
//! a thread that finds the gate taken does not wait: it adds its expiries to its own slot's
//! `owed`, and they are recorded at its next sample, on the stack it is running then (a random
//! moment of the same thread's CPU time, so the profile stays proportional).
//!
//! One signal can stand for several expiries: above the tick rate (999 Hz on a 250 Hz kernel)
//! a timer expires about four times between two checks, and the kernel reports the extra ones
//! as the signal's overrun. Each expiry is recorded as one sample (pprof-rs's handler is called
//! once per expiry, at most [`MAX_CALLS`] times per signal; the rest stays owed to the thread's
//! next signal).
//!
//! Async-signal-safe: atomics, `gettid`, `clock_gettime` once per capture, and a lock-free
//! probe of the thread-timer table; no lock, no allocation, nothing waited for.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::thread_timers;

/// pprof-rs's handler calls per signal (it bounds the time one signal holds the gate); a
/// thread's expiries past this wait for its next signal.
pub(crate) const MAX_CALLS: u64 = 32;

type SigAction = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// pprof-rs's SIGPROF handler, found in place when a capture starts.
static PPROF_HANDLER: AtomicUsize = AtomicUsize::new(0);
/// Set while one thread is inside pprof-rs's handler.
static GATE: AtomicBool = AtomicBool::new(false);

static SIGNALS: AtomicU64 = AtomicU64::new(0);
static EXPIRIES: AtomicU64 = AtomicU64::new(0);
static PASSED: AtomicU64 = AtomicU64::new(0);
static CARRIED: AtomicU64 = AtomicU64::new(0);
static OVERLAP_LOST: AtomicU64 = AtomicU64::new(0);
static OVER_CAP: AtomicU64 = AtomicU64::new(0);
static FIRST_SAMPLE_NS: AtomicU64 = AtomicU64::new(0);

/// What reached the handler during one capture.
#[derive(Debug, Default, Clone)]
pub(crate) struct SampleCounts {
    /// SIGPROF signals delivered.
    pub(crate) signals: u64,
    /// Timer expiries those signals stand for (signals plus overruns).
    pub(crate) expiries: u64,
    /// Expiries handed to pprof-rs's handler (each one walk, one sample unless pprof-rs drops it).
    pub(crate) passed: u64,
    /// Expiries that met another thread's handler and were recorded at their thread's next sample.
    pub(crate) carried: u64,
    /// Expiries that met another thread's handler and could not be carried (no own timer slot).
    pub(crate) overlap_lost: u64,
    /// Expiries past the per-signal limit of calls into pprof-rs, of a thread with no slot to
    /// keep them for its next signal.
    pub(crate) over_cap: u64,
    /// `CLOCK_MONOTONIC` of the first signal, if any arrived.
    pub(crate) first_sample_ns: Option<u64>,
}

/// Puts the counting handler in front of the SIGPROF handler installed now (pprof-rs's, just
/// registered by its guard), and zeroes the counts. `Err` when SIGPROF has no handler.
pub(crate) fn install() -> Result<(), String> {
    for counter in [&SIGNALS, &EXPIRIES, &PASSED, &CARRIED, &OVERLAP_LOST, &OVER_CAP, &FIRST_SAMPLE_NS] {
        counter.store(0, Ordering::Relaxed);
    }
    // SAFETY: all-zero is a valid sigaction.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: reads the current action into a sigaction we own.
    if unsafe { libc::sigaction(libc::SIGPROF, std::ptr::null(), &mut current) } != 0 {
        return Err(format!("sigaction(SIGPROF): {}", std::io::Error::last_os_error()));
    }
    let ours = on_sigprof as SigAction as usize;
    if current.sa_sigaction == ours {
        return Ok(()); // Still in front (pprof-rs did not re-register): nothing to chain anew.
    }
    if current.sa_sigaction == libc::SIG_DFL || current.sa_sigaction == libc::SIG_IGN {
        return Err("SIGPROF has no handler to count for".into());
    }
    PPROF_HANDLER.store(current.sa_sigaction, Ordering::Release);
    set_handler()
}

/// The counts since [`install`]. Read after the capture's timers are deleted.
pub(crate) fn counts() -> SampleCounts {
    let first = FIRST_SAMPLE_NS.load(Ordering::Acquire);
    SampleCounts {
        signals: SIGNALS.load(Ordering::Relaxed),
        expiries: EXPIRIES.load(Ordering::Relaxed),
        passed: PASSED.load(Ordering::Relaxed),
        carried: CARRIED.load(Ordering::Relaxed),
        overlap_lost: OVERLAP_LOST.load(Ordering::Relaxed),
        over_cap: OVER_CAP.load(Ordering::Relaxed),
        first_sample_ns: (first != 0).then_some(first),
    }
}

/// The fields of a timer's `siginfo_t` (`_sigev_timer` in the kernel's union).
#[repr(C)]
struct TimerSigInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    #[cfg(target_pointer_width = "64")]
    _pad: libc::c_int,
    timer_id: libc::c_int,
    overrun: libc::c_int,
    /// The timer's `sigev_value`: which set of timers it belongs to.
    value: usize,
}

/// Installs the handler with no pprof-rs behind it, for the flight recorder while no capture
/// runs (a capture's [`install`] puts it in front of pprof-rs's again).
pub(crate) fn install_alone() -> Result<(), String> {
    PPROF_HANDLER.store(0, Ordering::Release);
    set_handler()
}

/// Forgets pprof-rs's handler: called once a capture's guard is gone, before anything puts
/// this handler back for the recorder.
pub(crate) fn detach_pprof() {
    PPROF_HANDLER.store(0, Ordering::Release);
}

/// When the recorder stops with no capture running: leaves SIGPROF ignored (as pprof-rs does
/// when a capture stops), so no handler of onsite's stays behind and a late signal is harmless.
pub(crate) fn release_if_alone() {
    if PPROF_HANDLER.load(Ordering::Acquire) == 0 {
        // SAFETY: SIG_IGN is a valid disposition for SIGPROF.
        unsafe { libc::signal(libc::SIGPROF, libc::SIG_IGN) };
    }
}

fn set_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction with our handler, SA_SIGINFO like pprof-rs's (SIGPROF itself is
    // blocked while it runs, so it never nests on one thread).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigprof as SigAction as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: initialises the set we own.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a valid action for SIGPROF.
    if unsafe { libc::sigaction(libc::SIGPROF, &action, std::ptr::null_mut()) } != 0 {
        return Err(format!("sigaction(SIGPROF): {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

extern "C" fn on_sigprof(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    if !info.is_null() {
        // SAFETY: as below; `value` is read only for a POSIX timer's signal.
        let timer = unsafe { &*(info as *const TimerSigInfo) };
        if timer.code == libc::SI_TIMER && timer.value == thread_timers::TAG_RECORDER {
            let overrun = u32::try_from(timer.overrun).unwrap_or(0);
            crate::recorder::on_recorder_signal(1 + overrun, context);
            return;
        }
    }
    if SIGNALS.fetch_add(1, Ordering::Relaxed) == 0 {
        FIRST_SAMPLE_NS.store(thread_timers::monotonic_ns(), Ordering::Release);
    }
    let mut expiries = 1u64;
    if !info.is_null() {
        // SAFETY: the kernel passes a complete siginfo_t; the timer view is read only for a
        // POSIX timer's signal, whose union member it is.
        let timer = unsafe { &*(info as *const TimerSigInfo) };
        if timer.code == libc::SI_TIMER && timer.overrun > 0 {
            expiries += timer.overrun as u64;
        }
    }
    EXPIRIES.fetch_add(expiries, Ordering::Relaxed);
    let handler = PPROF_HANDLER.load(Ordering::Acquire);
    if handler == 0 {
        return;
    }
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    let slot = thread_timers::slot_of(tid);
    if GATE.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        // Another thread is inside pprof-rs, which would drop this sample: owe it instead.
        match slot {
            Some(slot) => slot.owed.fetch_add(expiries as u32, Ordering::Relaxed),
            None => OVERLAP_LOST.fetch_add(expiries, Ordering::Relaxed) as u32,
        };
        return;
    }
    let owed = slot.map_or(0, |slot| u64::from(slot.owed.swap(0, Ordering::Relaxed)));
    let due = expiries + owed;
    let calls = due.min(MAX_CALLS);
    // Past the limit the rest stays owed to the thread's next signal, so a thread that kept
    // meeting the gate taken catches up over a few signals instead of losing the excess; only
    // a thread without a slot has nowhere to keep it.
    match slot {
        Some(slot) => slot.owed.fetch_add((due - calls) as u32, Ordering::Relaxed),
        None => OVER_CAP.fetch_add(due - calls, Ordering::Relaxed) as u32,
    };
    // The owed expiries are recorded first, so those recorded late are the owed ones in `calls`.
    CARRIED.fetch_add(owed.min(calls), Ordering::Relaxed);
    // SAFETY: the address was pprof-rs's `sa_sigaction` (SA_SIGINFO), with this signature.
    let handler = unsafe { std::mem::transmute::<usize, SigAction>(handler) };
    for _ in 0..calls {
        handler(signal, info, context);
    }
    PASSED.fetch_add(calls, Ordering::Relaxed);
    GATE.store(false, Ordering::Release);
}
