//! A dhat memory capture while an operator asks for thread dumps again and again: the capture
//! is still written and the process still ends on SIGINT. (dhat holds its global lock while it
//! walks a stack with the `backtrace` crate; a symboliser that held `backtrace`'s lock while
//! allocating closed a cycle with it and hung the process, capture and SIGINT included.)

mod support;

use std::time::Duration;

use onsite_core::ProfileKind;
use onsite_core::pprof::decode;
use onsite_core::test_support::role;
use support::Service;

#[global_allocator]
static ALLOC: onsite::memory::Allocator = onsite::memory::Allocator::new();

/// Generous: with dhat on, every allocation of every thread takes one global lock, and a dump
/// symbolises through it; on a loaded machine a dump can take many seconds. A hang never ends.
const DEADLINE: Duration = Duration::from_secs(240);

#[test]
#[ignore = "child process role"]
fn child_dhat_service() {
    if role().as_deref() != Some("child_dhat_service") {
        return;
    }
    // A thread that allocates without pause keeps dhat's lock busy.
    support::run_service(1);
}

#[test]
fn a_dhat_capture_survives_repeated_thread_dumps_and_sigint_still_ends_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start("child_dhat_service", dir.path(), &[("ONSITE_MEMORY_MODE", "dhat")]);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    for _ in 0..6 {
        service.signal(libc::SIGUSR1);
        std::thread::sleep(Duration::from_millis(700));
    }
    service.wait_for_files(ProfileKind::Threads, "txt", 1, DEADLINE);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture stopped", DEADLINE);
    let memory = service.wait_for_files(ProfileKind::Memory, "pprof", 1, DEADLINE);
    let profile = decode(&std::fs::read(&memory[0]).unwrap()).expect("the memory profile decodes");
    assert!(!profile.sample.is_empty(), "dhat recorded the allocating threads");
    assert!(
        service.wait_for_files(ProfileKind::Memory, "dhat.json", 1, DEADLINE).len() == 1,
        "dhat's own file is written too"
    );

    service.signal(libc::SIGINT);
    let status = service.wait_exit(DEADLINE);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGINT), "SIGINT ends the process as it would without onsite");
}
