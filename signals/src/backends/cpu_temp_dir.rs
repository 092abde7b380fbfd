//! A usable temporary directory for pprof-rs, which onsite's CPU profiles are sampled with.
//!
//! pprof-rs keeps a named spill file for its sample buckets (`tempfile::NamedTempFile::new()`, in
//! tempfile's default directory) from its first use, and makes a new one at every stop; if that
//! directory is not writable (a read-only root, `TMPDIR` on a read-only volume), every CPU capture
//! of the process fails. The only lever without changing pprof-rs is tempfile's process-wide
//! default directory, `tempfile::env::override_temp_dir`, which can be set once.
//!
//! So before a CPU capture starts, [`UsableTempDir`] checks that the system's temporary directory
//! takes a file. Only if it does not, it points tempfile's default at a private directory in the
//! dump directory, `.onsite-{pid}.tmp` (mode 0700, created exclusively), which `ONSITE_DIR`
//! already has to make writable. An entry of that name already there is used only if it is a
//! directory (not a symlink to one) owned by this user with mode 0700: what a killed run with
//! the same pid leaves (a container restarted as pid 1, say), which would otherwise make every
//! CPU capture fail until someone removed it. Anything else there is left alone and reported. The side effect, logged
//! when it happens: the service's own `tempfile` files without an explicit directory go there too
//! for the rest of the process (they could not be created in the unusable one anyway).
//!
//! At onsite's shutdown the spill file pprof-rs made at the last stop is removed, and the
//! directory with it if nothing else is left in it; if the process is killed first, that empty
//! file and the directory stay. Retention never touches either (neither is named like a dump).

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use onsite_core::{CaptureError, CaptureOutput, ProfileKind, Profiler, Stopper};

/// A profiler (the CPU one) whose captures need tempfile's default directory to be writable.
pub(crate) struct UsableTempDir<P> {
    inner: P,
    /// The private directory tempfile was pointed at, once this did it.
    redirected: Option<PathBuf>,
}

impl<P: Profiler> UsableTempDir<P> {
    pub(crate) fn wrap(inner: P) -> Self {
        UsableTempDir { inner, redirected: None }
    }

    /// Redirects tempfile's default directory into `dump_dir` if the current one takes no file.
    fn ensure_usable(&mut self, dump_dir: &Path) {
        if self.redirected.is_some() {
            return;
        }
        let current = tempfile::env::temp_dir();
        let Err(cause) = tempfile::NamedTempFile::new_in(&current) else { return };
        let private = dump_dir.join(format!(".onsite-{}.tmp", std::process::id()));
        if let Err(e) = create_private_dir(&private) {
            tracing::warn!(temp_dir = %current.display(), error = %cause, dir = %private.display(), create_error = %e,
                "onsite: the temporary directory is not writable and no private one could be made in the dump directory; CPU captures will fail");
            return;
        }
        match tempfile::env::override_temp_dir(&private) {
            Ok(()) => {
                tracing::warn!(temp_dir = %current.display(), error = %cause, now = %private.display(),
                    "onsite: the temporary directory is not writable; the CPU profiler's scratch file, and the process's other `tempfile` files, now go to a private directory in the dump directory");
                self.redirected = Some(private);
            }
            Err(already) => {
                let _ = std::fs::remove_dir(&private);
                tracing::warn!(temp_dir = %already.display(), error = %cause,
                    "onsite: tempfile's directory was already set by the process and is not writable; CPU captures will fail");
            }
        }
    }
}

/// Creates `path` as a private directory, or takes over one a run with this pid left there
/// (a directory, not a symlink, owned by this user, mode 0700); anything else is an error.
fn create_private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let there = std::fs::symlink_metadata(path)?;
            // SAFETY: geteuid has no preconditions.
            let uid = unsafe { libc::geteuid() };
            if there.file_type().is_dir() && there.uid() == uid && there.mode() & 0o777 == 0o700 {
                tracing::info!(dir = %path.display(), "onsite: reusing the private temporary directory an earlier run with this pid left");
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "something else is already there (not a private directory of this user); it was not touched",
                ))
            }
        }
        other => other,
    }
}

/// The names in `dir` (none if it cannot be read).
fn names(dir: &Path) -> BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect()).unwrap_or_default()
}

impl<P: Profiler> Profiler for UsableTempDir<P> {
    fn kind(&self) -> ProfileKind {
        self.inner.kind()
    }

    fn start(&mut self) -> Result<Box<dyn Stopper>, CaptureError> {
        self.inner.start()
    }

    fn start_for(&mut self, out: &CaptureOutput) -> Result<Box<dyn Stopper>, CaptureError> {
        self.ensure_usable(out.dump_dir().dir());
        let stopper = self.inner.start_for(out)?;
        Ok(match &self.redirected {
            Some(dir) => Box::new(NotingSpillFiles { inner: stopper, dir: dir.clone() }),
            None => stopper,
        })
    }
}

impl<P> Drop for UsableTempDir<P> {
    fn drop(&mut self) {
        let Some(dir) = &self.redirected else { return };
        if let Err(e) = remove_spill_files(dir) {
            tracing::debug!(dir = %dir.display(), error = %e, "onsite: could not remove the CPU profiler's scratch file");
        }
    }
}

/// The spill files pprof-rs made in the private directory, noted at each stop (it makes the next
/// one then, on the control thread) so that shutdown removes those and nothing else.
static SPILL_FILES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn remove_spill_files(dir: &Path) -> io::Result<()> {
    let files = std::mem::take(&mut *SPILL_FILES.lock().unwrap_or_else(|e| e.into_inner()));
    for file in files {
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    // Left alone (ENOTEMPTY) if the service's own temporary files are still there.
    match std::fs::remove_dir(dir) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(()),
        other => other,
    }
}

struct NotingSpillFiles {
    inner: Box<dyn Stopper>,
    dir: PathBuf,
}

impl Stopper for NotingSpillFiles {
    fn stop(self: Box<Self>, out: &CaptureOutput) -> Result<(), CaptureError> {
        let before = names(&self.dir);
        let result = self.inner.stop(out);
        let made: Vec<PathBuf> = names(&self.dir).difference(&before).map(|n| self.dir.join(n)).collect();
        let mut noted = SPILL_FILES.lock().unwrap_or_else(|e| e.into_inner());
        noted.retain(|f| f.exists());
        noted.extend(made);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_private_directory_left_by_a_run_with_this_pid_is_taken_over_and_nothing_else_is() {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join(".onsite-1.tmp");
        create_private_dir(&path).expect("a fresh one");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o700);
        // What a killed run with the same pid (a restarted container's pid 1) leaves.
        create_private_dir(&path).expect("the leftover is taken over");

        let open = parent.path().join(".onsite-2.tmp");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(create_private_dir(&open).is_err(), "a directory others can read is not private");

        let planted = parent.path().join(".onsite-3.tmp");
        std::os::unix::fs::symlink(&path, &planted).unwrap();
        let err = create_private_dir(&planted).unwrap_err();
        assert!(err.to_string().contains("not touched"), "{err}");
        assert!(std::fs::symlink_metadata(&planted).unwrap().file_type().is_symlink(), "left alone");

        let file = parent.path().join(".onsite-4.tmp");
        std::fs::write(&file, b"x").unwrap();
        assert!(create_private_dir(&file).is_err(), "a file is not a directory");
    }
}
