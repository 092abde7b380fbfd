//! `cargo xtask demo`: the operator's experience, end to end, on demo-mq.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use onsite::report::{self, CaptureReport, ProfileTop, Section, Style, TextHead};

use crate::service::{DemoMq, kind_of, step};

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// How long the capture runs, in seconds.
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// Exit with an error unless every planted problem is found (what CI runs).
    #[arg(long)]
    pub(crate) strict: bool,
    /// Send no signal: let an automatic rule (a sustained memory rule scaled to the demo) start
    /// the capture.
    #[arg(long)]
    pub(crate) auto: bool,
    /// Send no signal: pull CPU, heap and mutex profiles over HTTP (`ONSITE_HTTP`) with
    /// `go tool pprof`, at the same time.
    #[arg(long, conflicts_with = "auto")]
    pub(crate) http: bool,
}

/// A problem demo-mq plants, and where a profile must show it.
pub(crate) struct Planted {
    pub(crate) kind: &'static str,
    sample_type: &'static str,
    pub(crate) function: &'static str,
    /// It must rank within this many rows by flat value.
    pub(crate) within: usize,
}

pub(crate) const PLANTED: &[Planted] = &[
    Planted { kind: "cpu", sample_type: "cpu", function: "demo_mq::broker::checksum_payload", within: 2 },
    Planted { kind: "memory", sample_type: "inuse_space", function: "demo_mq::broker::record_ack", within: 1 },
    Planted { kind: "mutex", sample_type: "delay", function: "demo_mq::broker::update_delivery_stats", within: 1 },
    Planted {
        kind: "threadcreate",
        sample_type: "alive",
        function: "demo_mq::broker::Broker::spawn_consumer_watchdog",
        within: 1,
    },
];

pub(crate) fn run(args: &DemoArgs) -> Result<(), String> {
    if args.auto {
        return crate::auto_demo::run(args);
    }
    if args.http {
        return crate::http_demo::run(args);
    }
    let mut demo = DemoMq::start("onsite-demo", &[], args.seconds + 30)?;
    let pid = demo.pid();
    step("driving load (2 producers, 2 consumers) for a 2 s warm-up");
    std::thread::sleep(Duration::from_secs(2));

    let rss_before = demo.rss_bytes();
    step("starting a capture");
    println!("  $ kill -USR2 {pid}");
    demo.server.signal(libc::SIGUSR2);
    demo.wait_for_log("capture started", Duration::from_secs(30))?;

    let bar = ProgressBar::new(args.seconds * 10);
    bar.set_style(
        ProgressStyle::with_template("  capturing [{bar:40}] {elapsed}/{msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    bar.set_message(format!("{}s", args.seconds));
    let thread_dump_at = args.seconds * 10 / 2;
    for tick in 0..args.seconds * 10 {
        if tick == thread_dump_at {
            bar.println(format!("  $ kill -USR1 {pid}    (every thread's stack, while the capture runs)"));
            demo.server.signal(libc::SIGUSR1);
        }
        std::thread::sleep(Duration::from_millis(100));
        bar.inc(1);
        if let Err(e) = demo.check_running() {
            bar.abandon();
            return Err(e);
        }
    }
    bar.finish();

    step("stopping the capture");
    println!("  $ kill -USR2 {pid}");
    demo.server.signal(libc::SIGUSR2);
    let spinner = ProgressBar::new_spinner();
    spinner.set_message("writing profiles…");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let stopped = demo.wait_for_log("capture stopped", Duration::from_secs(180));
    spinner.finish_and_clear();
    stopped?;
    let rss_after = demo.rss_bytes();
    demo.load.take();

    step("files written");
    let files = demo.files();
    for (path, size) in &files {
        println!("  {:>10}  {}", report::human(*size as i64, "bytes"), path.display());
    }

    // What `onsite report` prints for this capture: the same code.
    let manifest = files
        .iter()
        .find(|(p, _)| kind_of(p) == "manifest")
        .ok_or_else(|| format!("the capture wrote no manifest; see {}", demo.log.display()))?;
    step(&format!("$ onsite report {}", manifest.0.display()));
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "  demo-mq's RSS grew from {} to {} during the capture (+{})",
            report::human(before as i64, "bytes"),
            report::human(after as i64, "bytes"),
            report::human(after.saturating_sub(before) as i64, "bytes"),
        );
    }
    let style = Style { colour: false };
    let capture = CaptureReport::for_manifest(&manifest.0, None).map_err(|e| e.0)?;
    print!("{}", capture.render(style));

    step("the planted problems");
    let mut missed = Vec::new();
    for planted in PLANTED {
        let Some((path, _)) =
            files.iter().find(|(p, _)| kind_of(p) == planted.kind && p.extension().is_some_and(|e| e == "pprof"))
        else {
            continue;
        };
        let top = ProfileTop::read(path, Some(planted.sample_type)).map_err(|e| e.0)?;
        let (kind, function, within, by) = (planted.kind, planted.function, planted.within, planted.sample_type);
        match top.rank(function) {
            Some(r) if r < within => println!("  ✔ {function} is #{} by {by} in the {kind} profile", r + 1),
            _ => {
                println!("  ✘ {function} is not in the top {within} by {by} of the {kind} profile");
                missed.push(format!("{kind}: {function}"));
            }
        }
    }
    if capture.sections.iter().any(|s| matches!(s, Section::Unreadable(_))) {
        missed.push("a file of the capture could not be read".to_owned());
    }
    for (path, _) in files.iter().filter(|(p, _)| kind_of(p) == "threads") {
        step(&format!("SIGUSR1 thread dump (first threads; all of it: onsite dump {pid})"));
        print!("{}", TextHead::read(path, report::DUMP_LINES).map_err(|e| e.0)?.render(style));
    }
    for kind in ["cpu", "memory", "mutex", "block", "trace", "threadcreate", "threads"] {
        if !files.iter().any(|(p, _)| kind_of(p) == kind) {
            missed.push(format!("no {kind} file was written"));
        }
    }
    println!();
    println!("  Open them: go tool pprof -http=: <file.pprof>   (or -top), the .svg in a browser.");
    println!("  demo-mq's own log: {}", demo.log.display());
    if !missed.is_empty() && args.strict {
        return Err(format!("planted problems not found: {}", missed.join("; ")));
    }
    Ok(())
}
