//! `onsite capture` and `onsite dump`: the two commands that signal a live service.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use onsite::report::{CaptureReport, Style, TextHead};
use onsite::status::{self, RunningCapture};
use onsite::vars;
use serde_json::json;

use crate::service::{DEFAULT_DUMP, DEFAULT_TOGGLE, Service, file_ending, wait_for};

/// How long a service may take to start a capture after the toggle signal.
const START_WITHIN: Duration = Duration::from_secs(60);
/// How long writing a capture's files may take (symbolising a large binary is the slow part).
const WRITE_WITHIN: Duration = Duration::from_secs(300);
/// How long a thread dump may take to appear.
const DUMP_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct CaptureArgs {
    /// The service: a pid, or a process name (as in /proc/<pid>/comm).
    target: String,
    /// How long to capture, e.g. 30s, 2m, 1m30s.
    #[arg(long = "for", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Which kinds to report, e.g. cpu,memory. A signal cannot choose what the service
    /// captures (its ONSITE_KINDS, set when it starts, does); this picks what is shown.
    #[arg(long, value_delimiter = ',')]
    kinds: Option<Vec<String>>,
    /// The service's dump directory, when it is set in its code rather than ONSITE_DIR.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The toggle signal, when it is set in its code rather than ONSITE_TOGGLE_SIGNAL.
    #[arg(long)]
    signal: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// The service: a pid, or a process name (as in /proc/<pid>/comm).
    target: String,
    /// The service's dump directory, when it is set in its code rather than ONSITE_DIR.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The dump signal, when it is set in its code rather than ONSITE_DUMP_SIGNAL.
    #[arg(long)]
    signal: Option<String>,
}

/// Progress goes to stderr (indicatif draws only on a terminal); results to stdout.
fn note(text: &str) {
    #[allow(clippy::print_stderr)] // the command's progress lines
    {
        eprintln!("{text}");
    }
}

pub fn capture(args: &CaptureArgs, json: bool, style: Style) -> Result<String, String> {
    let service = Service::find(&args.target)?;
    let pid = service.pid;
    let sig = service.signal_for(vars::TOGGLE_SIGNAL, DEFAULT_TOGGLE, args.signal.as_deref())?;
    service.require_catches(sig, "captures")?;
    let dir = args.dir.clone().unwrap_or_else(|| service.dump_dir());
    let kinds = checked_kinds(&service, args.kinds.as_deref())?;
    let signal_name = status::signal_name(sig);

    let interrupted = Arc::new(AtomicBool::new(false));
    let ctrl_c = signal_hook::flag::register(libc::SIGINT, Arc::clone(&interrupted))
        .map_err(|e| format!("cannot catch Ctrl-C: {e}"))?;
    let result = (|| {
        // Whatever started a running capture (a rule, an API call, another operator), toggling
        // now would stop it: wait for it instead, and report it.
        if let Some(running) = status::running_capture(&dir, pid) {
            return wait_for_running(&service, &dir, &running, &interrupted, json, style, kinds.as_deref());
        }
        service.send(sig)?;
        note(&format!("sent {signal_name} to pid {pid} ({}): starting a capture", service.name));
        let running =
            wait_for(START_WITHIN, || !service.is_alive(), || status::running_capture(&dir, pid).filter(|r| r.running))
                .ok_or_else(|| not_started(&service, &dir, &signal_name))?;
        let what = running.kinds.join(",");
        let stopped_early = countdown(args.duration, &format!("capturing {what}"), &interrupted, &running, &dir, pid);
        if stopped_early {
            note("Ctrl-C: stopping the capture now");
        }
        // A capture that outlived the service's maximum duration stopped by itself: a toggle
        // now would start a new one.
        match status::running_capture(&dir, pid) {
            Some(now) if now.capture == running.capture => {
                service.send(sig)?;
                note(&format!("sent {signal_name} to pid {pid}: stopping the capture"));
            }
            _ => note(
                "the capture stopped by itself (the service's maximum capture duration) before the countdown ended",
            ),
        }
        // From here a Ctrl-C stops the waiting only: the capture is stopped already.
        interrupted.store(false, Ordering::Relaxed);
        let manifest = wait_for_manifest(&service, &dir, &running.capture, &interrupted)?;
        let report = CaptureReport::for_manifest(&manifest, kinds.as_deref()).map_err(|e| e.0)?;
        Ok(output(&service, &dir, &report, json, style, false, stopped_early))
    })();
    signal_hook::low_level::unregister(ctrl_c);
    result
}

/// `--kinds`, checked: kinds onsite knows, and (when the service's `ONSITE_KINDS` says what it
/// captures) ones it captures.
fn checked_kinds(service: &Service, kinds: Option<&[String]>) -> Result<Option<Vec<String>>, String> {
    let Some(kinds) = kinds else { return Ok(None) };
    let mut checked = Vec::new();
    for word in kinds {
        let kind: onsite::ProfileKind = word.parse().map_err(|e| format!("--kinds: {e}"))?;
        checked.push(kind.as_str().to_owned());
    }
    if let Some(configured) = service.var(vars::KINDS).filter(|k| !k.trim().eq_ignore_ascii_case("all")) {
        let configured: Vec<&str> = configured.split(',').map(str::trim).collect();
        let missing: Vec<&String> = checked.iter().filter(|k| !configured.contains(&k.as_str())).collect();
        if !missing.is_empty() {
            return Err(format!(
                "pid {} ({}) captures only {} ({}={}): a signal cannot ask for {}; restart it with {} \
                 set to include them, or leave them out of --kinds. Nothing was sent",
                service.pid,
                service.name,
                configured.join(","),
                vars::KINDS,
                configured.join(","),
                missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","),
                vars::KINDS
            ));
        }
    }
    Ok(Some(checked))
}

/// Counts `length` down (a bar on a terminal); `true` when Ctrl-C cut it short. Ends early too
/// when the capture's marker goes (it stopped by itself).
fn countdown(
    length: Duration,
    what: &str,
    interrupted: &AtomicBool,
    running: &RunningCapture,
    dir: &Path,
    pid: u32,
) -> bool {
    note(&format!("{what} for {} (Ctrl-C stops it early and still reports)", humantime::format_duration(length)));
    let bar = ProgressBar::new(length.as_millis() as u64);
    if let Ok(style) = ProgressStyle::with_template("  {msg} [{bar:30}] {elapsed}/{duration}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    let start = Instant::now();
    let mut last_check = Instant::now();
    while start.elapsed() < length {
        if interrupted.load(Ordering::Relaxed) {
            bar.abandon();
            return true;
        }
        if last_check.elapsed() > Duration::from_millis(500) {
            last_check = Instant::now();
            if status::running_capture(dir, pid).is_none_or(|now| now.capture != running.capture) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        bar.set_position(start.elapsed().as_millis() as u64);
    }
    bar.finish_and_clear();
    false
}

/// Waits for a capture someone else started, then reports it.
fn wait_for_running(
    service: &Service,
    dir: &Path,
    running: &RunningCapture,
    interrupted: &AtomicBool,
    json: bool,
    style: Style,
    kinds: Option<&[String]>,
) -> Result<String, String> {
    let why = onsite::report::why(&running.started_by);
    note(&format!(
        "pid {} ({}) is already capturing {} (started by {why}); waiting for that capture to finish \
         instead of toggling it off",
        service.pid,
        service.name,
        running.kinds.join(",")
    ));
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let left = Duration::from_millis(running.stops_by_unix_ms.saturating_sub(now_ms));
    let bar = ProgressBar::new(left.as_millis() as u64);
    if let Ok(s) = ProgressStyle::with_template("  waiting [{bar:30}] {elapsed}/{duration}") {
        bar.set_style(s.progress_chars("=> "));
    }
    let start = Instant::now();
    let gone = wait_for(
        left + WRITE_WITHIN,
        || interrupted.load(Ordering::Relaxed) || !service.is_alive(),
        || {
            bar.set_position(start.elapsed().as_millis() as u64);
            status::running_capture(dir, service.pid).is_none_or(|now| now.capture != running.capture).then_some(())
        },
    );
    bar.finish_and_clear();
    if gone.is_none() {
        return Err(if interrupted.load(Ordering::Relaxed) {
            format!("stopped waiting (Ctrl-C); the capture in pid {} runs on, untouched", service.pid)
        } else {
            format!("pid {}'s capture {} did not finish in time; see the service's log", service.pid, running.capture)
        });
    }
    let manifest = wait_for_manifest(service, dir, &running.capture, interrupted)?;
    let report = CaptureReport::for_manifest(&manifest, kinds).map_err(|e| e.0)?;
    Ok(output(service, dir, &report, json, style, true, false))
}

fn wait_for_manifest(
    service: &Service,
    dir: &Path,
    capture: &str,
    interrupted: &AtomicBool,
) -> Result<PathBuf, String> {
    let suffix = format!("-{}-manifest-{capture}.json", service.pid);
    let spinner = ProgressBar::new_spinner();
    spinner.set_message("writing profiles…");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let found = wait_for(
        WRITE_WITHIN,
        || !service.is_alive() || interrupted.load(Ordering::Relaxed),
        || file_ending(dir, &suffix),
    );
    spinner.finish_and_clear();
    found.ok_or_else(|| {
        if interrupted.load(Ordering::Relaxed) {
            return format!(
                "stopped waiting (Ctrl-C); pid {} writes the capture's files on: `onsite ls {}` lists them",
                service.pid,
                dir.display()
            );
        }
        let state = if service.is_alive() { "is running" } else { "has exited" };
        format!(
            "no manifest *{suffix} appeared in {} within {WRITE_WITHIN:?}; pid {} {state}; see its log",
            dir.display(),
            service.pid
        )
    })
}

fn not_started(service: &Service, dir: &Path, signal: &str) -> String {
    if !service.is_alive() {
        return format!("pid {} ({}) exited after {signal}", service.pid, service.name);
    }
    format!(
        "pid {} ({}) caught {signal} but no capture started within {START_WITHIN:?} (no *-{}-{} in {}). \
         Is this its dump directory? Pass --dir if it is set in code. If a capture did start, it stops at \
         the service's maximum duration, or with `kill -{} {}`",
        service.pid,
        service.name,
        service.pid,
        status::MARKER_SUFFIX,
        dir.display(),
        signal.trim_start_matches("SIG"),
        service.pid
    )
}

fn output(
    service: &Service,
    dir: &Path,
    report: &CaptureReport,
    json: bool,
    style: Style,
    waited: bool,
    stopped_early: bool,
) -> String {
    if json {
        let value = json!({
            "pid": service.pid,
            "process": service.name,
            "dir": dir.display().to_string(),
            "waited_for_running_capture": waited,
            "stopped_early": stopped_early,
            "report": report.to_json(),
        });
        return format!("{value:#}\n");
    }
    report.render(style)
}

pub fn dump(args: &DumpArgs, json: bool, style: Style) -> Result<String, String> {
    let service = Service::find(&args.target)?;
    let pid = service.pid;
    let sig = service.signal_for(vars::DUMP_SIGNAL, DEFAULT_DUMP, args.signal.as_deref())?;
    service.require_catches(sig, "thread dumps")?;
    let dir = args.dir.clone().unwrap_or_else(|| service.dump_dir());
    let dumps = |dir: &Path| -> Vec<PathBuf> {
        let marker = format!("-{pid}-threads-");
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.contains(&marker) && n.ends_with(".txt"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = dumps(&dir);
    service.send(sig)?;
    note(&format!("sent {} to pid {pid} ({}): every thread's stack", status::signal_name(sig), service.name));
    let file = wait_for(DUMP_WITHIN, || !service.is_alive(), || dumps(&dir).into_iter().find(|p| !before.contains(p)))
        .ok_or_else(|| {
            format!(
                "pid {pid} ({}) caught {} but wrote no *-{pid}-threads-*.txt in {} within {DUMP_WITHIN:?}; \
                 pass --dir if its dump directory is set in code, and see its log",
                service.name,
                status::signal_name(sig),
                dir.display()
            )
        })?;
    let head = TextHead::read(&file, usize::MAX).map_err(|e| e.0)?;
    if json {
        return Ok(format!("{:#}\n", json!({ "pid": pid, "process": service.name, "dump": head.to_json() })));
    }
    Ok(head.render(style))
}
