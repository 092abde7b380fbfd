//! A capture needs nothing but its dump directory, and charges none of onsite's trace work to
//! the service: real child services, real `kill -USR2`, files decoded.

mod support;

use std::path::Path;
use std::time::Duration;

use onsite_core::ProfileKind;
use onsite_core::pprof::{decode, sample_stacks};
use onsite_core::test_support::{dump_files, role};
use support::Service;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;

#[global_allocator]
static ALLOC: onsite::memory::Allocator = onsite::memory::Allocator::new();

const DEADLINE: Duration = Duration::from_secs(90);

static CONTENDED: onsite::sync::Mutex<u64> = onsite::sync::Mutex::new(0);

/// The service's own allocations, a known amount per request.
#[inline(never)]
fn handle_request(i: u64) -> usize {
    let body = vec![i as u8; 2048];
    std::hint::black_box(body).len()
}

/// A service with the common subscriber (fmt filtered per layer) and onsite installed; it
/// serves until its capture's manifest appears, then drops onsite and exits 0.
#[test]
#[ignore = "child process role"]
fn child_service() {
    if role().as_deref() != Some("child_service") {
        return;
    }
    tracing_subscriber::registry()
        .with(onsite::trace::layer())
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_filter(LevelFilter::INFO),
        )
        .init();
    let onsite = onsite::install().expect("install");
    let dir = onsite.dump_dir().to_owned();
    for name in ["worker-a", "worker-b"] {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(|| {
                for i in 0.. {
                    // Many spans, of a level the fmt layer drops: the trace capture records them.
                    let _span = tracing::debug_span!("request", i).entered();
                    let _inner = tracing::trace_span!("parse").entered();
                    handle_request(i);
                    let mut n = CONTENDED.lock();
                    *n += 1;
                    if i % 64 == 0 {
                        drop(n);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
            .unwrap();
    }
    support::announce_ready();
    while dump_files(&dir, ProfileKind::Manifest, "json").is_empty() {
        let _ = std::thread::Builder::new().spawn(|| std::hint::black_box(1));
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(onsite);
    std::process::exit(0);
}

/// Starts the child with `env`, captures for a second with two `kill -USR2`, waits for its exit.
fn capture_once(dir: &Path, env: &[(&str, &str)]) -> Service {
    let mut service = Service::start("child_service", dir, env);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    std::thread::sleep(Duration::from_secs(1));
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture stopped", DEADLINE);
    let status = service.wait_exit(DEADLINE);
    assert!(status.success(), "{status:?}\n{}", service.log_text());
    service
}

/// A directory the child cannot create files in: one made read-only, or, when the tests run
/// as root (who writes anywhere the permissions say), a read-only kernel one.
fn read_only_dir(parent: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent.join("read-only-tmp");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(dir.join("probe"), b"x").is_ok() {
        return "/proc/self/fdinfo".into();
    }
    dir
}

#[test]
fn with_an_unwritable_tmpdir_every_kind_is_written_and_nothing_else_is_left() {
    let base = tempfile::tempdir().unwrap();
    let tmp = read_only_dir(base.path());
    let dir = base.path().join("dumps");
    let service = capture_once(&dir, &[("TMPDIR", tmp.to_str().unwrap()), ("ONSITE_MUTEX_FRACTION", "1")]);
    let log = service.log_text();
    for (kind, ext) in [
        (ProfileKind::Cpu, "pprof"),
        (ProfileKind::Memory, "pprof"),
        (ProfileKind::Mutex, "pprof"),
        (ProfileKind::Block, "pprof"),
        (ProfileKind::Trace, "json"),
        (ProfileKind::ThreadCreate, "pprof"),
    ] {
        let files = dump_files(&dir, kind, ext);
        assert_eq!(files.len(), 1, "one {kind} file, found {files:?}\n{log}");
        let bytes = std::fs::read(&files[0]).unwrap();
        if ext == "pprof" {
            decode(&bytes).unwrap_or_else(|e| panic!("{kind}: {e}"));
        } else {
            let events: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
            assert!(events.iter().any(|e| e["ph"] == "B" && e["name"] == "request"), "the trace has the spans");
        }
    }
    let own = format!("{}-{}-", std::env::current_exe().unwrap().file_name().unwrap().to_str().unwrap(), service.pid());
    let others: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with(&own))
        .collect();
    assert!(others.is_empty(), "only onsite's named files are left: {others:?}\n{log}");
}

#[test]
fn a_trace_capture_with_memory_charges_none_of_its_work_to_the_service() {
    let dir = tempfile::tempdir().unwrap();
    capture_once(dir.path(), &[("ONSITE_KINDS", "memory,trace"), ("ONSITE_MEMORY_SAMPLE_BYTES", "4096")]);
    let trace: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&dump_files(dir.path(), ProfileKind::Trace, "json")[0]).unwrap())
            .unwrap();
    let spans = trace.iter().filter(|e| e["ph"] == "B" && e["name"] == "request").count();
    assert!(spans > 1000, "the service emitted many spans during the capture: {spans}");

    let profile = decode(&std::fs::read(&dump_files(dir.path(), ProfileKind::Memory, "pprof")[0]).unwrap()).unwrap();
    let s = |i: i64| profile.string_table[i as usize].as_str();
    let index = profile.sample_type.iter().position(|t| s(t.r#type) == "alloc_space").expect("alloc_space");
    let (mut total, mut tracing_work) = (0i64, 0i64);
    let mut frameless = Vec::new();
    for (stack, sample) in sample_stacks(&profile) {
        let bytes = sample.value[index];
        total += bytes;
        if stack.iter().any(|f| f.contains("tracing_chrome") || f.contains("onsite_trace")) {
            tracing_work += bytes;
        }
        if stack.iter().all(|f| f.contains("start_thread") || f.contains("clone")) {
            frameless.push((stack.clone(), bytes));
        }
    }
    assert!(total > 0);
    let share = tracing_work as f64 / total as f64;
    assert!(share < 0.01, "tracing-chrome / onsite-trace frames hold {:.2}% of alloc_space", share * 100.0);
    assert!(frameless.is_empty(), "samples with no frame but the thread start: {frameless:?}");
}
