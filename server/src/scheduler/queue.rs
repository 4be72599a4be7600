//! The scheduling state machine: queued actions, connected workers and who
//! runs what. Pure logic with no I/O or clock, so "given these workers and
//! this action, what happens" is a unit test; the execution service drives it.
//!
//! Actions wait in one queue per [`MatchKey`] (their matched platform), in
//! priority order (lower value first, as REAPI says) then arrival. A worker
//! with a free slot takes the best head among the queues it can serve, so an
//! action nobody can run never blocks the others.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::platform::{Capabilities, MatchKey};

pub type OpId = String;
pub type WorkerId = String;

/// A decision: this worker should run this operation now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub worker: WorkerId,
    pub op: OpId,
}

/// Queue position: priority (lower first), then arrival.
pub type Rank = (i32, u64);

#[derive(Debug)]
struct Worker {
    caps: Capabilities,
    slots: usize,
    running: HashSet<OpId>,
}

impl Worker {
    fn free(&self) -> usize {
        self.slots.saturating_sub(self.running.len())
    }
}

/// A summary of the workers sharing one set of capabilities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSummary {
    pub caps: Capabilities,
    pub workers: usize,
    pub slots: usize,
    pub busy: usize,
}

/// Why a queued action has not started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// No connected worker offers the platform.
    NoWorker,
    /// Matching workers exist but every slot is taken; `ahead` actions of
    /// the same platform come first.
    AllBusy {
        workers: usize,
        slots: usize,
        ahead: usize,
    },
}

#[derive(Debug, Default)]
pub struct Scheduler {
    next_seq: u64,
    workers: HashMap<WorkerId, Worker>,
    queues: BTreeMap<MatchKey, BTreeMap<Rank, OpId>>,
    queued: HashMap<OpId, (MatchKey, Rank)>,
}

impl Scheduler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a worker (or re-registers it after a reconnect, keeping the
    /// operations it reports as still running) and fills its free slots.
    pub fn add_worker(
        &mut self,
        id: &str,
        caps: Capabilities,
        slots: usize,
        running: impl IntoIterator<Item = OpId>,
    ) -> Vec<Assignment> {
        self.workers.insert(
            id.to_string(),
            Worker {
                caps,
                slots,
                running: running.into_iter().collect(),
            },
        );
        self.fill(id)
    }

    /// Forgets a worker and returns the operations it was running, which the
    /// caller re-queues or fails.
    pub fn remove_worker(&mut self, id: &str) -> Vec<OpId> {
        let mut ops: Vec<OpId> = self
            .workers
            .remove(id)
            .map(|w| w.running.into_iter().collect())
            .unwrap_or_default();
        ops.sort();
        ops
    }

    pub fn has_worker(&self, id: &str) -> bool {
        self.workers.contains_key(id)
    }

    /// The queue position of an action arriving now with this priority.
    /// The caller keeps it, so an action put back after its worker vanished
    /// regains the place it had already waited for.
    pub fn next_rank(&mut self, priority: i32) -> Rank {
        self.next_seq += 1;
        (priority, self.next_seq)
    }

    /// Queues an operation; starts it at once when a matching worker has a
    /// free slot (the one with the most free slots, to spread load).
    pub fn enqueue(&mut self, op: &str, key: MatchKey, rank: Rank) -> Option<Assignment> {
        let best = self
            .workers
            .iter()
            .filter(|(_, w)| w.free() > 0 && w.caps.can_run(&key))
            .max_by(|(a_id, a), (b_id, b)| a.free().cmp(&b.free()).then(b_id.cmp(a_id)))
            .map(|(id, _)| id.clone());
        match best {
            Some(worker) => {
                self.workers
                    .get_mut(&worker)
                    .expect("worker just found")
                    .running
                    .insert(op.to_string());
                Some(Assignment {
                    worker,
                    op: op.to_string(),
                })
            }
            None => {
                self.queues
                    .entry(key.clone())
                    .or_default()
                    .insert(rank, op.to_string());
                self.queued.insert(op.to_string(), (key, rank));
                None
            }
        }
    }

    /// Removes a queued operation (cancelled, or failed for want of a
    /// worker). Returns false if it was not queued.
    pub fn dequeue(&mut self, op: &str) -> bool {
        let Some((key, rank)) = self.queued.remove(op) else {
            return false;
        };
        if let Some(queue) = self.queues.get_mut(&key) {
            queue.remove(&rank);
            if queue.is_empty() {
                self.queues.remove(&key);
            }
        }
        true
    }

    /// An operation left a worker (finished, failed or cancelled): its slot
    /// is free for the next action.
    pub fn release(&mut self, worker: &str, op: &str) -> Vec<Assignment> {
        let freed = self
            .workers
            .get_mut(worker)
            .is_some_and(|w| w.running.remove(op));
        if freed { self.fill(worker) } else { Vec::new() }
    }

    /// Whether some connected worker could ever run actions with this key.
    pub fn can_run(&self, key: &MatchKey) -> bool {
        self.workers.values().any(|w| w.caps.can_run(key))
    }

    pub fn is_queued(&self, op: &str) -> bool {
        self.queued.contains_key(op)
    }

    /// Why a queued operation waits, or None if it is not queued.
    pub fn wait_reason(&self, op: &str) -> Option<WaitReason> {
        let (key, rank) = self.queued.get(op)?;
        let matching: Vec<&Worker> = self
            .workers
            .values()
            .filter(|w| w.caps.can_run(key))
            .collect();
        if matching.is_empty() {
            return Some(WaitReason::NoWorker);
        }
        let ahead = self.queues.get(key).map_or(0, |q| q.range(..*rank).count());
        Some(WaitReason::AllBusy {
            workers: matching.len(),
            slots: matching.iter().map(|w| w.slots).sum(),
            ahead,
        })
    }

    /// Queued operations per platform, in queue order.
    pub fn queues(&self) -> Vec<(MatchKey, Vec<OpId>)> {
        self.queues
            .iter()
            .map(|(k, q)| (k.clone(), q.values().cloned().collect()))
            .collect()
    }

    /// Queued operations whose platform no connected worker offers.
    pub fn orphaned(&self) -> Vec<(MatchKey, Vec<OpId>)> {
        self.queues()
            .into_iter()
            .filter(|(key, _)| !self.can_run(key))
            .collect()
    }

    pub fn queued_len(&self) -> usize {
        self.queued.len()
    }

    /// Connected workers grouped by identical capabilities.
    pub fn platforms(&self) -> Vec<PlatformSummary> {
        let mut out: Vec<PlatformSummary> = Vec::new();
        let mut ids: Vec<&WorkerId> = self.workers.keys().collect();
        ids.sort();
        for id in ids {
            let w = &self.workers[id];
            match out.iter_mut().find(|s| s.caps == w.caps) {
                Some(s) => {
                    s.workers += 1;
                    s.slots += w.slots;
                    s.busy += w.running.len();
                }
                None => out.push(PlatformSummary {
                    caps: w.caps.clone(),
                    workers: 1,
                    slots: w.slots,
                    busy: w.running.len(),
                }),
            }
        }
        out
    }

    /// Operations a worker runs now.
    pub fn running_on(&self, worker: &str) -> Vec<OpId> {
        let mut ops: Vec<OpId> = self
            .workers
            .get(worker)
            .map(|w| w.running.iter().cloned().collect())
            .unwrap_or_default();
        ops.sort();
        ops
    }

    /// Gives a worker the best queued actions it can run, one per free slot.
    fn fill(&mut self, worker_id: &str) -> Vec<Assignment> {
        let mut out = Vec::new();
        loop {
            let Some(worker) = self.workers.get(worker_id) else {
                return out;
            };
            if worker.free() == 0 {
                return out;
            }
            let best = self
                .queues
                .iter()
                .filter(|(key, _)| worker.caps.can_run(key))
                .filter_map(|(key, q)| q.first_key_value().map(|(rank, _)| (*rank, key)))
                .min_by_key(|(rank, _)| *rank)
                .map(|(rank, key)| (rank, key.clone()));
            let Some((rank, key)) = best else {
                return out;
            };
            let queue = self.queues.get_mut(&key).expect("queue just found");
            let op = queue.remove(&rank).expect("head just found");
            if queue.is_empty() {
                self.queues.remove(&key);
            }
            self.queued.remove(&op);
            self.workers
                .get_mut(worker_id)
                .expect("worker just found")
                .running
                .insert(op.clone());
            out.push(Assignment {
                worker: worker_id.to_string(),
                op,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::platform::{Requirements, normalize_isa};
    use super::*;

    fn caps(isa: &str) -> Capabilities {
        Capabilities {
            os_family: "linux".into(),
            isas: [normalize_isa(isa)].into(),
            images: Default::default(),
            network_allowed: false,
        }
    }

    fn key(isa: &str) -> MatchKey {
        Requirements::parse([("OSFamily", "linux"), ("ISA", isa)], false)
            .unwrap()
            .match_key()
    }

    fn push(s: &mut Scheduler, op: &str, isa: &str, priority: i32) -> Option<Assignment> {
        let rank = s.next_rank(priority);
        s.enqueue(op, key(isa), rank)
    }

    fn ops(assignments: &[Assignment]) -> Vec<&str> {
        assignments.iter().map(|a| a.op.as_str()).collect()
    }

    #[test]
    fn an_idle_matching_worker_starts_an_action_at_once() {
        let mut s = Scheduler::new();
        assert!(s.add_worker("w1", caps("x86_64"), 2, []).is_empty());
        let a = push(&mut s, "op1", "x86-64", 0).unwrap();
        assert_eq!(a.worker, "w1");
        assert_eq!(s.queued_len(), 0);
    }

    #[test]
    fn queued_actions_start_by_priority_then_arrival() {
        let mut s = Scheduler::new();
        for (op, prio) in [("late-low", 5), ("a", 0), ("b", 0), ("urgent", -1)] {
            assert!(push(&mut s, op, "x86-64", prio).is_none());
        }
        let started = s.add_worker("w1", caps("x86-64"), 3, []);
        assert_eq!(ops(&started), ["urgent", "a", "b"]);
        let next = s.release("w1", "a");
        assert_eq!(ops(&next), ["late-low"]);
    }

    #[test]
    fn an_action_nobody_can_run_never_blocks_others() {
        let mut s = Scheduler::new();
        push(&mut s, "arm", "aarch64", -10);
        push(&mut s, "x86", "x86-64", 0);
        let started = s.add_worker("w1", caps("x86-64"), 1, []);
        assert_eq!(ops(&started), ["x86"]);
        assert!(s.is_queued("arm"));
        assert_eq!(s.wait_reason("arm"), Some(WaitReason::NoWorker));
        assert_eq!(s.orphaned().len(), 1);
        assert!(!s.can_run(&key("arm64")));
    }

    #[test]
    fn a_lost_worker_returns_its_leases_and_requeue_goes_first() {
        let mut s = Scheduler::new();
        s.add_worker("w1", caps("x86-64"), 1, []);
        let first = s.next_rank(0);
        s.enqueue("first", key("x86-64"), first).unwrap();
        push(&mut s, "second", "x86-64", 0);
        assert_eq!(s.remove_worker("w1"), ["first"]);
        assert!(s.enqueue("first", key("x86-64"), first).is_none());
        let started = s.add_worker("w2", caps("x86-64"), 1, []);
        assert_eq!(ops(&started), ["first"]);
    }

    #[test]
    fn reconnecting_worker_keeps_its_running_operations() {
        let mut s = Scheduler::new();
        push(&mut s, "queued", "x86-64", 0);
        let started = s.add_worker("w1", caps("x86-64"), 1, ["running".to_string()]);
        assert!(started.is_empty(), "the one slot is still busy");
        assert_eq!(s.running_on("w1"), ["running"]);
        assert_eq!(
            s.wait_reason("queued"),
            Some(WaitReason::AllBusy {
                workers: 1,
                slots: 1,
                ahead: 0
            })
        );
        assert_eq!(ops(&s.release("w1", "running")), ["queued"]);
    }

    #[test]
    fn load_spreads_over_workers_and_dequeue_removes() {
        let mut s = Scheduler::new();
        s.add_worker("w1", caps("x86-64"), 2, []);
        s.add_worker("w2", caps("x86-64"), 2, []);
        let a = push(&mut s, "a", "x86-64", 0).unwrap();
        let b = push(&mut s, "b", "x86-64", 0).unwrap();
        assert_ne!(a.worker, b.worker);
        push(&mut s, "c", "x86-64", 0).unwrap();
        push(&mut s, "d", "x86-64", 0).unwrap();
        assert!(push(&mut s, "e", "x86-64", 0).is_none());
        assert!(s.dequeue("e"));
        assert!(!s.dequeue("e"));
        assert!(s.release("w1", "a").is_empty());
        let summary = s.platforms();
        assert_eq!(summary.len(), 1);
        assert_eq!(
            (summary[0].workers, summary[0].slots, summary[0].busy),
            (2, 4, 3)
        );
    }
}
