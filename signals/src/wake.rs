//! How signals reach the control thread. Everything that runs inside a signal handler is in
//! this file, and all of it is async-signal-safe: atomic loads and stores, `sigaction` to read
//! the current disposition, and one non-blocking `write(2)` of one byte to a socket the control
//! thread sleeps on. No allocation, no lock, nothing that waits, no I/O beyond that byte; errno
//! is preserved for the interrupted code.
//!
//! - The toggle signal (SIGUSR2) and the dump signal (SIGUSR1), or the ones configured instead,
//!   are registered through signal-hook for the life of the installation and unregistered at
//!   shutdown. A handler already there is kept and chained to (install logs that it was).
//! - SIGINT and SIGTERM are only intercepted *while a capture runs*, with a plain `sigaction`
//!   whose previous disposition is kept. When one arrives, the control thread writes the
//!   capture's files, puts the previous disposition back and sends the signal again, so the
//!   process then ends (or the service's own handler runs) exactly as it would without onsite.
//!
//! A termination handler the service installs *while a capture runs* goes on top of onsite's
//! and, if it chains (signal-hook and so tokio do), keeps onsite's as the previous handler it
//! calls on every delivery, for ever. So `on_termination` first asks which handler is the
//! process's disposition now:
//!
//! - **onsite's**: the kernel delivered the signal to onsite alone. The control thread writes
//!   the capture, restores the previous disposition and sends the signal again.
//! - **another one**: onsite's was reached through that handler's chain, so the service has
//!   the signal already. During the capture, the control thread only writes the capture and
//!   sends nothing again (sending it again is what made one `kill -TERM` reach the service's
//!   handler without end). Outside a capture onsite's handler does nothing at all.
//!
//! Every order, for one `kill -TERM`:
//!
//! | the service's handler is installed | while a capture runs, its handler sees it | the capture |
//! |---|---|---|
//! | before `install`, or before the capture | once, when onsite sends it again | written first |
//! | during the capture (on top of onsite's) | once, at once (onsite cannot come first) | written at once, concurrently |
//! | after the capture | once, onsite is not involved | — |
//! | never (SIG_DFL) | — the process ends by the signal after the files are written | written first |
//! | SIG_IGN before the capture | — onsite does not intercept an ignored signal | not stopped |
//! | SIG_IGN or SIG_DFL during the capture | as the service set it: onsite's handler is gone | not written (the service chose) |
//!
//! In the third row's case a service whose graceful shutdown drops its `Onsite` handle (or
//! returns from `main`) waits for the files; one that calls `std::process::exit` at once may
//! end before they are written. And a handler below onsite's (installed before the capture) is
//! not called when a handler installed over onsite's chains to it: onsite cannot tell which
//! of the handlers that chain to it would have called which. A handler installed in the instant
//! between the kernel's delivery to onsite's handler and that handler's look at the disposition
//! looks like a chain: the capture is written, the signal is not sent again.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

/// The write end of the wake socket, for handlers; -1 when not installed.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// SIGUSR2s received and not yet handled.
pub(crate) static TOGGLES: AtomicUsize = AtomicUsize::new(0);
/// SIGUSR1s received and not yet handled.
pub(crate) static THREAD_DUMPS: AtomicUsize = AtomicUsize::new(0);
/// The SIGINT or SIGTERM that onsite's handler caught as the process's disposition, 0 for none:
/// onsite consumed it, so the control thread sends it again once the capture is written.
pub(crate) static TERMINATION: AtomicI32 = AtomicI32::new(0);
/// The SIGINT or SIGTERM that reached onsite's handler during a capture through a handler
/// installed over it, 0 for none: that handler has it already, so it is never sent again.
pub(crate) static CHAINED_TERMINATION: AtomicI32 = AtomicI32::new(0);
/// The termination signals intercepted for the running capture, one bit per signal number.
static ARMED: AtomicU64 = AtomicU64::new(0);

/// The dispositions onsite's termination handler replaced, for a forked child to put back (it
/// has no control thread to do it). Written by [`TerminationGuard::arm`] before the signal's
/// [`ARMED`] bit is set (Release), read only in the child, after an Acquire load of that bit.
struct SavedDispositions(std::cell::UnsafeCell<[libc::sigaction; TERMINATION_SIGNALS.len()]>);

// SAFETY: see the type's docs: one writer (the control thread, before publishing through
// `ARMED`), and readers only in a forked child, where that writer no longer exists.
unsafe impl Sync for SavedDispositions {}

// SAFETY: `sigaction` is plain data for which all zeroes is a valid (SIG_DFL) value.
static SAVED: SavedDispositions = SavedDispositions(std::cell::UnsafeCell::new(unsafe { std::mem::zeroed() }));

/// Makes onsite inert in a child made by `fork(2)` (a pre-fork server, `fork` + `exec`): the
/// child has no control thread, so nothing may be sent its way, and it must not share the
/// parent's wake socket (a signal to the child would toggle the parent's capture). Registered
/// once, at the first install. The child handler is async-signal-safe: atomic stores and
/// `sigaction(2)` only.
pub(crate) fn register_fork_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a handler that only does what `pthread_atfork` child handlers may.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_forked_child)) };
        if rc != 0 {
            tracing::warn!(rc, "onsite: pthread_atfork failed; a forked child would share onsite's wake socket");
        }
    });
}

extern "C" fn in_forked_child() {
    WAKE_FD.store(-1, Ordering::Release);
    crate::backends::forget_after_fork();
    let armed = ARMED.swap(0, Ordering::AcqRel);
    for (i, sig) in TERMINATION_SIGNALS.into_iter().enumerate() {
        if armed & bit(sig) == 0 {
            continue;
        }
        // SAFETY: sigaction(2) is async-signal-safe; `SAVED[i]` was written before the bit was
        // set, and no other thread exists in the child to write it.
        unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut current) == 0 && is_ours(&current) {
                libc::sigaction(sig, &(*SAVED.0.get())[i], std::ptr::null_mut());
            }
        }
    }
}

fn bit(sig: libc::c_int) -> u64 {
    1u64 << (sig as u32 % 64)
}

/// Wakes the control thread. Async-signal-safe: one non-blocking write; a full socket already
/// holds a wake-up, so a failed write loses nothing. errno is preserved for the interrupted code.
pub(crate) fn wake() {
    let fd = WAKE_FD.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    // SAFETY: errno is thread-local; reading and restoring it around write(2) is what a signal
    // handler must do so the code it interrupted sees its own errno.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(fd, [1u8].as_ptr().cast(), 1);
        *libc::__errno_location() = errno;
    }
}

/// The socket pair the control thread sleeps on, published for signal handlers.
pub(crate) struct WakeSocket {
    pub(crate) reader: UnixStream,
    writer: UnixStream,
}

impl WakeSocket {
    pub(crate) fn new() -> io::Result<Self> {
        let (reader, writer) = UnixStream::pair()?;
        writer.set_nonblocking(true)?;
        WAKE_FD.store(writer.as_raw_fd(), Ordering::Release);
        Ok(WakeSocket { reader, writer })
    }
}

/// Wakes the control thread from ordinary code (an API call), through the socket itself.
pub(crate) fn wake_socket_writer(socket: Option<&WakeSocket>) {
    if let Some(socket) = socket {
        // Non-blocking: a full socket already holds a wake-up.
        let _ = (&socket.writer).write(&[1]);
    }
}

impl Drop for WakeSocket {
    fn drop(&mut self) {
        // Handlers must stop writing to this fd before it is closed (and maybe reused).
        let _ = WAKE_FD.compare_exchange(self.writer.as_raw_fd(), -1, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The toggle signal (SIGUSR2) and the dump signal (SIGUSR1), as configured, registered
/// through signal-hook.
pub(crate) struct OperatorSignals {
    ids: Vec<signal_hook::SigId>,
}

/// Signals onsite has registered through signal-hook in this process: signal-hook leaves its
/// trampoline installed after onsite unregisters, so on a later installation that trampoline
/// is not the service's handler.
static REGISTERED_BEFORE: AtomicU64 = AtomicU64::new(0);

impl OperatorSignals {
    pub(crate) fn register(toggle: Option<libc::c_int>, dump: Option<libc::c_int>) -> io::Result<Self> {
        let mut signals = OperatorSignals { ids: Vec::new() };
        let jobs: [(Option<libc::c_int>, &str, &str, &'static AtomicUsize); 2] = [
            (toggle, "toggle", crate::vars::TOGGLE_SIGNAL, &TOGGLES),
            (dump, "thread dump", crate::vars::DUMP_SIGNAL, &THREAD_DUMPS),
        ];
        for (sig, job, variable, received) in jobs {
            let Some(sig) = sig else { continue };
            report_existing_handler(sig, job, variable);
            // SAFETY: the action only touches an atomic and calls `wake`, all async-signal-safe.
            // On an error `signals` is dropped, unregistering what was registered before.
            signals.ids.push(unsafe {
                signal_hook::low_level::register(sig, move || {
                    received.fetch_add(1, Ordering::Relaxed);
                    wake();
                })
            }?);
            REGISTERED_BEFORE.fetch_or(bit(sig), Ordering::AcqRel);
        }
        Ok(signals)
    }
}

/// Logs when `sig` already has a handler: signal-hook chains to it, so the service's handler
/// and onsite's both run on every delivery, and the operator should know how to part them.
fn report_existing_handler(sig: libc::c_int, job: &str, variable: &str) {
    // SAFETY: sigaction(2) only reads the disposition into a zeroed struct on this stack.
    let current = unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut current) != 0 {
            return;
        }
        current.sa_sigaction
    };
    let name = crate::env::signal_name(sig);
    if current == libc::SIG_IGN {
        tracing::info!(signal = %name, "onsite: {name} was ignored by the process; onsite now uses it as its {job} signal");
    } else if current != libc::SIG_DFL && REGISTERED_BEFORE.load(Ordering::Acquire) & bit(sig) == 0 {
        tracing::warn!(
            signal = %name,
            "onsite: {name} already has a handler; onsite chains to it, so both run on every {name}. \
             If the service uses {name} itself, give onsite's {job} another signal: {variable}=SIGRTMIN+N, or `off`"
        );
    }
}

impl Drop for OperatorSignals {
    fn drop(&mut self) {
        // signal-hook keeps its trampoline installed with no actions, so after shutdown these
        // signals are ignored rather than killing the service.
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// SIGINT/SIGTERM interception for the length of one capture (see the module docs).
pub(crate) struct TerminationGuard {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

const TERMINATION_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

extern "C" fn on_termination(sig: libc::c_int, _info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: errno is thread-local; it is restored below for the interrupted code. sigaction(2)
    // is async-signal-safe, and only reads the disposition into a struct on this stack.
    unsafe {
        let errno = *libc::__errno_location();
        let mut current: libc::sigaction = std::mem::zeroed();
        let ours = libc::sigaction(sig, std::ptr::null(), &mut current) != 0 || is_ours(&current);
        if ours {
            TERMINATION.store(sig, Ordering::Release);
            wake();
        } else if ARMED.load(Ordering::Acquire) & bit(sig) != 0 {
            CHAINED_TERMINATION.store(sig, Ordering::Release);
            wake();
        }
        *libc::__errno_location() = errno;
    }
}

fn is_ours(action: &libc::sigaction) -> bool {
    action.sa_sigaction == on_termination as *const () as usize
}

impl TerminationGuard {
    /// Intercepts SIGINT and SIGTERM, except one the process ignores: without onsite it
    /// would not end the process, so it must not end a capture either.
    pub(crate) fn arm() -> Self {
        let mut previous = Vec::new();
        for (i, sig) in TERMINATION_SIGNALS.into_iter().enumerate() {
            // SAFETY: plain sigaction calls on zero-initialised, fully written structs; `SAVED`
            // is written only here, on the control thread, before `ARMED` publishes it.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 || old.sa_sigaction == libc::SIG_IGN {
                    continue;
                }
                (*SAVED.0.get())[i] = old;
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_termination as *const () as usize;
                new.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
                libc::sigemptyset(&mut new.sa_mask);
                ARMED.fetch_or(bit(sig), Ordering::AcqRel);
                if libc::sigaction(sig, &new, &mut old) == 0 {
                    previous.push((sig, old));
                } else {
                    ARMED.fetch_and(!bit(sig), Ordering::AcqRel);
                }
            }
        }
        TerminationGuard { previous }
    }

    /// Puts the previous dispositions back. If someone installed a handler on top of ours in
    /// the meantime, theirs stays: replacing it would silently drop their handling. Ours, still
    /// in their chain, does nothing from now on.
    pub(crate) fn disarm(mut self) {
        self.restore();
    }

    fn restore(&mut self) {
        for (sig, old) in self.previous.drain(..) {
            // SAFETY: as in `arm`.
            unsafe {
                let mut current: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut current) == 0 && is_ours(&current) {
                    libc::sigaction(sig, &old, std::ptr::null_mut());
                }
            }
            // After the disposition: a signal arriving in between still finds our handler on
            // top, and is sent again.
            ARMED.fetch_and(!bit(sig), Ordering::AcqRel);
        }
    }
}

impl Drop for TerminationGuard {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Sends `sig` to the whole process again, after the previous disposition is back: the
/// default action ends the process by that signal; a service's own handler runs and decides.
pub(crate) fn resend(sig: libc::c_int) {
    // SAFETY: kill(2) on our own pid with a valid signal number.
    unsafe {
        libc::kill(libc::getpid(), sig);
    }
}
