//! Kiln's storage layer: the content-addressable storage, the action cache
//! and the Remote Asset mappings, behind two small seams.
//!
//! * [`BlobStore`] (in [`store`]): what every blob backend can honour, local
//!   or shared: batch-first get / put / find-missing of verified blobs, and
//!   streaming read / write for large ones. Modelled on Buildbarn's
//!   `BlobAccess`. [`OwnedStore`] is the optional capability of a store
//!   this process owns (delete, inventory, usage); the [`Lru`] decorator
//!   needs it below and offers it above.
//! * [`RecordStore`] (in [`records`]): small mutable records by key, under
//!   the [`ActionCache`] and the [`AssetStore`].
//!
//! Backends: [`MemoryStore`], [`PackStore`] for small blobs, [`FileStore`]
//! for large ones; decorators add behaviour around any backend: [`SizeSplit`]
//! routes by size (the disk backend, [`DiskStore`], is packs + files split
//! at [`disk::PACK_MAX`]), and [`Lru`] adds an in-memory index, size
//! accounting, LRU eviction and pinning of blobs in use. [`Cas`] is the
//! cloneable handle the rest of Kiln uses: it answers for the empty blob,
//! turns damaged blobs into misses and keeps the [`completeness`] cache.
//!
//! Data enters a store only as a [`VerifiedBlob`] or through an [`Upload`]
//! that checks the hash before committing.
//!
//! [`Storage::open`] opens what a [`StorageConfig`] describes. Storage knows
//! nothing of gRPC: [`Error`] names the digest or path, and the services map
//! it to a status. Metrics are reported to a [`StorageMetrics`] handle.
//!
//! Every backend runs the same [`conformance`] suite (feature
//! `conformance`, on in this crate's tests).

pub mod action_cache;
pub mod assets;
pub mod cas;
pub mod completeness;
pub mod config;
pub mod disk;
pub mod durability;
pub mod error;
pub mod files;
pub mod fsio;
pub mod lru;
pub mod memory;
pub mod metrics;
pub mod open;
pub mod packs;
pub mod records;
pub mod split;
pub mod store;
pub mod tree;
pub mod verify;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use action_cache::ActionCache;
pub use assets::AssetStore;
pub use cas::Cas;
pub use config::{Backend, StorageConfig};
pub use disk::{DiskOptions, DiskStore};
pub use error::{Error, Result};
pub use files::FileStore;
pub use kiln_proto::{Digest, HASH_LEN};
pub use lru::Lru;
pub use memory::MemoryStore;
pub use metrics::{MetricsHandle, NoMetrics, StorageMetrics};
pub use open::Storage;
pub use packs::PackStore;
pub use records::{DiskRecords, MemoryRecords, RecordStore};
pub use split::SizeSplit;
pub use store::{BlobReader, BlobStore, ChunkSource, OwnedStore, Usage};
pub use verify::{BlobSink, Upload, Verified, VerifiedBlob};
