//! Always-on heap sampling as an operator meets it: a service leaked 64 MiB *before* anyone
//! started a capture, and leaks nothing during it (other threads only churn). With
//! `ONSITE_MEMORY_ALWAYS=on` the capture's heap profile (real `kill -USR2`, the file decoded)
//! names the leak first by `inuse_space`, at 64 MiB ±20 %, while its `alloc_space` (the
//! capture's window) is nothing; a second capture names it again. Without always-on the same
//! capture (correctly) does not contain the leak at all.

mod support;

use std::sync::Mutex;
use std::time::Duration;

use onsite_core::ProfileKind;
use onsite_core::pprof::{FunctionTotal, decode, function_totals, proto::Profile};
use onsite_core::test_support::{dump_files, role};
use support::Service;

#[global_allocator]
static ALLOC: onsite::memory::Allocator = onsite::memory::Allocator::new();

const MIB: usize = 1 << 20;
const LEAK_BYTES: usize = 64 * MIB;
const BLOCK: usize = 4096;
/// A smaller mean than the default 512 KiB: 1024 samples expected in 64 MiB, so ±20 % is more
/// than 6 standard deviations and the estimate cannot miss by chance in practice.
const MEAN: &str = "65536";
const DEADLINE: Duration = Duration::from_secs(120);

static LEAK: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

#[inline(never)]
fn leak_before_the_capture() {
    let mut leak = LEAK.lock().unwrap();
    for i in 0..LEAK_BYTES / BLOCK {
        leak.push(vec![i as u8; BLOCK]);
    }
}

#[test]
#[ignore = "child process role"]
fn child_leaked_before_the_capture() {
    if role().as_deref() != Some("child_leaked_before_the_capture") {
        return;
    }
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).init();
    let _onsite = onsite::Builder::new().strict(true).install().expect("onsite installs");
    leak_before_the_capture();
    // Churn only, from here on: the allocating threads keep a bounded set of blocks.
    support::spawn_allocating_threads(1);
    support::announce_ready();
    loop {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the service with `env`, captures twice for ~1 s each with `kill -USR2`, and returns
/// the two memory profiles and the service's log.
fn two_captures(env: &[(&str, &str)]) -> (Vec<Profile>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut env = env.to_vec();
    env.extend([("ONSITE_KINDS", "memory"), ("ONSITE_MEMORY_SAMPLE_BYTES", MEAN)]);
    let mut service = Service::start("child_leaked_before_the_capture", dir.path(), &env);
    for n in 1..=2 {
        service.signal(libc::SIGUSR2);
        service.wait_for_log_count("capture started", n, DEADLINE);
        std::thread::sleep(Duration::from_secs(1));
        service.signal(libc::SIGUSR2);
        service.wait_for_files(ProfileKind::Memory, "pprof", n, DEADLINE);
    }
    let profiles = dump_files(dir.path(), ProfileKind::Memory, "pprof")
        .iter()
        .map(|path| decode(&std::fs::read(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect();
    (profiles, service.log_text())
}

fn totals(profile: &Profile, sample_type: &str) -> Vec<FunctionTotal> {
    let mut rows = function_totals(profile, sample_type).expect("a Go heap sample type");
    rows.retain(|r| r.flat > 0);
    rows
}

fn flat(rows: &[FunctionTotal], name: &str) -> i64 {
    rows.iter().filter(|r| r.function.ends_with(name)).map(|r| r.flat).sum()
}

fn comments(profile: &Profile) -> Vec<&str> {
    onsite_core::pprof::comments(profile).collect()
}

#[test]
fn always_on_names_a_leak_made_before_the_capture_and_without_it_the_capture_cannot() {
    let (profiles, log) = two_captures(&[("ONSITE_MEMORY_ALWAYS", "on")]);
    assert!(log.contains("always-on heap sampling started"), "{log}");
    for (n, profile) in profiles.iter().enumerate() {
        let inuse = totals(profile, "inuse_space");
        assert!(
            inuse[0].function.ends_with("leak_before_the_capture"),
            "capture {n}: the leak comes first by inuse_space: {:?}",
            &inuse[..3.min(inuse.len())]
        );
        let estimate = flat(&inuse, "leak_before_the_capture") as f64;
        assert!(
            (estimate / LEAK_BYTES as f64 - 1.0).abs() <= 0.20,
            "capture {n}: {estimate} bytes in use estimated for a {LEAK_BYTES}-byte leak"
        );
        // alloc_* is the capture's window: the leak allocated nothing in it.
        assert_eq!(flat(&totals(profile, "alloc_space"), "leak_before_the_capture"), 0, "capture {n}");
        let said = comments(profile);
        assert!(said.iter().any(|c| c.contains("always on")), "capture {n}: {said:?}");
        assert!(said.iter().any(|c| c.starts_with("sampler tables (fixed:")), "capture {n}: {said:?}");
    }

    let (profiles, log) = two_captures(&[]);
    assert!(!log.contains("always-on heap sampling started"), "{log}");
    for (n, profile) in profiles.iter().enumerate() {
        assert!(!totals(profile, "alloc_space").is_empty(), "capture {n} sampled the churning thread");
        let inuse = totals(profile, "inuse_space");
        assert_eq!(flat(&inuse, "leak_before_the_capture"), 0, "capture {n}: {inuse:?}");
    }
}
