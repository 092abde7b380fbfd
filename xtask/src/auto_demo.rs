//! `cargo xtask demo --auto`: no signal is sent. demo-mq runs with one automatic rule scaled to
//! the demo ("RSS above 100 MB for 10 s"), its planted leak grows RSS, the rule fires, and the
//! automatic capture's memory profile names the leak by what holds the memory: demo-mq samples
//! its heap from the start (`ONSITE_MEMORY_ALWAYS=on`), so the profile counts what leaked before
//! the rule fired too, not only during its capture. The CPU flight recorder runs too, so the
//! capture also holds the CPU of the minutes before the rule fired (`cpu-before`).

use std::time::{Duration, Instant};

use crate::demo::DemoArgs;
use onsite::report::{self, CaptureReport, Style};

use crate::service::{DemoMq, kind_of, step, wait_for};

/// The rule: above 100 MB for 10 s. demo-mq starts near 20 MB and its leak adds several MB a
/// second under the load below, so the rule holds after ~15 s and fires ~10 s later.
const RULE: &str = "mem>100MB for 10s kinds=memory capture=15s";
const THRESHOLD_BYTES: u64 = 100_000_000;
/// Sampling interval for the demo (production default: 5 s).
const INTERVAL: &str = "1s";
/// The leak, which must be the top function of the memory profile by in-use bytes.
const LEAK: &str = "demo_mq::broker::record_ack";
/// The flight recorder: the demo's whole run fits in its window.
const RECORDER: &str = "2m@19Hz";
/// demo-mq's CPU hot spot, which the CPU before the rule fired must show.
const HOT: &str = "demo_mq::broker::checksum_payload";
/// How long to wait for the rule to fire and for its capture to be written.
const FIRE_WITHIN: Duration = Duration::from_secs(120);
const WRITTEN_WITHIN: Duration = Duration::from_secs(120);

pub(crate) fn run(args: &DemoArgs) -> Result<(), String> {
    println!(
        "\n  $ ONSITE_AUTO=\"{RULE}\" ONSITE_AUTO_INTERVAL={INTERVAL} ONSITE_CPU_RECORDER={RECORDER} \
         ONSITE_MEMORY_ALWAYS=on demo-mq serve   (no signal will be sent)"
    );
    let env = [
        ("ONSITE_AUTO", RULE),
        ("ONSITE_AUTO_INTERVAL", INTERVAL),
        ("ONSITE_CPU_RECORDER", RECORDER),
        ("ONSITE_MEMORY_ALWAYS", "on"),
    ];
    let mut demo = DemoMq::start("onsite-demo-auto", &env, 300)?;

    step("driving load; watching demo-mq's RSS climb towards the rule");
    let start = Instant::now();
    let fired_line = loop {
        demo.check_running()?;
        let rss = demo.rss_bytes().unwrap_or(0);
        let width = 40;
        let filled = ((rss as f64 / THRESHOLD_BYTES as f64) * width as f64).min(width as f64 * 1.5) as usize;
        println!(
            "  {:>4.0}s  RSS {:>9}  {}{}",
            start.elapsed().as_secs_f64(),
            report::human(rss as i64, "bytes"),
            "#".repeat(filled.min(width)),
            if filled > width {
                format!("|{}", "#".repeat(filled - width))
            } else {
                format!("{}|", " ".repeat(width - filled))
            },
        );
        if let Ok(line) = demo.wait_for_log("automatic capture rule fired", Duration::ZERO) {
            break line;
        }
        if start.elapsed() > FIRE_WITHIN {
            return Err(format!("the rule did not fire within {FIRE_WITHIN:?}; see {}", demo.log.display()));
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    step("the rule fired");
    println!("  {}", fired_line.split("onsite: ").last().unwrap_or(&fired_line).trim());

    step("automatic capture running; waiting for its files");
    let manifest = wait_for(WRITTEN_WITHIN, || demo.files().into_iter().find(|(p, _)| kind_of(p) == "manifest"))
        .ok_or_else(|| format!("no manifest within {WRITTEN_WITHIN:?}; see {}", demo.log.display()))?;
    demo.load.take();

    step("files written");
    let files = demo.files();
    for (path, size) in &files {
        println!("  {:>10}  {}", report::human(*size as i64, "bytes"), path.display());
    }
    step(&format!("$ onsite report {}", manifest.0.display()));
    let capture = CaptureReport::for_manifest(&manifest.0, None).map_err(|e| e.0)?;
    print!("{}", capture.render(Style { colour: false }));
    let found = match capture.profile("memory").and_then(|tops| tops.iter().find(|t| t.sample_type == "inuse_space")) {
        Some(top) => match top.rank(LEAK) {
            Some(0) => {
                // Always-on sampling: what holds the memory now, more than the capture's own
                // window allocated (which is all a capture without it could show).
                let flat_of = |top: &report::ProfileTop| {
                    top.rows.iter().filter(|r| r.function == LEAK).map(|r| r.flat).sum::<i64>()
                };
                let held = flat_of(top);
                let during = flat_of(&report::ProfileTop::read(&top.path, Some("alloc_space")).map_err(|e| e.0)?);
                if held > during {
                    println!(
                        "  ✔ {LEAK} is #1 by in-use bytes, holding {} (the capture's own window allocated {}): \
                         the leak, by what holds the memory, found without any signal sent",
                        report::human(held, "bytes"),
                        report::human(during, "bytes")
                    );
                    true
                } else {
                    println!(
                        "  ✘ {LEAK} holds {} in use, no more than the capture allocated ({}): the leak before the rule fired is missing",
                        report::human(held, "bytes"),
                        report::human(during, "bytes")
                    );
                    false
                }
            }
            Some(r) => {
                println!("  ✘ {LEAK} is #{} by in-use bytes, not #1", r + 1);
                false
            }
            None => {
                println!("  ✘ {LEAK} is not in the memory profile");
                false
            }
        },
        None => {
            println!("  ✘ the automatic capture wrote no memory profile; see {}", demo.log.display());
            false
        }
    };
    // The report above shows the cpu-before file's top too: the CPU of the minutes before the
    // rule fired.
    let before_found = match capture.profile("cpu-before").and_then(|tops| tops.first()) {
        Some(top) => match top.rank(HOT) {
            Some(r) if r < 3 => {
                println!("  ✔ {HOT} is #{} by CPU in the minutes before the capture began", r + 1);
                true
            }
            _ => {
                println!("  ✘ {HOT} is not in the top 3 of the CPU before the capture");
                false
            }
        },
        None => {
            println!("  ✘ no cpu-before file (is the flight recorder running?); see {}", demo.log.display());
            false
        }
    };
    println!();
    println!("  demo-mq's own log: {}", demo.log.display());
    if !found && args.strict {
        return Err(format!("the automatic capture did not name {LEAK} first"));
    }
    if !before_found && args.strict {
        return Err(format!("the CPU before the automatic capture did not show {HOT}"));
    }
    Ok(())
}
