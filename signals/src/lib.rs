//! # onsite
//!
//! Capture the scene of a production problem while it is happening. Put one line at the top
//! of `main`:
//!
//! ```no_run
//! // Keep it alive. Bad `ONSITE_*` values are logged and replaced; only a process where onsite
//! // cannot run at all gets an error, and the service runs on without it.
//! let _onsite = onsite::install().inspect_err(|e| tracing::error!("{e}")).ok();
//! ```
//!
//! then `kill -USR2 <pid>` starts a capture of every enabled kind, and the next
//! `kill -USR2 <pid>` stops it and writes one file per kind, named
//! `{command}-{pid}-{kind}-{timestamp}.{ext}`, into the dump directory (the system temp dir,
//! `ONSITE_DIR`, or [`Builder::dump_dir`]). A capture also stops by itself after
//! [`Builder::max_duration`] (10 minutes by default). `kill -USR1 <pid>` writes every thread's
//! stack (with the `threads` feature); both signals can be moved or turned off
//! ([`Builder::toggle_signal`], [`Builder::dump_signal`], `ONSITE_TOGGLE_SIGNAL`,
//! `ONSITE_DUMP_SIGNAL`). SIGINT or SIGTERM during a capture first writes the capture's files,
//! then ends the process as it would have ended without onsite.
//!
//! A wrong setting never stops the service: it is logged, naming the variable, the value and
//! what is used instead ([`Builder::strict`] or `ONSITE_STRICT=1` make it `install`'s error).
//!
//! Each backend is a cargo feature (all on by default): `cpu`, `memory`, `mutex`, `block`,
//! `trace`, `threads`. The feature `http` (off by default) adds a listener for Go's
//! `/debug/pprof/` paths (`ONSITE_HTTP`, `Builder::http`), so `go tool pprof URL`, Parca and
//! Grafana Alloy can pull captures. Some need one more line in the service: the memory backend its global
//! allocator ([`memory::Allocator`]), the lock profiles onsite's lock types ([`sync`]), the
//! trace its `tracing` layer ([`trace`]).
//!
//! onsite can also start captures by itself when the process is in trouble: rules such as
//! `ONSITE_AUTO="mem>80%for3m; cpu>90%for1m"` (or [`Builder::auto`]) are checked every
//! interval against the process's CPU, memory and thread count, cgroup limits included (see
//! [`auto`] and the crate README for the grammar). Every capture, manual or automatic, ends
//! with a `…-manifest-….json` saying why it started and what it wrote, and the dump directory
//! is kept within [`Builder::retain_captures`] and [`Builder::retain_bytes`].
//!
//! Keep the returned [`Onsite`] alive: dropping it stops any running capture (writing its
//! files), unregisters the signal handlers and joins the control thread.

pub mod auto;
mod backends;
mod control;
mod env;
#[cfg(feature = "http")]
mod http;
mod manifest;
#[cfg(feature = "report")]
pub mod report;
mod retention;
pub mod status;
mod wake;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use onsite_core::{ConfigError, ProfileKind, WrittenFile};

#[cfg(feature = "cpu")]
pub use onsite_cpu as cpu;
#[cfg(feature = "memory")]
pub use onsite_memory as memory;
#[cfg(any(feature = "mutex", feature = "block"))]
pub use onsite_sync as sync;
#[cfg(feature = "threads")]
pub use onsite_threads as threads;
#[cfg(feature = "trace")]
pub use onsite_trace as trace;

pub use retention::{DEFAULT_MAX_BYTES, DEFAULT_MAX_CAPTURES};

use control::{Command, Controller};
use onsite_core::DumpDir;

/// Environment variables read by [`Builder::install`]. They override what the builder set,
/// so an operator can change a deployed binary without rebuilding it.
pub mod vars {
    /// The dump directory (created if missing). Default: the system temp dir.
    pub const DIR: &str = "ONSITE_DIR";
    /// Which kinds a capture contains: `all`, or a comma list such as `cpu,memory`.
    pub const KINDS: &str = "ONSITE_KINDS";
    /// How long a capture may run before it stops by itself, e.g. `10m`, `90s`.
    pub const MAX_DURATION: &str = "ONSITE_MAX_DURATION";
    /// Automatic capture rules, e.g. `mem>80%for3m; cpu>90%for1m` (grammar in the crate
    /// README); `off` turns off rules set by the builder.
    pub const AUTO: &str = "ONSITE_AUTO";
    /// How often the rules' metrics are sampled, e.g. `5s` (the default), `500ms`.
    pub const AUTO_INTERVAL: &str = "ONSITE_AUTO_INTERVAL";
    /// At most this many captures are kept in the dump directory (default 50), or `unlimited`.
    pub const RETAIN_CAPTURES: &str = "ONSITE_RETAIN_CAPTURES";
    /// At most this many bytes of onsite's files are kept, e.g. `256MiB` (the default), `1GB`,
    /// or `unlimited`.
    pub const RETAIN_BYTES: &str = "ONSITE_RETAIN_BYTES";
    /// The signal that starts and stops a capture: `SIGUSR2` (the default), `USR1`, `HUP`,
    /// `WINCH`, a real-time signal `SIGRTMIN+N`, or `off`.
    pub const TOGGLE_SIGNAL: &str = "ONSITE_TOGGLE_SIGNAL";
    /// The signal that writes every thread's stack: `SIGUSR1` (the default), the same choices
    /// as [`TOGGLE_SIGNAL`], or `off`.
    pub const DUMP_SIGNAL: &str = "ONSITE_DUMP_SIGNAL";
    /// `1`/`true`: a bad `ONSITE_*` value makes `install` fail instead of being logged and
    /// replaced (for tests and CI). Default: off.
    pub const STRICT: &str = "ONSITE_STRICT";
    /// Feature `http`: serve Go's `/debug/pprof/` paths on this address (`127.0.0.1:6060`; a
    /// bare port is loopback; `off`). Default: no listener.
    #[cfg(feature = "http")]
    pub const HTTP: &str = "ONSITE_HTTP";
    /// Feature `http`: the bearer token every request must carry; required for an address that
    /// is not loopback.
    #[cfg(feature = "http")]
    pub const HTTP_TOKEN: &str = "ONSITE_HTTP_TOKEN";
}

/// The default limit on a capture's length, so a forgotten toggle cannot run forever.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(600);

/// Installs onsite with the defaults and the `ONSITE_*` environment. See [`Builder`].
pub fn install() -> Result<Onsite, InstallError> {
    Builder::new().install()
}

/// onsite's configuration, ending in [`Builder::install`].
#[derive(Debug, Clone)]
pub struct Builder {
    dir: Option<PathBuf>,
    kinds: Option<Vec<ProfileKind>>,
    max_duration: Duration,
    strict: bool,
    toggle_signal: Option<libc::c_int>,
    dump_signal: Option<libc::c_int>,
    pub(crate) backends: backends::Settings,
    pub(crate) auto: auto::Settings,
    pub(crate) retention: retention::Settings,
    #[cfg(feature = "http")]
    pub(crate) http: http::Settings,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

impl Builder {
    /// The defaults: every compiled-in kind, the system temp dir, a 10 minute limit.
    pub fn new() -> Self {
        Builder {
            dir: None,
            kinds: None,
            max_duration: DEFAULT_MAX_DURATION,
            strict: false,
            toggle_signal: Some(libc::SIGUSR2),
            dump_signal: Some(libc::SIGUSR1),
            backends: Default::default(),
            auto: Default::default(),
            retention: Default::default(),
            #[cfg(feature = "http")]
            http: Default::default(),
        }
    }

    /// Where dump files go (`ONSITE_DIR` still wins).
    pub fn dump_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Which kinds a capture contains (`ONSITE_KINDS` still wins). Kinds whose cargo feature
    /// is off are ignored.
    pub fn kinds(mut self, kinds: impl IntoIterator<Item = ProfileKind>) -> Self {
        self.kinds = Some(kinds.into_iter().collect());
        self
    }

    /// How long a capture may run before it stops by itself (`ONSITE_MAX_DURATION` still wins).
    pub fn max_duration(mut self, limit: Duration) -> Self {
        self.max_duration = limit;
        self
    }

    /// The signal that starts and stops a capture (default `Some(SIGUSR2)`); `None` for none
    /// (captures then start through the API and rules only). It may be `SIGUSR1`, `SIGUSR2`,
    /// `SIGHUP`, `SIGWINCH` or a real-time signal; `ONSITE_TOGGLE_SIGNAL` still wins.
    pub fn toggle_signal(mut self, signal: Option<i32>) -> Self {
        self.toggle_signal = signal;
        self
    }

    /// The signal that writes every thread's stack (default `Some(SIGUSR1)`, with the `threads`
    /// feature); `None` for none. The same choices as [`Builder::toggle_signal`];
    /// `ONSITE_DUMP_SIGNAL` still wins.
    pub fn dump_signal(mut self, signal: Option<i32>) -> Self {
        self.dump_signal = signal;
        self
    }

    /// Whether a bad setting makes [`Builder::install`] fail (`true`, for tests and CI) rather
    /// than being logged and replaced while the service runs on (`false`, the default).
    /// `ONSITE_STRICT` still wins.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Applies the environment, registers the signal handlers and starts the control thread.
    ///
    /// A bad setting (builder or `ONSITE_*`) is logged at error level, naming it, its value
    /// and what is used instead, and the installation goes on; with [`Builder::strict`] it is
    /// this call's error instead. Other errors: onsite is already installed in this process, or
    /// the system refused a signal handler, socket or thread.
    pub fn install(mut self) -> Result<Onsite, InstallError> {
        let env = self.apply_env();
        let dir = match &self.dir {
            Some(dir) => DumpDir::new(dir),
            None => DumpDir::new(std::env::temp_dir()),
        };
        if INSTALLED.swap(true, Ordering::AcqRel) {
            return Err(InstallError::AlreadyInstalled);
        }
        match self.spawn(dir, env) {
            Ok(onsite) => Ok(onsite),
            Err(e) => {
                INSTALLED.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Applies the environment over the builder's settings; what was wrong is in the returned
    /// reader (logged already, or kept for strict mode's error).
    fn apply_env(&mut self) -> env::Reader {
        let mut env = env::Reader::new(self.strict);
        env.set(vars::STRICT, &mut self.strict, env::parse_bool);
        env.set_strict(self.strict);
        match env::var(vars::DIR) {
            Ok(None) => {}
            Ok(Some(dir)) if !dir.is_empty() => self.dir = Some(PathBuf::from(dir)),
            Ok(Some(dir)) => env.reject(ConfigError::new(vars::DIR, dir, "must name a directory"), self.dir_text()),
            Err(e) => env.reject(e, self.dir_text()),
        }
        env.set_shown(vars::KINDS, &mut self.kinds, |text| parse_kinds(text).map(Some), kinds_text);
        env.set(vars::MAX_DURATION, &mut self.max_duration, |text| {
            env::parse_duration(text).and_then(|limit| match limit.is_zero() {
                true => Err("a capture must be allowed to run".into()),
                false => Ok(limit),
            })
        });
        if self.max_duration.is_zero() {
            env.reject(
                ConfigError::new("Builder::max_duration", "0s", "a capture must be allowed to run"),
                format!("{DEFAULT_MAX_DURATION:?}"),
            );
            self.max_duration = DEFAULT_MAX_DURATION;
        }
        self.auto.apply_env(&mut env);
        self.retention.apply_env(&mut env);
        self.backends.apply_env(&mut env);
        #[cfg(feature = "http")]
        self.http.apply_env(&mut env);
        self.apply_signals(&mut env);
        env
    }

    /// The toggle and dump signals: each from its variable, checked, and never one signal for
    /// two jobs (with the thread dump's own signal either). A wrong one is turned off rather
    /// than put back to its default, which may be the very signal the service uses.
    fn apply_signals(&mut self, env: &mut env::Reader) {
        for (name, builder_name, slot) in [
            (vars::TOGGLE_SIGNAL, "Builder::toggle_signal", &mut self.toggle_signal),
            (vars::DUMP_SIGNAL, "Builder::dump_signal", &mut self.dump_signal),
        ] {
            if let Some(sig) = *slot
                && let Err(reason) = env::parse_signal(&sig.to_string())
            {
                env.reject(ConfigError::new(builder_name, sig.to_string(), reason), "off");
                *slot = None;
            }
            match env::parsed(name, env::parse_signal_or_off) {
                Ok(Some(sig)) => *slot = sig,
                Ok(None) => {}
                Err(e) => {
                    env.reject(e, "off");
                    *slot = None;
                }
            }
        }
        if cfg!(not(feature = "threads")) {
            self.dump_signal = None;
        }
        if self.toggle_signal.is_some() && self.dump_signal == self.toggle_signal {
            let reason = format!("is also the toggle signal ({}); one signal cannot do two jobs", vars::TOGGLE_SIGNAL);
            env.reject(ConfigError::new(vars::DUMP_SIGNAL, env::signal_or_off(self.dump_signal), reason), "off");
            self.dump_signal = None;
        }
        #[cfg(feature = "threads")]
        if let Some(internal) = self.backends.threads.internal_signal()
            && self.dump_signal.is_some()
        {
            for (job, sig) in [(vars::TOGGLE_SIGNAL, self.toggle_signal), (vars::DUMP_SIGNAL, self.dump_signal)] {
                if sig == Some(internal) {
                    let reason = format!(
                        "is also {job}; the thread dump sends this signal to every thread, so one signal cannot do both jobs"
                    );
                    env.reject(
                        ConfigError::new(backends::threads::DUMP_SIGNAL_VAR, env::signal_name(internal), reason),
                        format!("no thread dump ({} off)", vars::DUMP_SIGNAL),
                    );
                    self.dump_signal = None;
                }
            }
        }
    }

    /// Why no thread dump can be made even on request (its signal unusable, or shared with a
    /// signal that has another job); `None` when it can.
    fn thread_dump_unavailable(&self) -> Option<String> {
        #[cfg(feature = "threads")]
        match self.backends.threads.internal_signal() {
            None => Some(format!("the thread dump is off: {} is not usable", backends::threads::DUMP_SIGNAL_VAR)),
            Some(sig) if Some(sig) == self.toggle_signal || Some(sig) == self.dump_signal => Some(format!(
                "the thread dump is off: {} is also the toggle or dump signal",
                backends::threads::DUMP_SIGNAL_VAR
            )),
            Some(_) => None,
        }
        #[cfg(not(feature = "threads"))]
        Some("this service was built without onsite's `threads` feature".to_owned())
    }

    fn dir_text(&self) -> String {
        match &self.dir {
            Some(dir) => dir.display().to_string(),
            None => format!("the system temp dir ({})", std::env::temp_dir().display()),
        }
    }

    fn spawn(self, dir: DumpDir, mut env: env::Reader) -> Result<Onsite, InstallError> {
        let profilers = self.backends.profilers();
        let compiled: Vec<ProfileKind> = profilers.iter().map(|p| p.kind()).collect();
        let rules = self.auto.rules(&compiled, &mut env);
        #[cfg(feature = "http")]
        let listen = self.http.checked(&mut env);
        env.finish()?;
        if let Err(e) = dir.ensure_exists() {
            // Not fatal: the directory may appear later (a volume mounted after start-up), and
            // each capture reports its own write errors.
            tracing::warn!(dir = %dir.dir().display(), error = %e, "onsite: cannot create the dump directory yet");
        }
        let kinds: Vec<ProfileKind> =
            compiled.iter().copied().filter(|k| self.kinds.as_ref().is_none_or(|kinds| kinds.contains(k))).collect();
        let kinds_text: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        let kinds_text = kinds_text.join(",");
        let rules_text: Vec<&str> = rules.iter().map(|r| r.text.as_str()).collect();
        let rules_text = rules_text.join("; ");
        let watch = (!rules.is_empty()).then(|| {
            let needs = auto::metrics::Needs {
                cpu: rules.iter().any(|r| r.metric == auto::Metric::Cpu),
                memory: rules.iter().any(|r| r.metric == auto::Metric::Memory),
                threads: rules.iter().any(|r| r.metric == auto::Metric::Threads),
            };
            let source = Box::new(auto::metrics::ProcessMetrics::new(needs));
            auto::watch::Watch::new(rules, self.auto.interval(), source, std::time::Instant::now())
        });

        wake::register_fork_handler();
        let wake = wake::WakeSocket::new().map_err(InstallError::Io)?;
        let reader = wake.reader.try_clone().map_err(InstallError::Io)?;
        let signals =
            wake::OperatorSignals::register(self.toggle_signal, self.dump_signal).map_err(InstallError::Io)?;
        let (commands, receiver) = mpsc::channel();
        let setup = control::Setup {
            dir: dir.clone(),
            profilers,
            kinds,
            max_duration: self.max_duration,
            toggle_signal: self.toggle_signal,
            backends: self.backends.clone(),
            watch,
            retention: self.retention,
            thread_dump_unavailable: self.thread_dump_unavailable(),
        };
        let controller = Controller::new(setup, receiver, reader);
        let thread = std::thread::Builder::new()
            .name("onsite-control".into())
            .spawn(move || {
                // Everything this thread does (symbolising, encoding, writing) is onsite's.
                let _own = onsite_core::own_work::OwnThread::register();
                controller.run()
            })
            .map_err(InstallError::Io)?;
        #[cfg(feature = "http")]
        let http = listen.and_then(|listen| {
            let asked = listen.addr;
            let authenticated = listen.token.is_some();
            let control = http::server::Control { commands: commands.clone(), wake: wake.writer().ok()? };
            match http::Server::start(listen, self.max_duration, control) {
                Ok(server) => {
                    tracing::info!(
                        addr = %server.addr(),
                        bearer_token = authenticated,
                        "onsite: serving http://{}/debug/pprof/ (`go tool pprof http://{}/debug/pprof/profile?seconds=30`)",
                        server.addr(),
                        server.addr()
                    );
                    Some(server)
                }
                Err(e) => {
                    tracing::error!(addr = %asked, error = %e, "onsite: cannot listen for HTTP ({}); the service and signals run on without it", http::ADDR_VAR);
                    None
                }
            }
        });
        tracing::info!(
            pid = dir.pid(),
            dir = %dir.dir().display(),
            kinds = %kinds_text,
            max_duration = ?self.max_duration,
            auto = %rules_text,
            auto_interval = ?self.auto.interval(),
            retain_captures = ?self.retention.max_captures,
            retain_bytes = ?self.retention.max_bytes,
            toggle_signal = %env::signal_or_off(self.toggle_signal),
            dump_signal = %env::signal_or_off(self.dump_signal),
            "onsite: installed; {}",
            match self.toggle_signal {
                Some(sig) => format!("`kill -{} {}` starts a capture, the next one stops it", env::kill_name(sig), dir.pid()),
                None => "no toggle signal (ONSITE_TOGGLE_SIGNAL=off): captures start through the API or rules".to_owned(),
            }
        );
        Ok(Onsite {
            dir: dir.dir().to_owned(),
            pid: std::process::id(),
            commands,
            thread: Some(thread),
            signals: Some(signals),
            wake: Some(wake),
            #[cfg(feature = "http")]
            http,
        })
    }
}

fn kinds_text(kinds: &Option<Vec<ProfileKind>>) -> String {
    match kinds {
        None => "all".to_owned(),
        Some(kinds) => kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(","),
    }
}

fn parse_kinds(text: &str) -> Result<Vec<ProfileKind>, String> {
    if text.eq_ignore_ascii_case("all") {
        return Ok(ProfileKind::CAPTURED.to_vec());
    }
    let kinds = text
        .split(',')
        .filter(|w| !w.trim().is_empty())
        .map(|w| match w.parse::<ProfileKind>() {
            Ok(k) if ProfileKind::CAPTURED.contains(&k) => Ok(k),
            Ok(k) => Err(format!("{k} is not a kind a capture can contain")),
            Err(e) => Err(e.to_string()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if kinds.is_empty() {
        return Err("names no kind; use `all` or a list such as `cpu,memory`".into());
    }
    Ok(kinds)
}

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// A live installation. Dropping it (or [`Onsite::shutdown`]) finishes any running capture,
/// unregisters onsite's signal handlers and joins its thread.
#[must_use = "dropping the handle shuts onsite down at once; keep it alive for the life of the service"]
pub struct Onsite {
    dir: PathBuf,
    /// The process that installed onsite: in a forked child, which has none of onsite's
    /// threads, dropping this handle must not wait for them.
    pid: u32,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    signals: Option<wake::OperatorSignals>,
    wake: Option<wake::WakeSocket>,
    #[cfg(feature = "http")]
    http: Option<http::Server>,
}

impl fmt::Debug for Onsite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Onsite").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Onsite {
    /// The dump directory.
    pub fn dump_dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a capture, as a first SIGUSR2 would. `false` if one was already running (it is
    /// left as it is).
    pub fn start_capture(&self) -> bool {
        let (reply, answer) = mpsc::channel();
        self.send(Command::Start { reply });
        answer.recv().unwrap_or(false)
    }

    /// Stops the running capture, as a second SIGUSR2 would, and returns the files written
    /// once they are complete (none if no capture was running).
    pub fn stop_capture(&self) -> Vec<WrittenFile> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::Stop { reply });
        answer.recv().unwrap_or_default()
    }

    /// The address the `/debug/pprof/` listener serves (feature `http`), with the port it
    /// chose if asked for port 0; `None` when it is not running.
    #[cfg(feature = "http")]
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(http::Server::addr)
    }

    /// Shuts down now; the same as dropping the handle.
    pub fn shutdown(mut self) {
        self.shutdown_in_place();
    }

    fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            wake::wake_socket_writer(self.wake.as_ref());
        }
    }

    fn shutdown_in_place(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        if std::process::id() != self.pid {
            // A forked child's copy: the control thread is the parent's (joining it would wait
            // for ever), and unregistering signal-hook actions could wait on a lock a parent
            // thread held at the fork. The child's copies of the wake socket's ends are closed.
            std::mem::forget(thread);
            std::mem::forget(self.signals.take());
            #[cfg(feature = "http")]
            if let Some(http) = self.http.take() {
                http.forget();
            }
            drop(self.wake.take());
            return;
        }
        // No new signal or request may start anything once shutdown begins.
        drop(self.signals.take());
        #[cfg(feature = "http")]
        if let Some(http) = self.http.take() {
            http.shutdown();
        }
        self.send(Command::Shutdown);
        if thread.join().is_err() {
            tracing::error!("onsite: the control thread panicked");
        }
        drop(self.wake.take());
        INSTALLED.store(false, Ordering::Release);
        tracing::info!("onsite: shut down");
    }
}

impl Drop for Onsite {
    fn drop(&mut self) {
        self.shutdown_in_place();
    }
}

/// Why [`Builder::install`] failed.
#[derive(Debug)]
pub enum InstallError {
    /// A setting (builder or `ONSITE_*` variable) has a value onsite cannot use.
    Config(ConfigError),
    /// onsite is already installed in this process.
    AlreadyInstalled,
    /// The operating system refused a signal handler, socket or thread.
    Io(std::io::Error),
}

impl fmt::Display for InstallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstallError::Config(e) => write!(f, "onsite: bad setting {e}"),
            InstallError::AlreadyInstalled => f.write_str("onsite: already installed in this process"),
            InstallError::Io(e) => write!(f, "onsite: could not install: {e}"),
        }
    }
}

impl std::error::Error for InstallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InstallError::Config(e) => Some(e),
            InstallError::Io(e) => Some(e),
            InstallError::AlreadyInstalled => None,
        }
    }
}

impl From<ConfigError> for InstallError {
    fn from(e: ConfigError) -> Self {
        InstallError::Config(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_from_a_list_or_all() {
        assert_eq!(parse_kinds("all").unwrap().len(), ProfileKind::CAPTURED.len());
        assert_eq!(parse_kinds("cpu, memory").unwrap(), vec![ProfileKind::Cpu, ProfileKind::Memory]);
        assert!(parse_kinds("cpu,heap").unwrap_err().contains("heap"));
        assert!(parse_kinds("threads").is_err());
        assert!(parse_kinds(" , ").is_err());
    }
}
