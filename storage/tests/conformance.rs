//! Every blob-store backend and decorator, and every record store, runs the
//! same suites (`kiln_storage::conformance`).

use kiln_storage::conformance::{blob_store, owned_store, record_store};
use kiln_storage::disk::{self, SEGMENT_BYTES};
use kiln_storage::{
    DiskOptions, DiskRecords, FileStore, Lru, MemoryRecords, MemoryStore, PackStore, SizeSplit,
};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test]
async fn memory() {
    blob_store(&MemoryStore::new()).await;
    owned_store(&MemoryStore::new()).await;
}

#[tokio::test]
async fn packs() {
    for fsync in [false, true] {
        let (d1, d2) = (tmp(), tmp());
        let opts = DiskOptions { fsync };
        let (s, _) = PackStore::open(d1.path(), opts, SEGMENT_BYTES, None).unwrap();
        blob_store(&s).await;
        let (s, _) = PackStore::open(d2.path(), opts, SEGMENT_BYTES, None).unwrap();
        owned_store(&s).await;
    }
}

#[tokio::test]
async fn files() {
    let (d1, d2) = (tmp(), tmp());
    let (s, _) = FileStore::open(d1.path(), DiskOptions::default(), None).unwrap();
    blob_store(&s).await;
    let (s, _) = FileStore::open(d2.path(), DiskOptions::default(), None).unwrap();
    owned_store(&s).await;
}

#[tokio::test]
async fn disk() {
    let (d1, d2) = (tmp(), tmp());
    let (s, _) = disk::open(d1.path(), DiskOptions::default(), None).unwrap();
    blob_store(&s).await;
    let (s, _) = disk::open(d2.path(), DiskOptions::default(), None).unwrap();
    owned_store(&s).await;
}

/// A split at a threshold the suite's blobs fall on both sides of.
#[tokio::test]
async fn size_split() {
    let split = || SizeSplit::new(MemoryStore::new(), MemoryStore::new(), 1024);
    blob_store(&split()).await;
    owned_store(&split()).await;
}

#[tokio::test]
async fn lru_over_memory() {
    let lru = Lru::new(MemoryStore::new(), None, 90).await.unwrap();
    blob_store(&lru).await;
    let lru = Lru::new(MemoryStore::new(), Some(1 << 30), 90)
        .await
        .unwrap();
    owned_store(&lru).await;
}

#[tokio::test]
async fn lru_over_disk() {
    let (d1, d2) = (tmp(), tmp());
    let (s, _) = disk::open(d1.path(), DiskOptions::default(), None).unwrap();
    blob_store(&Lru::new(s, Some(1 << 30), 90).await.unwrap()).await;
    let (s, _) = disk::open(d2.path(), DiskOptions::default(), None).unwrap();
    owned_store(&Lru::new(s, None, 90).await.unwrap()).await;
}

/// Through the trait object the `Cas` handle holds.
#[tokio::test]
async fn as_trait_object() {
    let store: std::sync::Arc<dyn kiln_storage::BlobStore> =
        std::sync::Arc::new(Lru::new(MemoryStore::new(), None, 90).await.unwrap());
    blob_store(&*store).await;
}

#[tokio::test]
async fn records() {
    record_store(&MemoryRecords::new()).await;
    let d = tmp();
    for fsync in [false, true] {
        let sub = d.path().join(format!("{fsync}"));
        let store = DiskRecords::open(&sub.join("rec"), &sub.join("tmp"), fsync).unwrap();
        record_store(&store).await;
    }
}
