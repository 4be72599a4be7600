//! The index decorator: an in-memory index of what the backend holds, size
//! accounting, a size limit with LRU eviction, and pins.
//!
//! * FindMissingBlobs and presence checks (action-cache completeness) are
//!   answered from the index and never touch the backend.
//! * Every get, read, put and find-missing hit marks the blob as used.
//! * When the total size goes over the limit, a background task removes the
//!   least recently used blobs until it is under the low-water mark. Deletes
//!   happen off the request path (mass deletes are slow on this ext4).
//! * A blob being read (a [`BlobReader`] is alive, or a batch read is in
//!   flight) or committed is pinned and never chosen for eviction.
//! * A commit of a blob that is being deleted waits for the delete to finish,
//!   so a delete can never remove a freshly committed file.
//! * A streaming upload holds its declared size against the limit from its
//!   first byte until it is committed or dropped, so uploads in progress
//!   (or abandoned, until the ByteStream service sweeps them) can never
//!   keep data beyond the limit; one that cannot fit even after evicting
//!   everything evictable is refused as retryable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::error::{Error, Result};
use crate::metrics::{MetricsHandle, no_metrics};
use crate::store::{BlobReader, BlobStore, OwnedStore, Usage};
use crate::verify::{BlobSink, Verified, VerifiedBlob};
use kiln_proto::{Digest, HASH_LEN};

type Hash = [u8; HASH_LEN];

/// Most blobs removed per backend delete call; the "deleting" set is
/// cleared after each, so a waiting commit never waits for a whole round.
const EVICT_CHUNK: usize = 256;

/// The index decorator over a backend `S`. Cloning shares it.
pub struct Lru<S: OwnedStore> {
    inner: Arc<S>,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
}

impl<S: OwnedStore> Clone for Lru<S> {
    fn clone(&self) -> Self {
        Lru {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            wake: self.wake.clone(),
        }
    }
}

struct Shared {
    state: Mutex<State>,
    metrics: MetricsHandle,
    limit: u64,
    low_water: u64,
    /// Wakes commits waiting for a blob's delete to finish.
    deleted: Notify,
    removals: AtomicU64,
}

#[derive(Default)]
struct State {
    entries: HashMap<Hash, Entry>,
    /// Visible entries by the tick they were queued at. A use only bumps
    /// the entry's `tick` (O(1), which keeps FindMissingBlobs cheap);
    /// eviction re-queues entries whose tick moved on, so victims still go
    /// in true least-recently-used order.
    order: BTreeMap<u64, Hash>,
    next_tick: u64,
    blobs: u64,
    bytes: u64,
    /// Removed from the index, not yet from the backend.
    deleting: HashSet<Hash>,
    /// Declared sizes of streaming uploads not yet committed or dropped.
    reserved: u64,
}

struct Entry {
    size: u64,
    /// Last use.
    tick: u64,
    /// Key of this entry in `order` (≤ `tick`).
    queued: u64,
    pins: u32,
    /// False while the first commit of the blob is in flight.
    visible: bool,
}

enum Commit {
    Present,
    Deleting,
    Go,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    fn touch(&mut self, hash: &Hash) {
        let tick = self.tick();
        if let Some(e) = self.entries.get_mut(hash) {
            e.tick = tick;
        }
    }

    fn present(&self, d: &Digest) -> bool {
        self.entries
            .get(d.hash())
            .is_some_and(|e| e.visible && e.size == d.size())
    }

    /// Pins `d` if present, marking it used.
    fn pin(&mut self, d: &Digest) -> bool {
        if !self.present(d) {
            return false;
        }
        self.touch(d.hash());
        if let Some(e) = self.entries.get_mut(d.hash()) {
            e.pins += 1;
        }
        true
    }

    fn unpin(&mut self, hash: &Hash) {
        if let Some(e) = self.entries.get_mut(hash) {
            e.pins = e.pins.saturating_sub(1);
            if e.pins == 0 && !e.visible {
                self.entries.remove(hash);
            }
        }
    }

    fn begin_commit(&mut self, d: &Digest) -> Commit {
        if self.deleting.contains(d.hash()) {
            return Commit::Deleting;
        }
        match self.entries.get_mut(d.hash()) {
            Some(e) if e.visible => {
                self.touch(d.hash());
                Commit::Present
            }
            Some(e) => {
                e.pins += 1;
                Commit::Go
            }
            None => {
                self.entries.insert(
                    *d.hash(),
                    Entry {
                        size: d.size(),
                        tick: 0,
                        queued: 0,
                        pins: 1,
                        visible: false,
                    },
                );
                Commit::Go
            }
        }
    }

    fn finish_commit(&mut self, d: &Digest, ok: bool) {
        let tick = self.tick();
        let Some(e) = self.entries.get_mut(d.hash()) else {
            return;
        };
        e.pins = e.pins.saturating_sub(1);
        if ok && !e.visible {
            e.visible = true;
            e.tick = tick;
            e.queued = tick;
            self.order.insert(tick, *d.hash());
            self.blobs += 1;
            self.bytes += e.size;
        } else if !e.visible && e.pins == 0 {
            self.entries.remove(d.hash());
        }
    }

    /// Drops `d` from the index (it is gone from the backend).
    fn forget(&mut self, d: &Digest) -> bool {
        match self.entries.remove(d.hash()) {
            Some(e) if e.visible => {
                self.order.remove(&e.queued);
                self.blobs -= 1;
                self.bytes -= e.size;
                true
            }
            Some(e) => {
                // A commit in flight; put the placeholder back.
                self.entries.insert(*d.hash(), e);
                false
            }
            None => false,
        }
    }

    /// Takes up to `max` unpinned least-recently-used blobs out of the index
    /// (into `deleting`) until `bytes` would reach `target`.
    fn take_victims(&mut self, target: u64, max: usize) -> Vec<Digest> {
        let mut victims = Vec::new();
        let mut freed = 0u64;
        let excess = (self.bytes + self.reserved).saturating_sub(target);
        let mut after = 0u64;
        while freed < excess && victims.len() < max {
            let Some((&key, &hash)) = self
                .order
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .next()
            else {
                break;
            };
            after = key;
            let Some(e) = self.entries.get_mut(&hash) else {
                self.order.remove(&key);
                continue;
            };
            if e.tick > key {
                // Used since it was queued: move it to its place and meet
                // it again there.
                self.order.remove(&key);
                e.queued = e.tick;
                self.order.insert(e.tick, hash);
                continue;
            }
            if e.pins > 0 {
                continue;
            }
            freed += e.size;
            victims.push(Digest::new(hash, e.size));
        }
        for v in &victims {
            self.forget(v);
            self.deleting.insert(*v.hash());
        }
        victims
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Pins on some blobs, released on drop.
struct Pins {
    shared: Arc<Shared>,
    hashes: Vec<Hash>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        for h in &self.hashes {
            st.unpin(h);
        }
    }
}

impl<S: OwnedStore> Lru<S> {
    /// Indexes what `inner` holds and starts the evictor. `limit` is the size
    /// limit in bytes (`None`: unlimited); eviction brings the total down to
    /// `low_water_percent` of it.
    pub async fn new(inner: S, limit: Option<u64>, low_water_percent: u8) -> Result<Self> {
        Self::with_metrics(inner, limit, low_water_percent, no_metrics()).await
    }

    /// [`Lru::new`], counting evictions in `metrics`.
    pub async fn with_metrics(
        inner: S,
        limit: Option<u64>,
        low_water_percent: u8,
        metrics: MetricsHandle,
    ) -> Result<Self> {
        let mut inventory = inner.inventory().await?;
        inventory.sort_by_key(|(_, t)| *t);
        let limit = limit.unwrap_or(u64::MAX);
        let low_water = if limit == u64::MAX {
            u64::MAX
        } else {
            (limit as u128 * low_water_percent.min(100) as u128 / 100) as u64
        };
        let mut state = State::default();
        for (d, _) in inventory {
            let tick = state.tick();
            if state.entries.contains_key(d.hash()) {
                continue;
            }
            state.entries.insert(
                *d.hash(),
                Entry {
                    size: d.size(),
                    tick,
                    queued: tick,
                    pins: 0,
                    visible: true,
                },
            );
            state.order.insert(tick, *d.hash());
            state.blobs += 1;
            state.bytes += d.size();
        }
        let over = state.bytes > limit;
        let lru = Lru {
            inner: Arc::new(inner),
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                metrics,
                limit,
                low_water,
                deleted: Notify::new(),
                removals: AtomicU64::new(0),
            }),
            wake: Arc::new(Notify::new()),
        };
        let weak = Arc::downgrade(&lru.shared);
        tokio::spawn(evictor(weak, lru.inner.clone(), lru.wake.clone()));
        if over {
            lru.wake.notify_one();
        }
        Ok(lru)
    }

    /// The backend under the index.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Runs eviction now, until the store is within its limit (or all that
    /// is left is pinned). Normally the background task does this.
    pub async fn evict_now(&self) {
        evict(&self.shared, &*self.inner).await;
    }

    fn check_size(&self, d: &Digest) -> Result<()> {
        if d.size() > self.shared.limit {
            return Err(Error::TooLarge {
                digest: *d,
                limit: self.shared.limit,
            });
        }
        Ok(())
    }

    fn after_insert(&self) {
        let st = self.shared.lock();
        if st.bytes + st.reserved > self.shared.limit {
            self.wake.notify_one();
        }
    }

    /// Holds `d`'s size against the limit for an upload in progress.
    /// Refused when uploads in progress alone would leave it no room; else
    /// eviction makes room for it (in the background, as for commits).
    fn reserve(&self, d: &Digest) -> Result<Reservation> {
        {
            let mut st = self.shared.lock();
            if st.reserved + d.size() > self.shared.limit {
                return Err(Error::UploadsFull {
                    digest: *d,
                    reserved: st.reserved,
                    limit: self.shared.limit,
                });
            }
            st.reserved += d.size();
        }
        self.after_insert();
        Ok(Reservation {
            shared: self.shared.clone(),
            size: d.size(),
        })
    }

    /// Handles a backend read result for a blob the index listed: if the
    /// backend no longer has it, the index forgets it too.
    fn reconcile<T>(&self, d: &Digest, r: &Result<Option<T>>) {
        let gone = match r {
            Ok(None) => {
                warn!(digest = %d, "blob listed in the index is missing from the backend");
                true
            }
            Err(Error::Corrupt { .. }) => true,
            _ => false,
        };
        if gone && self.shared.lock().forget(d) {
            self.shared.removals.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until none of `hashes` is being deleted, then runs `f` on the
    /// state under the same lock.
    async fn when_not_deleting<T>(&self, hashes: &[Hash], mut f: impl FnMut(&mut State) -> T) -> T {
        loop {
            let notified = self.shared.deleted.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.shared.lock();
                if !hashes.iter().any(|h| st.deleting.contains(h)) {
                    return f(&mut st);
                }
            }
            debug!("commit waits for a delete of the same blob to finish");
            notified.await;
        }
    }
}

impl<S: OwnedStore> Drop for Lru<S> {
    fn drop(&mut self) {
        // The last handle gone: let the evictor notice and exit.
        if Arc::strong_count(&self.shared) == 1 {
            self.wake.notify_one();
        }
    }
}

async fn evictor<S: OwnedStore>(shared: Weak<Shared>, inner: Arc<S>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        evict(&shared, &*inner).await;
    }
}

async fn evict<S: OwnedStore>(shared: &Shared, inner: &S) {
    let (start_bytes, limit) = {
        let st = shared.lock();
        (st.bytes + st.reserved, shared.limit)
    };
    if start_bytes <= limit {
        return;
    }
    let mut evicted = 0u64;
    loop {
        let victims = shared.lock().take_victims(shared.low_water, EVICT_CHUNK);
        if victims.is_empty() {
            let st = shared.lock();
            if st.bytes + st.reserved > shared.low_water {
                warn!(
                    bytes = st.bytes,
                    uploading = st.reserved,
                    limit,
                    "storage is over its limit but everything left is in use"
                );
            }
            break;
        }
        evicted += victims.len() as u64;
        shared
            .metrics
            .evicted(victims.len() as u64, victims.iter().map(|v| v.size()).sum());
        shared
            .removals
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        if let Err(e) = inner.delete(&victims).await {
            error!(error = %e, "eviction could not delete blobs");
        }
        {
            let mut st = shared.lock();
            for v in &victims {
                st.deleting.remove(v.hash());
            }
        }
        shared.deleted.notify_waiters();
    }
    info!(
        evicted,
        before = start_bytes,
        after = shared.lock().bytes,
        limit,
        "evicted least recently used blobs"
    );
}

#[async_trait]
impl<S: OwnedStore> BlobStore for Lru<S> {
    async fn get_many(&self, digests: &[Digest]) -> Vec<Result<Option<Bytes>>> {
        let mut present = Vec::new();
        {
            let mut st = self.shared.lock();
            for (i, d) in digests.iter().enumerate() {
                if st.pin(d) {
                    present.push(i);
                }
            }
        }
        let pins = Pins {
            shared: self.shared.clone(),
            hashes: present.iter().map(|&i| *digests[i].hash()).collect(),
        };
        let wanted: Vec<Digest> = present.iter().map(|&i| digests[i]).collect();
        let results = self.inner.get_many(&wanted).await;
        drop(pins);
        let mut out: Vec<Result<Option<Bytes>>> = digests.iter().map(|_| Ok(None)).collect();
        for (&i, r) in present.iter().zip(results) {
            self.reconcile(&digests[i], &r);
            out[i] = r;
        }
        out
    }

    async fn put_many(&self, blobs: Vec<VerifiedBlob>) -> Vec<Result<()>> {
        let n = blobs.len();
        let mut out: Vec<Option<Result<()>>> = (0..n).map(|_| None).collect();
        let mut go = Vec::new();
        let mut go_idx = Vec::new();
        let mut candidates = Vec::new();
        for (i, b) in blobs.into_iter().enumerate() {
            match self.check_size(&b.digest()) {
                Ok(()) => candidates.push((i, b)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        let hashes: Vec<Hash> = candidates.iter().map(|(_, b)| *b.digest().hash()).collect();
        let decisions: Vec<bool> = self
            .when_not_deleting(&hashes, |st| {
                candidates
                    .iter()
                    .map(|(_, b)| matches!(st.begin_commit(&b.digest()), Commit::Go))
                    .collect()
            })
            .await;
        for ((i, b), write) in candidates.into_iter().zip(decisions) {
            if write {
                go_idx.push(i);
                go.push(b);
            } else {
                out[i] = Some(Ok(()));
            }
        }
        if !go.is_empty() {
            let digests: Vec<Digest> = go.iter().map(|b| b.digest()).collect();
            let results = self.inner.put_many(go).await;
            {
                let mut st = self.shared.lock();
                for (d, r) in digests.iter().zip(&results) {
                    st.finish_commit(d, r.is_ok());
                }
            }
            for (i, r) in go_idx.into_iter().zip(results) {
                out[i] = Some(r);
            }
            self.after_insert();
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Task("blob lost in batch".into()))))
            .collect()
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut st = self.shared.lock();
        let mut missing = Vec::new();
        for d in digests {
            if st.present(d) {
                st.touch(d.hash());
            } else {
                missing.push(*d);
            }
        }
        Ok(missing)
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobReader>> {
        if !self.shared.lock().pin(digest) {
            return Ok(None);
        }
        let pins = Pins {
            shared: self.shared.clone(),
            hashes: vec![*digest.hash()],
        };
        let r = self.inner.read(digest, offset).await;
        self.reconcile(digest, &r);
        Ok(r?.map(|reader| reader.hold(Box::new(pins))))
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        self.check_size(digest)?;
        let reservation = self.reserve(digest)?;
        let sink = self.inner.write(digest).await?;
        Ok(Box::new(LruSink {
            lru: self.clone(),
            digest: *digest,
            sink,
            _reservation: reservation,
        }))
    }

    fn owned(&self) -> Option<&dyn OwnedStore> {
        Some(self)
    }
}

#[async_trait]
impl<S: OwnedStore> OwnedStore for Lru<S> {
    async fn delete(&self, digests: &[Digest]) -> Result<()> {
        let removed: Vec<Digest> = {
            let mut st = self.shared.lock();
            let mut removed = Vec::new();
            for d in digests {
                if st.forget(d) {
                    st.deleting.insert(*d.hash());
                    removed.push(*d);
                }
            }
            removed
        };
        self.shared
            .removals
            .fetch_add(removed.len() as u64, Ordering::Relaxed);
        let r = self.inner.delete(digests).await;
        {
            let mut st = self.shared.lock();
            for d in &removed {
                st.deleting.remove(d.hash());
            }
        }
        self.shared.deleted.notify_waiters();
        r
    }

    async fn inventory(&self) -> Result<Vec<(Digest, std::time::SystemTime)>> {
        let st = self.shared.lock();
        // Ticks stand in for times: only the order matters.
        Ok(st
            .entries
            .iter()
            .filter(|(_, e)| e.visible)
            .map(|(h, e)| {
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(e.tick);
                (Digest::new(*h, e.size), t)
            })
            .collect())
    }

    fn usage(&self) -> Usage {
        let st = self.shared.lock();
        Usage {
            blobs: st.blobs,
            bytes: st.bytes,
            limit: (self.shared.limit != u64::MAX).then_some(self.shared.limit),
            removals: self.shared.removals.load(Ordering::Relaxed),
        }
    }
}

struct LruSink<S: OwnedStore> {
    lru: Lru<S>,
    digest: Digest,
    sink: Box<dyn BlobSink>,
    /// Released when the sink goes: committed (the blob then counts in
    /// `bytes`) or dropped (its data discarded).
    _reservation: Reservation,
}

/// An upload's size held against the limit.
struct Reservation {
    shared: Arc<Shared>,
    size: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.reserved = st.reserved.saturating_sub(self.size);
    }
}

#[async_trait]
impl<S: OwnedStore> BlobSink for LruSink<S> {
    async fn append(&mut self, chunk: Bytes) -> Result<()> {
        self.sink.append(chunk).await
    }

    async fn commit(self: Box<Self>, proof: Verified) -> Result<()> {
        let LruSink {
            lru,
            digest,
            sink,
            _reservation,
        } = *self;
        let decision = lru
            .when_not_deleting(&[*digest.hash()], |st| st.begin_commit(&digest))
            .await;
        match decision {
            // Someone else committed it first: dropping our sink discards
            // our copy.
            Commit::Present => Ok(()),
            Commit::Deleting => unreachable!("when_not_deleting waited for the delete"),
            Commit::Go => {
                let r = sink.commit(proof).await;
                lru.shared.lock().finish_commit(&digest, r.is_ok());
                lru.after_insert();
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryStore, Upload};

    fn blob(fill: u8, len: usize) -> VerifiedBlob {
        VerifiedBlob::from_data(Bytes::from(vec![fill; len]))
    }

    #[tokio::test]
    async fn evicts_least_recently_used_and_never_a_pinned_blob() {
        let lru = Lru::new(MemoryStore::new(), Some(250), 100).await.unwrap();
        let (a, b, c, d) = (blob(1, 100), blob(2, 100), blob(3, 100), blob(4, 100));
        lru.put_many(vec![a.clone(), b.clone()]).await;
        // Use `a`, so `b` is the least recently used.
        assert!(lru.find_missing(&[a.digest()]).await.unwrap().is_empty());
        lru.put_many(vec![c.clone()]).await;
        lru.evict_now().await;
        let missing = lru
            .find_missing(&[a.digest(), b.digest(), c.digest()])
            .await
            .unwrap();
        assert_eq!(missing, vec![b.digest()]);
        assert_eq!(lru.usage().bytes, 200);

        // `a` is now the oldest, but a reader holds it.
        let reader = lru.read(&a.digest(), 0).await.unwrap().unwrap();
        lru.find_missing(&[c.digest()]).await.unwrap();
        lru.put_many(vec![d.clone()]).await;
        lru.evict_now().await;
        assert_eq!(
            lru.find_missing(&[a.digest(), c.digest(), d.digest()])
                .await
                .unwrap(),
            vec![c.digest()],
            "the pinned blob survives; the next least recently used goes"
        );
        assert_eq!(reader.read_to_end().await.unwrap(), a.data().clone());
        assert_eq!(lru.usage().removals, 2);
    }

    #[tokio::test]
    async fn uses_reorder_victims() {
        let lru = Lru::new(MemoryStore::new(), Some(400), 75).await.unwrap();
        let b: Vec<VerifiedBlob> = (1..=4).map(|i| blob(i, 100)).collect();
        for x in &b {
            lru.put_many(vec![x.clone()]).await;
        }
        // Oldest first: b0, b1, b2, b3. Use b1 then b0: now b2, b3 are oldest.
        lru.get_many(&[b[1].digest()]).await;
        lru.find_missing(&[b[0].digest()]).await.unwrap();
        lru.put_many(vec![blob(9, 100)]).await;
        lru.evict_now().await;
        let all: Vec<Digest> = b.iter().map(|x| x.digest()).collect();
        let missing = lru.find_missing(&all).await.unwrap();
        assert_eq!(missing, vec![b[2].digest(), b[3].digest(),]);
        assert_eq!(lru.usage().bytes, 300);
    }

    #[tokio::test]
    async fn concurrent_commits_of_one_blob_both_succeed() {
        let lru = Lru::new(MemoryStore::new(), None, 90).await.unwrap();
        let data = Bytes::from(vec![7u8; 300_000]);
        let digest = Digest::of(&data);
        let mut u1 = Upload::new(digest, lru.write(&digest).await.unwrap());
        let mut u2 = Upload::new(digest, lru.write(&digest).await.unwrap());
        u1.append(data.slice(..1000)).await.unwrap();
        u2.append(data.clone()).await.unwrap();
        u1.append(data.slice(1000..)).await.unwrap();
        u2.commit().await.unwrap();
        u1.commit().await.unwrap();
        let usage = lru.usage();
        assert_eq!((usage.blobs, usage.bytes), (1, 300_000));
        assert_eq!(
            lru.get_many(&[digest]).await[0].as_ref().unwrap(),
            &Some(data)
        );
    }

    #[tokio::test]
    async fn bad_upload_stores_nothing() {
        let lru = Lru::new(MemoryStore::new(), None, 90).await.unwrap();
        let digest = Digest::of(b"right");
        let mut u = Upload::new(digest, lru.write(&digest).await.unwrap());
        u.append(Bytes::from_static(b"wrong")).await.unwrap();
        let e = u.commit().await.unwrap_err();
        assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
        assert_eq!(lru.usage().blobs, 0);
        assert_eq!(lru.inner().usage().blobs, 0);
    }

    #[tokio::test]
    async fn uploads_in_progress_hold_their_size_against_the_limit() {
        let lru = Lru::new(MemoryStore::new(), Some(250), 100).await.unwrap();
        lru.put_many(vec![blob(1, 100)]).await;
        let big = blob(2, 200);
        let mut upload = Upload::new(big.digest(), lru.write(&big.digest()).await.unwrap());
        upload.append(big.data().slice(..50)).await.unwrap();
        // Committed 100 + reserved 200 is over 250: the old blob goes.
        lru.evict_now().await;
        assert_eq!(lru.usage().blobs, 0, "evicted to make room for the upload");
        // A second 200-byte upload cannot fit beside the first at all.
        let other = blob(3, 200);
        let e = lru.write(&other.digest()).await.err().expect("no room");
        // (Retryable: the services map it to UNAVAILABLE; see kiln-server's
        // `storage_errors_keep_their_codes`.)
        assert!(matches!(e, Error::UploadsFull { .. }), "{e}");
        // Dropped uncommitted, its room is free again.
        drop(upload);
        let mut again = Upload::new(other.digest(), lru.write(&other.digest()).await.unwrap());
        again.append(other.data().clone()).await.unwrap();
        again.commit().await.unwrap();
        assert_eq!(lru.usage().bytes, 200);
        assert_eq!(lru.shared.lock().reserved, 0, "released on commit");
    }

    #[tokio::test]
    async fn too_large_for_the_limit() {
        let lru = Lru::new(MemoryStore::new(), Some(10), 90).await.unwrap();
        let r = lru.put_many(vec![blob(1, 11)]).await;
        assert!(matches!(r[0], Err(Error::TooLarge { .. })));
    }
}
