//! Mappings and symbolisation: the one place that knows which object an address belongs to,
//! where it is in that object's file, and what the object's symbols say about it.
//!
//! - [`Mappings`]: this process's executable mappings from `/proc/self/maps`, each with its
//!   file offset and GNU build ID (the loaded object's, read from memory: the file at its path
//!   may have been replaced since), as pprof's `Mapping` wants them.
//! - `loaded`: the objects the loader has loaded (`dl_iterate_phdr`), the one list of them,
//!   for those build IDs and for the stack walker's modules, and [`WritableSegments`]:
//!   whether an address is a `static`'s.
//! - [`Symbolizer`]: addresses to frames through `addr2line` (DWARF) and the ELF symbol table
//!   (`.symtab`, else `.dynsym`, sizes checked), reading each object's own file, or files
//!   found on a search path by build ID (offline, like `PPROF_BINARY_PATH`).
//! - [`with_shared`]: the process-wide symboliser behind onsite's own lock. It never takes the
//!   `backtrace` crate's global lock: a thread holding that lock may be waiting for the
//!   allocator's (dhat's) lock, and the symboliser allocates.
//! - A symbolisation deadline ([`deadline`], [`with_deadline`]): past it, addresses are left
//!   unnamed (with their real mappings, so they can be named offline), so a shutdown is not
//!   held up by symbolisation.

mod elf;
pub(crate) mod loaded;
mod maps;
mod symbolizer;

use std::cell::Cell;
use std::time::Instant;

pub use loaded::WritableSegments;
pub use maps::{MappedFile, Mappings, ObjectMapping};
pub use symbolizer::{Resolved, Symbolizer, release_shared, with_shared};

/// The address to resolve for a stack entry: stack walkers give return addresses, which point
/// after the call; the call itself is one byte earlier (for the interrupted leaf of a signal
/// this names the same function except at its very first instruction).
pub fn lookup_address(ip: u64) -> u64 {
    ip.saturating_sub(1)
}

thread_local! {
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The symbolisation deadline in force on this thread (set by [`with_deadline`]), if any.
pub fn deadline() -> Option<Instant> {
    DEADLINE.with(Cell::get)
}

/// Runs `f` with `deadline` as this thread's symbolisation deadline (the earlier of it and one
/// already in force).
pub fn with_deadline<R>(deadline: Option<Instant>, f: impl FnOnce() -> R) -> R {
    let outer = DEADLINE.with(Cell::get);
    let inner = match (outer, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    struct Restore(Option<Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEADLINE.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(outer);
    DEADLINE.with(|d| d.set(inner));
    f()
}

/// Whether the deadline in force on this thread has passed.
pub fn past_deadline() -> bool {
    deadline().is_some_and(|d| Instant::now() >= d)
}
