//! `onsite`, the operator's command: capture a running service by pid and read the scene in
//! the terminal, no Go needed. Every command has `--json` for scripts; text fits 80 columns,
//! in colour only on a terminal that wants it.

mod capture;
mod service;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use onsite::report::{CaptureReport, Diff, Listing, ProfileTop, Style};

#[derive(Debug, Parser)]
#[command(
    name = "onsite",
    version,
    about = "Capture a running service's scene and read it: profiles, heap, locks, threads"
)]
struct Cli {
    /// Print JSON for scripts instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Capture a running service: its toggle signal, a countdown, the signal again, the report.
    /// Refuses a process that does not catch the signal (it would end it).
    Capture(capture::CaptureArgs),
    /// What a capture found: name its manifest, its dump directory (the newest capture), or
    /// its files.
    Report {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Only these kinds, e.g. cpu,memory.
        #[arg(long, value_delimiter = ',')]
        kinds: Option<Vec<String>>,
    },
    /// Compare two profiles of one kind: which functions grew most. With --base, the later
    /// profile minus the base, as `go tool pprof -base`.
    Diff {
        /// The earlier profile, subtracted from the later one (`go tool pprof -base`).
        #[arg(long)]
        base: Option<PathBuf>,
        /// BEFORE AFTER, or only AFTER with --base.
        #[arg(required = true, num_args = 1..=2)]
        files: Vec<PathBuf>,
        /// The sample type (default: the profile's own, e.g. inuse_space for a heap).
        #[arg(long)]
        sample_type: Option<String>,
        /// Rows to show.
        #[arg(long, default_value_t = 10)]
        rows: usize,
    },
    /// Write every thread's stack (the service's dump signal) and print it.
    Dump(capture::DumpArgs),
    /// The captures in a dump directory, newest first: when, why, kinds, size.
    Ls {
        /// The directory (default: $ONSITE_DIR, else the temp dir, as a service started here
        /// would use).
        dir: Option<PathBuf>,
    },
    /// The top functions of pprof files.
    Top {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Rows to show per file.
        #[arg(long, default_value_t = 10)]
        rows: usize,
        /// The sample type (default: the profile's own).
        #[arg(long)]
        sample_type: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let style = Style { colour: !cli.json && console::colors_enabled() };
    match run(&cli, style) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            // A closed pipe (`onsite ls | head`) is not an error worth a message.
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "onsite: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli, style: Style) -> Result<String, String> {
    let json = cli.json;
    match &cli.command {
        Command::Capture(args) => capture::capture(args, json, style),
        Command::Dump(args) => capture::dump(args, json, style),
        Command::Report { paths, kinds } => {
            let report = CaptureReport::for_paths(paths, kinds.as_deref()).map_err(|e| e.0)?;
            Ok(if json { format!("{:#}\n", report.to_json()) } else { report.render(style) })
        }
        Command::Diff { base, files, sample_type, rows } => {
            let (before, after) = match (base, files.as_slice()) {
                (Some(base), [after]) => (base, after),
                (None, [before, after]) => (before, after),
                (Some(_), _) => return Err("with --base BASE, name one profile: onsite diff --base BASE AFTER".into()),
                (None, _) => return Err("name two profiles: onsite diff BEFORE AFTER".into()),
            };
            let diff = Diff::read(before, after, sample_type.as_deref()).map_err(|e| e.0)?;
            Ok(match (json, base.is_some()) {
                (true, _) => format!("{:#}\n", diff.to_json(*rows)),
                (false, true) => diff.render_based(*rows, style),
                (false, false) => diff.render(*rows, style),
            })
        }
        Command::Ls { dir } => {
            let dir = dir.clone().unwrap_or_else(default_dir);
            let listing = Listing::read(&dir).map_err(|e| e.0)?;
            Ok(if json { format!("{:#}\n", listing.to_json()) } else { listing.render(style) })
        }
        Command::Top { files, rows, sample_type } => {
            let mut text = String::new();
            let mut values = Vec::new();
            for file in files {
                let top = ProfileTop::read(file, sample_type.as_deref()).map_err(|e| e.0)?;
                if json {
                    values.push(top.to_json(*rows));
                } else {
                    text.push_str(&top.render(*rows, style));
                }
            }
            Ok(if json { format!("{:#}\n", serde_json::Value::Array(values)) } else { text })
        }
    }
}

/// Where a service started from this shell would dump.
fn default_dir() -> PathBuf {
    std::env::var_os(onsite::vars::DIR).filter(|d| !d.is_empty()).map_or_else(std::env::temp_dir, PathBuf::from)
}
