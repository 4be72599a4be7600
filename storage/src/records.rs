//! Small mutable records keyed by name: action results and asset mappings.
//!
//! Unlike blobs, a record's name does not certify its content, so each
//! record is stored with a SHA-256 of its payload and checked on every read;
//! a damaged record (e.g. after power loss) reads as absent and is removed.
//! Writes go through a temporary file and a rename, like blobs.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tracing::warn;

use crate::error::{Error, Result};
use crate::fsio::sync_dir;

const MAGIC: &[u8; 8] = b"KILNREC1";
/// Records kept in memory after a read or write. Action-cache hits then
/// skip a trip to the blocking pool; this process owns the directory (it
/// holds its lock), so the copy cannot go stale.
const CACHE_MAX: usize = 16_384;
const HEADER: usize = MAGIC.len() + 32;

/// A key-value store for small records: the seam under the action cache
/// and the asset mappings. A record read back is exactly what was last
/// written under its key, or absent; never damaged.
#[async_trait]
pub trait RecordStore: Send + Sync + std::fmt::Debug + 'static {
    /// Reads a record.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;

    /// Writes (or replaces) a record.
    async fn put(&self, key: &str, value: Bytes) -> Result<()>;

    /// Removes a record; absent is fine.
    async fn delete(&self, key: &str) -> Result<()>;
}

/// Builds a key: `namespace/instance/xx/name`, where the instance name is
/// encoded so any string is a safe path component and `xx` fans out
/// directories.
pub fn key(namespace: &str, instance: &str, name: &str) -> String {
    let inst = if instance.is_empty() {
        "_".to_string()
    } else {
        format!("i-{}", hex::encode(instance))
    };
    let fan = name.get(..2).unwrap_or("__");
    format!("{namespace}/{inst}/{fan}/{name}")
}

/// Records in a map in memory.
#[derive(Debug, Default)]
pub struct MemoryRecords(Mutex<HashMap<String, Bytes>>);

impl MemoryRecords {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bytes>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl RecordStore for MemoryRecords {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.map().get(key).cloned())
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<()> {
        self.map().insert(key.to_string(), value);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.map().remove(key);
        Ok(())
    }
}

/// One file per record under a directory, each with a SHA-256 of its
/// payload checked on every read.
#[derive(Clone, Debug)]
pub struct DiskRecords {
    inner: Arc<DiskInner>,
}

#[derive(Debug)]
struct DiskInner {
    root: PathBuf,
    tmp: PathBuf,
    fsync: bool,
    counter: AtomicU64,
    cache: Mutex<HashMap<String, Bytes>>,
}

impl DiskInner {
    fn cached(&self, key: &str) -> Option<Bytes> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    fn remember(&self, key: &str, value: Option<Bytes>) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match value {
            Some(v) => {
                if c.len() >= CACHE_MAX {
                    c.clear();
                }
                c.insert(key.to_string(), v);
            }
            None => {
                c.remove(key);
            }
        }
    }
}

impl DiskRecords {
    /// Records under `root`, with temporary files in `tmp` (same filesystem).
    pub fn open(root: &Path, tmp: &Path, fsync: bool) -> Result<Self> {
        for d in [root, tmp] {
            fs::create_dir_all(d).map_err(|e| Error::io("create directory", d, e))?;
        }
        Ok(DiskRecords {
            inner: Arc::new(DiskInner {
                root: root.to_path_buf(),
                tmp: tmp.to_path_buf(),
                fsync,
                counter: AtomicU64::new(0),
                cache: Mutex::default(),
            }),
        })
    }
}

#[async_trait]
impl RecordStore for DiskRecords {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        if let Some(v) = self.inner.cached(key) {
            return Ok(Some(v));
        }
        let d = self.inner.clone();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let v = d.read(&key)?;
            if let Some(v) = &v {
                d.remember(&key, Some(v.clone()));
            }
            Ok(v)
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<()> {
        let d = self.inner.clone();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            d.write(&key, &value)?;
            d.remember(&key, Some(value));
            Ok(())
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.remember(key, None);
        let path = self.inner.root.join(key);
        tokio::task::spawn_blocking(move || match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(Error::io("remove record", path, e))
            }
            _ => Ok(()),
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    }
}

impl DiskInner {
    fn read(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.root.join(key);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read record", path, e)),
        };
        let intact = data.len() >= HEADER
            && &data[..MAGIC.len()] == MAGIC
            && Sha256::digest(&data[HEADER..]).as_slice() == &data[MAGIC.len()..HEADER];
        if !intact {
            warn!(path = %path.display(), "removing a damaged record");
            let _ = fs::remove_file(&path);
            return Ok(None);
        }
        let mut b = Bytes::from(data);
        Ok(Some(b.split_off(HEADER)))
    }

    fn write(&self, key: &str, value: &[u8]) -> Result<()> {
        let path = self.root.join(key);
        let parent = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.tmp.join(format!("rec-{}-{n}", std::process::id()));
        let mut f = File::create_new(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        let written = f
            .write_all(MAGIC)
            .and_then(|_| f.write_all(&Sha256::digest(value)))
            .and_then(|_| f.write_all(value))
            .and_then(|_| if self.fsync { f.sync_data() } else { Ok(()) });
        drop(f);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("write record", tmp, e));
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("rename record into place", path, e));
        }
        if self.fsync {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn roundtrip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            DiskRecords::open(&dir.path().join("rec"), &dir.path().join("tmp"), false).unwrap();
        let key = key("ac", "", "abcdef-3");
        assert_eq!(key, "ac/_/ab/abcdef-3");
        assert_eq!(super::key("ac", "x/y", "ab"), "ac/i-782f79/ab/ab");
        store
            .put(&key, Bytes::from_static(b"result"))
            .await
            .unwrap();
        assert_eq!(
            store.get(&key).await.unwrap().as_deref(),
            Some(&b"result"[..])
        );
        let path = dir.path().join("rec").join(&key);
        let mut raw = fs::read(&path).unwrap();
        *raw.last_mut().unwrap() ^= 1;
        fs::write(&path, raw).unwrap();
        // As after a power loss: a new process reads the damaged file.
        let store =
            DiskRecords::open(&dir.path().join("rec"), &dir.path().join("tmp"), false).unwrap();
        assert_eq!(store.get(&key).await.unwrap(), None);
        assert!(!path.exists());
    }
}
