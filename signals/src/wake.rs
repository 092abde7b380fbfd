//! How signals reach the control thread. Everything that runs inside a signal handler is in
//! this file, and all of it is async-signal-safe: an atomic store and one non-blocking
//! `write(2)` of one byte to a socket the control thread sleeps on. No allocation, no lock,
//! no I/O beyond that byte.
//!
//! - SIGUSR2 (toggle) and SIGUSR1 (thread dump) are registered through signal-hook for the life
//!   of the installation and unregistered at shutdown.
//! - SIGINT and SIGTERM are only intercepted *while a capture runs*, with a plain `sigaction`
//!   whose previous disposition is kept. When one arrives, the control thread writes the
//!   capture's files, puts the previous disposition back and sends the signal again, so the
//!   process then ends (or the service's own handler runs) exactly as it would without onsite.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// The write end of the wake socket, for handlers; -1 when not installed.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// SIGUSR2s received and not yet handled.
pub(crate) static TOGGLES: AtomicUsize = AtomicUsize::new(0);
/// SIGUSR1s received and not yet handled.
pub(crate) static THREAD_DUMPS: AtomicUsize = AtomicUsize::new(0);
/// The SIGINT or SIGTERM caught during a capture, 0 for none.
pub(crate) static TERMINATION: AtomicI32 = AtomicI32::new(0);

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

/// SIGUSR2 and (with the thread dump) SIGUSR1, registered through signal-hook.
pub(crate) struct OperatorSignals {
    ids: Vec<signal_hook::SigId>,
}

impl OperatorSignals {
    pub(crate) fn register(thread_dump: bool) -> io::Result<Self> {
        let mut ids = Vec::new();
        // SAFETY: the actions only touch atomics and call `wake`, all async-signal-safe.
        ids.push(unsafe {
            signal_hook::low_level::register(libc::SIGUSR2, || {
                TOGGLES.fetch_add(1, Ordering::Relaxed);
                wake();
            })
        }?);
        if thread_dump {
            // SAFETY: as above.
            let id = unsafe {
                signal_hook::low_level::register(libc::SIGUSR1, || {
                    THREAD_DUMPS.fetch_add(1, Ordering::Relaxed);
                    wake();
                })
            };
            match id {
                Ok(id) => ids.push(id),
                Err(e) => {
                    signal_hook::low_level::unregister(ids[0]);
                    return Err(e);
                }
            }
        }
        Ok(OperatorSignals { ids })
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
    TERMINATION.store(sig, Ordering::Release);
    wake();
}

impl TerminationGuard {
    /// Intercepts SIGINT and SIGTERM, except one the process ignores: without onsite it
    /// would not end the process, so it must not end a capture either.
    pub(crate) fn arm() -> Self {
        let mut previous = Vec::new();
        for sig in TERMINATION_SIGNALS {
            // SAFETY: plain sigaction calls on zero-initialised, fully written structs.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 || old.sa_sigaction == libc::SIG_IGN {
                    continue;
                }
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_termination as *const () as usize;
                new.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
                libc::sigemptyset(&mut new.sa_mask);
                if libc::sigaction(sig, &new, &mut old) == 0 {
                    previous.push((sig, old));
                }
            }
        }
        TerminationGuard { previous }
    }

    /// Puts the previous dispositions back. If someone installed a handler on top of ours in
    /// the meantime, theirs stays: replacing it would silently drop their handling.
    pub(crate) fn disarm(mut self) {
        self.restore();
    }

    fn restore(&mut self) {
        for (sig, old) in self.previous.drain(..) {
            // SAFETY: as in `arm`.
            unsafe {
                let mut current: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut current) == 0
                    && current.sa_sigaction == on_termination as *const () as usize
                {
                    libc::sigaction(sig, &old, std::ptr::null_mut());
                }
            }
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
