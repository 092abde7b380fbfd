//! `/debug/pprof/cmdline` of a service started with an argument that is not UTF-8: the answer
//! shows it (as U+FFFD) and the listener keeps answering. libtest reads its own arguments as
//! UTF-8 and stops on such a one, so this test has its own `main`, which is the child too.

mod support;

use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use onsite_core::test_support::ChildTest;
use support::{Service, http_get};

const ROLE: &str = "child_cmdline_service";
const DEADLINE: Duration = Duration::from_secs(120);

fn main() {
    if let Some(_onsite) = support::install_as_role(ROLE) {
        support::announce_ready();
        loop {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    a_non_utf8_argument_is_answered_and_the_listener_keeps_answering();
}

fn a_non_utf8_argument_is_answered_and_the_listener_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let child = ChildTest::new(ROLE).arg(std::ffi::OsStr::from_bytes(b"bad-\xff-arg")).arg("last");
    let mut service = Service::start_test(child, dir.path(), &[("ONSITE_HTTP", "127.0.0.1:0")]);
    service.wait_for_log("serving http://", DEADLINE);
    let log = service.log_text();
    let at = log.find("serving http://").unwrap() + "serving http://".len();
    let addr: SocketAddr = log[at..at + log[at..].find('/').unwrap()].parse().unwrap();

    for _ in 0..2 {
        let answer = http_get(addr, "/debug/pprof/cmdline", &[]);
        let (status, body) = (answer.status, answer.text());
        assert_eq!(status, 200, "{body}");
        let args: Vec<&str> = body
            .trim_end_matches('\n')
            .strip_suffix('\0')
            .unwrap_or_else(|| panic!("ends in NUL: {body:?}"))
            .split('\0')
            .collect();
        assert_eq!(args[args.len() - 2..], ["bad-\u{fffd}-arg", "last"], "{body:?}");
    }
    let index = http_get(addr, "/debug/pprof/", &[]);
    assert_eq!(index.status, 200, "{}", index.text());
    assert!(service.is_alive(), "the service runs on:\n{}", service.log_text());
    assert!(!service.log_text().contains("panicked"), "{}", service.log_text());
}
