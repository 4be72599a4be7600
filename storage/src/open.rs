//! [`Storage`]: everything storage offers the rest of Kiln, opened from a
//! [`StorageConfig`].

use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tracing::{error, info};

use crate::action_cache::ActionCache;
use crate::assets::AssetStore;
use crate::cas::Cas;
use crate::config::{Backend, StorageConfig};
use crate::disk::{self, DiskOptions};
use crate::durability::DataDir;
use crate::error::{Error, Result};
use crate::lru::Lru;
use crate::memory::MemoryStore;
use crate::metrics::{MetricsHandle, no_metrics};
use crate::records::{DiskRecords, MemoryRecords, RecordStore};

/// Everything storage offers the rest of Kiln: the CAS, the action cache and
/// the asset mappings, over one store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Storage {
    /// Content-addressable storage.
    pub cas: Cas,
    /// The action cache (applies the completeness rule).
    pub action_cache: ActionCache,
    /// Remote Asset mappings.
    pub assets: AssetStore,
    data_dir: Option<Arc<OpenDataDir>>,
}

#[derive(Debug)]
struct OpenDataDir {
    dir: Arc<Mutex<Option<DataDir>>>,
    checkpoints: tokio::task::JoinHandle<()>,
}

impl Storage {
    /// Opens the storage `config` describes, reporting to `metrics`: for
    /// the disk backend, takes `data_dir` (exclusively), recovers from an
    /// unclean shutdown, indexes what is there and starts the checkpoint
    /// task.
    pub async fn open(
        config: &StorageConfig,
        data_dir: &Path,
        metrics: MetricsHandle,
    ) -> Result<Self> {
        let s = config;
        s.validate()?;
        let limit = s.limit();
        match s.backend {
            Backend::Memory => Ok(Self::memory(limit, s.evict_to_percent, metrics).await),
            Backend::Disk => {
                let root = data_dir.to_path_buf();
                let fsync = s.fsync;
                let opened = tokio::task::spawn_blocking(move || -> Result<_> {
                    let (dir, recovery) = DataDir::acquire(&root)?;
                    let (disk, report) =
                        disk::open(&root, DiskOptions { fsync }, recovery.verify_since)?;
                    if recovery.unclean {
                        info!(
                            checked = report.checked,
                            removed = report.removed,
                            "verification after unclean shutdown done"
                        );
                    }
                    let records = DiskRecords::open(&root, &root.join("tmp"), fsync)?;
                    Ok((dir, disk, records))
                })
                .await
                .map_err(|e| Error::Task(e.to_string()))??;
                let (dir, disk, records) = opened;
                let lru = Lru::with_metrics(disk, limit, s.evict_to_percent, metrics).await?;
                let records: Arc<dyn RecordStore> = Arc::new(records);
                let cas = Cas::new(Arc::new(lru));
                let dir = Arc::new(Mutex::new(Some(dir)));
                let interval = Duration::from_secs(s.checkpoint_interval_secs.max(1));
                let checkpoints = tokio::spawn(checkpoint_loop(dir.clone(), interval));
                Ok(Storage {
                    action_cache: ActionCache::new(records.clone(), cas.clone()),
                    assets: AssetStore::new(records, cas.clone()),
                    cas,
                    data_dir: Some(Arc::new(OpenDataDir { dir, checkpoints })),
                })
            }
        }
    }

    /// Storage in memory (tests, throwaway servers), with an optional size
    /// limit in bytes.
    pub async fn in_memory(limit: Option<u64>) -> Self {
        Self::memory(limit, 90, no_metrics()).await
    }

    async fn memory(limit: Option<u64>, evict_to_percent: u8, metrics: MetricsHandle) -> Self {
        let lru = Lru::with_metrics(MemoryStore::new(), limit, evict_to_percent, metrics)
            .await
            .expect("indexing an empty memory store cannot fail");
        let cas = Cas::new(Arc::new(lru));
        let records: Arc<dyn RecordStore> = Arc::new(MemoryRecords::new());
        Storage {
            action_cache: ActionCache::new(records.clone(), cas.clone()),
            assets: AssetStore::new(records, cas.clone()),
            cas,
            data_dir: None,
        }
    }

    /// Flushes everything to disk and marks the shutdown clean. Call once,
    /// after the server has stopped serving; later writes are not covered.
    pub async fn close(&self) -> Result<()> {
        let Some(d) = &self.data_dir else {
            return Ok(());
        };
        d.checkpoints.abort();
        let taken = d.dir.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(dir) = taken {
            tokio::task::spawn_blocking(move || dir.close())
                .await
                .map_err(|e| Error::Task(e.to_string()))??;
        }
        Ok(())
    }
}

async fn checkpoint_loop(dir: Arc<Mutex<Option<DataDir>>>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let dir = dir.clone();
        let r = tokio::task::spawn_blocking(move || {
            match dir.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                Some(d) => d.checkpoint(),
                None => Ok(()),
            }
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "checkpoint failed"),
            Err(e) => error!(error = %e, "checkpoint task failed"),
        }
    }
}
