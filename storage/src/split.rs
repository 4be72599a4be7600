//! Routing by size: small blobs to one store, large ones to another (like
//! Buildbarn's size-distinguishing blob access). Which store holds a blob
//! follows from its digest, so no lookup is ever needed to route.

use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::store::{BlobReader, BlobStore, OwnedStore, Usage};
use crate::verify::{BlobSink, VerifiedBlob};
use kiln_proto::Digest;

/// Blobs of at most `threshold` bytes go to `small`, the rest to `large`.
#[derive(Clone, Debug)]
pub struct SizeSplit<S, L> {
    small: S,
    large: L,
    threshold: u64,
}

impl<S: OwnedStore, L: OwnedStore> SizeSplit<S, L> {
    /// Routes blobs of at most `threshold` bytes to `small`.
    pub fn new(small: S, large: L, threshold: u64) -> Self {
        SizeSplit {
            small,
            large,
            threshold,
        }
    }

    /// The store for small blobs.
    pub fn small(&self) -> &S {
        &self.small
    }

    /// The store for large blobs.
    pub fn large(&self) -> &L {
        &self.large
    }

    fn is_small(&self, d: &Digest) -> bool {
        d.size() <= self.threshold
    }

    /// Splits items by the size of their digest, remembering positions.
    fn partition<T>(
        &self,
        items: Vec<T>,
        digest: impl Fn(&T) -> Digest,
    ) -> (Vec<usize>, Vec<T>, Vec<usize>, Vec<T>) {
        let (mut si, mut s, mut li, mut l) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, it) in items.into_iter().enumerate() {
            if self.is_small(&digest(&it)) {
                si.push(i);
                s.push(it);
            } else {
                li.push(i);
                l.push(it);
            }
        }
        (si, s, li, l)
    }
}

/// Puts results for two partitions back in request order.
fn merge<T>(n: usize, a: (Vec<usize>, Vec<T>), b: (Vec<usize>, Vec<T>)) -> Vec<T> {
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for (idx, vals) in [a, b] {
        for (i, v) in idx.into_iter().zip(vals) {
            out[i] = Some(v);
        }
    }
    out.into_iter()
        .map(|v| v.expect("every position filled by one side"))
        .collect()
}

#[async_trait]
impl<S: OwnedStore, L: OwnedStore> BlobStore for SizeSplit<S, L> {
    async fn get_many(&self, digests: &[Digest]) -> Vec<Result<Option<Bytes>>> {
        let (si, s, li, l) = self.partition(digests.to_vec(), |d| *d);
        let (rs, rl) = tokio::join!(
            async {
                if s.is_empty() {
                    Vec::new()
                } else {
                    self.small.get_many(&s).await
                }
            },
            async {
                if l.is_empty() {
                    Vec::new()
                } else {
                    self.large.get_many(&l).await
                }
            }
        );
        merge(digests.len(), (si, rs), (li, rl))
    }

    async fn put_many(&self, blobs: Vec<VerifiedBlob>) -> Vec<Result<()>> {
        let n = blobs.len();
        let (si, s, li, l) = self.partition(blobs, |b| b.digest());
        let (rs, rl) = tokio::join!(
            async {
                if s.is_empty() {
                    Vec::new()
                } else {
                    self.small.put_many(s).await
                }
            },
            async {
                if l.is_empty() {
                    Vec::new()
                } else {
                    self.large.put_many(l).await
                }
            }
        );
        merge(n, (si, rs), (li, rl))
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let (_, s, _, l) = self.partition(digests.to_vec(), |d| *d);
        let mut missing = self.small.find_missing(&s).await?;
        missing.extend(self.large.find_missing(&l).await?);
        // Back in request order.
        let set: std::collections::HashSet<Digest> = missing.into_iter().collect();
        Ok(digests
            .iter()
            .filter(|d| set.contains(d))
            .copied()
            .collect())
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobReader>> {
        if self.is_small(digest) {
            self.small.read(digest, offset).await
        } else {
            self.large.read(digest, offset).await
        }
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        if self.is_small(digest) {
            self.small.write(digest).await
        } else {
            self.large.write(digest).await
        }
    }

    fn owned(&self) -> Option<&dyn OwnedStore> {
        Some(self)
    }
}

#[async_trait]
impl<S: OwnedStore, L: OwnedStore> OwnedStore for SizeSplit<S, L> {
    async fn delete(&self, digests: &[Digest]) -> Result<()> {
        let (_, s, _, l) = self.partition(digests.to_vec(), |d| *d);
        if !s.is_empty() {
            self.small.delete(&s).await?;
        }
        if !l.is_empty() {
            self.large.delete(&l).await?;
        }
        Ok(())
    }

    async fn inventory(&self) -> Result<Vec<(Digest, SystemTime)>> {
        let mut all = self.small.inventory().await?;
        all.extend(self.large.inventory().await?);
        Ok(all)
    }

    fn usage(&self) -> Usage {
        let (a, b) = (self.small.usage(), self.large.usage());
        Usage {
            blobs: a.blobs + b.blobs,
            bytes: a.bytes + b.bytes,
            limit: None,
            removals: a.removals + b.removals,
        }
    }
}
