//! onsite-core: what every onsite backend shares.
//!
//! - [`Profiler`] and [`Stopper`]: the two traits a backend implements, and [`NoopStopper`];
//! - [`ProfileKind`]: the kinds of evidence, and their names in files and configuration;
//! - [`DumpDir`] and [`CaptureStamp`]: `{command}-{pid}-{kind}-{timestamp}.{ext}` naming;
//! - [`write_new_file`] and [`CaptureOutput`]: the one all-or-nothing, no-symlink file writer;
//! - [`pprof`]: the one builder from stacks to gzip'd `profile.proto`, and a reader for it;
//! - [`symbols`]: this process's mappings (`/proc/self/maps`, build IDs) and the one
//!   symboliser (addr2line and the ELF symbol tables, in process or offline by build ID);
//! - [`StackTable`]: the one fixed, lock-free table of distinct stacks that backends recording
//!   from an allocator or a hook index their counters by;
//! - [`stack_walk`]: the one stack walker that takes no lock and allocates nothing, for the
//!   allocator and for signal handlers;
//! - [`own_work`]: which threads and scopes are onsite's own work, so no profile charges them
//!   to the service;
//! - `test_support` (feature `test-support`, for tests only): running a test's child process
//!   in a role with a deadline, and finding the dump files of one kind.
//!
//! Nothing here starts threads or installs handlers; that is the `onsite` crate's job (only
//! `test_support`, in tests, starts child processes and threads reading their output).

mod deadline;
mod kind;
mod naming;
pub mod own_work;
pub mod pprof;
mod profiler;
mod stack_table;
pub mod stack_walk;
pub mod symbols;
/// For onsite's own tests (and services' tests if they like), not for production code.
#[cfg(feature = "test-support")]
pub mod test_support;
pub mod thread_events;
mod write;

pub use deadline::{LONGEST_DURATION, instant_after};
pub use kind::{ProfileKind, UnknownKind};
pub use naming::{CaptureStamp, ConfigError, DumpDir, format_utc_millis};
pub use profiler::{CaptureError, CaptureOutput, NoopStopper, Profiler, Stopper};
pub use stack_table::StackTable;
pub use write::{WriteError, WrittenFile, scratch_file, write_new_file};
