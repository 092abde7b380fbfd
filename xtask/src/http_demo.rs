//! `cargo xtask demo --http`: no signal is sent. demo-mq listens on `/debug/pprof/`
//! (`ONSITE_HTTP`), and `go tool pprof` pulls its CPU, heap and mutex profiles over HTTP at the
//! same time, as a scraper would; each table must name its planted problem. A second CPU
//! request while the first runs shows the answer a busy kind gets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::demo::{DemoArgs, PLANTED};
use crate::service::{DemoMq, step};

/// The endpoints pulled, with the planted kind each must show and the reader's extra flags.
const PULLS: &[(&str, &str, &[&str])] =
    &[("profile", "cpu", &[]), ("heap", "memory", &["-sample_index=inuse_space"]), ("mutex", "mutex", &[])];

pub(crate) fn run(args: &DemoArgs) -> Result<(), String> {
    if Command::new("go").arg("version").output().is_err() {
        return Err("`cargo xtask demo --http` pulls with `go tool pprof`, and go is not installed".into());
    }
    println!("\n  $ ONSITE_HTTP=127.0.0.1:0 demo-mq serve   (port 0: onsite picks a free port and logs it)");
    let mut demo = DemoMq::start("onsite-demo-http", &[("ONSITE_HTTP", "127.0.0.1:0")], args.seconds + 60)?;
    let line = demo.wait_for_log("serving http://", Duration::from_secs(30))?;
    let addr = line
        .split("serving http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| format!("no address in {line:?}"))?
        .to_owned();
    println!("  onsite serves http://{addr}/debug/pprof/");
    step("driving load (2 producers, 2 consumers) for a 2 s warm-up");
    std::thread::sleep(Duration::from_secs(2));

    step(&format!("pulling CPU, heap and mutex profiles of {} s at once with go tool pprof", args.seconds));
    let pprof_tmp = demo.dumps.join("go-pprof");
    let pulls: Vec<_> = PULLS
        .iter()
        .map(|&(path, kind, flags)| {
            let url = format!("http://{addr}/debug/pprof/{path}?seconds={}", args.seconds);
            println!("  $ go tool pprof -top {}{url}", flags.iter().map(|f| format!("{f} ")).collect::<String>());
            let tmp = pprof_tmp.clone();
            let thread = std::thread::spawn(move || {
                Command::new("go")
                    .args(["tool", "pprof", "-top"])
                    .args(flags)
                    .arg(&url)
                    .env("PPROF_TMPDIR", &tmp)
                    .output()
            });
            (path, kind, thread)
        })
        .collect();

    demo.wait_for_log("pull started kind=cpu", Duration::from_secs(60))?;
    step("a second CPU request while the first one records");
    println!("  $ curl http://{addr}/debug/pprof/profile?seconds=1");
    match get(&addr, "/debug/pprof/profile?seconds=1") {
        Ok(answer) => println!("  {}", answer.trim_end().replace('\n', "\n  ")),
        Err(e) => println!("  (request failed: {e})"),
    }

    let mut missed = Vec::new();
    for (path, kind, thread) in pulls {
        let out = thread.join().map_err(|_| "a go tool pprof thread panicked")?.map_err(|e| e.to_string())?;
        let table = String::from_utf8_lossy(&out.stdout);
        step(&format!("go tool pprof -top …/debug/pprof/{path}"));
        if !out.status.success() {
            println!("  {}", String::from_utf8_lossy(&out.stderr).trim_end().replace('\n', "\n  "));
            missed.push(format!("{path}: go tool pprof failed"));
            continue;
        }
        // The reader's summary and the first rows; the file's own comments are in `-raw`.
        let header = table.lines().position(|l| l.contains(" flat%")).unwrap_or(0);
        for line in table.lines().filter(|l| l.starts_with("Type:") || l.starts_with("Duration:")) {
            println!("  {line}");
        }
        for line in table.lines().skip(header).take(7) {
            println!("  {line}");
        }
        let rows: Vec<&str> = table
            .lines()
            .skip_while(|l| !l.contains(" flat%"))
            .skip(1)
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        for planted in PLANTED.iter().filter(|p| p.kind == kind) {
            match rows.iter().position(|f| *f == planted.function) {
                Some(r) if r < planted.within => println!("  ✔ {} is #{} in {path}", planted.function, r + 1),
                _ => {
                    println!("  ✘ {} is not in the top {} of {path}", planted.function, planted.within);
                    missed.push(format!("{path}: {}", planted.function));
                }
            }
        }
    }
    demo.check_running()?;
    println!();
    println!("  Each pull is also a capture in {} (with its manifest).", demo.dumps.display());
    println!("  demo-mq's own log: {}", demo.log.display());
    if !missed.is_empty() && args.strict {
        return Err(format!("planted problems not found over HTTP: {}", missed.join("; ")));
    }
    Ok(())
}

/// A plain `GET`, answered as status line and body.
fn get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let status = raw.lines().next().unwrap_or("").to_owned();
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(format!("{status}\n{body}"))
}
