//! The control thread: the only place a capture starts or stops. Signal handlers and API calls
//! just wake it (see `wake.rs`); it does the slow work (stopping backends, symbolising,
//! writing files) on an ordinary thread, where allocating and locking are safe.

use std::io::{ErrorKind, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, ProfileKind, Profiler, Stopper, WrittenFile};

use crate::wake::{self, TERMINATION, THREAD_DUMPS, TOGGLES, TerminationGuard};

/// Why a capture started or stopped, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    Signal,
    Api,
    MaxDuration,
    Termination(libc::c_int),
    Shutdown,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Signal => f.write_str("SIGUSR2"),
            Cause::Api => f.write_str("API call"),
            Cause::MaxDuration => f.write_str("maximum duration reached"),
            Cause::Termination(libc::SIGINT) => f.write_str("SIGINT"),
            Cause::Termination(_) => f.write_str("SIGTERM"),
            Cause::Shutdown => f.write_str("onsite shutting down"),
        }
    }
}

/// Requests from the `Onsite` handle.
pub(crate) enum Command {
    Start { reply: mpsc::Sender<bool> },
    Stop { reply: mpsc::Sender<Vec<WrittenFile>> },
    Shutdown,
}

struct Capture {
    output: CaptureOutput,
    stoppers: Vec<(ProfileKind, Box<dyn Stopper>)>,
    started: Instant,
    deadline: Instant,
    termination_guard: TerminationGuard,
}

pub(crate) struct Controller {
    pub(crate) dir: DumpDir,
    pub(crate) profilers: Vec<Box<dyn Profiler>>,
    pub(crate) max_duration: Duration,
    pub(crate) backends: crate::backends::Settings,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) wake_reader: std::os::unix::net::UnixStream,
    capture: Option<Capture>,
}

/// How long the control thread sleeps when nothing is due: long, since every event wakes it.
const IDLE_WAIT: Duration = Duration::from_secs(3600);

impl Controller {
    pub(crate) fn new(
        dir: DumpDir,
        profilers: Vec<Box<dyn Profiler>>,
        max_duration: Duration,
        backends: crate::backends::Settings,
        commands: mpsc::Receiver<Command>,
        wake_reader: std::os::unix::net::UnixStream,
    ) -> Self {
        Controller { dir, profilers, max_duration, backends, commands, wake_reader, capture: None }
    }

    pub(crate) fn run(mut self) {
        loop {
            let now = Instant::now();
            let wait = self.capture.as_ref().map_or(IDLE_WAIT, |c| c.deadline.saturating_duration_since(now));
            self.sleep(wait);

            if let sig @ 1.. = TERMINATION.swap(0, Ordering::AcqRel) {
                self.on_termination(sig);
            }
            for _ in 0..TOGGLES.swap(0, Ordering::AcqRel) {
                self.toggle();
            }
            if THREAD_DUMPS.swap(0, Ordering::AcqRel) > 0 {
                self.dump_threads();
            }
            while let Ok(command) = self.commands.try_recv() {
                match command {
                    Command::Start { reply } => {
                        let _ = reply.send(self.start(Cause::Api));
                    }
                    Command::Stop { reply } => {
                        let _ = reply.send(self.stop(Cause::Api));
                    }
                    Command::Shutdown => {
                        self.stop(Cause::Shutdown);
                        return;
                    }
                }
            }
            if self.capture.as_ref().is_some_and(|c| Instant::now() >= c.deadline) {
                self.stop(Cause::MaxDuration);
            }
        }
    }

    /// Sleeps until woken or `wait` passes, then drains the wake socket.
    fn sleep(&mut self, wait: Duration) {
        let mut buf = [0u8; 64];
        let _ = self.wake_reader.set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        match self.wake_reader.read(&mut buf) {
            Ok(_) => {
                // Drain whatever else is queued; the counters, not the bytes, carry the events.
                let _ = self.wake_reader.set_nonblocking(true);
                while matches!(self.wake_reader.read(&mut buf), Ok(n) if n > 0) {}
                let _ = self.wake_reader.set_nonblocking(false);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => {
                tracing::warn!(error = %e, "onsite: reading the wake socket failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn toggle(&mut self) {
        if self.capture.is_some() {
            self.stop(Cause::Signal);
        } else {
            self.start(Cause::Signal);
        }
    }

    /// Starts a capture of every enabled kind; `false` (and nothing changes) if one runs.
    fn start(&mut self, cause: Cause) -> bool {
        if self.capture.is_some() {
            tracing::info!(%cause, "onsite: a capture is already running; nothing changed");
            return false;
        }
        if let Err(e) = self.dir.ensure_exists() {
            tracing::error!(dir = %self.dir.dir().display(), error = %e, "onsite: cannot create the dump directory; files of this capture will fail to write");
        }
        let output = CaptureOutput::new(self.dir.clone(), CaptureStamp::now());
        let mut stoppers = Vec::new();
        for profiler in &mut self.profilers {
            let kind = profiler.kind();
            match catch_unwind(AssertUnwindSafe(|| profiler.start())) {
                Ok(Ok(stopper)) => stoppers.push((kind, stopper)),
                Ok(Err(e)) => {
                    tracing::error!(%kind, error = %e.message, "onsite: could not start this kind; the others carry on")
                }
                Err(_) => tracing::error!(%kind, "onsite: this kind panicked while starting; the others carry on"),
            }
        }
        let kinds: Vec<&str> = stoppers.iter().map(|(k, _)| k.as_str()).collect();
        tracing::info!(
            %cause,
            kinds = %kinds.join(","),
            dir = %self.dir.dir().display(),
            stops_after = ?self.max_duration,
            "onsite: capture started; send SIGUSR2 to pid {} again to stop it", self.dir.pid()
        );
        let now = Instant::now();
        self.capture = Some(Capture {
            output,
            stoppers,
            started: now,
            deadline: now + self.max_duration,
            termination_guard: TerminationGuard::arm(),
        });
        true
    }

    /// Stops the running capture and writes its files; returns what was written.
    fn stop(&mut self, cause: Cause) -> Vec<WrittenFile> {
        let Some(capture) = self.capture.take() else {
            if cause != Cause::Shutdown {
                tracing::info!(%cause, "onsite: no capture is running; nothing to stop");
            }
            return Vec::new();
        };
        let mut failed = 0;
        // Stop in the reverse order of starting, so the memory capture (started last) stops
        // first and sees none of the other kinds' stop work (symbolising, pprof-rs's reset).
        for (kind, stopper) in capture.stoppers.into_iter().rev() {
            match catch_unwind(AssertUnwindSafe(|| stopper.stop(&capture.output))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failed += 1;
                    tracing::error!(%kind, error = %e.message, "onsite: could not finish this kind");
                }
                Err(_) => {
                    failed += 1;
                    tracing::error!(%kind, "onsite: this kind panicked while stopping");
                }
            }
        }
        capture.termination_guard.disarm();
        let written: Vec<WrittenFile> = capture.output.written().into_iter().map(|(_, f)| f).collect();
        tracing::info!(
            %cause,
            duration = ?capture.started.elapsed(),
            files = written.len(),
            failed_kinds = failed,
            dir = %self.dir.dir().display(),
            "onsite: capture stopped"
        );
        written
    }

    /// SIGINT/SIGTERM arrived while our handler was armed: finish the capture, give the signal
    /// back to whoever had it before, and send it again.
    fn on_termination(&mut self, sig: libc::c_int) {
        if self.capture.is_some() {
            tracing::info!(signal = sig, "onsite: termination signal during a capture; writing its files first");
            self.stop(Cause::Termination(sig));
        }
        // `stop` disarmed the guard; the signal is re-sent even when the capture had just ended
        // by itself, because our handler consumed it.
        wake::resend(sig);
    }

    #[cfg(feature = "threads")]
    fn dump_threads(&mut self) {
        if let Err(e) = self.dir.ensure_exists() {
            tracing::error!(dir = %self.dir.dir().display(), error = %e, "onsite: cannot create the dump directory");
        }
        let output = CaptureOutput::new(self.dir.clone(), CaptureStamp::now());
        match catch_unwind(AssertUnwindSafe(|| self.backends.threads.dump_threads(&output))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e.message, "onsite: thread dump failed"),
            Err(_) => tracing::error!("onsite: thread dump panicked"),
        }
    }

    #[cfg(not(feature = "threads"))]
    fn dump_threads(&mut self) {
        let _ = &self.backends;
    }
}
