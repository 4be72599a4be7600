//! Kiln's server: content-addressed storage, the REAPI services
//! (Capabilities, CAS, ByteStream, ActionCache, Remote Asset, Execution,
//! Operations) and the scheduler that hands actions to workers.
//!
//! # Storage, for the rest of Kiln
//!
//! * [`Storage`] bundles the handles, all cheap to clone:
//!   * [`Cas`]: `get(&Digest) -> Option<Bytes>`, `get_many`, `put(Bytes) ->
//!     Digest`, `put_checked(digest, bytes)`, `find_missing(&[Digest])`,
//!     `contains`, `get_message::<Directory>(..)`, `put_message(&msg)`,
//!     streaming `read(digest, offset)` / `begin_upload(digest)`. The empty
//!     blob is always present.
//!   * [`ActionCache`]: `get(instance, &action_digest)` returns a result
//!     only if every blob it references is still in the CAS (else `None`, a
//!     miss); `put(instance, &action_digest, &result)` refuses results that
//!     reference missing blobs and skips non-zero exit codes. The execution
//!     engine must not call `put` for `do_not_cache` actions.
//!   * [`AssetStore`]: Remote Asset mappings.
//! * [`Digest`] is the parsed SHA-256 digest; `Digest::from_proto` validates
//!   a proto digest, `to_proto` converts back.
//! * [`tree::walk`] reads a Directory tree breadth-first (batched), and
//!   [`tree::missing_in_directory_tree`] lists what of a tree is missing,
//!   e.g. to validate an input root before queueing an action.
//! * [`Error`] is the crate's error type; [`Error::into_status`] maps it to a
//!   `tonic::Status` at the service edge. `Error::MissingBlobs` carries a
//!   `google.rpc.PreconditionFailure` with one `MISSING` violation per blob
//!   (see [`error::precondition_failure_missing`]).
//!
//! # Composing the endpoint
//!
//! [`KilnServer::open`] opens the storage a [`ServerConfig`] describes.
//! [`KilnServer::routes`] returns a `tonic::service::RoutesBuilder` holding
//! the storage services; add your own with `add_service` (apply
//! [`KilnServer::max_message_bytes`] to them), turn execution on in
//! Capabilities with [`KilnServer::execution_capabilities`], then
//! [`KilnServer::bind`] and [`KilnServer::serve`] (or [`KilnServer::start`]
//! in tests, which binds and serves in the background).
//!
//! # Storage internals
//!
//! [`storage::BlobStore`] is the one storage trait (batch get / put /
//! find-missing, streaming read / write, usage). Backends:
//! [`storage::MemoryStore`], [`storage::DiskStore`]; the [`storage::Lru`]
//! decorator adds the in-memory index, size accounting, LRU eviction and
//! pinning. See `docs/storage.md` for the disk layout and durability.

pub mod action_cache;
pub mod asset;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
pub mod client;
pub mod compression;
pub mod config;
pub mod digest;
pub mod error;
pub mod execution;
pub mod http;
pub mod instances;
pub mod metrics;
pub mod resource;
pub mod scheduler;
pub mod server;
pub mod storage;
pub mod tree;

pub use action_cache::ActionCache;
pub use asset::AssetStore;
pub use config::ServerConfig;
pub use digest::Digest;
pub use error::{Error, Result};
pub use instances::Instances;
pub use server::{KilnServer, RunningServer};
pub use storage::{Cas, Storage};
