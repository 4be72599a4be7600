//! A blob store in memory: for tests, and for caches that need not survive a
//! restart. Wrap it in [`Lru`](crate::Lru) to bound its size.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::error::Result;
use crate::store::{BlobReader, BlobStore, OwnedStore, Usage};
use crate::verify::{BlobSink, Verified, VerifiedBlob};
use kiln_proto::{Digest, HASH_LEN};

/// Blobs in a hash map. Cloning shares the same blobs.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    blobs: RwLock<HashMap<[u8; HASH_LEN], Bytes>>,
    bytes: AtomicU64,
    removals: AtomicU64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Inner {
    fn insert(&self, digest: Digest, data: Bytes) {
        let mut blobs = self.blobs.write().unwrap_or_else(|p| p.into_inner());
        if blobs.insert(*digest.hash(), data).is_none() {
            self.bytes.fetch_add(digest.size(), Ordering::Relaxed);
        }
    }

    fn lookup(&self, digest: &Digest) -> Option<Bytes> {
        let blobs = self.blobs.read().unwrap_or_else(|p| p.into_inner());
        blobs
            .get(digest.hash())
            .filter(|b| b.len() as u64 == digest.size())
            .cloned()
    }
}

#[async_trait]
impl BlobStore for MemoryStore {
    async fn get_many(&self, digests: &[Digest]) -> Vec<Result<Option<Bytes>>> {
        digests.iter().map(|d| Ok(self.inner.lookup(d))).collect()
    }

    async fn put_many(&self, blobs: Vec<VerifiedBlob>) -> Vec<Result<()>> {
        blobs
            .into_iter()
            .map(|b| {
                let (digest, data) = b.into_parts();
                self.inner.insert(digest, data);
                Ok(())
            })
            .collect()
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let blobs = self.inner.blobs.read().unwrap_or_else(|p| p.into_inner());
        Ok(digests
            .iter()
            .filter(|d| {
                blobs
                    .get(d.hash())
                    .is_none_or(|b| b.len() as u64 != d.size())
            })
            .copied()
            .collect())
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobReader>> {
        Ok(self.inner.lookup(digest).map(|data| {
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(data.len());
            BlobReader::from_bytes(data.slice(start..))
        }))
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        Ok(Box::new(MemorySink {
            store: self.inner.clone(),
            digest: *digest,
            buf: BytesMut::new(),
        }))
    }

    fn owned(&self) -> Option<&dyn OwnedStore> {
        Some(self)
    }
}

#[async_trait]
impl OwnedStore for MemoryStore {
    async fn delete(&self, digests: &[Digest]) -> Result<()> {
        let mut blobs = self.inner.blobs.write().unwrap_or_else(|p| p.into_inner());
        for d in digests {
            if let Some(b) = blobs.remove(d.hash()) {
                self.inner
                    .bytes
                    .fetch_sub(b.len() as u64, Ordering::Relaxed);
                self.inner.removals.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    async fn inventory(&self) -> Result<Vec<(Digest, std::time::SystemTime)>> {
        let blobs = self.inner.blobs.read().unwrap_or_else(|p| p.into_inner());
        Ok(blobs
            .iter()
            .map(|(h, b)| {
                (
                    Digest::new(*h, b.len() as u64),
                    std::time::SystemTime::UNIX_EPOCH,
                )
            })
            .collect())
    }

    fn usage(&self) -> Usage {
        let blobs = self.inner.blobs.read().unwrap_or_else(|p| p.into_inner());
        Usage {
            blobs: blobs.len() as u64,
            bytes: self.inner.bytes.load(Ordering::Relaxed),
            limit: None,
            removals: self.inner.removals.load(Ordering::Relaxed),
        }
    }
}

/// Collects an upload in memory until it is committed.
struct MemorySink {
    store: Arc<Inner>,
    digest: Digest,
    buf: BytesMut,
}

#[async_trait]
impl BlobSink for MemorySink {
    async fn append(&mut self, chunk: Bytes) -> Result<()> {
        self.buf.extend_from_slice(&chunk);
        Ok(())
    }

    async fn commit(self: Box<Self>, _proof: Verified) -> Result<()> {
        self.store.insert(self.digest, self.buf.freeze());
        Ok(())
    }
}
