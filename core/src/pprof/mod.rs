//! The pprof builder every backend shares (stacks → gzip'd `profile.proto`), and a reader for
//! the files it writes (used by tests, the demo and anyone checking a dump without Go).

pub mod proto;
mod builder;
mod read;

pub use builder::{Frame, PprofBuilder, symbolize};
pub use read::{DecodeError, FunctionTotal, decode, function_totals};
