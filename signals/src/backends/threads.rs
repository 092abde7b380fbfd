//! The threads backend's settings: the threadcreate profiler, and the SIGUSR1 all-threads dump
//! (`ONSITE_THREADS_DUMP_DEADLINE`, `ONSITE_THREADS_DUMP_SIGNAL`).

use std::time::Duration;

use onsite_core::{CaptureError, CaptureOutput, ConfigError, Profiler};
use onsite_threads::HookStatus;

use crate::env;

/// `ONSITE_THREADS_DUMP_DEADLINE`: how long a SIGUSR1 dump waits for every thread's answer
/// (default 2s); a thread that has not answered by then is listed as such.
pub const DUMP_DEADLINE_VAR: &str = "ONSITE_THREADS_DUMP_DEADLINE";
/// `ONSITE_THREADS_DUMP_SIGNAL`: the real-time signal the dump borrows to ask each thread for
/// its stack, as `SIGRTMIN+N` or a number (default `SIGRTMIN+4`).
pub const DUMP_SIGNAL_VAR: &str = "ONSITE_THREADS_DUMP_SIGNAL";

const DEFAULT_DUMP_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    dump_deadline: Duration,
    /// `None`: [`onsite_threads::default_dump_signal`].
    dump_signal: Option<i32>,
    /// `false` when `ONSITE_THREADS_DUMP_SIGNAL` was wrong: the operator moved the signal off
    /// the default, so the default may be the service's; the dump is turned off instead.
    dump_signal_usable: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { dump_deadline: DEFAULT_DUMP_DEADLINE, dump_signal: None, dump_signal_usable: true }
    }
}

/// A real-time signal as [`env::parse_signal`] reads it (`SIGRTMIN+N`, `SIGRTMAX-N`, a number).
fn parse_realtime_signal(text: &str) -> Result<i32, String> {
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    match env::parse_signal(text) {
        Ok(number) if (min..=max).contains(&number) => Ok(number),
        _ => Err(format!("must be a real-time signal, SIGRTMIN+N: {min} (SIGRTMIN) to {max} (SIGRTMAX)")),
    }
}

impl Settings {
    pub(crate) fn apply_env(&mut self, env: &mut env::Reader) {
        env.set(DUMP_DEADLINE_VAR, &mut self.dump_deadline, env::parse_duration);
        match env::parsed(DUMP_SIGNAL_VAR, parse_realtime_signal) {
            Ok(Some(signal)) => self.dump_signal = Some(signal),
            Ok(None) => {}
            Err(e) => {
                env.reject(e, "no thread dump (it cannot ask threads for their stacks)");
                self.dump_signal_usable = false;
            }
        }
        if let Some(signal) = self.dump_signal.filter(|s| !(libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(s)) {
            env.reject(
                ConfigError::new("Builder::threads_dump_signal", signal.to_string(), "must be a real-time signal"),
                "no thread dump (it cannot ask threads for their stacks)",
            );
            self.dump_signal_usable = false;
        }
    }

    /// The signal the dump sends each thread; `None` if the thread dump cannot run.
    pub(crate) fn internal_signal(&self) -> Option<i32> {
        self.dump_signal_usable.then(|| self.dump_signal.unwrap_or_else(onsite_threads::default_dump_signal))
    }

    /// The threadcreate profiler. Asking for the hook's status here also keeps `onsite-threads`
    /// (and so its `pthread_create` hook) linked into every service that installs onsite.
    pub(crate) fn profilers(&self) -> Vec<Box<dyn Profiler>> {
        match onsite_threads::hook_status() {
            HookStatus::Active { threads_seen } => {
                tracing::debug!(threads_seen, "onsite: pthread_create hook active");
            }
            HookStatus::StaticBuildWithoutWrap => tracing::warn!(
                "onsite: static build without onsite-threads' `wrap` feature: thread creation is not recorded"
            ),
        }
        vec![Box::new(onsite_threads::ThreadCreateProfiler::new())]
    }

    /// The SIGUSR1 dump: `…-threads-….txt` with every thread's name, id and stack.
    pub(crate) fn dump_threads(&self, out: &CaptureOutput) -> Result<(), CaptureError> {
        let signal = self.dump_signal.unwrap_or_else(onsite_threads::default_dump_signal);
        onsite_threads::dump_all_threads_with_signal(out, self.dump_deadline, signal).map(drop)
    }
}

impl crate::Builder {
    /// How long a SIGUSR1 threads dump waits for every thread's stack (default 2s).
    pub fn threads_dump_deadline(mut self, deadline: Duration) -> Self {
        self.backends.threads.dump_deadline = deadline;
        self
    }

    /// The real-time signal the threads dump borrows to ask each thread for its stack (default
    /// `SIGRTMIN+4`); pick another if the service uses that one. A signal outside
    /// `SIGRTMIN..=SIGRTMAX`, or one that is also the toggle or the dump signal, is reported at
    /// install and turns the thread dump off.
    pub fn threads_dump_signal(mut self, signal: i32) -> Self {
        self.backends.threads.dump_signal = Some(signal);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_signals_as_people_write_them() {
        let min = libc::SIGRTMIN();
        assert_eq!(parse_realtime_signal("SIGRTMIN+4"), Ok(min + 4));
        assert_eq!(parse_realtime_signal("sigrtmin"), Ok(min));
        assert_eq!(parse_realtime_signal("SIGRTMAX-1"), Ok(libc::SIGRTMAX() - 1));
        assert_eq!(parse_realtime_signal(&(min + 2).to_string()), Ok(min + 2));
        assert!(parse_realtime_signal("10").unwrap_err().contains("real-time"));
        assert!(parse_realtime_signal("SIGUSR1").is_err());
        assert!(parse_realtime_signal("SIGTERM").is_err());
        assert!(parse_realtime_signal("SIGRTMIN+x").is_err());
    }
}
