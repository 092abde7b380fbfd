//! `cargo xtask <task>`: the project's tasks, in Rust so they run wherever cargo does
//! (the rust-analyzer `xtask` convention).
//!
//! - `demo`: builds demo-mq in release, runs it under load, captures with two real
//!   `kill -USR2`, and prints what each profile names.
//! - `bench`: runs every benchmark of the workspace.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a terminal program: printing is its job

mod auto_demo;
mod demo;
mod http_demo;
mod service;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "onsite's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run demo-mq under load, capture with SIGUSR2, and show what each profile found.
    Demo(demo::DemoArgs),
    /// Run the workspace's benchmarks (`cargo bench --workspace`).
    Bench,
    /// Print the top of one or more pprof files (decoded in Rust, no Go needed; `onsite top`
    /// does the same).
    Top {
        /// Rows to show per file.
        #[arg(long, default_value_t = 10)]
        rows: usize,
        files: Vec<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Demo(args) => demo::run(&args),
        Task::Bench => cargo(&["bench", "--workspace"]),
        Task::Top { rows, files } => files.iter().try_for_each(|f| {
            let top = onsite::report::ProfileTop::read(f, None).map_err(|e| e.0)?;
            println!("  {}", f.display());
            print!("{}", top.render(rows, onsite::report::Style::default()));
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs cargo (the one that runs us) with `args` in the workspace root.
pub(crate) fn cargo(args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("`cargo {}` failed: {status}", args.join(" "))) }
}

pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace root").to_owned()
}
