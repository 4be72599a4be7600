//! Hash verification: the only way data gets into a [`BlobStore`].
//!
//! Stores accept a [`VerifiedBlob`] (whole blobs) or commit an upload only
//! with a [`Verified`] proof (streams). Both can only be made here, after the
//! data has been hashed and matched against its digest, so no backend can be
//! handed unverified bytes by mistake.
//!
//! [`BlobStore`]: crate::store::BlobStore

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use kiln_proto::Digest;

/// Chunks up to this size are hashed on the calling task; larger ones on the
/// blocking pool, so a 1 MiB chunk (≈0.5 ms of SHA-256) never stalls the
/// runtime's workers.
const INLINE_HASH_MAX: usize = 64 * 1024;

/// The receiving end of a streaming write. Dropping it without committing
/// discards the data.
#[async_trait::async_trait]
pub trait BlobSink: Send {
    /// Appends a chunk.
    async fn append(&mut self, chunk: Bytes) -> Result<()>;

    /// Makes the blob visible, atomically.
    async fn commit(self: Box<Self>, proof: Verified) -> Result<()>;
}

/// Proof that an upload's data hashed to its digest. Only this module can
/// make one.
#[derive(Debug)]
pub struct Verified {
    digest: Digest,
}

impl Verified {
    /// The digest the data was checked against.
    pub fn digest(&self) -> Digest {
        self.digest
    }
}

/// A whole blob whose data is known to match its digest.
#[derive(Clone, Debug)]
pub struct VerifiedBlob {
    digest: Digest,
    data: Bytes,
}

impl VerifiedBlob {
    /// Checks `data` against `digest` (size first, then hash).
    pub fn new(digest: Digest, data: Bytes) -> Result<Self> {
        if data.len() as u64 != digest.size() {
            return Err(Error::SizeMismatch {
                digest,
                detail: format!(
                    "{} bytes of data sent for a blob of size {}",
                    data.len(),
                    digest.size()
                ),
            });
        }
        let actual = Digest::of(&data);
        if actual != digest {
            return Err(Error::DigestMismatch {
                expected: digest,
                actual,
            });
        }
        Ok(VerifiedBlob { digest, data })
    }

    /// A blob assembled by an upload sink, with the proof the upload was
    /// checked. The proof must be for this digest and the data its size.
    pub fn from_upload(data: Bytes, proof: Verified) -> Result<Self> {
        if data.len() as u64 != proof.digest.size() {
            return Err(Error::SizeMismatch {
                digest: proof.digest,
                detail: format!("sink assembled {} bytes", data.len()),
            });
        }
        Ok(VerifiedBlob {
            digest: proof.digest,
            data,
        })
    }

    /// Hashes `data` to make its digest.
    pub fn from_data(data: Bytes) -> Self {
        VerifiedBlob {
            digest: Digest::of(&data),
            data,
        }
    }

    /// The blob's digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The blob's bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Splits into digest and bytes.
    pub fn into_parts(self) -> (Digest, Bytes) {
        (self.digest, self.data)
    }
}

/// A streaming upload of one blob: hashes what it is given, refuses data past
/// the declared size, and commits to the store only if size and hash match.
/// Dropping it uncommitted discards what was written.
pub struct Upload {
    digest: Digest,
    hasher: Option<Sha256>,
    received: u64,
    sink: Box<dyn BlobSink>,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("digest", &self.digest)
            .field("received", &self.received)
            .finish()
    }
}

impl Upload {
    /// Starts an upload of `digest` into `sink`.
    pub fn new(digest: Digest, sink: Box<dyn BlobSink>) -> Self {
        Upload {
            digest,
            hasher: Some(Sha256::new()),
            received: 0,
            sink,
        }
    }

    /// The digest being uploaded.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Bytes received so far (what QueryWriteStatus reports).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Appends the next chunk. Hashing and writing run side by side.
    pub async fn append(&mut self, chunk: Bytes) -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let end = self.received + chunk.len() as u64;
        if end > self.digest.size() {
            return Err(Error::SizeMismatch {
                digest: self.digest,
                detail: format!(
                    "received {end} bytes, more than the declared size {}",
                    self.digest.size()
                ),
            });
        }
        let mut hasher = self
            .hasher
            .take()
            .ok_or_else(|| Error::Task("upload used after a failed append".into()))?;
        if chunk.len() <= INLINE_HASH_MAX {
            hasher.update(&chunk);
            self.sink.append(chunk).await?;
        } else {
            let for_hash = chunk.clone();
            let hashing = tokio::task::spawn_blocking(move || {
                hasher.update(&for_hash);
                hasher
            });
            let (hashed, written) = tokio::join!(hashing, self.sink.append(chunk));
            written?;
            hasher = hashed.map_err(|e| Error::Task(e.to_string()))?;
        }
        self.hasher = Some(hasher);
        self.received = end;
        Ok(())
    }

    /// Checks size and hash and, if both match, makes the blob visible.
    pub async fn commit(mut self) -> Result<()> {
        if self.received != self.digest.size() {
            return Err(Error::SizeMismatch {
                digest: self.digest,
                detail: format!(
                    "upload finished after {} bytes of {}",
                    self.received,
                    self.digest.size()
                ),
            });
        }
        let hasher = self
            .hasher
            .take()
            .ok_or_else(|| Error::Task("upload used after a failed append".into()))?;
        let actual = Digest::new(hasher.finalize().into(), self.received);
        if actual != self.digest {
            return Err(Error::DigestMismatch {
                expected: self.digest,
                actual,
            });
        }
        self.sink.commit(Verified { digest: actual }).await
    }
}

/// Hashes `data` on the blocking pool when it is large, and checks it.
pub async fn verify(digest: Digest, data: Bytes) -> Result<VerifiedBlob> {
    if data.len() <= INLINE_HASH_MAX {
        return VerifiedBlob::new(digest, data);
    }
    tokio::task::spawn_blocking(move || VerifiedBlob::new(digest, data))
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

/// Hashes `data` (on the blocking pool when large).
pub async fn hash(data: Bytes) -> Result<VerifiedBlob> {
    if data.len() <= INLINE_HASH_MAX {
        return Ok(VerifiedBlob::from_data(data));
    }
    tokio::task::spawn_blocking(move || VerifiedBlob::from_data(data))
        .await
        .map_err(|e| Error::Task(e.to_string()))
}

/// Rehashes data read back from a backend (used by crash recovery).
pub(crate) fn matches(digest: &Digest, data: &[u8]) -> bool {
    data.len() as u64 == digest.size() && Digest::of(data) == *digest
}
