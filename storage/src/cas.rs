//! [`Cas`]: the cloneable handle to the content-addressable storage that the
//! services (and the scheduler, and the execution engine) use.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use crate::completeness::CompletenessCache;
use crate::error::{Error, Result};
use crate::store::{BlobReader, BlobStore, Usage};
use crate::verify::{self, BlobSink, Upload, Verified, VerifiedBlob};
use kiln_proto::Digest;

/// A handle to the CAS. Cheap to clone; all clones share one store.
///
/// The empty blob is always present: it is never stored, always found, and
/// reads as zero bytes (and so decodes as an empty `Directory`).
#[derive(Clone)]
pub struct Cas {
    store: Arc<dyn BlobStore>,
    completeness: Arc<CompletenessCache>,
}

impl std::fmt::Debug for Cas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cas").field("usage", &self.usage()).finish()
    }
}

impl Cas {
    /// A handle over `store` (normally an [`Lru`](crate::Lru) over a backend).
    pub fn new(store: Arc<dyn BlobStore>) -> Self {
        Cas {
            store,
            completeness: Arc::default(),
        }
    }

    pub(crate) fn completeness(&self) -> &CompletenessCache {
        &self.completeness
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    /// Reads a whole blob; `None` if absent.
    pub async fn get(&self, digest: &Digest) -> Result<Option<Bytes>> {
        self.get_many(std::slice::from_ref(digest))
            .await
            .pop()
            .unwrap_or(Ok(None))
    }

    /// Reads whole blobs, one result per digest (one trip to the disk for
    /// the lot). A blob found damaged reads as absent.
    pub async fn get_many(&self, digests: &[Digest]) -> Vec<Result<Option<Bytes>>> {
        let real: Vec<Digest> = digests.iter().filter(|d| !d.is_empty()).copied().collect();
        let mut fetched = if real.is_empty() {
            Vec::new()
        } else {
            self.store.get_many(&real).await
        }
        .into_iter();
        digests
            .iter()
            .map(|d| {
                if d.is_empty() {
                    return Ok(Some(Bytes::new()));
                }
                match fetched.next() {
                    Some(Err(Error::Corrupt { .. })) => Ok(None),
                    Some(r) => r,
                    None => Ok(None),
                }
            })
            .collect()
    }

    /// Stores `data`, returning its digest.
    pub async fn put(&self, data: Bytes) -> Result<Digest> {
        let blob = verify::hash(data).await?;
        let digest = blob.digest();
        self.put_verified(blob).await?;
        Ok(digest)
    }

    /// Stores `data` under `digest`, after checking they match.
    pub async fn put_checked(&self, digest: Digest, data: Bytes) -> Result<()> {
        let blob = verify::verify(digest, data).await?;
        self.put_verified(blob).await
    }

    /// Stores a verified blob.
    pub async fn put_verified(&self, blob: VerifiedBlob) -> Result<()> {
        self.put_many(vec![blob]).await.pop().unwrap_or(Ok(()))
    }

    /// Stores verified blobs, one result per blob.
    pub async fn put_many(&self, blobs: Vec<VerifiedBlob>) -> Vec<Result<()>> {
        let n = blobs.len();
        let mut idx = Vec::with_capacity(n);
        let mut real = Vec::with_capacity(n);
        for (i, b) in blobs.into_iter().enumerate() {
            if !b.digest().is_empty() {
                idx.push(i);
                real.push(b);
            }
        }
        let mut out: Vec<Result<()>> = (0..n).map(|_| Ok(())).collect();
        if !real.is_empty() {
            for (i, r) in idx.into_iter().zip(self.store.put_many(real).await) {
                out[i] = r;
            }
        }
        out
    }

    /// Stores the canonical encoding of a message, returning its digest.
    pub async fn put_message<M: Message>(&self, message: &M) -> Result<Digest> {
        self.put(Bytes::from(message.encode_to_vec())).await
    }

    /// Reads and decodes a message; `what` names the message type in errors
    /// ("Directory", "Tree", ...).
    pub async fn get_message<M: Message + Default>(
        &self,
        digest: &Digest,
        what: &'static str,
    ) -> Result<Option<M>> {
        match self.get(digest).await? {
            None => Ok(None),
            Some(b) => M::decode(b).map(Some).map_err(|source| Error::Decode {
                what,
                digest: *digest,
                source,
            }),
        }
    }

    /// The digests among `digests` that are absent, in request order
    /// (duplicates kept). Present ones count as used.
    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let real: Vec<Digest> = digests.iter().filter(|d| !d.is_empty()).copied().collect();
        if real.is_empty() {
            return Ok(Vec::new());
        }
        self.store.find_missing(&real).await
    }

    /// Whether a blob is present.
    pub async fn contains(&self, digest: &Digest) -> Result<bool> {
        Ok(self
            .find_missing(std::slice::from_ref(digest))
            .await?
            .is_empty())
    }

    /// Opens a blob for streaming from `offset`. The blob cannot be evicted
    /// while the reader lives. `offset` past the end is OUT_OF_RANGE.
    pub async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobReader>> {
        if offset > digest.size() {
            return Err(Error::OutOfRange(format!(
                "read offset {offset} is past the end of blob {digest}"
            )));
        }
        if digest.is_empty() {
            return Ok(Some(BlobReader::from_bytes(Bytes::new())));
        }
        match self.store.read(digest, offset).await {
            Err(Error::Corrupt { .. }) => Ok(None),
            r => r,
        }
    }

    /// Starts a verified streaming upload of `digest`.
    pub async fn begin_upload(&self, digest: &Digest) -> Result<Upload> {
        let sink: Box<dyn BlobSink> = if digest.is_empty() {
            Box::new(NullSink)
        } else {
            self.store.write(digest).await?
        };
        Ok(Upload::new(*digest, sink))
    }

    /// What the store holds (all zero for a store that does not keep
    /// account: one shared with other processes).
    pub fn usage(&self) -> Usage {
        self.store.owned().map(|o| o.usage()).unwrap_or_default()
    }

    /// Blobs removed since the store was opened, if the store keeps account:
    /// while it has not moved, nothing that was present has gone.
    pub fn removals(&self) -> Option<u64> {
        self.store.owned().map(|o| o.usage().removals)
    }
}

/// Where an upload of the empty blob goes: nowhere, it always exists.
struct NullSink;

#[async_trait::async_trait]
impl BlobSink for NullSink {
    async fn append(&mut self, _chunk: Bytes) -> Result<()> {
        Ok(())
    }

    async fn commit(self: Box<Self>, _proof: Verified) -> Result<()> {
        Ok(())
    }
}
