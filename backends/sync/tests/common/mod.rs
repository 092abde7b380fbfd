//! Running a test's child role in a fresh process, and reading the profiles it wrote.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use onsite_core::pprof::{FunctionTotal, decode, function_totals, proto::Profile};
use onsite_core::{CaptureOutput, CaptureStamp, DumpDir};

/// The variable that tells a re-run test binary which child role to play.
pub const ROLE_ENV: &str = "ONSITE_SYNC_TEST_ROLE";
/// The directory a child writes into.
pub const DIR_ENV: &str = "ONSITE_SYNC_TEST_DIR";

/// The child role this process plays, if it is a child.
pub fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// The directory the parent gave this child.
pub fn child_dir() -> PathBuf {
    PathBuf::from(std::env::var(DIR_ENV).expect("the parent sets the directory"))
}

/// Re-runs this test binary as `child_fn` in role `role`, writing into `dir`; fails the test
/// if the child fails or is still running after `deadline` (then it is killed).
pub fn run_child(child_fn: &str, role: &str, dir: &Path, deadline: Duration) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child_fn, "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role)
        .env(DIR_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            assert!(
                status.success(),
                "child {role} failed: {status}\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            return;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child {role} still running after {deadline:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A capture output into `dir` (created), stamped now.
pub fn capture_output(dir: &Path) -> CaptureOutput {
    std::fs::create_dir_all(dir).unwrap();
    CaptureOutput::new(DumpDir::new(dir), CaptureStamp::now())
}

/// The one file in `dir` whose name contains `-{kind}-`, if any.
pub fn profile_file(dir: &Path, kind: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(&format!("-{kind}-")))
        .collect();
    assert!(found.len() <= 1, "more than one {kind} file in {}: {found:?}", dir.display());
    found.pop()
}

/// The decoded `kind` profile in `dir`.
pub fn read_profile(dir: &Path, kind: &str) -> Profile {
    let path = profile_file(dir, kind).unwrap_or_else(|| panic!("no {kind} profile in {}", dir.display()));
    assert!(path.extension().is_some_and(|e| e == "pprof"), "{}", path.display());
    decode(&std::fs::read(&path).unwrap()).unwrap()
}

/// `go tool pprof -top`-like rows of `profile` by delay.
pub fn top(profile: &Profile) -> Vec<FunctionTotal> {
    function_totals(profile, "delay").expect("a delay sample type")
}

/// The profile's sample and period types, as `type/unit` strings.
pub fn types(profile: &Profile) -> (Vec<String>, String) {
    let s = |i: i64| profile.string_table[i as usize].clone();
    let samples = profile.sample_type.iter().map(|t| format!("{}/{}", s(t.r#type), s(t.unit))).collect();
    let period = profile.period_type.as_ref().map(|t| format!("{}/{}", s(t.r#type), s(t.unit))).unwrap_or_default();
    (samples, period)
}

/// Sum of one sample value (index `i`) over the whole profile.
pub fn total(profile: &Profile, i: usize) -> i64 {
    profile.sample.iter().map(|s| s.value[i]).sum()
}

/// Whether any function in the profile's stacks has a name containing `name`.
pub fn mentions(profile: &Profile, name: &str) -> bool {
    profile.function.iter().any(|f| profile.string_table[f.name as usize].contains(name))
}
