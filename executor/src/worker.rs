//! The worker's side of Kiln's worker protocol: one `Join` stream to the
//! server, leases run concurrently up to the slot count, and a server that
//! goes away is noticed (keepalive) and reconnected to with backoff while
//! running actions carry on; their results are delivered after reconnecting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kiln_proto::worker::workers_client::WorkersClient;
use kiln_proto::worker::{
    Done, Hello, Lease, Ping, Progress, Property, Stage, WorkerMessage, server_message,
    worker_message,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::cas::{CasClient, MAX_MESSAGE};
use crate::error::{Error, Result};
use crate::run::Executor;

/// How this worker introduces itself.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    pub worker_id: String,
    pub hostname: String,
    /// `OSFamily` once, `ISA` once per supported ISA, in canonical spelling.
    pub platform: Vec<(String, String)>,
    pub slots: u32,
    pub images: Vec<String>,
    pub network_allowed: bool,
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(5);

/// Messages that must reach the server even across a reconnect (results),
/// and the stream currently open, if any.
#[derive(Default)]
struct Outbox {
    stream: Option<mpsc::UnboundedSender<WorkerMessage>>,
    pending: Vec<WorkerMessage>,
}

impl Outbox {
    fn send_reliable(&mut self, msg: WorkerMessage) {
        match &self.stream {
            Some(tx) if tx.send(msg.clone()).is_ok() => {}
            _ => self.pending.push(msg),
        }
    }

    fn send_best_effort(&self, msg: WorkerMessage) {
        if let Some(tx) = &self.stream {
            let _ = tx.send(msg);
        }
    }
}

struct Shared {
    exec: Arc<Executor>,
    identity: WorkerIdentity,
    outbox: Mutex<Outbox>,
    running: Mutex<HashMap<String, CancellationToken>>,
}

/// Builds a channel to the server with keepalive, so a vanished server is
/// noticed even when no RPC is in flight.
pub fn endpoint(url: &str) -> Result<Endpoint> {
    let url = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    Ok(Endpoint::from_shared(url.clone())
        .map_err(|e| Error::Internal(format!("invalid server address {url:?}: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// A CAS client on a lazily connecting channel (it reconnects by itself).
pub fn cas_client(url: &str) -> Result<(Channel, CasClient)> {
    let channel = endpoint(url)?.connect_lazy();
    let cas = CasClient::new(channel.clone(), "");
    Ok((channel, cas))
}

/// Runs the worker until `shutdown` fires.
pub async fn run(
    exec: Arc<Executor>,
    identity: WorkerIdentity,
    channel: Channel,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared {
        exec,
        identity,
        outbox: Mutex::new(Outbox::default()),
        running: Mutex::new(HashMap::new()),
    });
    let mut backoff = BACKOFF_START;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = session(&shared, channel.clone()) => r,
            _ = shutdown.cancelled() => break,
        };
        shared.outbox.lock().expect("outbox").stream = None;
        match result {
            Ok(()) => tracing::warn!("server closed the worker stream; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "lost the server; reconnecting")
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = BACKOFF_START;
        }
        tokio::select! {
            _ = tokio::time::sleep(jitter(backoff)) => {}
            _ = shutdown.cancelled() => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    let running: Vec<CancellationToken> = shared
        .running
        .lock()
        .expect("running")
        .values()
        .cloned()
        .collect();
    for token in running {
        token.cancel();
    }
}

fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos() as u64;
    d + Duration::from_millis(nanos % (d.as_millis() as u64 / 4 + 1))
}

/// One connection: Hello, then leases until the stream ends.
async fn session(shared: &Arc<Shared>, channel: Channel) -> Result<()> {
    let (tx, rx) = mpsc::unbounded_channel::<WorkerMessage>();
    let id = &shared.identity;
    let hello = Hello {
        worker_id: id.worker_id.clone(),
        hostname: id.hostname.clone(),
        platform: id
            .platform
            .iter()
            .map(|(name, value)| Property {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        slots: id.slots,
        images: id.images.clone(),
        network_allowed: id.network_allowed,
        running: shared
            .running
            .lock()
            .expect("running")
            .keys()
            .cloned()
            .collect(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    tx.send(msg(worker_message::Kind::Hello(hello)))
        .map_err(|_| Error::Internal("worker stream closed".into()))?;
    let mut client = WorkersClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut inbound = client
        .join(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .map_err(|s| Error::remote("Workers.Join", s))?
        .into_inner();

    // Results that finished while disconnected go first.
    {
        let mut outbox = shared.outbox.lock().expect("outbox");
        for m in outbox.pending.drain(..) {
            let _ = tx.send(m);
        }
        outbox.stream = Some(tx.clone());
    }

    let mut keepalive = DEFAULT_KEEPALIVE;
    let mut ping_seq = 0u64;
    let mut ticker = tokio::time::interval(keepalive);
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            next = inbound.next() => {
                let Some(next) = next else { return Ok(()) };
                let m = next.map_err(|s| Error::remote("Workers.Join", s))?;
                last_heard = tokio::time::Instant::now();
                match m.kind {
                    Some(server_message::Kind::Welcome(w)) => {
                        if w.keepalive_interval_ms > 0 {
                            keepalive = Duration::from_millis(w.keepalive_interval_ms as u64);
                            ticker = tokio::time::interval(keepalive);
                        }
                        let running = shared.running.lock().expect("running");
                        for lease in &w.unknown_leases {
                            if let Some(t) = running.get(lease) {
                                tracing::warn!(lease, "server no longer knows this lease; stopping it");
                                t.cancel();
                            }
                        }
                        tracing::info!(server = %w.server_id, "joined the server");
                    }
                    Some(server_message::Kind::Lease(lease)) => start_lease(shared, lease),
                    Some(server_message::Kind::Cancel(c)) => {
                        if let Some(t) = shared.running.lock().expect("running").get(&c.lease_id) {
                            tracing::info!(lease = %c.lease_id, reason = %c.reason, "cancelling");
                            t.cancel();
                        }
                    }
                    Some(server_message::Kind::Ping(_)) | None => {}
                }
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > keepalive * 3 {
                    return Err(Error::Internal(format!(
                        "no word from the server for {:?}", last_heard.elapsed()
                    )));
                }
                ping_seq += 1;
                let _ = tx.send(msg(worker_message::Kind::Ping(Ping { seq: ping_seq })));
            }
        }
    }
}

fn start_lease(shared: &Arc<Shared>, lease: Lease) {
    let token = CancellationToken::new();
    {
        let mut running = shared.running.lock().expect("running");
        if running.contains_key(&lease.lease_id) {
            tracing::warn!(lease = %lease.lease_id, "lease offered twice; ignoring the repeat");
            return;
        }
        running.insert(lease.lease_id.clone(), token.clone());
    }
    let shared = Arc::clone(shared);
    // Every line logged while this lease runs names its operation and
    // action, so one grep follows an action through the worker.
    let action = kiln_proto::reapi::Digest::decode(lease.action_digest.as_slice())
        .map(|d| format!("{}/{}", d.hash, d.size_bytes))
        .unwrap_or_default();
    let span = tracing::info_span!("action", operation = %lease.lease_id, action = %action);
    let task = async move {
        let lease_id = lease.lease_id.clone();
        let progress_shared = Arc::clone(&shared);
        let progress_id = lease_id.clone();
        let progress = move |stage: Stage| {
            progress_shared
                .outbox
                .lock()
                .expect("outbox")
                .send_best_effort(msg(worker_message::Kind::Progress(Progress {
                    lease_id: progress_id.clone(),
                    stage: stage as i32,
                })));
        };
        let (outcome, timings) = shared.exec.execute(&lease, progress, token).await;
        let us = |d: std::time::Duration| d.as_micros() as u64;
        let wire_timings = kiln_proto::worker::Timings {
            fetch_us: us(timings.fetch),
            stage_us: us(timings.stage),
            sandbox_setup_us: us(timings.sandbox_setup),
            run_us: us(timings.run),
            upload_us: us(timings.upload),
        };
        tracing::info!(
            lease = %lease_id,
            code = outcome.status.code,
            exit_code = outcome.result.as_ref().map(|r| r.exit_code),
            fetch_ms = timings.fetch.as_millis() as u64,
            stage_ms = timings.stage.as_millis() as u64,
            setup_ms = timings.sandbox_setup.as_millis() as u64,
            run_ms = timings.run.as_millis() as u64,
            upload_ms = timings.upload.as_millis() as u64,
            "action finished"
        );
        let done = Done {
            lease_id: lease_id.clone(),
            status: outcome.status.encode_to_vec(),
            action_result: outcome
                .result
                .map(|r| r.encode_to_vec())
                .unwrap_or_default(),
            message: outcome.message,
            timings: Some(wire_timings),
        };
        shared.running.lock().expect("running").remove(&lease_id);
        shared
            .outbox
            .lock()
            .expect("outbox")
            .send_reliable(msg(worker_message::Kind::Done(done)));
    };
    tokio::spawn(tracing::Instrument::instrument(task, span));
}

fn msg(kind: worker_message::Kind) -> WorkerMessage {
    WorkerMessage { kind: Some(kind) }
}
