//! The pprof builder every backend shares (stacks → gzip'd `profile.proto`), and a reader for
//! the files it writes (used by tests, the demo and anyone checking a dump without Go).

mod builder;
pub mod proto;
mod read;

pub use builder::{Frame, PprofBuilder, is_std_function, not_walked_frame, pseudo_frame, resolve_stack, symbolize};
pub use read::{
    DecodeError, FunctionTotal, comments, decode, function_totals, sample_stacks, sample_type_index, string_at,
    symbolize_offline, totals_by_function,
};
