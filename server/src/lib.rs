//! Kiln's server: content-addressed storage, the REAPI services
//! (Capabilities, CAS, ByteStream, ActionCache, Remote Asset, Execution,
//! Operations) and the scheduler that hands actions to workers.
//!
//! # Storage
//!
//! Storage lives in `kiln-storage` ([`Storage`], [`Cas`], [`ActionCache`],
//! [`AssetStore`], tree walks); its errors convert into this crate's
//! [`Error`], which [`Error::into_status`] maps to a `tonic::Status` at the
//! service edge. `Error::MissingBlobs` carries a
//! `google.rpc.PreconditionFailure` with one `MISSING` violation per blob
//! (see [`error::precondition_failure_missing`]).
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

pub use config::ServerConfig;
pub use digest::Digest;
pub use error::{Error, Result};
pub use instances::Instances;
pub use kiln_storage::{ActionCache, AssetStore, Cas, Storage};
pub use server::{KilnServer, RunningServer};
