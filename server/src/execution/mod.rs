//! Remote execution on the server: the Execution and Operations services,
//! the worker-protocol service, and the state behind them (operations,
//! workers, the scheduler, the journal that survives restarts).

mod journal;
mod service;
mod state;
mod validate;
mod workers;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use service::{ExecutionService, OperationsService};
pub use state::{ClientInfo, ExecutionState, OpTimes, OpView, Totals, WorkerView};
pub use workers::WorkersService;

use crate::error::Result;
use crate::instances::Instances;
use kiln_storage::ActionCache;
use kiln_storage::Cas;

/// `[execution]` in the server's config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionConfig {
    /// Longest `Action.timeout` accepted; longer ones are INVALID_ARGUMENT.
    /// Default 86400 (one day).
    pub max_action_timeout_secs: u64,
    /// Timeout for actions that set none; 0 means the maximum. Default 0.
    pub default_action_timeout_secs: u64,
    /// Ignore platform properties Kiln does not know instead of rejecting
    /// the action with INVALID_ARGUMENT. Default false.
    pub ignore_unknown_properties: bool,
    /// After start, while no worker has ever connected, actions are queued
    /// rather than rejected for want of a worker. Default 15.
    pub startup_grace_secs: u64,
    /// A worker platform stays "possible" this long after its last worker
    /// left (or after a restart), so reconnecting workers find their actions
    /// waiting; after it, actions queued for it fail with
    /// FAILED_PRECONDITION. Default 60.
    pub worker_loss_grace_secs: u64,
    /// After a restart, how long a running action waits for its worker to
    /// reconnect and claim it before it is queued again. Default 30.
    pub reattach_grace_secs: u64,
    /// Worker keepalive interval in milliseconds; a worker silent for three
    /// intervals is considered gone. Default 5000.
    pub keepalive_ms: u64,
    /// Attempts an action gets when its workers vanish. Default 3.
    pub max_attempts: u32,
    /// How long finished operations stay answerable (GetOperation,
    /// WaitExecution). Default 3600.
    pub completed_retention_secs: u64,
    /// At most this many finished operations are kept. Default 100000.
    pub completed_max: usize,
    /// fsync the operations journal after each batch of writes (survives
    /// power loss, costs latency). Default false.
    pub journal_fsync: bool,
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        Self {
            max_action_timeout_secs: 86_400,
            default_action_timeout_secs: 0,
            ignore_unknown_properties: false,
            startup_grace_secs: 15,
            worker_loss_grace_secs: 60,
            reattach_grace_secs: 30,
            keepalive_ms: 5000,
            max_attempts: 3,
            completed_retention_secs: 3600,
            completed_max: 100_000,
            journal_fsync: false,
        }
    }
}

impl ExecutionConfig {
    pub fn max_action_timeout(&self) -> Duration {
        Duration::from_secs(self.max_action_timeout_secs)
    }
    pub fn default_action_timeout(&self) -> Option<Duration> {
        (self.default_action_timeout_secs > 0)
            .then(|| Duration::from_secs(self.default_action_timeout_secs))
    }
    pub fn startup_grace(&self) -> Duration {
        Duration::from_secs(self.startup_grace_secs)
    }
    pub fn worker_loss_grace(&self) -> Duration {
        Duration::from_secs(self.worker_loss_grace_secs)
    }
    pub fn reattach_grace(&self) -> Duration {
        Duration::from_secs(self.reattach_grace_secs)
    }
    pub fn keepalive(&self) -> Duration {
        Duration::from_millis(self.keepalive_ms.max(100))
    }
    pub fn completed_retention(&self) -> Duration {
        Duration::from_secs(self.completed_retention_secs)
    }
}

/// The three services and their shared state, ready to be added to the
/// server.
pub struct Execution {
    pub state: Arc<ExecutionState>,
    pub execution: ExecutionService,
    pub operations: OperationsService,
    pub workers: WorkersService,
}

impl Execution {
    /// Builds the services; `journal_dir` None keeps operations in memory
    /// only. Spawns the housekeeping task (needs a tokio runtime).
    pub fn new(
        config: ExecutionConfig,
        cas: Cas,
        ac: ActionCache,
        instances: Instances,
        journal_dir: Option<&Path>,
    ) -> Result<Self> {
        let (journal, records) = match journal_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| crate::error::Error::io("create directory", dir, e))?;
                let retention = config.completed_retention();
                journal::Journal::open(
                    &dir.join("operations.journal"),
                    config.journal_fsync,
                    |r| ExecutionState::compact(r, retention),
                )?
            }
            None => (journal::Journal::disabled(), Vec::new()),
        };
        let state = Arc::new(ExecutionState::new(config.clone(), ac, journal));
        state.restore(records);
        let valid = Arc::new(validate::ValidTrees::default());
        let tick_state = Arc::downgrade(&state);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(500));
            loop {
                interval.tick().await;
                match tick_state.upgrade() {
                    Some(s) => s.tick(),
                    None => return,
                }
            }
        });
        Ok(Self {
            execution: ExecutionService::new(Arc::clone(&state), cas, instances.clone(), valid),
            operations: OperationsService::new(Arc::clone(&state)),
            workers: WorkersService::new(Arc::clone(&state)),
            state,
        })
    }
}
