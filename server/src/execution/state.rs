//! The execution state: operations, connected workers and the scheduler,
//! behind one lock. Every state change is published to the operation's
//! watchers (Execute and WaitExecution streams) and written to the journal.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use kiln_proto::longrunning::{Operation, operation};
use kiln_proto::protobuf::Any;
use kiln_proto::reapi::execution_stage::Value as ExecStage;
use kiln_proto::reapi::{ActionResult, ExecuteOperationMetadata, ExecuteResponse};
use kiln_proto::rpc;
use kiln_proto::worker::{
    Cancel, Done, Hello, Lease, Ping, Progress, Property, ServerMessage, Stage, Timings, Welcome,
    server_message,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::scheduler::{Assignment, Capabilities, MatchKey, Rank, Scheduler, platform};
use kiln_storage::ActionCache;

use super::ExecutionConfig;
use super::journal::{self, Journal, record};
use super::validate::CheckedAction;

const METADATA_TYPE: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata";
const RESPONSE_TYPE: &str = "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse";

pub type OpWatch = watch::Receiver<Arc<Operation>>;

/// Where an operation is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpState {
    Queued,
    Executing {
        worker: String,
    },
    /// Running when the server restarted: waiting for its worker to
    /// reconnect and claim it, until `deadline`.
    Unclaimed {
        deadline: Instant,
    },
    Completed,
}

/// Timings of an operation, for the status page and logs.
#[derive(Debug, Clone)]
pub struct OpTimes {
    pub queued: Instant,
    pub started: Option<Instant>,
    pub completed: Option<Instant>,
    /// When each worker stage began (fetch, stage, run, upload).
    pub stages: Vec<(Stage, Instant)>,
    /// The phase durations the worker reported with the result.
    pub reported: Option<Timings>,
}

/// Who asked for an operation, from the client's `RequestMetadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// `tool_name tool_version`, e.g. `bazel 7.4.0`.
    pub tool: String,
    /// The tool's invocation id (one build).
    pub invocation: String,
}

pub(crate) struct Op {
    pub name: String,
    pub instance: String,
    pub action_digest: Digest,
    action: Bytes,
    command: Bytes,
    properties: Vec<(String, String)>,
    pub key: MatchKey,
    rank: Rank,
    timeout_ms: u64,
    pub do_not_cache: bool,
    queued_at_unix_ns: i64,
    pub state: OpState,
    pub attempt: u32,
    tx: watch::Sender<Arc<Operation>>,
    pub times: OpTimes,
    pub outcome: String,
    pub client: ClientInfo,
}

struct WorkerConn {
    conn: u64,
    tx: mpsc::UnboundedSender<std::result::Result<ServerMessage, Status>>,
    pub hostname: String,
    pub caps: Capabilities,
    pub slots: u32,
    pub joined: Instant,
    last_heard: Instant,
}

/// A worker as the status page shows it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub id: String,
    pub hostname: String,
    pub caps: Capabilities,
    pub slots: u32,
    pub running: Vec<String>,
    pub connected_for: Duration,
}

/// An operation as the status page shows it.
#[derive(Debug, Clone)]
pub struct OpView {
    pub name: String,
    pub action_digest: String,
    pub platform: String,
    pub state: String,
    pub worker: Option<String>,
    pub attempt: u32,
    pub times: OpTimes,
    pub outcome: String,
    pub wait_reason: Option<String>,
    pub client: ClientInfo,
}

#[derive(Default)]
struct Inner {
    scheduler: Scheduler,
    ops: HashMap<String, Op>,
    /// (instance, action) → operation running it, to merge identical
    /// requests.
    inflight: HashMap<(String, Digest), String>,
    workers: HashMap<String, WorkerConn>,
    /// Capabilities of workers seen recently (also loaded from the journal
    /// of a previous run): their platforms stay "possible" for a while so a
    /// worker reconnecting does not turn its actions into errors.
    recent: Vec<(Capabilities, Instant)>,
    completed: VecDeque<(Instant, String)>,
    next_conn: u64,
}

/// The shared execution state.
pub struct ExecutionState {
    pub(crate) config: ExecutionConfig,
    ac: ActionCache,
    inner: Mutex<Inner>,
    journal: Journal,
    started: Instant,
    pub server_id: String,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub queued: usize,
    pub executing: usize,
    pub workers: usize,
    pub slots: usize,
}

impl ExecutionState {
    pub fn new(config: ExecutionConfig, ac: ActionCache, journal: Journal) -> Self {
        Self {
            config,
            ac,
            inner: Mutex::new(Inner::default()),
            journal,
            started: Instant::now(),
            server_id: uuid::Uuid::new_v4().to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds operations from a replayed journal: finished ones answer
    /// WaitExecution, queued ones queue again, running ones wait for their
    /// worker to claim them.
    pub fn restore(&self, records: Vec<journal::Record>) {
        let mut inner = self.lock();
        let mut started: HashMap<String, (String, u32)> = HashMap::new();
        let mut completed: HashMap<String, Operation> = HashMap::new();
        let mut queued: Vec<journal::QueuedRecord> = Vec::new();
        let mut deleted: HashSet<String> = HashSet::new();
        for r in records {
            match r.kind {
                Some(record::Kind::Queued(q)) => queued.push(q),
                Some(record::Kind::Started(s)) => {
                    started.insert(s.name, (s.worker, s.attempt));
                }
                Some(record::Kind::Completed(c)) => {
                    if let Ok(op) = Operation::decode(c.operation.as_slice()) {
                        completed.insert(c.name, op);
                    }
                }
                Some(record::Kind::Deleted(d)) => {
                    deleted.insert(d.name);
                }
                Some(record::Kind::Worker(w)) => {
                    let caps = Capabilities {
                        os_family: w.os_family,
                        isas: w.isas.into_iter().collect(),
                        images: w.images.into_iter().collect(),
                        network_allowed: w.network_allowed,
                    };
                    if !inner.recent.iter().any(|(c, _)| *c == caps) {
                        inner.recent.push((caps, Instant::now()));
                    }
                }
                None => {}
            }
        }
        let now = Instant::now();
        for q in queued {
            if deleted.contains(&q.name) {
                continue;
            }
            let Ok(action_digest) = kiln_proto::reapi::Digest::decode(q.action_digest.as_slice())
                .map_err(|_| ())
                .and_then(|d| Digest::from_proto(&d).map_err(|_| ()))
            else {
                continue;
            };
            let action = kiln_proto::reapi::Action::decode(q.action.as_slice()).unwrap_or_default();
            let command =
                kiln_proto::reapi::Command::decode(q.command.as_slice()).unwrap_or_default();
            let properties = super::validate::platform_properties(&action, &command);
            let key = platform::Requirements::parse(
                properties.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                true,
            )
            .map(|r| r.match_key())
            .unwrap_or_default();
            let rank = (q.priority, q.seq);
            let mut op = Op {
                name: q.name.clone(),
                instance: q.instance.clone(),
                action_digest,
                action: Bytes::from(q.action),
                command: Bytes::from(q.command),
                properties,
                key: key.clone(),
                rank,
                timeout_ms: q.timeout_ms,
                do_not_cache: q.do_not_cache,
                queued_at_unix_ns: q.queued_at_unix_ns,
                state: OpState::Queued,
                attempt: 0,
                tx: watch::channel(Arc::new(Operation::default())).0,
                times: OpTimes {
                    queued: now,
                    started: None,
                    completed: None,
                    stages: Vec::new(),
                    reported: None,
                },
                outcome: String::new(),
                client: ClientInfo::default(),
            };
            if let Some(done) = completed.remove(&q.name) {
                op.state = OpState::Completed;
                op.times.completed = Some(now);
                op.outcome = "completed before the server restarted".into();
                op.tx.send_replace(Arc::new(done));
                inner.completed.push_back((now, op.name.clone()));
            } else if let Some((_, attempt)) = started.get(&q.name) {
                op.attempt = *attempt;
                op.state = OpState::Unclaimed {
                    deadline: now + self.config.reattach_grace(),
                };
                op.publish(ExecStage::Executing, None);
                inner
                    .inflight
                    .insert((op.instance.clone(), op.action_digest), op.name.clone());
            } else {
                op.publish(ExecStage::Queued, None);
                inner
                    .inflight
                    .insert((op.instance.clone(), op.action_digest), op.name.clone());
                inner.scheduler.enqueue(&op.name, key, rank);
                // Never an assignment: no worker is connected yet.
            }
            inner.ops.insert(op.name.clone(), op);
        }
        // Completed operations whose queued record was compacted away.
        for (name, done) in completed {
            if deleted.contains(&name) || inner.ops.contains_key(&name) {
                continue;
            }
            let (tx, _) = watch::channel(Arc::new(done));
            let digest = Digest::EMPTY;
            inner.ops.insert(
                name.clone(),
                Op {
                    name: name.clone(),
                    instance: String::new(),
                    action_digest: digest,
                    action: Bytes::new(),
                    command: Bytes::new(),
                    properties: Vec::new(),
                    key: MatchKey::default(),
                    rank: (0, 0),
                    timeout_ms: 0,
                    do_not_cache: false,
                    queued_at_unix_ns: 0,
                    state: OpState::Completed,
                    attempt: 0,
                    tx,
                    times: OpTimes {
                        queued: now,
                        started: None,
                        completed: Some(now),
                        stages: Vec::new(),
                        reported: None,
                    },
                    outcome: "completed before the server restarted".into(),
                    client: ClientInfo::default(),
                },
            );
            inner.completed.push_back((now, name));
        }
        let n = inner.ops.len();
        if n > 0 {
            tracing::info!(operations = n, "restored operations from the journal");
        }
    }

    /// Which journal records are still worth keeping at start-up.
    pub fn compact(records: Vec<journal::Record>, retention: Duration) -> Vec<journal::Record> {
        let now_ns = unix_ns();
        let mut completed: HashMap<String, i64> = HashMap::new();
        let mut deleted: HashSet<String> = HashSet::new();
        let mut workers_seen = HashSet::new();
        for r in &records {
            match &r.kind {
                Some(record::Kind::Completed(c)) => {
                    completed.insert(c.name.clone(), c.completed_at_unix_ns);
                }
                Some(record::Kind::Deleted(d)) => {
                    deleted.insert(d.name.clone());
                }
                _ => {}
            }
        }
        let expired = |name: &str| {
            deleted.contains(name)
                || completed
                    .get(name)
                    .is_some_and(|at| now_ns - at > retention.as_nanos() as i64)
        };
        records
            .into_iter()
            .filter(|r| match &r.kind {
                Some(record::Kind::Queued(q)) => {
                    !expired(&q.name) && !completed.contains_key(&q.name)
                }
                Some(record::Kind::Started(s)) => {
                    !expired(&s.name) && !completed.contains_key(&s.name)
                }
                Some(record::Kind::Completed(c)) => !expired(&c.name),
                // One record per distinct worker platform.
                Some(record::Kind::Worker(w)) => workers_seen.insert(w.encode_to_vec()),
                _ => false,
            })
            .collect()
    }

    /// Whether some worker could run actions with this key now or soon.
    fn possible(&self, inner: &Inner, key: &MatchKey) -> bool {
        if inner.scheduler.can_run(key) {
            return true;
        }
        let grace = self.config.worker_loss_grace();
        if inner
            .recent
            .iter()
            .any(|(caps, seen)| seen.elapsed() < grace && caps.can_run(key))
        {
            return true;
        }
        // Right after start, before any worker has (re)connected.
        inner.workers.is_empty()
            && inner.recent.is_empty()
            && self.started.elapsed() < self.config.startup_grace()
    }

    fn no_worker_message(&self, inner: &Inner, key: &MatchKey) -> String {
        let platforms = inner.scheduler.platforms();
        let offered = if platforms.is_empty() {
            "no worker is connected".to_string()
        } else {
            platforms
                .iter()
                .map(|p| {
                    format!(
                        "[{}] ({} worker(s), {} slot(s))",
                        p.caps, p.workers, p.slots
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        format!(
            "no worker can run this action: it asks for {key}; the workers connected offer: {offered}"
        )
    }

    /// Answers from the action cache when it can; otherwise queues the
    /// action (or joins an identical one already running).
    pub async fn submit(
        &self,
        checked: CheckedAction,
        skip_cache_lookup: bool,
        priority: i32,
        client: ClientInfo,
    ) -> Result<(String, OpWatch)> {
        let do_not_cache = checked.action.do_not_cache;
        if !skip_cache_lookup && !do_not_cache {
            let found = self
                .ac
                .get(&checked.instance, &checked.action_digest)
                .await?;
            crate::metrics::global().cache_lookup("execute", found.is_some());
            if let Some(result) = found {
                return Ok(self.cached(&checked, result, client));
            }
        }
        let key = checked.requirements.match_key();
        let mut inner = self.lock();
        if !do_not_cache
            && let Some(name) = inner
                .inflight
                .get(&(checked.instance.clone(), checked.action_digest))
                .cloned()
            && let Some(op) = inner.ops.get(&name)
            && op.state != OpState::Completed
        {
            tracing::debug!(operation = %name, action = %checked.action_digest, "joined an identical running action");
            return Ok((name, op.tx.subscribe()));
        }
        if !self.possible(&inner, &key) {
            let message = self.no_worker_message(&inner, &key);
            return Err(Error::FailedPrecondition(message));
        }
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let rank = inner.scheduler.next_rank(priority);
        let queued_at_unix_ns = unix_ns();
        let timeout_ms = checked.timeout.map_or(0, |t| t.as_millis() as u64);
        let mut op = Op {
            name: name.clone(),
            instance: checked.instance.clone(),
            action_digest: checked.action_digest,
            action: checked.action_bytes.clone(),
            command: checked.command_bytes.clone(),
            properties: checked.properties.clone(),
            key: key.clone(),
            rank,
            timeout_ms,
            do_not_cache,
            queued_at_unix_ns,
            state: OpState::Queued,
            attempt: 0,
            tx: watch::channel(Arc::new(Operation::default())).0,
            times: OpTimes {
                queued: Instant::now(),
                started: None,
                completed: None,
                stages: Vec::new(),
                reported: None,
            },
            outcome: String::new(),
            client,
        };
        op.publish(ExecStage::Queued, None);
        let rx = op.tx.subscribe();
        self.journal
            .append(record::Kind::Queued(journal::QueuedRecord {
                name: name.clone(),
                instance: op.instance.clone(),
                action_digest: op.action_digest.to_proto().encode_to_vec(),
                action: op.action.to_vec(),
                command: op.command.to_vec(),
                priority: rank.0,
                seq: rank.1,
                queued_at_unix_ns,
                timeout_ms,
                do_not_cache,
            }));
        if !do_not_cache {
            inner
                .inflight
                .insert((op.instance.clone(), op.action_digest), name.clone());
        }
        // Logged before the scheduler may hand it to an idle worker at
        // once, so "queued" always precedes "dispatched".
        tracing::info!(operation = %name, action = %checked.action_digest, platform = %op.key, tool = %op.client.tool, invocation = %op.client.invocation, "queued");
        inner.ops.insert(name.clone(), op);
        if let Some(a) = inner.scheduler.enqueue(&name, key, rank) {
            self.dispatch(&mut inner, a);
        }
        Ok((name, rx))
    }

    /// A completed operation for an action-cache hit.
    fn cached(
        &self,
        checked: &CheckedAction,
        result: ActionResult,
        client: ClientInfo,
    ) -> (String, OpWatch) {
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let response = ExecuteResponse {
            result: Some(result),
            cached_result: true,
            status: Some(rpc::Status::default()),
            server_logs: Default::default(),
            message: String::new(),
        };
        let operation = build_operation(
            &name,
            &checked.action_digest,
            ExecStage::Completed,
            Some(response),
        );
        let (tx, rx) = watch::channel(Arc::new(operation));
        let now = Instant::now();
        let op = Op {
            name: name.clone(),
            instance: checked.instance.clone(),
            action_digest: checked.action_digest,
            action: Bytes::new(),
            command: Bytes::new(),
            properties: Vec::new(),
            key: checked.requirements.match_key(),
            rank: (0, 0),
            timeout_ms: 0,
            do_not_cache: false,
            queued_at_unix_ns: unix_ns(),
            state: OpState::Completed,
            attempt: 0,
            tx,
            times: OpTimes {
                queued: now,
                started: None,
                completed: Some(now),
                stages: Vec::new(),
                reported: None,
            },
            outcome: "action cache hit".into(),
            client,
        };
        crate::metrics::global()
            .actions
            .with_label_values(&["cache_hit"])
            .inc();
        tracing::info!(operation = %name, action = %checked.action_digest, tool = %op.client.tool, invocation = %op.client.invocation, "answered from the action cache");
        let mut inner = self.lock();
        inner.ops.insert(name.clone(), op);
        inner.completed.push_back((now, name.clone()));
        (name, rx)
    }

    /// Sends a lease to its worker.
    fn dispatch(&self, inner: &mut Inner, a: Assignment) {
        let Some(op) = inner.ops.get_mut(&a.op) else {
            return;
        };
        op.attempt += 1;
        op.state = OpState::Executing {
            worker: a.worker.clone(),
        };
        let now = Instant::now();
        crate::metrics::global().phase("queued", now - op.times.queued);
        op.times.started = Some(now);
        op.publish(ExecStage::Executing, None);
        let lease = Lease {
            lease_id: op.name.clone(),
            instance_name: op.instance.clone(),
            action_digest: op.action_digest.to_proto().encode_to_vec(),
            action: op.action.to_vec(),
            command: op.command.to_vec(),
            digest_function: 0,
            attempt: op.attempt,
            timeout_ms: op.timeout_ms,
            platform: op
                .properties
                .iter()
                .map(|(name, value)| Property {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            queued_at_unix_ns: op.queued_at_unix_ns,
        };
        // On disk before the lease goes out: if running it takes the whole
        // service down, the restart counts this attempt (see `tick`).
        self.journal
            .append_durable(record::Kind::Started(journal::StartedRecord {
                name: op.name.clone(),
                worker: a.worker.clone(),
                attempt: op.attempt,
            }));
        tracing::info!(operation = %op.name, action = %op.action_digest, worker = %a.worker, attempt = op.attempt, tool = %op.client.tool, invocation = %op.client.invocation, "dispatched");
        let sent = inner.workers.get(&a.worker).is_some_and(|w| {
            w.tx.send(Ok(server_msg(server_message::Kind::Lease(lease))))
                .is_ok()
        });
        if !sent {
            // The worker's stream is gone; its removal re-queues the lease.
            tracing::debug!(worker = %a.worker, "lease not delivered: worker stream closed");
        }
    }

    pub fn subscribe(&self, name: &str) -> Option<OpWatch> {
        self.lock().ops.get(name).map(|op| op.tx.subscribe())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Operation>> {
        self.lock().ops.get(name).map(|op| op.tx.borrow().clone())
    }

    /// Operations, newest first.
    pub fn list(&self) -> Vec<Arc<Operation>> {
        let inner = self.lock();
        let mut ops: Vec<&Op> = inner.ops.values().collect();
        ops.sort_by(|a, b| {
            b.times
                .queued
                .cmp(&a.times.queued)
                .then(a.name.cmp(&b.name))
        });
        ops.into_iter().map(|op| op.tx.borrow().clone()).collect()
    }

    /// Cancels an operation: a queued one never runs, a running one is
    /// killed on its worker. The operation completes with CANCELLED.
    pub fn cancel(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        let Some(op) = inner.ops.get(name) else {
            return Err(Error::NotFound(format!("operation {name} not found")));
        };
        match op.state.clone() {
            OpState::Completed => return Ok(()),
            OpState::Queued => {
                inner.scheduler.dequeue(name);
            }
            // The worker's slot stays taken until it reports the kill.
            OpState::Executing { worker } => {
                if let Some(w) = inner.workers.get(&worker) {
                    let _ =
                        w.tx.send(Ok(server_msg(server_message::Kind::Cancel(Cancel {
                            lease_id: name.to_string(),
                            reason: "CancelOperation".into(),
                        }))));
                }
            }
            OpState::Unclaimed { .. } => {}
        }
        let status = rpc::Status {
            code: Code::Cancelled as i32,
            message: format!("operation {name} was cancelled"),
            details: Vec::new(),
        };
        self.finish(&mut inner, name, Finish::Error(status), "cancelled");
        if let Some(op) = inner.ops.get(name) {
            tracing::info!(operation = %name, action = %op.action_digest, "cancelled");
        }
        Ok(())
    }

    /// Forgets a finished operation (a running one is cancelled first).
    pub fn delete(&self, name: &str) -> Result<()> {
        let done = {
            let inner = self.lock();
            match inner.ops.get(name) {
                None => return Err(Error::NotFound(format!("operation {name} not found"))),
                Some(op) => op.state == OpState::Completed,
            }
        };
        if !done {
            self.cancel(name)?;
        }
        let mut inner = self.lock();
        inner.ops.remove(name);
        self.journal
            .append(record::Kind::Deleted(journal::DeletedRecord {
                name: name.to_string(),
            }));
        Ok(())
    }

    /// A worker opened its stream.
    pub fn worker_joined(
        &self,
        hello: &Hello,
        tx: mpsc::UnboundedSender<std::result::Result<ServerMessage, Status>>,
    ) -> Result<u64> {
        if hello.worker_id.is_empty() {
            return Err(Error::InvalidArgument("Hello.worker_id is empty".into()));
        }
        if hello.slots == 0 {
            return Err(Error::InvalidArgument("Hello.slots is 0".into()));
        }
        let caps = capabilities(hello);
        let mut inner = self.lock();
        inner.next_conn += 1;
        let conn = inner.next_conn;
        // A reconnect of a worker whose old stream is not cleaned up yet.
        if inner.workers.contains_key(&hello.worker_id) {
            let lost = inner.scheduler.remove_worker(&hello.worker_id);
            let keep: HashSet<&String> = hello.running.iter().collect();
            for op in lost.into_iter().filter(|op| !keep.contains(op)) {
                self.requeue_or_fail(&mut inner, &op, &hello.worker_id);
            }
        }
        // Leases the worker still runs: claim them back where possible.
        let mut running = Vec::new();
        let mut unknown = Vec::new();
        for lease in &hello.running {
            let claimable = inner.ops.get(lease).map(|op| op.state.clone());
            match claimable {
                Some(OpState::Queued) => {
                    inner.scheduler.dequeue(lease);
                    running.push(lease.clone());
                }
                Some(OpState::Unclaimed { .. }) => running.push(lease.clone()),
                Some(OpState::Executing { worker }) if worker == hello.worker_id => {
                    running.push(lease.clone())
                }
                _ => unknown.push(lease.clone()),
            }
        }
        for lease in &running {
            if let Some(op) = inner.ops.get_mut(lease) {
                op.state = OpState::Executing {
                    worker: hello.worker_id.clone(),
                };
                op.times.started.get_or_insert_with(Instant::now);
                op.publish(ExecStage::Executing, None);
            }
        }
        let welcome = Welcome {
            server_id: self.server_id.clone(),
            keepalive_interval_ms: self.config.keepalive().as_millis() as u32,
            unknown_leases: unknown,
        };
        let _ = tx.send(Ok(server_msg(server_message::Kind::Welcome(welcome))));
        inner.workers.insert(
            hello.worker_id.clone(),
            WorkerConn {
                conn,
                tx,
                hostname: hello.hostname.clone(),
                caps: caps.clone(),
                slots: hello.slots,
                joined: Instant::now(),
                last_heard: Instant::now(),
            },
        );
        let known = inner.recent.iter().any(|(c, _)| *c == caps);
        inner.recent.retain(|(c, _)| *c != caps);
        inner.recent.push((caps.clone(), Instant::now()));
        if !known {
            self.journal
                .append(record::Kind::Worker(journal::WorkerRecord {
                    os_family: caps.os_family.clone(),
                    isas: caps.isas.iter().cloned().collect(),
                    images: caps.images.iter().cloned().collect(),
                    network_allowed: caps.network_allowed,
                }));
        }
        tracing::info!(worker = %hello.worker_id, host = %hello.hostname, platform = %caps, slots = hello.slots, reattached = running.len(), "worker joined");
        let assignments =
            inner
                .scheduler
                .add_worker(&hello.worker_id, caps, hello.slots as usize, running);
        for a in assignments {
            self.dispatch(&mut inner, a);
        }
        Ok(conn)
    }

    /// A worker's stream ended (or went silent): re-queue what it ran.
    pub fn worker_left(&self, worker: &str, conn: u64, why: &str) {
        let mut inner = self.lock();
        if inner.workers.get(worker).is_none_or(|w| w.conn != conn) {
            return;
        }
        let w = inner.workers.remove(worker).expect("checked above");
        if let Some(r) = inner.recent.iter_mut().find(|(c, _)| *c == w.caps) {
            r.1 = Instant::now();
        }
        let lost = inner.scheduler.remove_worker(worker);
        tracing::warn!(worker, reason = why, leases = lost.len(), "worker left");
        for op in lost {
            self.requeue_or_fail(&mut inner, &op, worker);
        }
    }

    fn requeue_or_fail(&self, inner: &mut Inner, name: &str, worker: &str) {
        let Some(op) = inner.ops.get_mut(name) else {
            return;
        };
        if op.state
            != (OpState::Executing {
                worker: worker.to_string(),
            })
        {
            return;
        }
        if op.attempt >= self.config.max_attempts {
            let status = rpc::Status {
                code: Code::Unavailable as i32,
                message: format!(
                    "operation {name} lost its worker {} time(s) (last: {worker}); giving up",
                    op.attempt
                ),
                details: Vec::new(),
            };
            self.finish(
                inner,
                name,
                Finish::Response(status, None),
                "failed: workers lost",
            );
            return;
        }
        op.state = OpState::Queued;
        op.times.started = None;
        op.times.stages.clear();
        op.publish(ExecStage::Queued, None);
        let (key, rank) = (op.key.clone(), op.rank);
        tracing::warn!(operation = %name, action = %op.action_digest, worker, "re-queued after its worker was lost");
        if let Some(a) = inner.scheduler.enqueue(name, key, rank) {
            self.dispatch(inner, a);
        }
    }

    pub fn worker_heard(&self, worker: &str) {
        if let Some(w) = self.lock().workers.get_mut(worker) {
            w.last_heard = Instant::now();
        }
    }

    pub fn worker_progress(&self, worker: &str, p: &Progress) {
        let mut inner = self.lock();
        if let Some(op) = inner.ops.get_mut(&p.lease_id)
            && op.state
                == (OpState::Executing {
                    worker: worker.to_string(),
                })
        {
            let stage = Stage::try_from(p.stage).unwrap_or(Stage::Unspecified);
            op.times.stages.push((stage, Instant::now()));
        }
    }

    /// A worker finished a lease: write the action cache, complete the
    /// operation, and give the slot to the next action.
    pub async fn worker_done(&self, worker: &str, done: Done) {
        let status = rpc::Status::decode(done.status.as_slice()).unwrap_or_else(|e| rpc::Status {
            code: Code::Internal as i32,
            message: format!("worker {worker} sent an undecodable status: {e}"),
            details: Vec::new(),
        });
        let result = if done.action_result.is_empty() {
            None
        } else {
            ActionResult::decode(done.action_result.as_slice()).ok()
        };
        // Who is this result for, and should it be cached?
        let cache_key = {
            let inner = self.lock();
            match inner.ops.get(&done.lease_id) {
                Some(op) if op.state != OpState::Completed => {
                    Some((op.instance.clone(), op.action_digest, op.do_not_cache))
                }
                _ => None,
            }
        };
        let mut cached = false;
        if let (Some((instance, action, do_not_cache)), Some(r)) = (&cache_key, &result)
            && status.code == 0
            && r.exit_code == 0
            && !do_not_cache
        {
            match self.ac.put(instance, action, r).await {
                Ok(c) => cached = c,
                Err(e) => {
                    tracing::warn!(operation = %done.lease_id, action = %action, error = %e, "could not write the action cache")
                }
            }
        }
        let mut inner = self.lock();
        let assignments = inner.scheduler.release(worker, &done.lease_id);
        let state = inner.ops.get(&done.lease_id).map(|op| op.state.clone());
        match state {
            None | Some(OpState::Completed) => {}
            Some(state) => {
                match state {
                    // Another worker runs a newer attempt: stop it.
                    OpState::Executing { worker: other } if other != worker => {
                        if let Some(w) = inner.workers.get(&other) {
                            let _ =
                                w.tx.send(Ok(server_msg(server_message::Kind::Cancel(Cancel {
                                    lease_id: done.lease_id.clone(),
                                    reason: format!("finished on worker {worker}"),
                                }))));
                        }
                    }
                    OpState::Queued => {
                        inner.scheduler.dequeue(&done.lease_id);
                    }
                    _ => {}
                }
                let outcome = match (&result, status.code) {
                    (Some(r), 0) => format!(
                        "exit code {}{}",
                        r.exit_code,
                        if cached { ", cached" } else { "" }
                    ),
                    (_, code) => format!("{:?}: {}", Code::from(code), status.message),
                };
                if let Some(t) = &done.timings
                    && let Some(op) = inner.ops.get_mut(&done.lease_id)
                {
                    let m = crate::metrics::global();
                    let us = Duration::from_micros;
                    m.phase("fetch", us(t.fetch_us));
                    m.phase("stage", us(t.stage_us));
                    m.phase("sandbox_setup", us(t.sandbox_setup_us));
                    m.phase("run", us(t.run_us));
                    m.phase("upload", us(t.upload_us));
                    op.times.reported = Some(*t);
                }
                let mut message = done.message.clone();
                if message.is_empty() && status.code != 0 {
                    message = status.message.clone();
                }
                self.finish(
                    &mut inner,
                    &done.lease_id,
                    Finish::Response(status, result.map(|r| Box::new((r, message)))),
                    &outcome,
                );
            }
        }
        for a in assignments {
            self.dispatch(&mut inner, a);
        }
    }

    fn finish(&self, inner: &mut Inner, name: &str, how: Finish, outcome: &str) {
        let Some(op) = inner.ops.get_mut(name) else {
            return;
        };
        op.state = OpState::Completed;
        op.times.completed = Some(Instant::now());
        op.outcome = outcome.to_string();
        let class = match &how {
            Finish::Error(s) if s.code == Code::Cancelled as i32 => "cancelled",
            Finish::Error(_) => "error",
            Finish::Response(s, _) if s.code == Code::DeadlineExceeded as i32 => "timeout",
            Finish::Response(s, Some(r)) if s.code == 0 && r.0.exit_code == 0 => "success",
            Finish::Response(s, Some(_)) if s.code == 0 => "exit_nonzero",
            Finish::Response(..) => "error",
        };
        crate::metrics::global()
            .actions
            .with_label_values(&[class])
            .inc();
        let operation = match how {
            Finish::Error(status) => {
                let mut o =
                    build_operation(&op.name, &op.action_digest, ExecStage::Completed, None);
                o.done = true;
                o.result = Some(operation::Result::Error(status));
                o
            }
            Finish::Response(status, result) => {
                let (result, message) = match result.map(|b| *b) {
                    Some((r, m)) => (Some(r), m),
                    None => (None, status.message.clone()),
                };
                let response = ExecuteResponse {
                    result,
                    cached_result: false,
                    status: Some(status),
                    server_logs: Default::default(),
                    message,
                };
                build_operation(
                    &op.name,
                    &op.action_digest,
                    ExecStage::Completed,
                    Some(response),
                )
            }
        };
        self.journal
            .append(record::Kind::Completed(journal::CompletedRecord {
                name: op.name.clone(),
                operation: operation.encode_to_vec(),
                completed_at_unix_ns: unix_ns(),
            }));
        op.tx.send_replace(Arc::new(operation));
        let key = (op.instance.clone(), op.action_digest);
        tracing::info!(operation = %name, action = %op.action_digest, outcome, tool = %op.client.tool, invocation = %op.client.invocation, "completed");
        if inner.inflight.get(&key).is_some_and(|n| n == name) {
            inner.inflight.remove(&key);
        }
        inner
            .completed
            .push_back((Instant::now(), name.to_string()));
    }

    /// Periodic housekeeping: fail actions no worker can run any more,
    /// re-queue unclaimed ones, ping workers, drop silent ones, forget old
    /// completed operations.
    pub fn tick(&self) {
        let mut inner = self.lock();
        // Orphaned queues.
        for (key, ops) in inner.scheduler.orphaned() {
            if self.possible(&inner, &key) {
                continue;
            }
            let message = self.no_worker_message(&inner, &key);
            for name in ops {
                inner.scheduler.dequeue(&name);
                let status = rpc::Status {
                    code: Code::FailedPrecondition as i32,
                    message: message.clone(),
                    details: Vec::new(),
                };
                self.finish(
                    &mut inner,
                    &name,
                    Finish::Response(status, None),
                    "failed: no worker",
                );
            }
        }
        // Running at the last restart and never claimed.
        let now = Instant::now();
        let unclaimed: Vec<String> = inner
            .ops
            .values()
            .filter(|op| matches!(op.state, OpState::Unclaimed { deadline } if deadline <= now))
            .map(|op| op.name.clone())
            .collect();
        for name in unclaimed {
            let attempts = inner.ops.get(&name).map_or(0, |op| op.attempt);
            if attempts >= self.config.max_attempts {
                // It was running when the service went down, as many times
                // as it may run: perhaps it is what takes the service down.
                // Not run again, so nothing can keep the service in a
                // crash loop; INTERNAL, for a client must not just retry it.
                let status = rpc::Status {
                    code: Code::Internal as i32,
                    message: format!(
                        "operation {name} was running when the server stopped, on each of its                          {attempts} attempts (execution.max_attempts = {}); it is not run again",
                        self.config.max_attempts
                    ),
                    details: Vec::new(),
                };
                tracing::error!(operation = %name, attempts, "attempts used up across restarts; the operation is not run again");
                self.finish(
                    &mut inner,
                    &name,
                    Finish::Response(status, None),
                    "failed: attempts used up across restarts",
                );
                continue;
            }
            if let Some(op) = inner.ops.get_mut(&name) {
                tracing::warn!(operation = %name, action = %op.action_digest, "no worker claimed this running operation after the restart; queueing it again");
                op.state = OpState::Queued;
                op.publish(ExecStage::Queued, None);
                let (key, rank) = (op.key.clone(), op.rank);
                if let Some(a) = inner.scheduler.enqueue(&name, key, rank) {
                    self.dispatch(&mut inner, a);
                }
            }
        }
        // Keepalive.
        let silent_after = self.config.keepalive() * 3;
        let mut silent = Vec::new();
        for (id, w) in &inner.workers {
            if w.last_heard.elapsed() > silent_after {
                silent.push((id.clone(), w.conn));
            } else {
                let _ =
                    w.tx.send(Ok(server_msg(server_message::Kind::Ping(Ping { seq: 0 }))));
            }
        }
        // Retention.
        let retention = self.config.completed_retention();
        while let Some((at, _)) = inner.completed.front() {
            if at.elapsed() < retention && inner.completed.len() <= self.config.completed_max {
                break;
            }
            let (_, name) = inner.completed.pop_front().expect("front exists");
            if inner
                .ops
                .get(&name)
                .is_some_and(|op| op.state == OpState::Completed)
            {
                inner.ops.remove(&name);
            }
        }
        drop(inner);
        for (id, conn) in silent {
            if let Some(w) = self.lock().workers.get(&id)
                && w.conn == conn
            {
                let _ =
                    w.tx.send(Err(Status::unavailable("no keepalive from the worker")));
            }
            self.worker_left(&id, conn, "no keepalive");
        }
    }

    /// Ends every worker stream (server shutdown): workers reconnect to
    /// the next server; their running actions carry on meanwhile.
    pub fn close_workers(&self) {
        let inner = self.lock();
        for w in inner.workers.values() {
            let _ =
                w.tx.send(Err(Status::unavailable("the server is shutting down")));
        }
    }

    pub fn totals(&self) -> Totals {
        let inner = self.lock();
        let executing = inner
            .ops
            .values()
            .filter(|op| matches!(op.state, OpState::Executing { .. }))
            .count();
        Totals {
            queued: inner.scheduler.queued_len(),
            executing,
            workers: inner.workers.len(),
            slots: inner.workers.values().map(|w| w.slots as usize).sum(),
        }
    }

    pub fn workers(&self) -> Vec<WorkerView> {
        let inner = self.lock();
        let mut out: Vec<WorkerView> = inner
            .workers
            .iter()
            .map(|(id, w)| WorkerView {
                id: id.clone(),
                hostname: w.hostname.clone(),
                caps: w.caps.clone(),
                slots: w.slots,
                running: inner.scheduler.running_on(id),
                connected_for: w.joined.elapsed(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Operations for the status page: all unfinished ones and the most
    /// recent finished ones.
    pub fn operations(&self, recent: usize) -> Vec<OpView> {
        let inner = self.lock();
        let mut ops: Vec<&Op> = inner.ops.values().collect();
        ops.sort_by_key(|op| std::cmp::Reverse(op.times.queued));
        let mut finished = 0;
        ops.into_iter()
            .filter(|op| {
                if op.state == OpState::Completed {
                    finished += 1;
                    finished <= recent
                } else {
                    true
                }
            })
            .map(|op| OpView {
                name: op.name.clone(),
                action_digest: op.action_digest.to_string(),
                platform: op.key.to_string(),
                state: match &op.state {
                    OpState::Queued => "queued".into(),
                    OpState::Executing { .. } => "executing".into(),
                    OpState::Unclaimed { .. } => "awaiting its worker".into(),
                    OpState::Completed => "completed".into(),
                },
                worker: match &op.state {
                    OpState::Executing { worker } => Some(worker.clone()),
                    _ => None,
                },
                attempt: op.attempt,
                times: op.times.clone(),
                outcome: op.outcome.clone(),
                wait_reason: inner.scheduler.wait_reason(&op.name).map(|r| match r {
                    crate::scheduler::WaitReason::NoWorker => format!("no connected worker offers {}", op.key),
                    crate::scheduler::WaitReason::AllBusy { workers, slots, ahead } => format!(
                        "all {slots} slot(s) of the {workers} matching worker(s) are busy; {ahead} action(s) ahead"
                    ),
                }),
                client: op.client.clone(),
            })
            .collect()
    }

    /// Queued operations per platform.
    pub fn queues(&self) -> Vec<(String, usize)> {
        self.lock()
            .scheduler
            .queues()
            .into_iter()
            .map(|(k, ops)| (k.to_string(), ops.len()))
            .collect()
    }
}

enum Finish {
    Error(rpc::Status),
    Response(rpc::Status, Option<Box<(ActionResult, String)>>),
}

impl Op {
    fn publish(&mut self, stage: ExecStage, response: Option<ExecuteResponse>) {
        let op = build_operation(&self.name, &self.action_digest, stage, response);
        self.tx.send_replace(Arc::new(op));
    }
}

fn build_operation(
    name: &str,
    action_digest: &Digest,
    stage: ExecStage,
    response: Option<ExecuteResponse>,
) -> Operation {
    let metadata = ExecuteOperationMetadata {
        stage: stage as i32,
        action_digest: Some(action_digest.to_proto()),
        ..Default::default()
    };
    Operation {
        name: name.to_string(),
        metadata: Some(Any {
            type_url: METADATA_TYPE.into(),
            value: metadata.encode_to_vec(),
        }),
        done: response.is_some(),
        result: response.map(|r| {
            operation::Result::Response(Any {
                type_url: RESPONSE_TYPE.into(),
                value: r.encode_to_vec(),
            })
        }),
    }
}

fn capabilities(hello: &Hello) -> Capabilities {
    let mut caps = Capabilities {
        network_allowed: hello.network_allowed,
        images: hello.images.iter().cloned().collect(),
        ..Default::default()
    };
    for p in &hello.platform {
        match p.name.as_str() {
            platform::OS_FAMILY => caps.os_family = p.value.clone(),
            platform::ISA => {
                caps.isas.insert(platform::normalize_isa(&p.value));
            }
            _ => {}
        }
    }
    caps
}

fn server_msg(kind: server_message::Kind) -> ServerMessage {
    ServerMessage { kind: Some(kind) }
}

fn unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::worker::server_message::Kind;
    use kiln_storage::Storage;

    type WorkerRx = mpsc::UnboundedReceiver<std::result::Result<ServerMessage, Status>>;

    async fn state(config: ExecutionConfig) -> ExecutionState {
        let storage = Storage::in_memory(None).await;
        ExecutionState::new(config, storage.action_cache.clone(), Journal::disabled())
    }

    fn hello(id: &str, isa: &str) -> Hello {
        Hello {
            worker_id: id.into(),
            hostname: "test".into(),
            platform: vec![
                Property {
                    name: "OSFamily".into(),
                    value: "linux".into(),
                },
                Property {
                    name: "ISA".into(),
                    value: isa.into(),
                },
            ],
            slots: 1,
            ..Default::default()
        }
    }

    fn checked(isa: &str, seed: &str) -> CheckedAction {
        let action = kiln_proto::reapi::Action {
            salt: seed.as_bytes().to_vec(),
            ..Default::default()
        };
        let (digest, bytes) = Digest::of_message(&action);
        CheckedAction {
            instance: String::new(),
            action_digest: digest,
            action,
            action_bytes: Bytes::from(bytes),
            command_bytes: Bytes::new(),
            requirements: platform::Requirements::parse(
                [("OSFamily", "linux"), ("ISA", isa)],
                false,
            )
            .unwrap(),
            properties: vec![("ISA".into(), isa.into())],
            timeout: None,
        }
    }

    fn join(s: &ExecutionState, id: &str) -> (u64, WorkerRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = s.worker_joined(&hello(id, "x86-64"), tx).unwrap();
        (conn, rx)
    }

    /// The next lease sent to a worker, skipping other messages.
    fn next_lease(rx: &mut WorkerRx) -> Option<Lease> {
        while let Ok(m) = rx.try_recv() {
            if let Ok(ServerMessage {
                kind: Some(Kind::Lease(l)),
            }) = m
            {
                return Some(l);
            }
        }
        None
    }

    fn final_status(rx: &OpWatch) -> Option<rpc::Status> {
        let op = rx.borrow().clone();
        match &op.result {
            Some(operation::Result::Response(any)) => {
                ExecuteResponse::decode(any.value.as_slice())
                    .unwrap()
                    .status
            }
            Some(operation::Result::Error(s)) => Some(s.clone()),
            None => None,
        }
    }

    #[tokio::test]
    async fn a_lease_lost_too_often_fails_clearly() {
        let s = state(ExecutionConfig {
            max_attempts: 2,
            ..Default::default()
        })
        .await;
        let (conn, mut rx) = join(&s, "w1");
        let (name, watch) = s
            .submit(checked("x86-64", "a"), false, 0, ClientInfo::default())
            .await
            .unwrap();
        assert_eq!(next_lease(&mut rx).unwrap().attempt, 1);
        s.worker_left("w1", conn, "test");
        let (conn, mut rx) = join(&s, "w2");
        assert_eq!(
            next_lease(&mut rx).unwrap().attempt,
            2,
            "re-queued to the next worker"
        );
        s.worker_left("w2", conn, "test");
        let status = final_status(&watch).expect("finished after the last attempt");
        assert_eq!(status.code, Code::Unavailable as i32);
        assert!(status.message.contains("2 time(s)"), "{}", status.message);
        assert!(s.get(&name).unwrap().done);
    }

    #[tokio::test]
    async fn a_stale_worker_stream_never_removes_its_reconnection() {
        let s = state(ExecutionConfig::default()).await;
        let (old_conn, _old) = join(&s, "w1");
        let (_new_conn, _new) = join(&s, "w1");
        s.worker_left("w1", old_conn, "old stream ended late");
        assert_eq!(s.totals().workers, 1);
    }

    #[tokio::test]
    async fn platforms_nobody_offers_fail_now_but_wait_during_the_grace() {
        let s = state(ExecutionConfig::default()).await;
        // Before any worker ever joined: queued (workers are still coming).
        let (_, early) = s
            .submit(checked("aarch64", "early"), false, 0, ClientInfo::default())
            .await
            .unwrap();
        assert!(!early.borrow().done);
        let (conn, _rx) = join(&s, "w1");
        // Now an x86-64 worker exists and nobody offers aarch64: refused.
        let err = s
            .submit(checked("aarch64", "late"), false, 0, ClientInfo::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)));
        assert!(err.to_string().contains("ISA=aarch64"), "{err}");
        // The early one is failed by housekeeping, not left queued forever.
        s.tick();
        assert_eq!(
            final_status(&early).unwrap().code,
            Code::FailedPrecondition as i32
        );
        // A worker that left recently keeps its platform possible.
        s.worker_left("w1", conn, "test");
        let (_, queued) = s
            .submit(
                checked("x86-64", "after-loss"),
                false,
                0,
                ClientInfo::default(),
            )
            .await
            .unwrap();
        s.tick();
        assert!(!queued.borrow().done, "waits for the worker to come back");
    }
}
