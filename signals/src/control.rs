//! The control thread: the only place a capture starts or stops. Signal handlers, API calls and
//! the HTTP listener just wake it (see `wake.rs`, `http/`); it does the slow work (stopping
//! backends, symbolising, writing files) on an ordinary thread, where allocating and locking are
//! safe.
//!
//! With automatic rules it also wakes once per interval to sample metrics (see `auto`); with
//! none it sleeps until an event. Several captures may run at once, but a kind is recorded by one
//! capture at a time:
//!
//! - the *operator capture*, at most one, started by the toggle signal, the API or a rule: a rule
//!   never interrupts it, and a toggle during an automatic one stops it;
//! - *pulls*, one kind each for a fixed window, asked for over HTTP and answered with the file's
//!   bytes. A pull for a kind another capture records is refused, naming that capture. An
//!   operator capture started while pulls hold some of its kinds records the others and says in
//!   its log and manifest which kinds were held, and by whom.
//!
//! Every capture, pulls included, ends with its manifest and a retention pass over the dump
//! directory.

use std::io::{ErrorKind, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
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
    /// A pull's window elapsed.
    PullWindow,
    /// The client of a pull went away before its window elapsed.
    PullAbandoned,
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
            Cause::PullWindow => f.write_str("the requested seconds elapsed"),
            Cause::PullAbandoned => f.write_str("the HTTP client went away"),
        }
    }
}

/// Requests from the `Onsite` handle and the HTTP listener.
pub(crate) enum Command {
    Start {
        reply: mpsc::Sender<bool>,
    },
    Stop {
        reply: mpsc::Sender<Vec<WrittenFile>>,
    },
    Shutdown,
    /// Record one kind for a window (or dump the threads) and answer with the file's bytes.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    Pull(Pull),
    /// The requester of this pull went away: stop its capture now (its files are still written).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    AbandonPull {
        id: u64,
    },
}

/// One capture asked for by a client that waits for its bytes.
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) struct Pull {
    /// The requester's own number for it, for [`Command::AbandonPull`].
    pub(crate) id: u64,
    pub(crate) what: PullWhat,
    /// Who asked, as logged and put in the manifest (`GET /debug/pprof/… from ADDR`).
    pub(crate) requested_by: String,
    /// Called once, on the control thread, with the answer.
    pub(crate) reply: Box<dyn FnOnce(Pulled) + Send>,
}

impl std::fmt::Debug for Pull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pull").field("id", &self.id).field("what", &self.what).finish_non_exhaustive()
    }
}

/// What a pull records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) enum PullWhat {
    /// `kind` for `length` (capped by the maximum duration).
    Window { kind: ProfileKind, length: Duration },
    /// Every thread's stack, now (what the dump signal writes).
    ThreadDump,
}

/// The answer to a pull.
#[derive(Debug)]
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) enum Pulled {
    /// The bytes of the file the capture wrote (the same as on disk), and its name.
    Body { bytes: Vec<u8>, file_name: String },
    /// Another capture records this kind now.
    Held { holder: String, ends_in: Option<Duration> },
    /// This build or configuration cannot record it (a cargo feature off, the dump turned off).
    Unavailable(String),
    /// It started but nothing usable was written.
    Failed(String),
}

struct Capture {
    output: CaptureOutput,
    stoppers: Vec<(ProfileKind, Box<dyn Stopper>)>,
    trigger: Trigger,
    kinds: Vec<ProfileKind>,
    failures: Vec<(ProfileKind, String)>,
    /// Kinds this capture wanted that other captures held when it started, with their holder.
    held_elsewhere: Vec<(ProfileKind, String)>,
    started: Instant,
    started_wall: SystemTime,
    deadline: Instant,
    /// Whether the deadline is the rule's capture duration rather than the maximum.
    rule_deadline: bool,
    /// The window of the capture's `cpu-before` file, if the flight recorder wrote one.
    before_window: Option<crate::backends::Window>,
    /// Set for a pull: who waits for its bytes.
    pull: Option<PullReply>,
}

struct PullReply {
    id: u64,
    kind: ProfileKind,
    reply: Box<dyn FnOnce(Pulled) + Send>,
}

impl Capture {
    /// The kinds this capture is recording (those that started).
    fn records(&self, kind: ProfileKind) -> bool {
        self.stoppers.iter().any(|(k, _)| *k == kind)
    }

    /// This capture, as a 409 or a manifest names it.
    fn holder(&self) -> String {
        let age = self.started.elapsed().as_secs();
        match &self.pull {
            Some(_) => format!("the pull {} (started {age}s ago)", self.trigger),
            None => format!("the capture started by {} {age}s ago", self.trigger),
        }
    }
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
    /// Why a thread dump cannot be made (its signal clashes or is unusable); `None` if it can.
    #[cfg_attr(not(feature = "threads"), allow(dead_code))]
    pub(crate) thread_dump_unavailable: Option<String>,
}

pub(crate) struct Controller {
    setup: Setup,
    /// Started when the control thread starts, stopped when it ends.
    recorders: crate::backends::Recorders,
    commands: mpsc::Receiver<Command>,
    wake_reader: std::os::unix::net::UnixStream,
    /// The operator capture (at most one) and the pulls, in start order.
    captures: Vec<Capture>,
    /// SIGINT/SIGTERM are intercepted while any capture runs.
    termination_guard: Option<TerminationGuard>,
}

/// How long the control thread sleeps when nothing is due: long, since every event wakes it.
const IDLE_WAIT: Duration = Duration::from_secs(3600);

impl Controller {
    pub(crate) fn new(
        setup: Setup,
        commands: mpsc::Receiver<Command>,
        wake_reader: std::os::unix::net::UnixStream,
    ) -> Self {
        Controller {
            setup,
            recorders: Default::default(),
            commands,
            wake_reader,
            captures: Vec::new(),
            termination_guard: None,
        }
    }

    pub(crate) fn run(mut self) {
        // SAFETY: gettid has no preconditions. (The id lets an operator or a test find this
        // thread in /proc even where thread names are not kept.)
        tracing::debug!(tid = unsafe { libc::gettid() }, "onsite: control thread running");
        // Dumps of earlier runs count against the limits too; a restart is when they pile up.
        retention::enforce(&self.setup.dir, self.setup.retention, &[]);
        self.recorders = self.setup.backends.start_recorders();
        loop {
            let now = Instant::now();
            let deadline = self.captures.iter().map(|c| c.deadline).min();
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
                        self.stop_all(Cause::Shutdown);
                        return;
                    }
                    Command::Pull(pull) => self.start_pull(pull),
                    Command::AbandonPull { id } => {
                        if let Some(i) = self.captures.iter().position(|c| c.pull.as_ref().is_some_and(|p| p.id == id))
                        {
                            self.finish(i, Cause::PullAbandoned);
                        }
                    }
                }
            }
            let now = Instant::now();
            while let Some(i) = self.captures.iter().position(|c| now >= c.deadline) {
                let capture = &self.captures[i];
                let cause = match () {
                    _ if capture.pull.is_some() => Cause::PullWindow,
                    _ if capture.rule_deadline => Cause::RuleDuration,
                    _ => Cause::MaxDuration,
                };
                self.finish(i, cause);
            }
            let running = self.operator_capture().is_some();
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
        if self.operator_capture().is_some() {
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
            // Every kind of the rule is held by pulls (or, impossibly, an operator capture
            // runs): a rule must never be left believing its capture runs; start its cooldown.
            if let Some(watch) = self.setup.watch.as_mut() {
                watch.capture_ended(rule, Instant::now());
            }
        }
    }

    /// What retention must keep after `just_written`: it, and every capture still running
    /// (an operator capture's `cpu-before` file is written at its start).
    fn stamps_to_keep<'a>(&'a self, just_written: &'a CaptureStamp) -> Vec<&'a str> {
        std::iter::once(just_written.as_str()).chain(self.captures.iter().map(|c| c.output.stamp().as_str())).collect()
    }

    /// The index of the operator capture (signal, API or rule), if one runs.
    fn operator_capture(&self) -> Option<usize> {
        self.captures.iter().position(|c| c.pull.is_none())
    }

    /// The capture that records `kind` now.
    fn holder_of(&self, kind: ProfileKind) -> Option<&Capture> {
        self.captures.iter().find(|c| c.records(kind))
    }

    /// Starts the operator capture; `false` (and nothing changes) if one runs, or if pulls hold
    /// every kind it would record. A rule's capture contains the rule's kinds and lasts the
    /// rule's duration; any other the configured kinds, up to the maximum duration. Kinds a
    /// pull holds are left out, and named in the log and the manifest.
    fn start(&mut self, trigger: Trigger) -> bool {
        if self.operator_capture().is_some() {
            tracing::info!(cause = %trigger, "onsite: a capture is already running; nothing changed");
            return false;
        }
        let (wanted, length, rule_deadline) = match &trigger {
            Trigger::Rule(f) => (
                f.kinds.clone().unwrap_or_else(|| self.setup.kinds.clone()),
                f.capture.min(self.setup.max_duration),
                f.capture < self.setup.max_duration,
            ),
            Trigger::Signal(_) | Trigger::Api | Trigger::Pull { .. } => {
                (self.setup.kinds.clone(), self.setup.max_duration, false)
            }
        };
        let compiled: Vec<ProfileKind> =
            self.setup.profilers.iter().map(|p| p.kind()).filter(|k| wanted.contains(k)).collect();
        let held_elsewhere: Vec<(ProfileKind, String)> =
            compiled.iter().filter_map(|&k| self.holder_of(k).map(|c| (k, c.holder()))).collect();
        let kinds: Vec<ProfileKind> =
            compiled.into_iter().filter(|k| !held_elsewhere.iter().any(|(h, _)| h == k)).collect();
        if kinds.is_empty() && !held_elsewhere.is_empty() {
            tracing::warn!(
                cause = %trigger,
                held = %show_held(&held_elsewhere),
                "onsite: every kind of this capture is being recorded by a pull; nothing started"
            );
            return false;
        }
        if !held_elsewhere.is_empty() {
            tracing::warn!(
                cause = %trigger,
                held = %show_held(&held_elsewhere),
                "onsite: some kinds are being recorded by a pull; this capture records the others"
            );
        }
        let capture = self.start_capture(trigger, kinds, length, rule_deadline, held_elsewhere, None);
        let started: Vec<&str> = capture.stoppers.iter().map(|(k, _)| k.as_str()).collect();
        tracing::info!(
            cause = %capture.trigger,
            kinds = %started.join(","),
            dir = %self.setup.dir.dir().display(),
            stops_after = ?length,
            "onsite: capture started; {}",
            match self.setup.toggle_signal {
                Some(sig) => format!("send {} to pid {} to stop it now", crate::env::signal_name(sig), self.setup.dir.pid()),
                None => "it stops through the API, its duration or shutdown".to_owned(),
            }
        );
        self.captures.push(capture);
        true
    }

    /// Starts the profilers of `kinds` into a new capture (not yet in `self.captures`), arming
    /// the SIGINT/SIGTERM guard if it is the first.
    fn start_capture(
        &mut self,
        trigger: Trigger,
        kinds: Vec<ProfileKind>,
        length: Duration,
        rule_deadline: bool,
        held_elsewhere: Vec<(ProfileKind, String)>,
        pull: Option<PullReply>,
    ) -> Capture {
        let dir = &self.setup.dir;
        if let Err(e) = dir.ensure_exists() {
            tracing::error!(dir = %dir.dir().display(), error = %e, "onsite: cannot create the dump directory; files of this capture will fail to write");
        }
        let output = CaptureOutput::new(dir.clone(), CaptureStamp::now());
        // The marker is the operator capture's (the one a toggle would stop); pulls are not.
        let operator = pull.is_none();
        if operator {
            crate::status::capture_starting(&output, &trigger, &kinds, length);
        }
        let started_wall = SystemTime::now();
        // Taken before any kind starts (so it ends where the capture begins), written after.
        // A pull of another kind has no use for the CPU before it: a scraper pulling four
        // kinds every 15 s would leave four copies of the same minutes each time.
        let before = (operator || kinds.contains(&ProfileKind::Cpu)).then(|| self.recorders.snapshot());
        let mut stoppers = Vec::new();
        let mut failures = Vec::new();
        for profiler in self.setup.profilers.iter_mut().filter(|p| kinds.contains(&p.kind())) {
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
        let (before_window, before_failures) = before.map_or((None, Vec::new()), |before| before.write(&output));
        failures.extend(before_failures);
        if self.termination_guard.is_none() {
            self.termination_guard = Some(TerminationGuard::arm());
        }
        if operator {
            crate::status::capture_running(&output, &trigger, &kinds, length);
        }
        let now = Instant::now();
        Capture {
            output,
            stoppers,
            trigger,
            kinds,
            failures,
            held_elsewhere,
            started: now,
            started_wall,
            deadline: crate::env::instant_after(now, length),
            rule_deadline,
            before_window,
            pull,
        }
    }

    /// Starts a pull's capture, or answers at once: the thread dump, a kind another capture
    /// holds (refused, naming it), a kind this build has not.
    fn start_pull(&mut self, pull: Pull) {
        let (kind, length) = match pull.what {
            PullWhat::ThreadDump => {
                let answer = self.dump_threads_for(&pull.requested_by);
                (pull.reply)(answer);
                return;
            }
            PullWhat::Window { kind, length } => (kind, length.min(self.setup.max_duration)),
        };
        if !self.setup.profilers.iter().any(|p| p.kind() == kind) {
            let answer = Pulled::Unavailable(format!("this service was built without onsite's `{kind}` feature"));
            (pull.reply)(answer);
            return;
        }
        if let Some(holder) = self.holder_of(kind) {
            let answer = Pulled::Held {
                holder: holder.holder(),
                ends_in: Some(holder.deadline.saturating_duration_since(Instant::now())),
            };
            tracing::info!(%kind, requested_by = %pull.requested_by, holder = %holder.holder(), "onsite: refused a pull: its kind is being recorded");
            (pull.reply)(answer);
            return;
        }
        let trigger = Trigger::Pull { requested_by: pull.requested_by.clone() };
        let reply = PullReply { id: pull.id, kind, reply: pull.reply };
        let capture = self.start_capture(trigger, vec![kind], length, false, Vec::new(), Some(reply));
        if capture.stoppers.is_empty() {
            let why = capture.failures.first().map_or_else(|| "it did not start".to_owned(), |(_, e)| e.clone());
            if let Some(pull) = capture.pull {
                (pull.reply)(Pulled::Failed(format!("{kind} could not start: {why}")));
            }
            self.disarm_if_idle();
            return;
        }
        tracing::info!(%kind, requested_by = %capture.trigger, stops_after = ?length, dir = %self.setup.dir.dir().display(), "onsite: pull started");
        self.captures.push(capture);
    }

    /// Stops the operator capture and writes its files; returns what was written.
    fn stop(&mut self, cause: Cause) -> Vec<WrittenFile> {
        match self.operator_capture() {
            Some(i) => self.finish(i, cause),
            None => {
                if cause != Cause::Shutdown {
                    tracing::info!(%cause, "onsite: no capture is running; nothing to stop");
                }
                Vec::new()
            }
        }
    }

    /// Stops every capture, pulls included (each pull is answered with its bytes).
    fn stop_all(&mut self, cause: Cause) {
        while !self.captures.is_empty() {
            self.finish(0, cause);
        }
    }

    /// Puts SIGINT/SIGTERM back once no capture runs.
    fn disarm_if_idle(&mut self) {
        if self.captures.is_empty()
            && let Some(guard) = self.termination_guard.take()
        {
            guard.disarm();
        }
    }

    /// Stops capture `index` and writes its files, its manifest, answers its pull, and trims
    /// the dump directory; returns what was written.
    fn finish(&mut self, index: usize, cause: Cause) -> Vec<WrittenFile> {
        let capture = self.captures.remove(index);
        let mut failures = capture.failures;
        // A process on its way out has a grace period: symbolising stops at the budget and the
        // rest is written with addresses and mappings only.
        if matches!(cause, Cause::Termination(_) | Cause::Shutdown) {
            capture
                .output
                .symbolize_until(crate::env::instant_after(Instant::now(), self.setup.backends.shutdown_budget));
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
            held_elsewhere: &capture.held_elsewhere,
        };
        if let Err(e) = manifest::write(&capture.output, &record) {
            tracing::error!(error = %e.message, "onsite: could not write the capture's manifest");
        }
        if capture.pull.is_none() {
            crate::status::capture_stopped(&self.setup.dir);
        }
        // Disarmed only now: a SIGINT that arrives while the files are written waits for them.
        self.disarm_if_idle();
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
        // Read back before retention runs, which may remove older captures but never this one.
        if let Some(pull) = capture.pull {
            let answer = body_of(&profiles, pull.kind, &failures);
            (pull.reply)(answer);
        }
        retention::enforce(&self.setup.dir, self.setup.retention, &self.stamps_to_keep(capture.output.stamp()));
        // Nothing of the captures' symbolisation (mapped files, parsed DWARF) stays in the
        // service's memory after the last one.
        if self.captures.is_empty() {
            onsite_core::symbols::release_shared();
        }
        written
    }

    /// SIGINT/SIGTERM arrived while our handler was armed: finish the capture, give the signal
    /// back to whoever had it before, and send it again if `resend` (our handler consumed it);
    /// not if a handler installed over ours during the capture had it first (see `wake.rs`).
    fn on_termination(&mut self, sig: libc::c_int, resend: bool) {
        if !self.captures.is_empty() {
            tracing::info!(signal = sig, "onsite: termination signal during a capture; writing its files first");
            self.stop_all(Cause::Termination(sig));
        }
        // `stop` disarmed the guard; the signal is re-sent even when the capture had just ended
        // by itself, because our handler consumed it.
        if resend {
            wake::resend(sig);
        }
    }

    fn dump_threads(&mut self) {
        // Failures are logged where they happen; the signal has no one to answer.
        let _ = self.dump_threads_into();
    }

    /// The thread dump for a pull: its text, read back from the file it wrote.
    fn dump_threads_for(&mut self, requested_by: &str) -> Pulled {
        tracing::info!(requested_by, "onsite: thread dump pulled");
        match self.dump_threads_into() {
            Ok(written) => body_of(&written, ProfileKind::Threads, &[]),
            Err(why) => Pulled::Unavailable(why),
        }
    }

    /// Writes every thread's stack; what was written, or why nothing could be.
    #[cfg(feature = "threads")]
    fn dump_threads_into(&mut self) -> Result<Vec<(ProfileKind, WrittenFile)>, String> {
        if let Some(why) = &self.setup.thread_dump_unavailable {
            return Err(why.clone());
        }
        let dir = &self.setup.dir;
        if let Err(e) = dir.ensure_exists() {
            tracing::error!(dir = %dir.dir().display(), error = %e, "onsite: cannot create the dump directory");
        }
        let output = CaptureOutput::new(dir.clone(), CaptureStamp::now());
        let result = match catch_unwind(AssertUnwindSafe(|| self.setup.backends.threads.dump_threads(&output))) {
            Ok(Ok(())) => Ok(output.written()),
            Ok(Err(e)) => {
                tracing::error!(error = %e.message, "onsite: thread dump failed");
                Err(format!("the thread dump failed: {}", e.message))
            }
            Err(_) => {
                tracing::error!("onsite: thread dump panicked");
                Err("the thread dump panicked".to_owned())
            }
        };
        // Kept while a capture runs (its stop symbolises the same objects), released otherwise.
        if self.captures.is_empty() {
            onsite_core::symbols::release_shared();
        }
        retention::enforce(dir, self.setup.retention, &self.stamps_to_keep(output.stamp()));
        result
    }

    #[cfg(not(feature = "threads"))]
    fn dump_threads_into(&mut self) -> Result<Vec<(ProfileKind, WrittenFile)>, String> {
        let _ = &self.setup.backends;
        Err("this service was built without onsite's `threads` feature".to_owned())
    }
}

/// The answer to a pull of `kind` whose capture wrote `written`: the bytes of its file (the
/// pprof one, or the trace's JSON, or the dump's text), read back from the dump directory.
fn body_of(written: &[(ProfileKind, WrittenFile)], kind: ProfileKind, failures: &[(ProfileKind, String)]) -> Pulled {
    let ext = match kind {
        ProfileKind::Trace => "json",
        ProfileKind::Threads => "txt",
        _ => "pprof",
    };
    let file = written.iter().find(|(k, f)| *k == kind && f.path.extension().is_some_and(|e| e == ext));
    let Some((_, file)) = file else {
        return Pulled::Failed(match failures.iter().find(|(k, _)| *k == kind) {
            Some((_, e)) => format!("{kind}: {e}"),
            None => format!("the {kind} capture wrote no .{ext} file (see the service's log)"),
        });
    };
    let file_name = file.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match std::fs::read(&file.path) {
        Ok(bytes) => Pulled::Body { bytes, file_name },
        Err(e) => Pulled::Failed(format!("could not read back {}: {e}", show_path(&file.path))),
    }
}

fn show_path(path: &Path) -> String {
    path.display().to_string()
}

/// `cpu (the pull GET /debug/pprof/profile?seconds=30 from 127.0.0.1:4242 …), mutex (…)`.
fn show_held(held: &[(ProfileKind, String)]) -> String {
    held.iter().map(|(k, by)| format!("{k} ({by})")).collect::<Vec<_>>().join(", ")
}
