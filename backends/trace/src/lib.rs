//! onsite-trace: a `tracing` layer that records the service's spans and events as a Chrome
//! Trace Event file (Perfetto, `chrome://tracing`) while an onsite capture runs.
//!
//! A service adds [`layer()`] to its subscriber once, at start-up:
//!
//! ```no_run
//! use tracing_subscriber::prelude::*;
//! tracing_subscriber::registry()
//!     .with(onsite_trace::layer())
//!     .with(tracing_subscriber::fmt::layer())
//!     .init();
//! ```
//!
//! How it works, and why this way:
//! - While no capture runs the layer wants nothing, and says so: it is a per-layer filtered
//!   layer ([`WhileCapturing`]) whose filter answers `Interest::never()` for every callsite and a
//!   maximum level of `OFF`, so beside other per-layer filtered layers (the common
//!   `fmt::layer().with_filter(LevelFilter::INFO)`) a span nobody else wants is not even built,
//!   exactly as without this layer. A capture's start and stop ask tracing to recompute every
//!   callsite's interest (`rebuild_interest_cache`, on the control thread, outside every lock
//!   of ours), so during a capture every level reaches the layer, including those the other
//!   layers drop.
//! - tracing-chrome keeps a per-thread cached sender, so a process can have only one
//!   `ChromeLayer` that ever sees events: it is built once (lazily, at the first capture, so a
//!   service that never captures has no writer thread) and kept for the life of the process.
//! - It is switched on and off by one atomic flag, read by the filter and again before every
//!   callback, rather than `reload::Layer<Option<ChromeLayer>>`: the layer can be a filtered
//!   layer, which a reloaded layer cannot (tracing#1629). A span created while off but wanted
//!   by another layer costs this layer one relaxed load per callback, and tracing-subscriber
//!   the per-span bookkeeping of a per-layer filter (~160–190 ns per span; a layer without a
//!   per-layer filter would make every span no layer wants be built instead, which costs a
//!   service more).
//! - Only spans created while a capture runs are in it: a span created before the capture (a
//!   connection's span, say) was not given to this layer, so its enters during the capture are
//!   not recorded either; the events inside it are.
//! - Each capture's trace goes to a private, already-unlinked temporary file (tracing-chrome's
//!   writer thread writes it; `FlushGuard::start_new` ends one file and begins the next); at the
//!   stop it is copied through [`CaptureOutput::write`], so the dump appears all or nothing.
//! - An exit is recorded only when its enter was recorded in the same capture, so a file never
//!   holds an `E` without its `B`. A span still open at the stop keeps its `B` alone, which
//!   Perfetto shows as "did not end"; the file is valid JSON either way.
//! - Everything this backend does is onsite's own work, never the service's: tracing-chrome's
//!   writer thread registers itself as onsite's ([`OwnThread`]) before it allocates for a
//!   capture (the capture's start waits for that), and the callbacks that forward a span to
//!   tracing-chrome on a service thread run inside [`OwnWork`], so the memory profile does not
//!   charge their allocations to the service.
//! - The writer thread is joined when the last [`TraceProfiler`] is dropped (onsite's shutdown).
//!   After that no capture can start in this process: a new `ChromeLayer` would miss every thread
//!   that already cached the old sender.

use std::fs::File;
use std::io::{self, Seek, Write};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use onsite_core::own_work::{OwnThread, OwnWork};
use onsite_core::{CaptureError, CaptureOutput, ProfileKind, Profiler, Stopper};
use tracing::level_filters::LevelFilter;
use tracing::span;
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_chrome::{ChromeLayer, ChromeLayerBuilder, FlushGuard};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Filtered;
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::LookupSpan;

/// How a service adds the layer, quoted in the error when it has not.
const HOW_TO_ADD: &str = "add `onsite::trace::layer()` to the tracing subscriber once at start-up, e.g. \
     `tracing_subscriber::registry().with(onsite::trace::layer()).with(tracing_subscriber::fmt::layer()).init()`";

/// Whether the layer forwards to tracing-chrome: true only while a capture runs.
static RECORDING: AtomicBool = AtomicBool::new(false);
/// Bumped at every capture start; an exit is recorded only if its enter carries this number.
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// How many [`TraceProfiler`]s exist; the last one to go joins the writer thread.
static PROFILERS: AtomicUsize = AtomicUsize::new(0);
/// Set by tracing-chrome's writer thread once it is registered as onsite's.
static WRITER_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Builds the one `ChromeLayer` inside the installed layer and returns its guard; `None` when that
/// layer (and so its subscriber) has been dropped.
type BuildChrome = Box<dyn Fn(CaptureFile) -> Option<FlushGuard> + Send>;

/// Process-wide state of the trace backend, behind one mutex taken only by start/stop/shutdown
/// (never by the tracing callbacks).
struct Shared {
    /// Set when a layer was added to a subscriber.
    build: Option<BuildChrome>,
    /// The writer thread's guard, once the `ChromeLayer` was built.
    guard: Option<FlushGuard>,
    /// The writer thread was joined; no capture can start any more.
    shut_down: bool,
    /// A capture is running; the receiver gets its temporary file when tracing-chrome lets go.
    running: Option<Receiver<CaptureResult>>,
}

fn shared() -> MutexGuard<'static, Shared> {
    static SHARED: Mutex<Shared> = Mutex::new(Shared { build: None, guard: None, shut_down: false, running: None });
    SHARED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The layer a service adds to its `tracing` subscriber (see the crate docs). Add it once per
/// process: if several are added, only one ever records (the last one added before the first
/// capture), because a process can have only one tracing-chrome layer.
///
/// It needs no filter of its own: it already wants nothing while no capture runs and every
/// level while one runs. A filter added to it (`.with_filter(...)`) limits what a capture
/// records; a global filter of the subscriber (an `EnvFilter` added as a plain layer,
/// `fmt().with_max_level(...)`) limits it too.
pub fn layer<S>() -> TraceLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
{
    ChromeForwarder { chrome: Arc::new(OnceLock::new()), _subscriber: PhantomData }.with_filter(WhileCapturing)
}

/// The layer returned by [`layer()`]: [`ChromeForwarder`] behind the [`WhileCapturing`] filter.
pub type TraceLayer<S> = Filtered<ChromeForwarder<S>, WhileCapturing, S>;

/// The per-layer filter of [`TraceLayer`]: interested in every span and event while a trace
/// capture runs, in none otherwise. Its interest is cached per callsite by tracing; the
/// capture's start and stop have it recomputed.
#[derive(Debug, Clone, Copy, Default)]
pub struct WhileCapturing;

impl<S> Filter<S> for WhileCapturing {
    #[inline]
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        RECORDING.load(Ordering::Relaxed)
    }

    fn callsite_enabled(&self, _meta: &'static Metadata<'static>) -> Interest {
        if RECORDING.load(Ordering::Relaxed) { Interest::always() } else { Interest::never() }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // `None` is "no opinion", which lets every level through to the callsite check.
        if RECORDING.load(Ordering::Relaxed) { None } else { Some(LevelFilter::OFF) }
    }
}

/// Has tracing recompute every callsite's interest and the maximum level, after [`RECORDING`]
/// changed. It walks every registered callsite and asks every dispatcher (tracing's own locks:
/// its dispatcher list and its list of non-default callsites), so it runs on the control
/// thread at a capture's start and stop, never inside a tracing callback and never while
/// holding [`shared`] (nothing it calls takes that lock, but nothing needs to).
///
/// A callsite first hit on another thread during the rebuild may keep the interest it computed
/// from the flag's old value: at a start it can miss that capture, at a stop it stays
/// "sometimes" and is filtered out by [`WhileCapturing::enabled`] for one relaxed load.
fn rebuild_interest() {
    tracing_core::callsite::rebuild_interest_cache();
}

/// The layer inside [`TraceLayer`]: forwards to one `tracing_chrome::ChromeLayer` while a trace
/// capture runs, and does nothing but one atomic load per callback otherwise.
pub struct ChromeForwarder<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    chrome: Arc<OnceLock<ChromeLayer<S>>>,
    _subscriber: PhantomData<fn(S)>,
}

impl<S> std::fmt::Debug for ChromeForwarder<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChromeForwarder").field("built", &self.chrome.get().is_some()).finish()
    }
}

/// Which capture a span's enters were recorded in, and how many are not yet exited.
struct Entered {
    generation: u64,
    depth: u32,
}

impl<S> ChromeForwarder<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    /// The ChromeLayer while a capture runs. The caller forwards to it inside an [`OwnWork`]
    /// scope: tracing-chrome's formatting and its per-thread sender allocate on the service's
    /// thread, and that is onsite's work.
    #[inline(always)]
    fn recording(&self) -> Option<&ChromeLayer<S>> {
        if !RECORDING.load(Ordering::Relaxed) {
            return None;
        }
        self.chrome.get()
    }
}

impl<S> Layer<S> for ChromeForwarder<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    fn on_layer(&mut self, _subscriber: &mut S) {
        let mut shared = shared();
        let weak: Weak<OnceLock<ChromeLayer<S>>> = Arc::downgrade(&self.chrome);
        if shared.guard.is_some() || shared.shut_down {
            // The process already has its one ChromeLayer (in an earlier subscriber): this layer
            // stays off, and `start` explains why if that earlier one is gone.
            return;
        }
        shared.build = Some(Box::new(move |file| {
            let cell = weak.upgrade()?;
            let (chrome, guard) = ChromeLayerBuilder::new().writer(file).include_args(true).build();
            // The cell is only ever set here, under the shared lock, once.
            let _ = cell.set(chrome);
            Some(guard)
        }));
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if let Some(chrome) = self.recording() {
            let _own = OwnWork::enter();
            chrome.on_new_span(attrs, id, ctx);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(chrome) = self.recording() {
            let _own = OwnWork::enter();
            chrome.on_record(id, values, ctx);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if let Some(chrome) = self.recording() {
            let _own = OwnWork::enter();
            chrome.on_event(event, ctx);
        }
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        let Some(chrome) = self.recording() else { return };
        let _own = OwnWork::enter();
        let Some(span) = ctx.span(id) else { return };
        let generation = GENERATION.load(Ordering::Relaxed);
        {
            let mut extensions = span.extensions_mut();
            match extensions.get_mut::<Entered>() {
                Some(entered) if entered.generation == generation => entered.depth += 1,
                Some(entered) => *entered = Entered { generation, depth: 1 },
                None => extensions.insert(Entered { generation, depth: 1 }),
            }
        }
        drop(span);
        chrome.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        let Some(chrome) = self.recording() else { return };
        let _own = OwnWork::enter();
        let Some(span) = ctx.span(id) else { return };
        let generation = GENERATION.load(Ordering::Relaxed);
        let entered_in_this_capture = match span.extensions_mut().get_mut::<Entered>() {
            Some(entered) if entered.generation == generation && entered.depth > 0 => {
                entered.depth -= 1;
                true
            }
            _ => false,
        };
        drop(span);
        if entered_in_this_capture {
            chrome.on_exit(id, ctx);
        }
    }
}

type CaptureResult = Result<File, io::Error>;

/// Where tracing-chrome's writer thread writes one capture: a private unlinked scratch file in
/// the dump directory. It never reports an error to that thread (which would panic on one); the
/// first error is kept and reported by the stop. Dropping it (tracing-chrome does when it starts
/// the next file) hands the file to the stopper. Its first call on the writer thread registers
/// that thread as onsite's.
struct CaptureFile {
    file: Option<File>,
    error: Option<io::Error>,
    done: Option<SyncSender<CaptureResult>>,
}

impl CaptureFile {
    fn new(file: File) -> (CaptureFile, Receiver<CaptureResult>) {
        let (done, receiver) = sync_channel(1);
        (CaptureFile { file: Some(file), error: None, done: Some(done) }, receiver)
    }

    /// A file for the time between captures: writes go nowhere.
    fn idle() -> CaptureFile {
        CaptureFile { file: None, error: None, done: None }
    }
}

thread_local! {
    /// tracing-chrome's writer thread's registration as onsite's, made at its first write and
    /// dropped when the thread ends (joined at onsite's shutdown), freeing its id.
    static WRITER_THREAD: std::cell::OnceCell<OwnThread> = const { std::cell::OnceCell::new() };
}

/// Registers the calling thread (tracing-chrome's writer: only it calls [`CaptureFile`]) as
/// onsite's, once.
fn register_writer_thread() {
    WRITER_THREAD.with(|own| {
        own.get_or_init(|| {
            let own = OwnThread::register();
            WRITER_REGISTERED.store(true, Ordering::SeqCst);
            own
        });
    });
}

/// How long the first capture's start waits for tracing-chrome's new writer thread to register
/// as onsite's. It has nothing to do but start and flush two bytes, so this is only reached on a
/// machine too loaded to schedule it; the capture then goes on, and the thread's first
/// allocations may be sampled as the service's.
const REGISTER_DEADLINE: Duration = Duration::from_secs(2);

/// Makes the writer thread of a `ChromeLayer` just built register itself before the capture
/// starts: the flush reaches [`CaptureFile::write`] on that thread. It has already allocated its
/// buffer by then, but every other kind (memory last) starts after this returns.
fn await_writer_registration(guard: &FlushGuard) {
    guard.flush();
    let started = Instant::now();
    while !WRITER_REGISTERED.load(Ordering::SeqCst) {
        if started.elapsed() > REGISTER_DEADLINE {
            tracing::debug!("onsite: tracing-chrome's writer thread did not start in time to register as onsite's");
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Write for CaptureFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        register_writer_thread();
        if let (Some(file), None) = (&mut self.file, &self.error)
            && let Err(e) = file.write_all(buf)
        {
            self.error = Some(e);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        register_writer_thread();
        Ok(())
    }
}

impl Drop for CaptureFile {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let result = match (self.file.take(), self.error.take()) {
                (_, Some(e)) => Err(e),
                (Some(file), None) => Ok(file),
                (None, None) => Err(io::Error::other("no file")),
            };
            let _ = done.try_send(result);
        }
    }
}

/// How long a stop waits for tracing-chrome's writer thread to finish the file (it may have a
/// backlog of events queued from a busy capture).
const FINISH_DEADLINE: Duration = Duration::from_secs(30);

/// The trace backend's [`Profiler`]: `…-trace-….json`. Dropping the last one (onsite's shutdown)
/// joins tracing-chrome's writer thread.
#[derive(Debug)]
pub struct TraceProfiler {
    _private: (),
}

impl TraceProfiler {
    /// A profiler for the layer this process added with [`layer()`].
    pub fn new() -> Self {
        PROFILERS.fetch_add(1, Ordering::SeqCst);
        TraceProfiler { _private: () }
    }
}

impl Default for TraceProfiler {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TraceProfiler {
    fn drop(&mut self) {
        if PROFILERS.fetch_sub(1, Ordering::SeqCst) == 1 {
            shutdown();
        }
    }
}

/// Stops recording and joins tracing-chrome's writer thread, if one was started. Called when the
/// last [`TraceProfiler`] is dropped; after it, trace captures fail with an error saying why.
pub fn shutdown() {
    {
        let mut shared = shared();
        RECORDING.store(false, Ordering::SeqCst);
        shared.running = None;
        if let Some(guard) = shared.guard.take() {
            shared.shut_down = true;
            shared.build = None;
            // Joins the writer thread (it finishes the idle or abandoned file first); its
            // registration as onsite's ends with it.
            drop(guard);
        }
    }
    rebuild_interest();
}

impl Profiler for TraceProfiler {
    fn kind(&self) -> ProfileKind {
        ProfileKind::Trace
    }

    /// Starts a capture whose scratch file is in the system's temporary directory (onsite's
    /// control thread calls [`start_for`](Profiler::start_for) instead, which puts it in the dump
    /// directory).
    fn start(&mut self) -> Result<Box<dyn Stopper>, CaptureError> {
        let dir = std::env::temp_dir();
        let file = onsite_core::scratch_file(&dir, "onsite-trace.json").map_err(|e| {
            CaptureError::new(
                ProfileKind::Trace,
                format!("could not create a scratch file for the trace in {}: {e}", dir.display()),
            )
        })?;
        start_into(file)
    }

    fn start_for(&mut self, out: &CaptureOutput) -> Result<Box<dyn Stopper>, CaptureError> {
        start_into(out.scratch_file(ProfileKind::Trace, "json")?)
    }
}

/// Starts a capture whose events tracing-chrome's writer thread writes to `file`.
fn start_into(file: File) -> Result<Box<dyn Stopper>, CaptureError> {
    {
        let err = |m: String| CaptureError::new(ProfileKind::Trace, m);
        let mut shared = shared();
        if shared.shut_down {
            return Err(err("onsite's trace writer was shut down in this process; a process has one \
                 tracing-chrome layer, so trace capture cannot restart"
                .into()));
        }
        if shared.running.is_some() {
            return Err(err("a trace capture is already running".into()));
        }
        let (file, receiver) = CaptureFile::new(file);
        match &shared.guard {
            Some(guard) => guard.start_new(Some(Box::new(file))),
            None => {
                let Some(build) = &shared.build else {
                    return Err(err(format!(
                        "the service's tracing subscriber has no onsite trace layer: {HOW_TO_ADD}"
                    )));
                };
                match build(file) {
                    Some(guard) => {
                        await_writer_registration(&guard);
                        shared.guard = Some(guard);
                    }
                    None => {
                        shared.build = None;
                        return Err(err(format!(
                            "the onsite trace layer was dropped with its tracing subscriber: {HOW_TO_ADD}"
                        )));
                    }
                }
            }
        }
        shared.running = Some(receiver);
        GENERATION.fetch_add(1, Ordering::SeqCst);
        register_fork_handler();
        RECORDING.store(true, Ordering::SeqCst);
    }
    rebuild_interest();
    Ok(Box::new(TraceStopper { started: Instant::now() }))
}

/// A child made by `fork(2)` during a capture has no writer thread: were it to go on recording,
/// its events would pile up in a channel no one reads. Its child handler switches recording off
/// (one atomic store, as `pthread_atfork` child handlers may do). Registered once, at the first
/// capture.
fn register_fork_handler() {
    extern "C" fn in_forked_child() {
        RECORDING.store(false, Ordering::SeqCst);
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a child handler that only stores an atomic.
        if unsafe { libc::pthread_atfork(None, None, Some(in_forked_child)) } != 0 {
            tracing::warn!(
                "onsite: pthread_atfork failed; a child forked during a trace capture would record for ever"
            );
        }
    });
}

struct TraceStopper {
    started: Instant,
}

impl Stopper for TraceStopper {
    fn stop(self: Box<Self>, out: &CaptureOutput) -> Result<(), CaptureError> {
        let err = |m: String| CaptureError::new(ProfileKind::Trace, m);
        let receiver = {
            let mut shared = shared();
            RECORDING.store(false, Ordering::SeqCst);
            match (shared.running.take(), &shared.guard) {
                (Some(receiver), Some(guard)) => {
                    // Ends the capture's file ("]") and hands it back by dropping our writer.
                    guard.start_new(Some(Box::new(CaptureFile::idle())));
                    Ok(receiver)
                }
                _ => Err(err("onsite's trace writer was shut down".into())),
            }
        };
        rebuild_interest();
        let receiver = receiver?;
        let mut file = match receiver.recv_timeout(FINISH_DEADLINE) {
            Ok(Ok(file)) => file,
            Ok(Err(e)) => return Err(err(format!("writing the trace to its scratch file failed: {e}"))),
            Err(_) => {
                return Err(err(format!(
                    "tracing-chrome's writer did not finish the trace within {FINISH_DEADLINE:?}; it was dropped"
                )));
            }
        };
        file.rewind().map_err(|e| err(format!("reading back the trace scratch file: {e}")))?;
        let written = out.write(ProfileKind::Trace, "json", |w| io::copy(&mut file, w).map(drop))?;
        tracing::debug!(seconds = self.started.elapsed().as_secs_f64(), bytes = written.bytes, "onsite: trace capture");
        Ok(())
    }
}
