//! The control thread: the only place a capture starts or stops. Signal handlers and API calls
//! just wake it (see `wake.rs`); it does the slow work (stopping backends, symbolising,
//! writing files) on an ordinary thread, where allocating and locking are safe.
//!
//! With automatic rules it also wakes once per interval to sample metrics (see `auto`); with
//! none it sleeps until an event, as before. One capture runs at a time, whoever started it:
//! a rule never interrupts a manual capture, and a SIGUSR2 during an automatic one stops it.
//! Every capture ends with its manifest and a retention pass over the dump directory.

use std::io::{ErrorKind, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, ProfileKind, Profiler, Stopper, WrittenFile};

use crate::auto::watch::{Firing, Watch};
use crate::manifest::{self, Trigger};
use crate::retention;
use crate::wake::{self, CHAINED_TERMINATION, TERMINATION, THREAD_DUMPS, TOGGLES, TerminationGuard};

/// Why a capture started or stopped, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The toggle signal, this one.
    Signal(libc::c_int),
    Api,
    MaxDuration,
    RuleDuration,
    Termination(libc::c_int),
    Shutdown,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Signal(sig) => f.write_str(&crate::env::signal_name(*sig)),
            Cause::Api => f.write_str("API call"),
            Cause::MaxDuration => f.write_str("maximum duration reached"),
            Cause::RuleDuration => f.write_str("the rule's capture duration elapsed"),
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
    trigger: Trigger,
    kinds: Vec<ProfileKind>,
    failures: Vec<(ProfileKind, String)>,
    started: Instant,
    started_wall: SystemTime,
    deadline: Instant,
    /// Whether the deadline is the rule's capture duration rather than the maximum.
    rule_deadline: bool,
    /// The window of the capture's `cpu-before` file, if the flight recorder wrote one.
    before_window: Option<crate::backends::Window>,
    termination_guard: TerminationGuard,
}

/// What the control thread is given at install.
pub(crate) struct Setup {
    pub(crate) dir: DumpDir,
    /// Every compiled-in profiler; each capture starts the ones of its kinds.
    pub(crate) profilers: Vec<Box<dyn Profiler>>,
    /// The kinds a manual capture (and a rule without `kinds=`) contains.
    pub(crate) kinds: Vec<ProfileKind>,
    pub(crate) max_duration: Duration,
    /// The signal that toggles a capture; `None` when there is none.
    pub(crate) toggle_signal: Option<libc::c_int>,
    pub(crate) backends: crate::backends::Settings,
    /// The automatic rules; `None` when there are none (then nothing wakes periodically).
    pub(crate) watch: Option<Watch>,
    pub(crate) retention: retention::Settings,
}

pub(crate) struct Controller {
    setup: Setup,
    /// Started when the control thread starts, stopped when it ends.
    recorders: crate::backends::Recorders,
    commands: mpsc::Receiver<Command>,
    wake_reader: std::os::unix::net::UnixStream,
    capture: Option<Capture>,
}

/// How long the control thread sleeps when nothing is due: long, since every event wakes it.
const IDLE_WAIT: Duration = Duration::from_secs(3600);

impl Controller {
    pub(crate) fn new(
        setup: Setup,
        commands: mpsc::Receiver<Command>,
        wake_reader: std::os::unix::net::UnixStream,
    ) -> Self {
        Controller { setup, recorders: Default::default(), commands, wake_reader, capture: None }
    }

    pub(crate) fn run(mut self) {
        // SAFETY: gettid has no preconditions. (The id lets an operator or a test find this
        // thread in /proc even where thread names are not kept.)
        tracing::debug!(tid = unsafe { libc::gettid() }, "onsite: control thread running");
        // Dumps of earlier runs count against the limits too; a restart is when they pile up.
        retention::enforce(&self.setup.dir, self.setup.retention, None);
        self.recorders = self.setup.backends.start_recorders();
        loop {
            let now = Instant::now();
            let deadline = self.capture.as_ref().map(|c| c.deadline);
            let next_sample = self.setup.watch.as_ref().map(Watch::next_due);
            let wake_at = match (deadline, next_sample) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            self.sleep(wake_at.map_or(IDLE_WAIT, |at| at.saturating_duration_since(now)));

            if let sig @ 1.. = TERMINATION.swap(0, Ordering::AcqRel) {
                self.on_termination(sig, true);
            }
            if let sig @ 1.. = CHAINED_TERMINATION.swap(0, Ordering::AcqRel) {
                self.on_termination(sig, false);
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
                        let _ = reply.send(self.start(Trigger::Api));
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
            if let Some(capture) = self.capture.as_ref()
                && Instant::now() >= capture.deadline
            {
                self.stop(if capture.rule_deadline { Cause::RuleDuration } else { Cause::MaxDuration });
            }
            let running = self.capture.is_some();
            if let Some(firing) = self.setup.watch.as_mut().and_then(|w| w.tick(Instant::now(), running)) {
                self.start_for_rule(firing);
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
        // Toggles are counted only while the toggle signal is registered.
        let sig = self.setup.toggle_signal.unwrap_or(libc::SIGUSR2);
        if self.capture.is_some() {
            self.stop(Cause::Signal(sig));
        } else {
            self.start(Trigger::Signal(sig));
        }
    }

    /// Starts a capture for a rule that fired (the watch only fires when none is running).
    fn start_for_rule(&mut self, firing: Firing) {
        tracing::info!(rule = %firing.text, reason = %firing.reason, "onsite: automatic capture rule fired");
        let rule = firing.rule;
        if !self.start(Trigger::Rule(Box::new(firing))) {
            // Cannot happen (the watch saw no capture running), but a rule must never be left
            // believing its capture runs: start its cooldown.
            if let Some(watch) = self.setup.watch.as_mut() {
                watch.capture_ended(rule, Instant::now());
            }
        }
    }

    /// Starts a capture; `false` (and nothing changes) if one runs. A rule's capture contains
    /// the rule's kinds and lasts the rule's duration; any other the configured kinds, up to
    /// the maximum duration.
    fn start(&mut self, trigger: Trigger) -> bool {
        if self.capture.is_some() {
            tracing::info!(cause = %trigger, "onsite: a capture is already running; nothing changed");
            return false;
        }
        let dir = &self.setup.dir;
        if let Err(e) = dir.ensure_exists() {
            tracing::error!(dir = %dir.dir().display(), error = %e, "onsite: cannot create the dump directory; files of this capture will fail to write");
        }
        let (wanted, length, rule_deadline) = match &trigger {
            Trigger::Rule(f) => (
                f.kinds.clone().unwrap_or_else(|| self.setup.kinds.clone()),
                f.capture.min(self.setup.max_duration),
                f.capture < self.setup.max_duration,
            ),
            Trigger::Signal(_) | Trigger::Api => (self.setup.kinds.clone(), self.setup.max_duration, false),
        };
        let output = CaptureOutput::new(dir.clone(), CaptureStamp::now());
        let started_wall = SystemTime::now();
        // Taken before any kind starts (so it ends where the capture begins), written after.
        let before = self.recorders.snapshot();
        let mut stoppers = Vec::new();
        let mut failures = Vec::new();
        for profiler in self.setup.profilers.iter_mut().filter(|p| wanted.contains(&p.kind())) {
            let kind = profiler.kind();
            match catch_unwind(AssertUnwindSafe(|| profiler.start_for(&output))) {
                Ok(Ok(stopper)) => stoppers.push((kind, stopper)),
                Ok(Err(e)) => {
                    tracing::error!(%kind, error = %e.message, "onsite: could not start this kind; the others carry on");
                    failures.push((kind, format!("could not start: {}", e.message)));
                }
                Err(_) => {
                    tracing::error!(%kind, "onsite: this kind panicked while starting; the others carry on");
                    failures.push((kind, "panicked while starting".to_owned()));
                }
            }
        }
        let (before_window, before_failures) = before.write(&output);
        failures.extend(before_failures);
        let kinds: Vec<ProfileKind> =
            self.setup.profilers.iter().map(|p| p.kind()).filter(|k| wanted.contains(k)).collect();
        let started: Vec<&str> = stoppers.iter().map(|(k, _)| k.as_str()).collect();
        tracing::info!(
            cause = %trigger,
            kinds = %started.join(","),
            dir = %dir.dir().display(),
            stops_after = ?length,
            "onsite: capture started; {}",
            match self.setup.toggle_signal {
                Some(sig) => format!("send {} to pid {} to stop it now", crate::env::signal_name(sig), dir.pid()),
                None => "it stops through the API, its duration or shutdown".to_owned(),
            }
        );
        let now = Instant::now();
        self.capture = Some(Capture {
            output,
            stoppers,
            trigger,
            kinds,
            failures,
            started: now,
            started_wall,
            deadline: now + length,
            rule_deadline,
            before_window,
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
        let mut failures = capture.failures;
        // A process on its way out has a grace period: symbolising stops at the budget and the
        // rest is written with addresses and mappings only.
        if matches!(cause, Cause::Termination(_) | Cause::Shutdown) {
            capture.output.symbolize_until(Instant::now() + self.setup.backends.shutdown_budget);
        }
        // Stop in the reverse order of starting, so the memory capture (started last) stops
        // first and sees none of the other kinds' stop work (symbolising, pprof-rs's reset).
        for (kind, stopper) in capture.stoppers.into_iter().rev() {
            match catch_unwind(AssertUnwindSafe(|| stopper.stop(&capture.output))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(%kind, error = %e.message, "onsite: could not finish this kind");
                    failures.push((kind, e.message));
                }
                Err(_) => {
                    tracing::error!(%kind, "onsite: this kind panicked while stopping");
                    failures.push((kind, "panicked while stopping".to_owned()));
                }
            }
        }
        let profiles = capture.output.written();
        let record = manifest::Record {
            trigger: &capture.trigger,
            stopped_by: cause.to_string(),
            started: capture.started_wall,
            stopped: SystemTime::now(),
            kinds: &capture.kinds,
            files: &profiles,
            failures: &failures,
            before_window: capture.before_window,
        };
        if let Err(e) = manifest::write(&capture.output, &record) {
            tracing::error!(error = %e.message, "onsite: could not write the capture's manifest");
        }
        // Disarmed only now: a SIGINT that arrives while the files are written waits for them.
        capture.termination_guard.disarm();
        let written: Vec<WrittenFile> = capture.output.written().into_iter().map(|(_, f)| f).collect();
        tracing::info!(
            %cause,
            started_by = %capture.trigger,
            duration = ?capture.started.elapsed(),
            files = written.len(),
            failed_kinds = failures.len(),
            dir = %self.setup.dir.dir().display(),
            "onsite: capture stopped"
        );
        if let Trigger::Rule(firing) = &capture.trigger
            && let Some(watch) = self.setup.watch.as_mut()
        {
            watch.capture_ended(firing.rule, Instant::now());
        }
        retention::enforce(&self.setup.dir, self.setup.retention, Some(capture.output.stamp().as_str()));
        // Nothing of the capture's symbolisation (mapped files, parsed DWARF) stays in the
        // service's memory after it.
        onsite_core::symbols::release_shared();
        written
    }

    /// SIGINT/SIGTERM arrived while our handler was armed: finish the capture, give the signal
    /// back to whoever had it before, and send it again if `resend` (our handler consumed it);
    /// not if a handler installed over ours during the capture had it first (see `wake.rs`).
    fn on_termination(&mut self, sig: libc::c_int, resend: bool) {
        if self.capture.is_some() {
            tracing::info!(signal = sig, "onsite: termination signal during a capture; writing its files first");
            self.stop(Cause::Termination(sig));
        }
        // `stop` disarmed the guard; the signal is re-sent even when the capture had just ended
        // by itself, because our handler consumed it.
        if resend {
            wake::resend(sig);
        }
    }

    #[cfg(feature = "threads")]
    fn dump_threads(&mut self) {
        let dir = &self.setup.dir;
        if let Err(e) = dir.ensure_exists() {
            tracing::error!(dir = %dir.dir().display(), error = %e, "onsite: cannot create the dump directory");
        }
        let output = CaptureOutput::new(dir.clone(), CaptureStamp::now());
        match catch_unwind(AssertUnwindSafe(|| self.setup.backends.threads.dump_threads(&output))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e.message, "onsite: thread dump failed"),
            Err(_) => tracing::error!("onsite: thread dump panicked"),
        }
        // Kept while a capture runs (its stop symbolises the same objects), released otherwise.
        if self.capture.is_none() {
            onsite_core::symbols::release_shared();
        }
        retention::enforce(dir, self.setup.retention, Some(output.stamp().as_str()));
    }

    #[cfg(not(feature = "threads"))]
    fn dump_threads(&mut self) {
        let _ = &self.setup.backends;
    }
}
