//! The `/debug/pprof/` listener the way a scraper or an operator meets it: a child service
//! with onsite's allocator and locks listening on a port it picked, real HTTP requests over TCP
//! (a small client here, and `go tool pprof` when Go is installed), and every body decoded.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use onsite_core::ProfileKind;
use onsite_core::pprof::{decode, function_totals};
use onsite_core::test_support::dump_files;
use support::{HttpAnswer, Service, http_get};

#[global_allocator]
static ALLOC: onsite::memory::Allocator = onsite::memory::Allocator::new();

const DEADLINE: Duration = Duration::from_secs(120);

static LEAKED: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
static CONTENDED: onsite::sync::Mutex<u64> = onsite::sync::Mutex::new(0);

#[inline(never)]
fn leak_a_block() {
    LEAKED.lock().unwrap().push(vec![7u8; 64 * 1024]);
}

/// Holds the contended lock across a sleep: the mutex profile charges the waiting to it, and the
/// block profile finds its waiters in it.
#[inline(never)]
fn hold_the_lock_while_sleeping() -> u64 {
    let mut n = CONTENDED.lock();
    *n += 1;
    std::thread::sleep(Duration::from_millis(5));
    let value = *n;
    drop(n);
    std::hint::black_box(value)
}

#[test]
#[ignore = "child process role"]
fn child_http_service() {
    let Some(_onsite) = support::install_traced_as_role("child_http_service") else { return };
    for name in ["contender-a", "contender-b"] {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(|| {
                loop {
                    let _span = tracing::info_span!("contend").entered();
                    hold_the_lock_while_sleeping();
                }
            })
            .unwrap();
    }
    std::thread::Builder::new()
        .name("leaker".into())
        .spawn(|| {
            loop {
                leak_a_block();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .unwrap();
    support::announce_ready();
    loop {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(10) {
            support::burn_cpu_in_a_known_function(100_000);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the child listening on a port of its choice, and returns it with that address.
fn start(dir: &std::path::Path, env: &[(&str, &str)]) -> (Service, SocketAddr) {
    let mut all = vec![("ONSITE_MUTEX_FRACTION", "1")];
    all.extend_from_slice(env);
    if !env.iter().any(|(k, _)| *k == "ONSITE_HTTP") {
        all.push(("ONSITE_HTTP", "127.0.0.1:0"));
    }
    let service = Service::start("child_http_service", dir, &all);
    service.wait_for_log("serving http://", DEADLINE);
    let log = service.log_text();
    let at = log.find("serving http://").unwrap() + "serving http://".len();
    let addr = &log[at..at + log[at..].find('/').unwrap()];
    let mut addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("{addr:?}: {e}"));
    if addr.ip().is_unspecified() {
        addr.set_ip([127, 0, 0, 1].into());
    }
    (service, addr)
}

/// An HTTP answer: status, headers (names lower-cased), body.
/// The functions of `answer`'s profile with a flat `sample_type`, largest first.
fn top(answer: &HttpAnswer, sample_type: &str) -> Vec<String> {
    let profile = decode(&answer.body).unwrap_or_else(|e| panic!("not a pprof body ({e:?}): {}", answer.text()));
    function_totals(&profile, sample_type).unwrap().into_iter().filter(|r| r.flat > 0).map(|r| r.function).collect()
}

#[test]
fn cpu_mutex_and_block_pulled_in_parallel_each_name_the_childs_work_and_are_the_files_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (service, addr) = start(dir.path(), &[]);
    let pulls: Vec<_> = ["profile", "mutex", "block"]
        .into_iter()
        .map(|name| std::thread::spawn(move || http_get(addr, &format!("/debug/pprof/{name}?seconds=3"), &[])))
        .collect();
    let [cpu, mutex, block] = pulls.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>().try_into().ok().unwrap();
    for (name, answer) in [("profile", &cpu), ("mutex", &mutex), ("block", &block)] {
        assert_eq!(answer.status, 200, "{name}: {}\n{}", answer.text(), service.log_text());
        assert_eq!(answer.header("content-type"), Some("application/octet-stream"));
        // The body is the file the capture left in the dump directory, byte for byte.
        let file = answer.header("x-onsite-file").unwrap();
        assert_eq!(std::fs::read(dir.path().join(file)).unwrap(), answer.body, "{name}: {file}");
    }
    let cpu_top = top(&cpu, "samples");
    assert!(cpu_top.iter().take(3).any(|f| f.ends_with("burn_cpu_in_a_known_function")), "cpu: {cpu_top:?}");
    let mutex_top = top(&mutex, "delay");
    assert!(mutex_top[0].ends_with("hold_the_lock_while_sleeping"), "mutex: {mutex_top:?}");
    let block_top = top(&block, "delay");
    assert!(block_top.iter().take(2).any(|f| f.ends_with("hold_the_lock_while_sleeping")), "block: {block_top:?}");

    // Each pull is a capture of its own, with the usual manifest saying who asked.
    let manifests = service.wait_for_manifests(3, DEADLINE);
    for (_, manifest) in &manifests {
        assert_eq!(manifest["started_by"]["trigger"], "http", "{manifest}");
        assert!(manifest["started_by"]["request"].as_str().unwrap().contains("/debug/pprof/"), "{manifest}");
        assert_eq!(manifest["stopped_by"], "the requested seconds elapsed", "{manifest}");
    }

    // The leak, through heap (and its alias allocs).
    let heap = http_get(addr, "/debug/pprof/heap?seconds=3", &[]);
    assert_eq!(heap.status, 200, "{}", heap.text());
    let heap_top = top(&heap, "inuse_space");
    assert!(heap_top[0].ends_with("leak_a_block"), "heap by inuse_space: {heap_top:?}");
}

#[test]
fn a_second_pull_of_a_kind_being_recorded_gets_409_and_a_signal_capture_records_the_free_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let (mut service, addr) = start(dir.path(), &[]);
    let first = std::thread::spawn(move || http_get(addr, "/debug/pprof/profile?seconds=8", &[]));
    service.wait_for_log("pull started", DEADLINE);

    let second = http_get(addr, "/debug/pprof/profile?seconds=3", &[]);
    assert_eq!(second.status, 409, "{}", second.text());
    let text = second.text();
    assert!(
        text.contains("cpu is being recorded already") && text.contains("GET /debug/pprof/profile?seconds=8"),
        "{text}"
    );
    assert!(second.header("retry-after").is_some_and(|s| s.parse::<u64>().unwrap() <= 9), "{:?}", second.headers);

    // A toggle now records every kind but cpu, and its manifest says who held cpu.
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture stopped", DEADLINE);
    let answer = first.join().unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let manifests = service.wait_for_manifests(2, DEADLINE);
    let by_signal = manifests.iter().map(|(_, m)| m).find(|m| m["started_by"]["trigger"] == "signal").unwrap();
    assert!(!by_signal["kinds"].as_array().unwrap().iter().any(|k| k == "cpu"), "{by_signal}");
    assert!(by_signal["kinds"].as_array().unwrap().iter().any(|k| k == "mutex"), "{by_signal}");
    let held = &by_signal["held_elsewhere"][0];
    assert_eq!(held["kind"], "cpu", "{by_signal}");
    assert!(held["held_by"].as_str().unwrap().contains("/debug/pprof/profile?seconds=8"), "{by_signal}");
    assert_eq!(dump_files(dir.path(), ProfileKind::Cpu, "pprof").len(), 1);
    assert_eq!(dump_files(dir.path(), ProfileKind::Mutex, "pprof").len(), 1);

    // Paths and parameters as Go's, and nothing outside /debug/pprof/.
    let index = http_get(addr, "/debug/pprof/", &[]);
    assert_eq!(index.status, 200);
    assert!(index.text().contains("trace?seconds=N") && index.text().contains("NOT Go's execution trace format"));
    let no_seconds = http_get(addr, "/debug/pprof/mutex", &[]);
    assert_eq!(no_seconds.status, 400);
    assert!(no_seconds.text().contains("add ?seconds=N"), "{}", no_seconds.text());
    assert_eq!(http_get(addr, "/", &[]).status, 404);
    assert_eq!(http_get(addr, "/debug/pprof/../../etc/passwd", &[]).status, 404);
    let dump = http_get(addr, "/debug/pprof/goroutine?debug=2", &[]);
    assert_eq!(dump.status, 200, "{}", dump.text());
    assert!(
        dump.text().contains("contender-a") && dump.text().contains("hold_the_lock_while_sleeping"),
        "{}",
        dump.text()
    );
    let trace = http_get(addr, "/debug/pprof/trace?seconds=1", &[]);
    assert_eq!(trace.status, 200, "{}", trace.text());
    let _: Vec<serde_json::Value> = serde_json::from_slice(&trace.body).expect("Chrome trace JSON");

    // A client that hangs up stops its capture at once; the file is still written.
    let mut gone = TcpStream::connect(addr).unwrap();
    gone.write_all(b"GET /debug/pprof/block?seconds=600 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    service.wait_for_log("kind=block requested_by=GET /debug/pprof/block?seconds=600", DEADLINE);
    drop(gone);
    service.wait_for_log("HTTP client went away", DEADLINE);
    // The cpu pull, the toggle's capture, the trace pull and this one (a thread dump has none).
    let abandoned = service.wait_for_manifests(4, DEADLINE);
    assert!(abandoned.iter().any(|(_, m)| m["stopped_by"] == "the HTTP client went away"), "{abandoned:?}");
    assert_eq!(dump_files(dir.path(), ProfileKind::Block, "pprof").len(), 2);
}

#[test]
fn a_non_loopback_bind_needs_a_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut open = Service::start("child_http_service", dir.path(), &[("ONSITE_HTTP", "0.0.0.0:0")]);
    open.wait_for_log("ONSITE_HTTP_TOKEN", DEADLINE);
    let log = open.log_text();
    assert!(log.contains("bad setting ONSITE_HTTP=\"0.0.0.0:0\"") && !log.contains("serving http://"), "{log}");
    // The service and its signals run on.
    open.signal(libc::SIGUSR2);
    open.wait_for_log("capture started", DEADLINE);
    assert!(open.is_alive());
    drop(open);

    let dir = tempfile::tempdir().unwrap();
    let token = "s3cret-token-of-32-characters-xx";
    let (_service, addr) = start(dir.path(), &[("ONSITE_HTTP", "0.0.0.0:0"), ("ONSITE_HTTP_TOKEN", token)]);
    let none = http_get(addr, "/debug/pprof/", &[]);
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), Some("Bearer realm=\"onsite\""));
    assert_eq!(
        http_get(addr, "/debug/pprof/", &["Authorization: Bearer s3cret-token-of-32-characters-xy"]).status,
        401
    );
    assert_eq!(http_get(addr, "/debug/pprof/profile?seconds=1", &["Authorization: Basic abc"]).status, 401);
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(http_get(addr, "/debug/pprof/", &[&bearer]).status, 200);
    let cpu = http_get(addr, "/debug/pprof/profile?seconds=1", &[&bearer]);
    assert_eq!(cpu.status, 200, "{}", cpu.text());
    decode(&cpu.body).unwrap();
}

#[test]
fn two_hundred_silent_connections_leave_signals_and_requests_working() {
    let dir = tempfile::tempdir().unwrap();
    let (mut service, addr) = start(dir.path(), &[]);
    let silent: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let index = http_get(addr, "/debug/pprof/", &[]);
    assert_eq!(index.status, 200, "{}", index.text());
    service.signal(libc::SIGUSR1);
    service.wait_for_files(ProfileKind::Threads, "txt", 1, DEADLINE);
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture started", DEADLINE);
    let held = http_get(addr, "/debug/pprof/threadcreate?seconds=1", &[]);
    assert_eq!(held.status, 409, "the toggle's capture holds threadcreate: {}", held.text());
    assert!(held.text().contains("the capture started by SIGUSR2"), "{}", held.text());
    service.signal(libc::SIGUSR2);
    service.wait_for_log("capture stopped", DEADLINE);
    let mutex = http_get(addr, "/debug/pprof/mutex?seconds=1", &[]);
    assert_eq!(mutex.status, 200, "{}", mutex.text());
    decode(&mutex.body).unwrap();
    drop(silent);
    assert!(service.is_alive());
}

/// `go tool pprof -top` on the endpoints themselves: a reader that is not ours, fetching over
/// HTTP as operators do. Skipped (saying so) where Go is not installed; CI installs it.
#[test]
#[allow(clippy::print_stdout)] // the skip must say so in the test's output
fn go_tool_pprof_pulls_cpu_heap_and_mutex_and_names_the_culprits() {
    if std::process::Command::new("go").arg("version").output().is_err() {
        println!("SKIPPED: go is not installed, so `go tool pprof` cannot be tried");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (service, addr) = start(dir.path(), &[]);
    let pprof_tmp = tempfile::tempdir().unwrap();
    let pulls: Vec<_> = [
        ("profile?seconds=3", "", "burn_cpu_in_a_known_function", 3),
        ("heap?seconds=3", "-sample_index=inuse_space", "leak_a_block", 1),
        ("mutex?seconds=3", "", "hold_the_lock_while_sleeping", 1),
    ]
    .into_iter()
    .map(|(path, flag, want, within)| {
        let url = format!("http://{addr}/debug/pprof/{path}");
        let tmp = pprof_tmp.path().to_owned();
        std::thread::spawn(move || {
            let mut cmd = std::process::Command::new("go");
            // pprof gives up 1.5 × seconds + 5 s after asking; on this shared 2-core machine
            // a first CPU capture can take longer than that to start in a debug build.
            cmd.args(["tool", "pprof", "-top", "-timeout=60"]).env("PPROF_TMPDIR", &tmp).env("HOME", &tmp);
            if !flag.is_empty() {
                cmd.arg(flag);
            }
            let out = cmd.arg(&url).output().unwrap();
            let table = String::from_utf8_lossy(&out.stdout).into_owned();
            (url, want, within, out.status.success(), table, String::from_utf8_lossy(&out.stderr).into_owned())
        })
    })
    .collect();
    for pull in pulls {
        let (url, want, within, ok, table, stderr) = pull.join().unwrap();
        assert!(ok, "go tool pprof {url} failed: {stderr}\n{}", service.log_text());
        let rows: Vec<&str> = table
            .lines()
            .skip_while(|l| !l.contains(" flat%"))
            .skip(1)
            .filter_map(|l| l.split_whitespace().last())
            .take(within)
            .collect();
        assert!(rows.iter().any(|f| f.ends_with(want)), "{want} not in the top {within} of {url}:\n{table}");
    }
}

#[test]
fn a_cpu_pull_also_writes_the_minutes_before_it_and_a_mutex_pull_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (service, addr) = start(dir.path(), &[("ONSITE_CPU_RECORDER", "1m@99Hz")]);
    // The child burns CPU all the time; give the recorder a few of its seconds.
    std::thread::sleep(Duration::from_secs(3));
    let cpu = http_get(addr, "/debug/pprof/profile?seconds=1", &[]);
    assert_eq!(cpu.status, 200, "{}\n{}", cpu.text(), service.log_text());
    let mutex = http_get(addr, "/debug/pprof/mutex?seconds=1", &[]);
    assert_eq!(mutex.status, 200, "{}\n{}", mutex.text(), service.log_text());
    let manifests = service.wait_for_manifests(2, DEADLINE);
    let windows: Vec<(&str, &serde_json::Value)> =
        manifests.iter().map(|(_, m)| (m["kinds"][0].as_str().unwrap(), &m["cpu_before"])).collect();
    let of = |kind: &str| windows.iter().find(|(k, _)| *k == kind).unwrap_or_else(|| panic!("{windows:?}")).1;
    assert!(of("cpu")["seconds"].as_f64().unwrap() > 1.0, "the CPU pull's manifest: {windows:?}");
    assert!(of("mutex").is_null(), "a mutex pull writes no cpu-before: {windows:?}");
    let before = dump_files(dir.path(), ProfileKind::CpuBefore, "pprof");
    assert_eq!(before.len(), 1, "one cpu-before file, the CPU pull's: {before:?}");
    let profile = decode(&std::fs::read(&before[0]).unwrap()).unwrap();
    let named: Vec<String> =
        function_totals(&profile, "samples").unwrap().into_iter().take(3).map(|r| r.function).collect();
    assert!(named.iter().any(|f| f.ends_with("burn_cpu_in_a_known_function")), "cpu-before: {named:?}");
}

#[test]
fn with_the_always_on_heap_a_heap_pull_without_seconds_says_what_holds_the_memory_now() {
    let dir = tempfile::tempdir().unwrap();
    let (service, addr) = start(dir.path(), &[("ONSITE_MEMORY_ALWAYS", "on")]);
    // The child leaks 64 KiB every 10 ms from its start: give it a few MiB to hold.
    std::thread::sleep(Duration::from_secs(2));
    let heap = http_get(addr, "/debug/pprof/heap", &[]);
    assert_eq!(heap.status, 200, "{}\n{}", heap.text(), service.log_text());
    let profile = decode(&heap.body).unwrap();
    let held = function_totals(&profile, "inuse_space").unwrap();
    assert!(held[0].function.ends_with("leak_a_block"), "heap by inuse_space: {held:?}");
    let mib = held[0].flat as f64 / (1 << 20) as f64;
    assert!(mib > 4.0, "the leak of the last seconds is held, not only the pull's own moment: {mib:.1} MiB");
    // Without always-on, the same path asks for a window.
    let dir = tempfile::tempdir().unwrap();
    let (_plain, addr) = start(dir.path(), &[]);
    let heap = http_get(addr, "/debug/pprof/heap", &[]);
    assert_eq!(heap.status, 400, "{}", heap.text());
    assert!(heap.text().contains("?seconds=N"), "{}", heap.text());
}
