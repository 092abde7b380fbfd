//! A program that did not install onsite's allocator: a memory capture refuses to start, with
//! an error that says what to do, and nothing is left claimed.

use onsite_core::{ProfileKind, Profiler};
use onsite_memory::{MemoryMode, MemoryProfiler};

#[test]
fn starting_without_the_allocator_is_a_clear_error() {
    for mode in [MemoryMode::Sampled, MemoryMode::Dhat] {
        let mut profiler = MemoryProfiler::new(mode, 1024);
        assert_eq!(profiler.kind(), ProfileKind::Memory);
        for _ in 0..2 {
            let err = match profiler.start() {
                Ok(_) => panic!("{mode}: started without the allocator"),
                Err(err) => err,
            };
            assert_eq!(err.kind, ProfileKind::Memory);
            assert!(
                err.to_string().contains("install onsite::memory::Allocator as #[global_allocator]"),
                "{mode}: {err}"
            );
        }
    }
}
