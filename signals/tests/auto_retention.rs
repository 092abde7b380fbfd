//! Retention end to end: a real child keeping at most two captures, in a dump directory
//! planted with files that look like onsite's but are not its own to remove.

mod support;

use std::path::Path;
use std::time::Duration;

use onsite_core::ProfileKind;
use onsite_core::test_support::{dump_files, role};
use support::{Service, command_name};

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
#[ignore = "child process role"]
fn child_retaining_service() {
    if role().as_deref() == Some("child_retaining_service") {
        support::run_spiking_service();
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

#[test]
fn retention_removes_only_onsites_own_oldest_captures() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cmd = command_name();
    let old = "20200101T000000.000Z";
    // An earlier run's capture of this same service (its process has ended): onsite's own,
    // and the oldest.
    let mut ended = std::process::Command::new("true").spawn().unwrap();
    let earlier = ended.id();
    ended.wait().unwrap();
    let earlier_run = [format!("{cmd}-{earlier}-cpu-{old}.pprof"), format!("{cmd}-{earlier}-manifest-{old}.json")];
    for name in &earlier_run {
        std::fs::write(d.join(name), "earlier run").unwrap();
    }
    // Another instance of the same service, still running, sharing the directory: its capture
    // is older still, and not this instance's to remove.
    let mut other = std::process::Command::new("sleep").arg("120").spawn().unwrap();
    let other_instance = format!("{cmd}-{}-cpu-20190101T000000.000Z.pprof", other.id());
    std::fs::write(d.join(&other_instance), "another instance").unwrap();
    // Look-alikes onsite did not write, all older than anything it will write.
    let precious = outside.path().join("precious");
    std::fs::write(&precious, "keep me").unwrap();
    std::os::unix::fs::symlink(&precious, d.join(format!("{cmd}-2-cpu-20200101T000000.001Z.pprof"))).unwrap();
    let directory = d.join(format!("{cmd}-3-cpu-20200101T000000.002Z.pprof"));
    std::fs::create_dir(&directory).unwrap();
    std::fs::write(directory.join("inside"), "keep").unwrap();
    let look_alikes = [
        format!("other-service-1-cpu-{old}.pprof"),
        format!("{cmd}-4-heap-{old}.pprof"),
        format!("{cmd}-x-cpu-{old}.pprof"),
        format!("{cmd}-5-cpu-{old}.pprof.bak"),
        format!("{cmd}-notes.txt"),
        "notes.txt".to_owned(),
    ];
    for name in &look_alikes {
        std::fs::write(d.join(name), "not onsite's").unwrap();
    }

    let mut service = Service::start(
        "child_retaining_service",
        d,
        &[("ONSITE_KINDS", "cpu"), ("ONSITE_CPU_FLAMEGRAPH", "false"), ("ONSITE_RETAIN_CAPTURES", "2")],
    );
    let own = format!("{cmd}-{}-", service.pid());
    let own_pprofs = || -> Vec<String> {
        dump_files(d, ProfileKind::Cpu, "pprof")
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .filter(|n| n.starts_with(&own))
            .collect()
    };
    let mut written = Vec::new();
    for n in 1..=3 {
        service.signal(libc::SIGUSR2);
        service.wait_for_log_count("capture started", n, DEADLINE);
        service.signal(libc::SIGUSR2);
        service.wait_for_log_count("capture stopped", n, DEADLINE);
        let new: Vec<String> = own_pprofs().into_iter().filter(|p| !written.contains(p)).collect();
        assert_eq!(new.len(), 1, "capture {n} wrote one cpu file: {:?}", names(d));
        written.extend(new);
    }

    let left = names(d);
    // The earlier run's capture and this run's first capture were the oldest two of four.
    for name in &earlier_run {
        assert!(!left.contains(name), "{name} should have been removed: {left:?}");
    }
    assert!(!left.contains(&written[0]), "the oldest capture of this run goes: {left:?}");
    assert!(!left.contains(&written[0].replace("-cpu-", "-manifest-").replace(".pprof", ".json")), "{left:?}");
    for kept in &written[1..] {
        assert!(left.contains(kept), "{kept}: {left:?}");
        assert!(left.contains(&kept.replace("-cpu-", "-manifest-").replace(".pprof", ".json")), "{left:?}");
    }
    assert!(left.contains(&other_instance), "a live instance's capture stays: {left:?}");
    other.kill().unwrap();
    other.wait().unwrap();
    // Nothing onsite did not write was touched.
    for name in &look_alikes {
        assert_eq!(std::fs::read_to_string(d.join(name)).unwrap(), "not onsite's", "{name}");
    }
    let link = d.join(format!("{cmd}-2-cpu-20200101T000000.001Z.pprof"));
    assert_eq!(std::fs::read_link(&link).unwrap(), precious, "the symlink is still there");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me", "its target untouched");
    assert_eq!(std::fs::read_to_string(directory.join("inside")).unwrap(), "keep");
    assert!(service.log_text().contains("removed the oldest captures"), "{}", service.log_text());
}
