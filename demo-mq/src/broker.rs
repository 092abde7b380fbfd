//! The broker: topics of queued messages, in-flight messages awaiting an ack, and a pool of
//! workers that verify payloads. Three problems are planted here on purpose, each one a scene
//! onsite must find:
//!
//! - **CPU**: [`checksum_payload`] is the hot path (every published message is checksummed
//!   many rounds over).
//! - **Memory leak**: [`record_ack`] copies every acked message into `acked_index`, which
//!   nothing ever prunes.
//! - **Lock bottleneck**: [`update_delivery_stats`] holds the stats lock across slow work, so
//!   every acking connection queues behind it.
//! - **Thread leak**: [`Broker::spawn_consumer_watchdog`] starts a thread per consumer connection that
//!   never exits.

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use onsite::sync::Mutex;

use crate::protocol::{Reply, Request, read_request, write_reply};

/// How many times each payload is checksummed: the CPU cost per message, tuned so a few
/// producers keep a core busy.
const CHECKSUM_ROUNDS: u32 = 192;

struct Message {
    id: u64,
    topic: String,
    payload: Vec<u8>,
    checksum: u64,
    published: Instant,
}

/// What the leak keeps: a full copy of every acked message, "for auditing".
struct AckRecord {
    #[allow(dead_code)]
    topic: String,
    #[allow(dead_code)]
    payload_copy: Vec<u8>,
    #[allow(dead_code)]
    acked_after: Duration,
}

#[derive(Default)]
struct DeliveryStats {
    acked: u64,
    total_latency: Duration,
    max_latency: Duration,
    checksum_fold: u64,
}

struct VerifyJob {
    payload: Vec<u8>,
    /// Gets the checksum and the payload back.
    done: mpsc::Sender<(u64, Vec<u8>)>,
}

pub struct Broker {
    topics: Mutex<HashMap<String, VecDeque<Message>>>,
    in_flight: Mutex<HashMap<u64, Message>>,
    acked_index: Mutex<HashMap<u64, AckRecord>>,
    stats: Mutex<DeliveryStats>,
    next_id: AtomicU64,
    /// One queue per verification worker, picked round-robin by message id.
    verify: Vec<mpsc::Sender<VerifyJob>>,
    /// Senders the leaked watchdog threads wait on; never dropped, so they never wake.
    watchdog_leases: Mutex<Vec<mpsc::Sender<()>>>,
}

impl Broker {
    /// A broker with `workers` verification threads.
    pub fn new(workers: usize) -> Arc<Broker> {
        let verify = (0..workers.max(1))
            .map(|n| {
                let (tx, rx) = mpsc::channel::<VerifyJob>();
                std::thread::Builder::new()
                    .name(format!("verify-{n}"))
                    .spawn(move || verify_worker(&rx))
                    .expect("spawn a verify worker");
                tx
            })
            .collect();
        Arc::new(Broker {
            topics: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            acked_index: Mutex::new(HashMap::new()),
            stats: Mutex::new(DeliveryStats::default()),
            next_id: AtomicU64::new(1),
            verify,
            watchdog_leases: Mutex::new(Vec::new()),
        })
    }

    /// Accepts connections forever, one thread per connection.
    pub fn serve(self: &Arc<Self>, listener: TcpListener) {
        for (conn_id, stream) in listener.incoming().enumerate() {
            match stream {
                Ok(stream) => {
                    let broker = Arc::clone(self);
                    let spawned = std::thread::Builder::new()
                        .name(format!("conn-{conn_id}"))
                        .spawn(move || broker.handle_connection(conn_id as u64, stream));
                    if let Err(e) = spawned {
                        tracing::error!(error = %e, "cannot spawn a connection thread");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            }
        }
    }

    fn handle_connection(self: Arc<Self>, conn_id: u64, stream: TcpStream) {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let span = tracing::info_span!("connection", conn_id, %peer);
        let _entered = span.enter();
        let _ = stream.set_nodelay(true);
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(e) => return tracing::warn!(error = %e, "cannot clone the stream"),
        });
        let mut writer = BufWriter::new(stream);
        let mut consumer_seen = false;
        loop {
            let request = match read_request(&mut reader) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    let _ = write_reply(&mut writer, &Reply::Error(e.to_string()));
                    break;
                }
            };
            if matches!(request, Request::Get { .. }) && !consumer_seen {
                consumer_seen = true;
                self.spawn_consumer_watchdog(conn_id);
            }
            let reply = self.handle(request);
            if write_reply(&mut writer, &reply).is_err() {
                break;
            }
        }
        tracing::debug!("connection closed");
    }

    fn handle(&self, request: Request) -> Reply {
        match request {
            Request::Publish { topic, payload } => self.publish(topic, payload),
            Request::Get { topic } => self.get(&topic),
            Request::Ack { id } => self.ack(id),
        }
    }

    fn publish(&self, topic: String, payload: Vec<u8>) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let _span = tracing::info_span!("message", id, topic = %topic, bytes = payload.len()).entered();
        let (done, result) = mpsc::channel();
        let job = VerifyJob { payload, done };
        if self.verify[id as usize % self.verify.len()].send(job).is_err() {
            return Reply::Error("verification workers are gone".into());
        }
        let Ok((checksum, payload)) = result.recv() else {
            return Reply::Error("verification failed".into());
        };
        let message = Message { id, topic: topic.clone(), payload, checksum, published: Instant::now() };
        self.topics.lock().entry(topic).or_default().push_back(message);
        tracing::trace!(id, checksum, "published");
        Reply::Ok(id)
    }

    fn get(&self, topic: &str) -> Reply {
        let message = self.topics.lock().get_mut(topic).and_then(VecDeque::pop_front);
        match message {
            Some(message) => {
                let _span = tracing::info_span!("message", id = message.id, topic = %topic).entered();
                let reply = Reply::Message { id: message.id, payload: message.payload.clone() };
                self.in_flight.lock().insert(message.id, message);
                reply
            }
            None => Reply::Empty,
        }
    }

    fn ack(&self, id: u64) -> Reply {
        let _span = tracing::info_span!("ack", id).entered();
        let Some(message) = self.in_flight.lock().remove(&id) else {
            return Reply::Error(format!("message {id} is not in flight"));
        };
        let latency = message.published.elapsed();
        let acked = update_delivery_stats(&self.stats, latency, message.checksum);
        if acked.is_multiple_of(10_000) {
            tracing::info!(acked, index_records = self.acked_records(), "delivery milestone");
        }
        record_ack(&self.acked_index, message, latency);
        Reply::Ok(id)
    }

    /// The planted thread leak: a "watchdog" per consumer connection that waits for a lease
    /// that is never released, so the thread lives for ever.
    #[inline(never)]
    fn spawn_consumer_watchdog(&self, conn_id: u64) {
        let (lease, expiry) = mpsc::channel::<()>();
        self.watchdog_leases.lock().push(lease);
        let spawned = std::thread::Builder::new().name(format!("watchdog-{conn_id}")).spawn(move || {
            // Never returns: the sender is kept in `watchdog_leases` for ever.
            while expiry.recv().is_ok() {}
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot spawn a consumer watchdog");
        }
    }

    /// How many acked messages the index holds (it only grows).
    pub fn acked_records(&self) -> usize {
        self.acked_index.lock().len()
    }
}

fn verify_worker(jobs: &mpsc::Receiver<VerifyJob>) {
    while let Ok(job) = jobs.recv() {
        let checksum = checksum_payload(&job.payload);
        let _ = job.done.send((checksum, job.payload));
    }
}

/// The CPU-heavy path: a multi-round 64-bit mixing checksum over the whole payload.
#[inline(never)]
pub fn checksum_payload(payload: &[u8]) -> u64 {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for round in 0..CHECKSUM_ROUNDS {
        for chunk in payload.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            state ^= u64::from_le_bytes(word).wrapping_add(u64::from(round));
            state = state.wrapping_mul(0x0100_0000_01b3).rotate_left(29);
        }
    }
    std::hint::black_box(state)
}

/// The planted memory leak: a full copy of every acked message, kept for ever.
#[inline(never)]
fn record_ack(index: &Mutex<HashMap<u64, AckRecord>>, message: Message, acked_after: Duration) {
    let payload_copy = message.payload.to_vec();
    index.lock().insert(message.id, AckRecord { topic: message.topic, payload_copy, acked_after });
}

/// The planted lock bottleneck: the stats lock is held while the slow part runs. Returns the
/// number of acks so far.
#[inline(never)]
fn update_delivery_stats(stats: &Mutex<DeliveryStats>, latency: Duration, checksum: u64) -> u64 {
    let mut stats = stats.lock();
    stats.acked += 1;
    stats.total_latency += latency;
    stats.max_latency = stats.max_latency.max(latency);
    // "Recompute the delivery report" while holding the lock: the slow work that belongs
    // outside the critical section.
    std::thread::sleep(Duration::from_micros(300));
    stats.checksum_fold ^= checksum_payload(&checksum.to_le_bytes());
    let acked = stats.acked;
    drop(stats);
    // Work after the unlock keeps this function's frame on the stack at the unlock (no tail
    // call into it), so the mutex profile can name it.
    std::hint::black_box(acked)
}
