//! The load generator: producers publish, consumers get and ack, and consumers reconnect
//! every few hundred messages (which is what grows the planted thread leak).

use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::protocol::{Reply, Request, read_reply, write_request};

#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub addr: SocketAddr,
    pub producers: usize,
    pub consumers: usize,
    pub payload_bytes: usize,
    pub duration: Duration,
    pub reconnect_every: u64,
    pub rate_per_producer: u32,
}

#[derive(Debug, Default)]
pub struct LoadTotals {
    pub published: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
}

struct Connection {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl Connection {
    fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Connection { reader: BufReader::new(stream.try_clone()?), writer: BufWriter::new(stream) })
    }

    fn call(&mut self, request: &Request) -> std::io::Result<Reply> {
        write_request(&mut self.writer, request)?;
        read_reply(&mut self.reader)
    }
}

/// Runs the plan to its end (or until `stop` is set) and returns the totals.
pub fn run(plan: &LoadPlan, stop: &Arc<AtomicBool>) -> Arc<LoadTotals> {
    let totals = Arc::new(LoadTotals::default());
    let deadline = Instant::now() + plan.duration;
    let mut threads = Vec::new();
    for p in 0..plan.producers {
        let (plan, totals, stop) = (plan.clone(), Arc::clone(&totals), Arc::clone(stop));
        threads.push(std::thread::spawn(move || produce(p, &plan, deadline, &totals, &stop)));
    }
    for c in 0..plan.consumers {
        let (plan, totals, stop) = (plan.clone(), Arc::clone(&totals), Arc::clone(stop));
        threads.push(std::thread::spawn(move || consume(c, &plan, deadline, &totals, &stop)));
    }
    for t in threads {
        let _ = t.join();
    }
    totals
}

fn topic(n: usize) -> String {
    format!("orders-{}", n % 2)
}

fn produce(n: usize, plan: &LoadPlan, deadline: Instant, totals: &LoadTotals, stop: &AtomicBool) {
    let mut payload = vec![0u8; plan.payload_bytes];
    let mut seq: u64 = 0;
    let interval = Duration::from_secs(1) / plan.rate_per_producer;
    let mut next_send = Instant::now();
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = Connection::open(plan.addr) else {
            totals.errors.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            // Pace to the planned rate (catching up after a slow call, never bursting past it).
            let now = Instant::now();
            if next_send > now {
                std::thread::sleep(next_send - now);
            }
            next_send = next_send.max(now - interval * 10) + interval;
            seq += 1;
            payload[..8].copy_from_slice(&seq.to_le_bytes());
            match conn.call(&Request::Publish { topic: topic(n), payload: payload.clone() }) {
                Ok(Reply::Ok(_)) => {
                    totals.published.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

fn consume(n: usize, plan: &LoadPlan, deadline: Instant, totals: &LoadTotals, stop: &AtomicBool) {
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = Connection::open(plan.addr) else {
            totals.errors.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let mut on_this_connection = 0;
        while on_this_connection < plan.reconnect_every && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            match conn.call(&Request::Get { topic: topic(n) }) {
                Ok(Reply::Message { id, .. }) => match conn.call(&Request::Ack { id }) {
                    Ok(Reply::Ok(_)) => {
                        totals.acked.fetch_add(1, Ordering::Relaxed);
                        on_this_connection += 1;
                    }
                    _ => {
                        totals.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                },
                Ok(Reply::Empty) => std::thread::sleep(Duration::from_millis(2)),
                _ => {
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}
