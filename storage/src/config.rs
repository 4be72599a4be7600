//! Storage configuration: the `[storage]` section of the server's TOML
//! file. Every field has a documented default; unknown keys are errors.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which backend holds blobs. The keys below the `backend` line that only
/// concern one backend say so; a backend added later (`s3`) brings its own
/// `[storage.<backend>]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Files under `data_dir` (durable).
    Disk,
    /// Memory (lost on exit; for tests and throwaway caches).
    Memory,
}

/// The blob store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `"disk"` or `"memory"`. Default `"disk"`.
    pub backend: Backend,
    /// Size limit of the CAS in bytes; beyond it the least recently used
    /// blobs are evicted. 0 means unlimited. Default 16 GiB.
    pub max_size_bytes: u64,
    /// Eviction brings the CAS down to this percentage of `max_size_bytes`.
    /// Default 90.
    pub evict_to_percent: u8,
    /// Disk backend: fsync every blob and record (and its directory) before
    /// acknowledging it. Default false: periodic checkpoints plus
    /// verification after an unclean shutdown protect against power loss
    /// instead (see `docs/storage.md`).
    pub fsync: bool,
    /// Disk backend: seconds between checkpoints (`syncfs` of the data
    /// directory). Blobs written since the last checkpoint are rehashed
    /// after an unclean shutdown. Default 30.
    pub checkpoint_interval_secs: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Disk,
            max_size_bytes: 16 << 30,
            evict_to_percent: 90,
            fsync: false,
            checkpoint_interval_secs: 30,
        }
    }
}

impl StorageConfig {
    /// Checks settings a parser cannot.
    pub fn validate(&self) -> Result<()> {
        if self.evict_to_percent == 0 || self.evict_to_percent > 100 {
            return Err(Error::Config(format!(
                "storage.evict_to_percent = {} must be between 1 and 100",
                self.evict_to_percent
            )));
        }
        Ok(())
    }

    /// The size limit, `None` for unlimited.
    pub fn limit(&self) -> Option<u64> {
        (self.max_size_bytes != 0).then_some(self.max_size_bytes)
    }
}
