//! shipped-service: a test subject for onsite in the builds people deploy (see README.md).

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use onsite::sync::{Condvar, Mutex};
use tracing_subscriber::prelude::*;

#[global_allocator]
static ALLOC: onsite::memory::Allocator = onsite::memory::Allocator::new();

/// The lock the `record_hit` callers fight over.
static STATS: Mutex<u64> = Mutex::new(0);
/// Work for the idle workers, and the condvar they wait on.
static JOBS: Mutex<VecDeque<u64>> = Mutex::new(VecDeque::new());
static JOB_READY: Condvar = Condvar::new();
/// What the service "remembers" of each request: never trimmed, the leak.
static REMEMBERED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
static CHECKSUMS: AtomicU64 = AtomicU64::new(0);

fn main() {
    tracing_subscriber::registry()
        .with(onsite::trace::layer())
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let onsite = match onsite::install() {
        Ok(onsite) => onsite,
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(2);
        }
    };
    for _ in 0..2 {
        std::thread::spawn(|| {
            loop {
                CHECKSUMS.fetch_add(checksum_records(black_box(20_000)), Ordering::Relaxed);
            }
        });
    }
    for _ in 0..3 {
        std::thread::spawn(|| {
            loop {
                record_hit();
            }
        });
    }
    for _ in 0..6 {
        std::thread::spawn(|| {
            loop {
                black_box(next_job());
            }
        });
    }
    std::thread::spawn(|| {
        let mut request = 0u64;
        loop {
            request += 1;
            handle_request(request);
            if request.is_multiple_of(64) {
                JOBS.lock().push_back(request);
                JOB_READY.notify_one();
            }
            if request.is_multiple_of(128) {
                spawn_session_watcher(request);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    say_ready();
    loop {
        std::thread::park();
        if CHECKSUMS.load(Ordering::Relaxed) == u64::MAX {
            break; // never: keeps `onsite` alive and used
        }
    }
    drop(onsite);
}

#[allow(clippy::print_stdout)] // the one line the test reads
fn say_ready() {
    println!("ready {}", std::process::id());
}

/// The CPU culprit.
#[inline(never)]
fn checksum_records(rounds: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for i in 0..rounds {
        h = (h ^ i).wrapping_mul(0x0100_0000_01b3).rotate_left(5);
    }
    h
}

/// The mutex culprit: holds the lock across slow work; the guard drops at the end.
#[inline(never)]
fn record_hit() {
    let mut hits = STATS.lock();
    slow_work();
    *hits += 1;
}

#[inline(never)]
fn slow_work() {
    let until = Instant::now() + Duration::from_micros(300);
    while Instant::now() < until {
        black_box(checksum_records(black_box(50)));
    }
}

/// The block culprit: idle workers waiting for a job.
#[inline(never)]
fn next_job() -> u64 {
    let mut jobs = JOBS.lock();
    loop {
        if let Some(job) = jobs.pop_front() {
            return job;
        }
        JOB_READY.wait(&mut jobs);
    }
}

#[tracing::instrument(level = "debug")]
fn handle_request(request: u64) {
    remember_request(&mut REMEMBERED.lock(), request);
}

/// The memory culprit: every request's payload is kept.
#[inline(never)]
fn remember_request(store: &mut Vec<Vec<u8>>, request: u64) {
    store.push(vec![request as u8; 2048]);
}

/// The threadcreate culprit: a watcher thread per "session", never ending.
#[inline(never)]
fn spawn_session_watcher(session: u64) {
    std::thread::Builder::new()
        .name(format!("watch-{session}"))
        .spawn(|| {
            loop {
                std::thread::park();
            }
        })
        .map(drop)
        .unwrap_or_else(|e| tracing::warn!("no watcher: {e}"));
}
