//! The blob-store seam: the narrow [`BlobStore`] trait every backend can
//! honour (batch get / put / find-missing of verified blobs, streaming read
//! and write), and the optional [`OwnedStore`] capability of a store this
//! process owns (delete, inventory, usage), which the LRU builds on.

use std::any::Any;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::verify::{BlobSink, VerifiedBlob};
use kiln_proto::Digest;

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

/// A content-addressed blob store: what every backend can honour, local or
/// shared.
///
/// Implementations never expose a partial or unverified blob: `put_many`
/// takes verified blobs and a [`BlobSink`] commits only with a [`Verified`]
/// proof. The empty blob needs no special case here; [`Cas`](crate::Cas)
/// answers for it.
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

    /// The [`OwnedStore`] capability, if this store has it. A store shared
    /// with other processes (an object store) does not: it cannot count
    /// what it holds, nor see what others remove.
    fn owned(&self) -> Option<&dyn OwnedStore> {
        None
    }
}

/// What only a store owned by this process can do: remove blobs, list what
/// it holds and account for its size. The [`Lru`](crate::Lru) decorator
/// needs it below itself, and offers it above.
#[async_trait]
pub trait OwnedStore: BlobStore {
    /// Removes blobs; absent ones are ignored.
    async fn delete(&self, digests: &[Digest]) -> Result<()>;

    /// Every blob held, with the time it was last written (used to rebuild
    /// an index, oldest first, when a decorator opens over a persistent
    /// backend).
    async fn inventory(&self) -> Result<Vec<(Digest, std::time::SystemTime)>>;

    /// What the store holds.
    fn usage(&self) -> Usage;
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
            return Err(Error::Task(format!(
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
