//! The two traits every backend implements, and what a capture writes into.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use crate::kind::ProfileKind;
use crate::naming::{CaptureStamp, DumpDir};
use crate::write::{WriteError, WrittenFile, scratch_file, write_new_file};

/// Something that can capture one kind of profile. Held by the control thread for the life
/// of the process; `start` is called once per capture.
pub trait Profiler: Send {
    /// The kind this profiler produces.
    fn kind(&self) -> ProfileKind;

    /// Starts capturing. The returned [`Stopper`] ends this capture and writes its files.
    fn start(&mut self) -> Result<Box<dyn Stopper>, CaptureError>;

    /// Starts capturing for the capture whose files will go through `out`; the control thread
    /// calls this. The default is [`start`](Profiler::start); a backend that keeps data on disk
    /// during the capture overrides it to put that data in `out`'s directory
    /// ([`CaptureOutput::scratch_file`]).
    fn start_for(&mut self, out: &CaptureOutput) -> Result<Box<dyn Stopper>, CaptureError> {
        let _ = out;
        self.start()
    }
}

/// One running capture of one kind.
pub trait Stopper: Send {
    /// Ends the capture and writes its file(s) through `out`. Called on the control thread,
    /// never in a signal handler.
    fn stop(self: Box<Self>, out: &CaptureOutput) -> Result<(), CaptureError>;
}

/// The stopper of a capture that was never started because the backend's capture was already
/// running (pprof-rs allows one profiler per process, and the service may run its own):
/// stopping it does nothing and writes nothing, and the running capture is left alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopStopper;

impl Stopper for NoopStopper {
    fn stop(self: Box<Self>, _out: &CaptureOutput) -> Result<(), CaptureError> {
        Ok(())
    }
}

/// Why a backend could not start or finish; logged by the control thread, never fatal to the
/// service or to the other kinds of the same capture.
#[derive(Debug)]
pub struct CaptureError {
    /// The kind that failed.
    pub kind: ProfileKind,
    /// What went wrong, in words an operator can act on.
    pub message: String,
}

impl CaptureError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ProfileKind, message: impl Into<String>) -> Self {
        CaptureError { kind, message: message.into() }
    }
}

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} profile: {}", self.kind, self.message)
    }
}

impl std::error::Error for CaptureError {}

impl From<(ProfileKind, WriteError)> for CaptureError {
    fn from((kind, e): (ProfileKind, WriteError)) -> Self {
        CaptureError::new(kind, e.to_string())
    }
}

/// Where one capture's files go: one directory, one shared timestamp. Every file written
/// through it is recorded, so the caller can log and list what a capture produced.
#[derive(Debug)]
pub struct CaptureOutput {
    dir: DumpDir,
    stamp: CaptureStamp,
    written: Mutex<Vec<(ProfileKind, WrittenFile)>>,
    symbolize_until: Mutex<Option<Instant>>,
}

impl CaptureOutput {
    /// Output for a capture stamped `stamp` in `dir`.
    pub fn new(dir: DumpDir, stamp: CaptureStamp) -> Self {
        CaptureOutput { dir, stamp, written: Mutex::new(Vec::new()), symbolize_until: Mutex::new(None) }
    }

    /// Stops symbolising at `deadline` (a shutdown's budget): what is written after it keeps
    /// its addresses and real mappings, unnamed, so [`crate::pprof::symbolize_offline`] can
    /// still name it, and so can `go tool pprof` with `PPROF_BINARY_PATH` in a mapping less
    /// than half of which was named in time (pprof leaves a mapping marked `has_functions`
    /// alone; see the builder). Applies to every file written through this output from now on;
    /// an earlier deadline already set stays.
    pub fn symbolize_until(&self, deadline: Instant) {
        let mut current = self.symbolize_until.lock().unwrap_or_else(|e| e.into_inner());
        *current = Some(current.map_or(deadline, |d| d.min(deadline)));
    }

    /// The symbolisation deadline set by [`CaptureOutput::symbolize_until`], if any.
    pub fn symbolize_deadline(&self) -> Option<Instant> {
        *self.symbolize_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The capture's timestamp.
    pub fn stamp(&self) -> &CaptureStamp {
        &self.stamp
    }

    /// When the capture started.
    pub fn started_at(&self) -> SystemTime {
        self.stamp.time()
    }

    /// The dump directory.
    pub fn dump_dir(&self) -> &DumpDir {
        &self.dir
    }

    /// Writes the `kind` file with extension `ext` (all or nothing, see [`write_new_file`]),
    /// logs it, and records it. `fill` runs under this output's symbolisation deadline, so a
    /// profile built inside it honours it.
    pub fn write(
        &self,
        kind: ProfileKind,
        ext: &str,
        fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<WrittenFile, CaptureError> {
        let path = self.dir.path(&self.stamp, kind, ext);
        let deadline = self.symbolize_deadline();
        match crate::symbols::with_deadline(deadline, || write_new_file(&path, fill)) {
            Ok(file) => {
                tracing::info!(kind = %kind, path = %file.path.display(), bytes = file.bytes, "onsite: wrote profile");
                self.written.lock().unwrap_or_else(|e| e.into_inner()).push((kind, file.clone()));
                Ok(file)
            }
            Err(e) => Err(CaptureError::from((kind, e))),
        }
    }

    /// A private, already-unlinked scratch file in the dump directory for the `kind` data this
    /// capture keeps while it runs (see [`scratch_file`](crate::scratch_file)); the error names
    /// the directory.
    pub fn scratch_file(&self, kind: ProfileKind, ext: &str) -> Result<std::fs::File, CaptureError> {
        let path = self.dir.path(&self.stamp, kind, ext);
        let (dir, name) = (self.dir.dir(), path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        scratch_file(dir, &name)
            .map_err(|e| CaptureError::new(kind, format!("could not create a scratch file in {}: {e}", dir.display())))
    }

    /// Every file written so far, in order.
    pub fn written(&self) -> Vec<(ProfileKind, WrittenFile)> {
        self.written.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
