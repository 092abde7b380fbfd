//! demo-mq: a small message queue run against onsite.
//!
//! `demo-mq serve` runs the broker (onsite installed: `kill -USR2 <pid>` toggles a capture);
//! `demo-mq load --addr …` drives it with producers and consumers.

mod broker;
mod load;
mod protocol;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::prelude::*;

/// onsite's allocator: one relaxed load on top of `System` until a memory capture runs.
#[cfg(not(feature = "jemalloc"))]
#[global_allocator]
static ALLOC: onsite::memory::Allocator = onsite::memory::Allocator::new();

/// With the `jemalloc` feature, the same over jemalloc.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: onsite::memory::Allocator<tikv_jemallocator::Jemalloc> =
    onsite::memory::Allocator::wrapping(tikv_jemallocator::Jemalloc);

#[derive(Parser)]
#[command(version, about = "A small message queue with planted problems, run against onsite")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker on loopback.
    Serve {
        /// Address to listen on (port 0 picks a free one; the chosen address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// Payload verification threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// Drive a running broker with producers and consumers.
    Load {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 2)]
        producers: usize,
        #[arg(long, default_value_t = 2)]
        consumers: usize,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 4096)]
        payload: usize,
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Consumers reconnect after this many acked messages.
        #[arg(long, default_value_t = 200)]
        reconnect_every: u64,
        /// Messages per second per producer.
        #[arg(long, default_value_t = 800)]
        rate: u32,
    },
}

fn main() {
    // onsite's trace layer sees every span (it costs a relaxed load while no capture runs);
    // the log output is filtered by RUST_LOG as usual.
    let log_filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::registry()
        .with(onsite::trace::layer())
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(log_filter),
        )
        .init();
    match Cli::parse().command {
        Cmd::Serve { addr, workers } => serve(addr, workers),
        Cmd::Load { addr, producers, consumers, payload, seconds, reconnect_every, rate } => {
            let plan = load::LoadPlan {
                addr,
                producers,
                consumers,
                payload_bytes: payload.max(8),
                duration: Duration::from_secs(seconds),
                reconnect_every: reconnect_every.max(1),
                rate_per_producer: rate.max(1),
            };
            let totals = load::run(&plan, &Arc::new(AtomicBool::new(false)));
            tracing::info!(
                published = totals.published.load(std::sync::atomic::Ordering::Relaxed),
                acked = totals.acked.load(std::sync::atomic::Ordering::Relaxed),
                errors = totals.errors.load(std::sync::atomic::Ordering::Relaxed),
                "load finished"
            );
        }
    }
}

#[allow(clippy::print_stdout)] // the one line a driver script reads: where to connect
fn serve(addr: SocketAddr, workers: usize) {
    let onsite = match onsite::install() {
        Ok(onsite) => onsite,
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen");
            std::process::exit(2);
        }
    };
    let local = listener.local_addr().expect("a bound listener has an address");
    println!("listening on {local} pid {}", std::process::id());
    tracing::info!(%local, dumps = %onsite.dump_dir().display(), "demo-mq serving");
    let broker = broker::Broker::new(workers);
    broker.serve(listener);
    drop(onsite);
}
