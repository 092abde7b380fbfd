//! demo-mq built over jemalloc (`--features jemalloc`): its planted leak is found the way the
//! demo finds it on `System`. The broker runs under load, two real `kill -USR2` bracket a
//! memory capture, and `record_ack` must be the first function by `inuse_space`. The files stay
//! in `target/tmp/demo-mq-jemalloc` for CI to read with `go tool pprof` too.
#![cfg(feature = "jemalloc")]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use onsite_core::ProfileKind::Memory;
use onsite_core::pprof::{decode, function_totals};
use onsite_core::test_support::{ChildTest, RunningChild, the_dump_file};

const DEADLINE: Duration = Duration::from_secs(120);
const CAPTURE: Duration = Duration::from_secs(8);

fn wait_for(child: &mut RunningChild, what: &str, found: impl Fn(&RunningChild) -> Option<String>) -> String {
    let started = Instant::now();
    loop {
        if let Some(value) = found(child) {
            return value;
        }
        assert!(child.is_alive(), "demo-mq exited before {what}; its log:\n{}", child.stderr());
        assert!(started.elapsed() < DEADLINE, "demo-mq: no {what} within {DEADLINE:?}; its log:\n{}", child.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_planted_leak_is_found_over_jemalloc() {
    let bin = env!("CARGO_BIN_EXE_demo-mq");
    let dumps = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("demo-mq-jemalloc");
    let _ = std::fs::remove_dir_all(&dumps);
    std::fs::create_dir_all(&dumps).unwrap();

    let mut server = ChildTest::program(bin, &["serve", "--addr", "127.0.0.1:0"])
        .env("ONSITE_DIR", &dumps)
        .env("ONSITE_KINDS", "memory")
        // A debug build under this load leaks a few MB in the capture: a mean of 64 KiB gives the
        // leak ~50 samples in use, so its lead does not hang on a handful.
        .env("ONSITE_MEMORY_SAMPLE_BYTES", "65536")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .spawn();
    let addr = wait_for(&mut server, "listening address", |s| {
        s.stdout().lines().find_map(|l| l.strip_prefix("listening on")?.split_whitespace().next().map(str::to_owned))
    });
    let seconds = (CAPTURE.as_secs() + 6).to_string();
    let mut load = ChildTest::program(bin, &["load", "--addr", &addr, "--seconds", &seconds]).spawn();
    std::thread::sleep(Duration::from_secs(2));

    server.signal(libc::SIGUSR2);
    wait_for(&mut server, "capture start", |s| s.stderr().contains("capture started").then_some(String::new()));
    std::thread::sleep(CAPTURE);
    assert!(load.is_alive(), "the load ran through the capture:\n{}", load.stderr());
    server.signal(libc::SIGUSR2);
    wait_for(&mut server, "capture stop", |s| s.stderr().contains("capture stopped").then_some(String::new()));
    drop(load);
    drop(server);

    let profile = decode(&std::fs::read(the_dump_file(&dumps, Memory, "pprof")).unwrap()).expect("a heap profile");
    let comments: Vec<&str> = profile.comment.iter().map(|&i| profile.string_table[i as usize].as_str()).collect();
    assert!(
        comments.contains(&"allocator: onsite_memory::Allocator over tikv_jemallocator::Jemalloc"),
        "captured over jemalloc: {comments:?}"
    );
    let inuse = function_totals(&profile, "inuse_space").expect("inuse_space");
    assert_eq!(
        inuse.first().map(|t| t.function.as_str()),
        Some("demo_mq::broker::record_ack"),
        "the leak comes first by inuse_space: {:?}",
        &inuse[..inuse.len().min(5)]
    );
}
