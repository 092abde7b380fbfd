//! Running a test's child role in a fresh process, and reading the profiles it wrote.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use onsite_core::pprof::{FunctionTotal, decode, function_totals, proto::Profile};
use onsite_core::test_support::{ChildTest, the_dump_file};
use onsite_core::{CaptureOutput, CaptureStamp, DumpDir, ProfileKind};

/// The directory a child writes into.
pub const DIR_ENV: &str = "ONSITE_SYNC_TEST_DIR";

/// The directory the parent gave this child.
pub fn child_dir() -> PathBuf {
    PathBuf::from(std::env::var(DIR_ENV).expect("the parent sets the directory"))
}

/// Re-runs this test binary as `child_fn` in role `role`, writing into `dir`; fails the test
/// if the child fails or is still running after `deadline` (then it is killed).
pub fn run_child(child_fn: &str, role: &str, dir: &Path, deadline: Duration) {
    ChildTest::new(child_fn).role(role).env(DIR_ENV, dir).run(deadline);
}

/// A capture output into `dir` (created), stamped now.
pub fn capture_output(dir: &Path) -> CaptureOutput {
    std::fs::create_dir_all(dir).unwrap();
    CaptureOutput::new(DumpDir::new(dir), CaptureStamp::now())
}

/// The decoded `kind` profile in `dir`.
pub fn read_profile(dir: &Path, kind: ProfileKind) -> Profile {
    decode(&std::fs::read(the_dump_file(dir, kind, "pprof")).unwrap()).unwrap()
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
