//! Protocol types for Kiln.
//!
//! * [`reapi`], [`bytestream`], [`longrunning`], [`rpc`], [`asset`]: the Remote
//!   Execution API v2 and its companions, re-exported from the maintained
//!   `bazel-remote-apis` crate (no proto text is copied into Kiln).
//! * [`worker`]: Kiln's own worker protocol, compiled from
//!   `kiln/worker/v1/worker.proto`.
//! * [`Digest`]: the parsed, validated SHA-256 digest every layer above
//!   uses (storage, scheduler, services, clients); the proto form is
//!   validated once, at the edge.

pub use bazel_remote_apis::build::bazel::remote::asset::v1 as asset;
pub use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
pub use bazel_remote_apis::build::bazel::semver;
pub use bazel_remote_apis::google::bytestream;
pub use bazel_remote_apis::google::longrunning;
pub use bazel_remote_apis::google::protobuf;
pub use bazel_remote_apis::google::rpc;
/// google.rpc error details (`PreconditionFailure`, …), from `tonic-types`.
pub use tonic_types::pb as error_details;

pub mod digest;
pub mod sha256;
pub mod tree;

pub use prost;
pub use sha256::{Digest, DigestError, HASH_LEN};

/// Kiln's worker protocol (server ⇄ worker).
pub mod worker {
    tonic::include_proto!("kiln.worker.v1");
}
