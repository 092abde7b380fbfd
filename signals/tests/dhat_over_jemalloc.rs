//! A service on jemalloc (`Allocator::wrapping(Jemalloc)`) asks for a dhat memory capture: dhat
//! allocates and frees through `System`, so over jemalloc it would free jemalloc's blocks into
//! glibc's heap. The memory kind refuses to start, its error naming both allocators in the log
//! and in the manifest; the capture's cpu kind runs and is written, and the service runs on.

mod support;

use std::time::Duration;

use onsite_core::ProfileKind;
use onsite_core::pprof::{decode, function_totals};
use onsite_core::test_support::{dump_files, role};
use support::Service;

#[global_allocator]
static ALLOC: onsite::memory::Allocator<tikv_jemallocator::Jemalloc> =
    onsite::memory::Allocator::wrapping(tikv_jemallocator::Jemalloc);

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
#[ignore = "child process role"]
fn child_jemalloc_service() {
    if role().as_deref() == Some("child_jemalloc_service") {
        support::run_service(1);
    }
}

#[test]
fn a_dhat_capture_over_jemalloc_refuses_while_the_cpu_kind_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start(
        "child_jemalloc_service",
        dir.path(),
        &[("ONSITE_KINDS", "cpu,memory"), ("ONSITE_MEMORY_MODE", "dhat")],
    );
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    let log = service.log_text();
    let refusal = log
        .lines()
        .find(|line| line.contains("could not start this kind"))
        .unwrap_or_else(|| panic!("no start failure logged:\n{log}"));
    assert!(
        refusal.contains("memory")
            && refusal.contains("std::alloc::System")
            && refusal.contains("tikv_jemallocator::Jemalloc"),
        "the refusal names the kind and both allocators: {refusal}"
    );
    std::thread::sleep(Duration::from_secs(1));
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture stopped", DEADLINE);
    let manifest = support::manifests(dir.path()).pop().expect("a manifest").1;

    let cpu = dump_files(dir.path(), ProfileKind::Cpu, "pprof");
    assert_eq!(cpu.len(), 1, "{cpu:?}");
    let profile = decode(&std::fs::read(&cpu[0]).unwrap()).expect("the cpu profile decodes");
    let top = function_totals(&profile, "samples").unwrap();
    assert!(
        top.iter().take(3).any(|t| t.function.ends_with("burn_cpu_in_a_known_function")),
        "the cpu kind sampled the service: {:?}",
        &top[..top.len().min(5)]
    );
    for ext in ["pprof", "dhat.json"] {
        let memory = dump_files(dir.path(), ProfileKind::Memory, ext);
        assert!(memory.is_empty(), "no memory file: {memory:?}");
    }
    let failed = manifest["failed"].as_array().expect("the manifest lists failures");
    assert!(
        failed
            .iter()
            .any(|f| f["kind"] == "memory"
                && f["error"].as_str().is_some_and(|e| e.contains("tikv_jemallocator::Jemalloc"))),
        "the manifest says why memory is missing: {failed:?}"
    );
    assert!(service.is_alive(), "the service runs on:\n{}", service.log_text());
}
