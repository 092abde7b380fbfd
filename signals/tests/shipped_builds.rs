//! The builds people deploy: `signals/shipped-service` built with Cargo's release profile and
//! `debug = false`, and a stripped copy of that binary, each captured with two real `SIGUSR2`
//! and read back. Every planted culprit must be the first service function of its profile, in
//! the release build by name and in the stripped one once symbolised from the unstripped binary
//! (what `PPROF_BINARY_PATH` does for `go tool pprof`, which `.ci/run` also checks on these
//! files); the stripped build alone must show addresses, never a wrong name.
//!
//! The files are kept under `target/tmp/shipped/` for `.ci/run` to read.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use onsite_core::ProfileKind;
use onsite_core::pprof::proto::Profile;
use onsite_core::pprof::{decode, function_totals, sample_stacks, symbolize_offline};
use onsite_core::test_support::{ChildTest, the_dump_file};
use support::Service;

/// The service's own functions, as the symbol table names them.
const SERVICE: &str = "shipped_service::";

/// What each profile must name first: kind, sample type, culprit.
const CULPRITS: [(ProfileKind, &str, &str); 5] = [
    (ProfileKind::Cpu, "samples", "shipped_service::checksum_records"),
    (ProfileKind::Memory, "inuse_space", "shipped_service::remember_request"),
    (ProfileKind::Mutex, "delay", "shipped_service::record_hit"),
    (ProfileKind::Block, "delay", "shipped_service::next_job"),
    (ProfileKind::ThreadCreate, "alive", "shipped_service::spawn_session_watcher"),
];

/// Building the service in release from scratch (every dependency) on a 2-core machine.
const BUILD_DEADLINE: Duration = Duration::from_secs(20 * 60);
const CAPTURE: Duration = Duration::from_secs(3);
const WRITE_DEADLINE: Duration = Duration::from_secs(60);

struct Binaries {
    release: PathBuf,
    stripped: PathBuf,
}

/// Builds shipped-service as deployed, into its own target directory (so the workspace's own
/// release profile, which keeps debug info for the demo, is not what is tested), and strips a
/// copy.
fn build() -> Binaries {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let target = tmp.parent().expect("CARGO_TARGET_TMPDIR is inside the target directory").join("shipped");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    ChildTest::program(&cargo, &["build", "--release", "--quiet", "-p", "shipped-service"])
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_TARGET_DIR", &target)
        .run(BUILD_DEADLINE);
    let release = target.join("release/shipped-service");
    let stripped_dir = tmp.join("shipped/stripped-bin");
    std::fs::create_dir_all(&stripped_dir).unwrap();
    let stripped = stripped_dir.join("shipped-service");
    let _ = std::fs::remove_file(&stripped);
    ChildTest::program("objcopy", &["--strip-all", release.to_str().unwrap(), stripped.to_str().unwrap()])
        .run(Duration::from_secs(60));
    let sections =
        ChildTest::program("readelf", &["-S", "-W", stripped.to_str().unwrap()]).run(Duration::from_secs(60));
    assert!(!sections.stdout.contains(".symtab"), "the stripped copy still has a symbol table");
    assert!(sections.stdout.contains(".note.gnu.build-id"), "the binary has no GNU build ID:\n{}", sections.stdout);
    Binaries { release, stripped }
}

/// Runs `binary`, captures every kind for [`CAPTURE`], and returns the dump directory once the
/// capture's manifest is written.
fn capture(binary: &Path, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("shipped").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut service = Service::start_program(binary, "ready ", &dir, &[("ONSITE_MEMORY_SAMPLE_BYTES", "65536")]);
    std::thread::sleep(Duration::from_millis(500));
    service.signal(libc::SIGUSR2);
    std::thread::sleep(CAPTURE);
    service.signal(libc::SIGUSR2);
    service.wait_for_manifests(1, WRITE_DEADLINE);
    service.signal(libc::SIGTERM);
    service.wait_exit(WRITE_DEADLINE);
    dir
}

fn read(dir: &Path, kind: ProfileKind) -> Profile {
    let path = the_dump_file(dir, kind, "pprof");
    decode(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The service's functions in `go tool pprof -top` order (flat, then cum).
fn service_functions(profile: &Profile, sample_type: &str) -> Vec<String> {
    function_totals(profile, sample_type)
        .unwrap_or_else(|| panic!("no sample type {sample_type}"))
        .into_iter()
        .filter(|row| row.function.starts_with(SERVICE) && (row.flat > 0 || row.cum > 0))
        .map(|row| row.function)
        .collect()
}

/// No location that names nothing at address 0, and no sample that is only the C library's
/// thread start (a thread whose frames were lost).
fn assert_no_invented_frames(profile: &Profile, what: &str) {
    for location in &profile.location {
        assert!(!(location.address == 0 && location.line.is_empty()), "{what}: a 0x0 location: {location:?}");
    }
    for (stack, sample) in sample_stacks(profile) {
        assert!(
            stack.is_empty() || !stack.iter().all(|f| is_thread_start(f)),
            "{what}: a sample with nothing but the thread start: {stack:?} {sample:?}"
        );
    }
}

/// The frames every thread starts with below any Rust code: the C library's (named, or unnamed
/// in a libc without symbols) and onsite's `pthread_create` trampoline.
fn is_thread_start(function: &str) -> bool {
    const THREAD_START: [&str; 6] =
        ["start_thread", "clone3", "__clone3", "clone", "__clone", "onsite_threads::hook::trampoline"];
    THREAD_START.contains(&function) || function.starts_with("libc.so")
}

/// onsite's own frames (everything but the allocator every allocation enters, which the
/// builder trims from the leaf end).
fn is_onsite_frame(function: &str) -> bool {
    let function = function.trim_start_matches('<');
    ["onsite_core::", "onsite_cpu::", "onsite_trace::", "onsite_threads::", "onsite_sync::", "onsite::"]
        .iter()
        .chain(&["tracing_chrome::", "pprof::", "addr2line::", "gimli::", "framehop::", "inferno::", "backtrace::"])
        .any(|p| function.starts_with(p))
        || function.starts_with("[onsite")
}

#[test]
fn release_and_stripped_builds_name_every_culprit() {
    let binaries = build();

    let release = capture(&binaries.release, "release");
    for (kind, sample_type, culprit) in CULPRITS {
        let profile = read(&release, kind);
        let found = service_functions(&profile, sample_type);
        assert_eq!(found.first().map(String::as_str), Some(culprit), "release {kind} ({sample_type}): {found:?}");
        assert_no_invented_frames(&profile, &format!("release {kind}"));
    }

    // With every kind on, what onsite allocated itself is not the service's.
    let memory = read(&release, ProfileKind::Memory);
    let alloc_space = memory.sample_type.iter().position(|t| memory.string_table[t.r#type as usize] == "alloc_space");
    let alloc_space = alloc_space.expect("alloc_space");
    let (mut total, mut onsite) = (0i64, 0i64);
    for (stack, sample) in sample_stacks(&memory) {
        total += sample.value[alloc_space];
        if stack.iter().any(|f| is_onsite_frame(f) && !is_thread_start(f)) {
            onsite += sample.value[alloc_space];
        }
    }
    assert!(total > 0, "the memory profile has allocations");
    assert!(onsite * 100 < total, "onsite's own allocations are {onsite} of {total} bytes of alloc_space");

    let stripped = capture(&binaries.stripped, "stripped");
    let unstripped_dir = binaries.release.parent().unwrap().to_owned();
    for (kind, sample_type, culprit) in CULPRITS {
        let mut profile = read(&stripped, kind);
        let named = service_functions(&profile, sample_type);
        assert!(named.is_empty(), "stripped {kind}: names no symbol table holds: {named:?}");
        assert_no_invented_frames(&profile, &format!("stripped {kind}"));
        // With the unstripped binary found by build ID, the same culprit comes first.
        assert!(
            symbolize_offline(&mut profile, std::slice::from_ref(&unstripped_dir)) > 0,
            "stripped {kind}: nothing named"
        );
        let found = service_functions(&profile, sample_type);
        assert_eq!(found.first().map(String::as_str), Some(culprit), "stripped {kind} symbolised: {found:?}");
    }
}
