//! Blob storage: one small trait, backends and decorators.
//!
//! Modelled on Buildbarn's `BlobAccess`: every service talks to a
//! [`BlobStore`] trait object; backends ([`MemoryStore`], [`PackStore`] for
//! small blobs, [`FileStore`] for large ones) hold bytes, decorators add
//! behaviour around any backend: [`SizeSplit`] routes by size (the disk
//! backend, [`DiskStore`], is packs + files split at
//! [`disk::PACK_MAX`]), and [`Lru`] adds an in-memory index, size
//! accounting, LRU eviction and pinning of blobs in use.
//!
//! The trait is batch-first (`get_many` / `put_many` / `find_missing`) because
//! BatchUpdateBlobs and BatchReadBlobs carry hundreds of small blobs: a disk
//! backend does one trip to the blocking pool per batch, not per blob. Large
//! blobs stream through [`BlobReader`] and [`BlobSink`] so a 1 GiB blob never
//! sits in memory.
//!
//! Data enters a store only as a [`VerifiedBlob`] or through an [`Upload`]
//! that checks the hash before committing.
//!
//! [`Cas`] is the cloneable handle the rest of Kiln uses.

mod cas;
pub mod disk;
pub mod durability;
pub mod files;
pub mod lru;
pub mod memory;
pub mod packs;
pub mod records;
pub mod split;
pub mod verify;

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::digest::Digest;
use crate::error::{Error, Result};

pub use cas::Cas;
pub use disk::{DiskOptions, DiskStore};
pub use files::FileStore;
pub use lru::Lru;
pub use memory::MemoryStore;
pub use packs::PackStore;
pub use records::RecordStore;
pub use split::SizeSplit;
pub use verify::{Upload, Verified, VerifiedBlob};

/// Runs blocking file I/O off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task(e.to_string()))
}

/// `get_many` of a store whose reads block: one blocking task for the batch;
/// if that task dies, every digest of the batch reports why.
pub(crate) async fn get_many_blocking(
    digests: &[Digest],
    get: impl Fn(&Digest) -> Result<Option<Bytes>> + Send + 'static,
) -> Vec<Result<Option<Bytes>>> {
    let owned = digests.to_vec();
    let n = owned.len();
    match blocking(move || owned.iter().map(&get).collect::<Vec<_>>()).await {
        Ok(v) => v,
        Err(e) => (0..n).map(|_| Err(Error::Task(e.to_string()))).collect(),
    }
}

/// How much a store holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Number of blobs.
    pub blobs: u64,
    /// Total size of the blobs in bytes.
    pub bytes: u64,
    /// Size limit, if the store has one.
    pub limit: Option<u64>,
    /// Blobs removed since the store was opened (evicted, deleted or found
    /// damaged). Callers use it as an epoch: while it has not moved, nothing
    /// that was present has gone.
    pub removals: u64,
}

/// A content-addressed blob store.
///
/// Implementations never expose a partial or unverified blob: `put_many`
/// takes verified blobs and a [`BlobSink`] commits only with a [`Verified`]
/// proof. The empty blob needs no special case here; [`Cas`] answers for it.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Reads whole blobs. One result per digest, in order; `Ok(None)` when
    /// absent.
    async fn get_many(&self, digests: &[Digest]) -> Vec<Result<Option<Bytes>>>;

    /// Stores blobs. One result per blob, in order. Storing a blob that is
    /// already present succeeds.
    async fn put_many(&self, blobs: Vec<VerifiedBlob>) -> Vec<Result<()>>;

    /// The digests that are not present, in request order. Present ones count
    /// as used (LRU).
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>>;

    /// Opens a blob for streaming from `offset` (≤ its size).
    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobReader>>;

    /// Starts a streaming write of `digest`.
    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>>;

    /// Removes blobs; absent ones are ignored.
    async fn delete(&self, digests: &[Digest]) -> Result<()>;

    /// Every blob held, with the time it was last written (used to rebuild
    /// an index, oldest first, when a decorator opens over a persistent
    /// backend).
    async fn inventory(&self) -> Result<Vec<(Digest, std::time::SystemTime)>>;

    /// What the store holds.
    fn usage(&self) -> Usage;
}

/// The receiving end of a streaming write. Dropping it without committing
/// discards the data.
#[async_trait]
pub trait BlobSink: Send {
    /// Appends a chunk.
    async fn append(&mut self, chunk: Bytes) -> Result<()>;

    /// Makes the blob visible, atomically.
    async fn commit(self: Box<Self>, proof: Verified) -> Result<()>;
}

/// Where a [`BlobReader`] gets its bytes.
#[async_trait]
pub trait ChunkSource: Send {
    /// Up to `max` bytes; empty only at the end of the blob.
    async fn next_chunk(&mut self, max: usize) -> Result<Bytes>;
}

/// A blob being read in chunks. Whatever it holds (e.g. a pin that keeps the
/// blob from eviction) lives as long as the reader.
pub struct BlobReader {
    source: Box<dyn ChunkSource>,
    remaining: u64,
    held: Vec<Box<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl BlobReader {
    /// A reader over `source`, which has `remaining` bytes left.
    pub fn new(source: Box<dyn ChunkSource>, remaining: u64) -> Self {
        BlobReader {
            source,
            remaining,
            held: Vec::new(),
        }
    }

    /// A reader over bytes already in memory.
    pub fn from_bytes(data: Bytes) -> Self {
        let len = data.len() as u64;
        BlobReader::new(Box::new(BytesSource(data)), len)
    }

    /// Keeps `guard` alive for as long as the reader.
    pub fn hold(mut self, guard: Box<dyn Any + Send + Sync>) -> Self {
        self.held.push(guard);
        self
    }

    /// Bytes left to read.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The next chunk of at most `max` bytes, or `None` at the end.
    pub async fn next_chunk(&mut self, max: usize) -> Result<Option<Bytes>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let want = max.min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let chunk = self.source.next_chunk(want).await?;
        if chunk.is_empty() {
            return Err(crate::error::Error::Task(format!(
                "blob ended {} bytes early",
                self.remaining
            )));
        }
        self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
        Ok(Some(chunk))
    }

    /// Reads everything left.
    pub async fn read_to_end(mut self) -> Result<Bytes> {
        let mut out = Vec::with_capacity(usize::try_from(self.remaining).unwrap_or(0));
        while let Some(chunk) = self.next_chunk(1 << 20).await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out.into())
    }
}

struct BytesSource(Bytes);

#[async_trait]
impl ChunkSource for BytesSource {
    async fn next_chunk(&mut self, max: usize) -> Result<Bytes> {
        let n = max.min(self.0.len());
        Ok(self.0.split_to(n))
    }
}

use std::sync::Mutex;
use std::time::Duration;

use tracing::{error, info};

use crate::action_cache::ActionCache;
use crate::asset::AssetStore;
use crate::config::{Backend, ServerConfig};
use durability::DataDir;

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
    /// Opens the storage `config` describes: for the disk backend, takes the
    /// data directory (exclusively), recovers from an unclean shutdown,
    /// indexes what is there and starts the checkpoint task.
    pub async fn open(config: &ServerConfig) -> Result<Self> {
        let s = &config.storage;
        let limit = (s.max_size_bytes != 0).then_some(s.max_size_bytes);
        match s.backend {
            Backend::Memory => Ok(Self::memory(limit, s.evict_to_percent).await),
            Backend::Disk => {
                let root = config.data_dir();
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
                    let records = RecordStore::disk(&root, &root.join("tmp"), fsync)?;
                    Ok((dir, disk, records))
                })
                .await
                .map_err(|e| Error::Task(e.to_string()))??;
                let (dir, disk, records) = opened;
                let lru = Lru::new(disk, limit, s.evict_to_percent).await?;
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
        Self::memory(limit, 90).await
    }

    async fn memory(limit: Option<u64>, evict_to_percent: u8) -> Self {
        let lru = Lru::new(MemoryStore::new(), limit, evict_to_percent)
            .await
            .expect("indexing an empty memory store cannot fail");
        let cas = Cas::new(Arc::new(lru));
        let records = RecordStore::memory();
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
