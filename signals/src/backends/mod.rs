//! One file per backend, compiled only with its cargo feature: the backend's settings (its
//! builder methods and `ONSITE_*` variables) and the profilers it adds to a capture. Adding a
//! backend means adding a file here and a field below; nothing else in the crate changes.

use std::time::{Duration, SystemTime};

use onsite_core::{CaptureOutput, ProfileKind, Profiler};

#[cfg(feature = "cpu")]
pub(crate) mod cpu;
#[cfg(feature = "cpu")]
mod cpu_temp_dir;
#[cfg(feature = "memory")]
pub(crate) mod memory;
#[cfg(any(feature = "mutex", feature = "block"))]
pub(crate) mod sync;
#[cfg(feature = "threads")]
pub(crate) mod threads;
#[cfg(feature = "trace")]
pub(crate) mod trace;

/// `ONSITE_SHUTDOWN_BUDGET`: how long a capture stopped by SIGINT/SIGTERM (or by dropping the
/// `Onsite` handle) may spend symbolising its files (default 3s). Past it, the rest is written
/// unsymbolised, with real mappings (`go tool pprof` names it with `PPROF_BINARY_PATH`), so
/// the process ends within its grace period.
pub const SHUTDOWN_BUDGET_VAR: &str = "ONSITE_SHUTDOWN_BUDGET";

const DEFAULT_SHUTDOWN_BUDGET: Duration = Duration::from_secs(3);

/// Every enabled backend's settings, and the symbolisation budget of a shutdown that all of
/// them share.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) shutdown_budget: Duration,
    #[cfg(feature = "cpu")]
    pub(crate) cpu: cpu::Settings,
    #[cfg(feature = "memory")]
    pub(crate) memory: memory::Settings,
    #[cfg(any(feature = "mutex", feature = "block"))]
    pub(crate) sync: sync::Settings,
    #[cfg(feature = "trace")]
    pub(crate) trace: trace::Settings,
    #[cfg(feature = "threads")]
    pub(crate) threads: threads::Settings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            shutdown_budget: DEFAULT_SHUTDOWN_BUDGET,
            #[cfg(feature = "cpu")]
            cpu: Default::default(),
            #[cfg(feature = "memory")]
            memory: Default::default(),
            #[cfg(any(feature = "mutex", feature = "block"))]
            sync: Default::default(),
            #[cfg(feature = "trace")]
            trace: Default::default(),
            #[cfg(feature = "threads")]
            threads: Default::default(),
        }
    }
}

impl Settings {
    /// Applies each backend's `ONSITE_*` variables over what the builder set.
    pub(crate) fn apply_env(&mut self, env: &mut crate::env::Reader) {
        env.set(SHUTDOWN_BUDGET_VAR, &mut self.shutdown_budget, crate::env::parse_duration);
        #[cfg(feature = "cpu")]
        self.cpu.apply_env(env);
        #[cfg(feature = "memory")]
        self.memory.apply_env(env);
        #[cfg(any(feature = "mutex", feature = "block"))]
        self.sync.apply_env(env);
        #[cfg(feature = "trace")]
        self.trace.apply_env(env);
        #[cfg(feature = "threads")]
        self.threads.apply_env(env);
    }

    /// The profilers of every compiled-in backend, in the order a capture starts them:
    /// [`ProfileKind::CAPTURED`] order, except memory, which starts last (and so stops first):
    /// its window then holds none of onsite's own start and stop allocations, such as
    /// pprof-rs's sample buckets.
    pub(crate) fn profilers(&self) -> Vec<Box<dyn Profiler>> {
        let mut all: Vec<Box<dyn Profiler>> = Vec::new();
        #[cfg(feature = "cpu")]
        all.extend(self.cpu.profilers());
        #[cfg(feature = "memory")]
        all.extend(self.memory.profilers());
        #[cfg(any(feature = "mutex", feature = "block"))]
        all.extend(self.sync.profilers());
        #[cfg(feature = "trace")]
        all.extend(self.trace.profilers());
        #[cfg(feature = "threads")]
        all.extend(self.threads.profilers());
        all.sort_by_key(|p| match p.kind() {
            ProfileKind::Memory => usize::MAX,
            kind => ProfileKind::CAPTURED.iter().position(|&k| k == kind).unwrap_or(usize::MAX - 1),
        });
        all
    }
}

/// What records all the time, so a capture can show the time before it began: the CPU flight
/// recorder (`ONSITE_CPU_RECORDER`). Owned by the control thread, from its start to its end.
#[derive(Debug, Default)]
pub(crate) struct Recorders {
    #[cfg(feature = "cpu")]
    cpu: cpu::Recorder,
}

/// The recorders' content at a capture's start, written once the capture runs.
#[derive(Debug)]
pub(crate) struct BeforeCapture {
    #[cfg(feature = "cpu")]
    cpu: Option<onsite_cpu::BeforeSnapshot>,
}

/// The window a `cpu-before` file covers, for the manifest.
pub(crate) type Window = (SystemTime, SystemTime);

impl Settings {
    /// Starts the configured recorders (none by default).
    pub(crate) fn start_recorders(&self) -> Recorders {
        Recorders {
            #[cfg(feature = "cpu")]
            cpu: self.cpu.start_recorder(),
        }
    }
}

impl Recorders {
    /// What the recorders hold up to now.
    pub(crate) fn snapshot(&self) -> BeforeCapture {
        BeforeCapture {
            #[cfg(feature = "cpu")]
            cpu: self.cpu.snapshot(),
        }
    }
}

impl BeforeCapture {
    /// Writes the snapshot's files into the capture `out`: the window written, and what failed.
    pub(crate) fn write(self, out: &CaptureOutput) -> (Option<Window>, Vec<(ProfileKind, String)>) {
        #[cfg(feature = "cpu")]
        if let Some(snapshot) = self.cpu {
            let window = snapshot.window();
            return match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| snapshot.write(out))) {
                Ok(Ok(_)) => (Some(window), Vec::new()),
                Ok(Err(e)) => {
                    tracing::error!(error = %e.message, "onsite: could not write the cpu-before file");
                    (None, vec![(ProfileKind::CpuBefore, e.message)])
                }
                Err(_) => {
                    tracing::error!("onsite: writing the cpu-before file panicked");
                    (None, vec![(ProfileKind::CpuBefore, "panicked while writing".to_owned())])
                }
            };
        }
        let _ = out;
        (None, Vec::new())
    }
}

/// Whether `kind` is recorded all the time, so a capture of it with no window still has
/// something to say (the always-on heap: what holds the memory now).
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) fn records_always(kind: ProfileKind) -> bool {
    match kind {
        #[cfg(feature = "memory")]
        ProfileKind::Memory => onsite_memory::sampling_always(),
        _ => false,
    }
}

/// In a fork's child (from the atfork handler: stores only): the recorders' timers and thread
/// stayed with the parent.
pub(crate) fn forget_after_fork() {
    #[cfg(feature = "cpu")]
    onsite_cpu::flight_recorder::forget_after_fork();
}
