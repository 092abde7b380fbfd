//! onsite-threads: who starts threads, and what every thread is doing right now.
//!
//! - A `pthread_create` hook (always on, a few µs per thread creation) records the creating
//!   stack of every thread: Rust's std, rayon, tokio, C libraries. [`ThreadCreateProfiler`]
//!   writes `…-threadcreate-….pprof` from it: threads created during a capture
//!   (`threadcreate/count`) and threads alive at its stop (`alive/count`), by creating stack.
//! - [`dump_all_threads`] writes `…-threads-….txt` (onsite sends it on SIGUSR1): every thread's
//!   name, id, state and symbolised stack, and who created it, within a deadline.
//!
//! The hook is this crate's exported `pthread_create` (or `__wrap_pthread_create` in static
//! builds with the `wrap` feature): it is only linked if the program references the crate, which
//! the `onsite` crate does by calling [`hook_status`] at install. See README.md for static
//! builds and for what the hook cannot see.

mod dump;
mod fork;
mod hook;
mod profile;

pub use dump::{default_dump_signal, dump_all_threads, dump_all_threads_with_signal};
pub use hook::{HookStatus, hook_status};
pub use profile::ThreadCreateProfiler;

#[cfg(not(target_feature = "crt-static"))]
pub use hook::pthread_create;
