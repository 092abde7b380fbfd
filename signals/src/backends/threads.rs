//! The threads backend's settings: the threadcreate profiler, and the SIGUSR1 all-threads dump
//! (`ONSITE_THREADS_DUMP_DEADLINE`, `ONSITE_THREADS_DUMP_SIGNAL`).

use std::time::Duration;

use onsite_core::{CaptureError, CaptureOutput, Profiler};
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
}

impl Default for Settings {
    fn default() -> Self {
        Settings { dump_deadline: DEFAULT_DUMP_DEADLINE, dump_signal: None }
    }
}

/// `SIGRTMIN+N`, `SIGRTMAX-N` or a number, within the real-time range.
fn parse_realtime_signal(text: &str) -> Result<i32, String> {
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let upper = text.to_ascii_uppercase();
    let number = if let Some(rest) = upper.strip_prefix("SIGRTMIN") {
        min + if rest.is_empty() {
            0
        } else {
            rest.strip_prefix('+').and_then(|n| n.parse().ok()).ok_or("expected SIGRTMIN+N")?
        }
    } else if let Some(rest) = upper.strip_prefix("SIGRTMAX") {
        max - if rest.is_empty() {
            0
        } else {
            rest.strip_prefix('-').and_then(|n| n.parse().ok()).ok_or("expected SIGRTMAX-N")?
        }
    } else {
        upper.parse().map_err(|_| "expected a real-time signal such as SIGRTMIN+4 or its number")?
    };
    if (min..=max).contains(&number) {
        Ok(number)
    } else {
        Err(format!("must be a real-time signal, {min} (SIGRTMIN) to {max} (SIGRTMAX)"))
    }
}

impl Settings {
    pub(crate) fn apply_env(&mut self, env: &mut env::Reader) {
        env.set(DUMP_DEADLINE_VAR, &mut self.dump_deadline, env::parse_duration);
        env.set_shown(
            DUMP_SIGNAL_VAR,
            &mut self.dump_signal,
            |text| parse_realtime_signal(text).map(Some),
            |signal| format!("{}", signal.unwrap_or_else(onsite_threads::default_dump_signal)),
        );
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

    /// The real-time signal the threads dump borrows (default `SIGRTMIN+4`); pick another if the
    /// service uses that one. A signal outside `SIGRTMIN..=SIGRTMAX` makes the dump fail with an
    /// error saying so.
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
        assert!(parse_realtime_signal("SIGRTMIN+x").is_err());
    }
}
