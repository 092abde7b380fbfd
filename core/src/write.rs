//! The one file writer every backend uses.
//!
//! A dump is written to a fresh temporary name in the same directory (created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600), flushed, fsync'd, and then moved to its final name
//! with `renameat2(RENAME_NOREPLACE)` (or `link` + `unlink` where the file system lacks it).
//! Neither step follows a symlink or replaces an existing file, so a symlink planted at the
//! final name is left alone and reported, and a reader never sees a half-written dump under its
//! final name. On any failure the temporary file is removed (also when `fill` panics: a guard
//! removes it while the panic unwinds) and the error names the path.

use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file that was written completely and is now under its final name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    /// Its final path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

/// A dump that could not be written; nothing is left under `path`.
#[derive(Debug)]
pub struct WriteError {
    /// The final path the dump would have had.
    pub path: PathBuf,
    /// The step that failed.
    pub step: &'static str,
    /// The cause.
    pub source: io::Error,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "could not write {}: {}: {}", self.path.display(), self.step, self.source)
    }
}

impl std::error::Error for WriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Writes a new file at `path` with what `fill` writes, all or nothing (see the module docs).
///
/// Fails without touching anything if `path` already exists, whatever it is (a file, a
/// directory, a symlink to anywhere).
pub fn write_new_file(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<WrittenFile, WriteError> {
    let err = |step: &'static str| move |source: io::Error| WriteError { path: path.to_owned(), step, source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))
        .map_err(err("checking the name"))?;
    // Refuse early when the final name is taken, so no work is wasted; the rename below is
    // what actually guarantees it (the name could be taken in between).
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(err("checking the final name")(already_exists()));
    }

    let (temp_path, file) = create_temp(dir, name.as_bytes()).map_err(err("creating a temporary file"))?;
    let temp = RemovedUnlessMoved(temp_path);
    let bytes = fill_and_sync(file, fill).map_err(err("writing"))?;
    rename_no_replace(&temp.0, path).map_err(err("moving into place"))?;
    std::mem::forget(temp);
    // Make the rename itself durable; a failure here leaves a complete file, so it is only
    // worth a debug line.
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "could not fsync the dump directory");
    }
    Ok(WrittenFile { path: path.to_owned(), bytes })
}

/// A temporary file not yet moved to its final name: removed when dropped, on an error's
/// early return and while a panic in `fill` unwinds alike. Forgotten once the move is done.
struct RemovedUnlessMoved(PathBuf);

impl Drop for RemovedUnlessMoved {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), error = %e, "onsite: could not remove a temporary file");
        }
    }
}

/// Creates a private scratch file for a capture's temporary data in `dir`, named after the
/// dump it will become (`.{name}.{pid}.{n}.tmp`, created exactly as the writer's temporary:
/// `O_EXCL|O_NOFOLLOW`, mode 0600), and unlinks it at once: it is reachable only through the
/// returned handle and vanishes with it (or with the process, however that ends), so nothing
/// is ever left in `dir` and retention never sees it.
///
/// Putting scratch data in the dump directory means a service needs no writable `/tmp`: the
/// directory onsite writes to is the only one it needs.
pub fn scratch_file(dir: &Path, name: &str) -> io::Result<File> {
    let (path, file) = create_temp(dir, name.as_bytes())?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

fn already_exists() -> io::Error {
    io::Error::new(io::ErrorKind::AlreadyExists, "a file or symlink already exists there; it was not touched")
}

fn fill_and_sync(file: File, fill: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> io::Result<u64> {
    let mut counted = CountingWriter { inner: BufWriter::with_capacity(64 * 1024, file), bytes: 0 };
    fill(&mut counted)?;
    let file = counted.inner.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    Ok(counted.bytes)
}

/// Creates `.{name}.{pid}.{n}.tmp` next to the final file, exclusively and without following
/// symlinks. The leading dot keeps it out of `ls` and out of retention's view of dumps.
fn create_temp(dir: &Path, name: &[u8]) -> io::Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut temp_name = b".".to_vec();
        temp_name.extend_from_slice(name);
        temp_name.extend_from_slice(format!(".{}.{n}.tmp", std::process::id()).as_bytes());
        let temp_path = dir.join(std::ffi::OsStr::from_bytes(&temp_name));
        match OpenOptions::new()
            // Readable too: a scratch file is read back at the stop.
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp_path)
        {
            Ok(file) => return Ok((temp_path, file)),
            // Someone (a planted file, or a leftover of a crashed run) holds this name: take
            // the next one rather than touching it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Moves `from` to `to` only if `to` does not exist, atomically.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    let from_c = CString::new(from.as_os_str().as_bytes())?;
    let to_c = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths that live across the call.
    let rc = unsafe {
        libc::renameat2(libc::AT_FDCWD, from_c.as_ptr(), libc::AT_FDCWD, to_c.as_ptr(), libc::RENAME_NOREPLACE)
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EEXIST) => Err(already_exists()),
        // The file system (or an old kernel) has no RENAME_NOREPLACE: a hard link gives the
        // same no-replace guarantee.
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
            std::fs::hard_link(from, to)
                .map_err(|e| if e.kind() == io::ErrorKind::AlreadyExists { already_exists() } else { e })?;
            // The complete file is under its final name now, whatever happens to the
            // temporary name: a failure to remove that is a leftover to report, not a failed
            // write.
            if let Err(e) = std::fs::remove_file(from) {
                tracing::warn!(path = %from.display(), error = %e, "onsite: could not remove a temporary file");
            }
            Ok(())
        }
        _ => Err(e),
    }
}

struct CountingWriter<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn writes_a_private_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pprof");
        let written = write_new_file(&path, |w| w.write_all(b"hello")).unwrap();
        assert_eq!(written.bytes, 5);
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(entries(dir.path()), vec!["a.pprof"]);
    }

    #[test]
    fn a_planted_symlink_is_not_followed_nor_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        let path = dir.path().join("a.pprof");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = write_new_file(&path, |w| w.write_all(b"dump")).unwrap_err();
        assert_eq!(err.path, path);
        assert!(err.to_string().contains("a.pprof"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        assert_eq!(std::fs::read_link(&path).unwrap(), target);
        assert_eq!(entries(dir.path()), vec!["a.pprof", "precious"]);
    }

    #[test]
    fn a_failed_fill_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pprof");
        let err = write_new_file(&path, |w| {
            w.write_all(b"partial")?;
            Err(io::Error::other("disk full, say"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full, say"), "{err}");
        assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    }

    /// A panicking encoder (the control thread catches it) leaves no temporary file either.
    #[test]
    fn a_fill_that_panics_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pprof");
        let panicked = std::panic::catch_unwind(|| {
            let _ = write_new_file(&path, |w| {
                w.write_all(b"partial")?;
                w.flush()?;
                panic!("an encoder's bug");
            });
        });
        assert!(panicked.is_err());
        assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    }

    #[test]
    fn enospc_while_writing_leaves_nothing_and_names_the_path() {
        // The kernel's own ENOSPC, from /dev/full, raised in the middle of a dump.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pprof");
        let err = write_new_file(&path, |w| {
            w.write_all(b"first half")?;
            OpenOptions::new().write(true).open("/dev/full")?.write_all(b"x")
        })
        .unwrap_err();
        assert_eq!(err.source.raw_os_error(), Some(libc::ENOSPC));
        assert!(err.to_string().contains(&path.display().to_string()));
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn a_scratch_file_is_private_usable_and_already_gone_from_the_directory() {
        use std::io::{Read, Seek};
        let dir = tempfile::tempdir().unwrap();
        let mut file = scratch_file(dir.path(), "svc-1-trace-x.json").unwrap();
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
        file.write_all(b"scratch").unwrap();
        file.rewind().unwrap();
        let mut back = String::new();
        file.read_to_string(&mut back).unwrap();
        assert_eq!(back, "scratch");
    }

    #[test]
    fn a_scratch_file_in_a_missing_directory_is_an_error() {
        let err = scratch_file(Path::new("/proc/onsite-cannot-write-here"), "a.json").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_the_path() {
        let path = Path::new("/proc/onsite-cannot-write-here/a.pprof");
        let err = write_new_file(path, |w| w.write_all(b"x")).unwrap_err();
        assert!(err.to_string().contains("/proc/onsite-cannot-write-here/a.pprof"), "{err}");
    }
}
