//! The crate's one error type, and its mapping to gRPC statuses.
//!
//! Every variant carries the digest, resource name or path it is about, so the
//! status a client sees names what was wrong. Conversion to [`tonic::Status`]
//! happens only at the service edge ([`Error::into_status`]).

use std::io;
use std::path::PathBuf;

use kiln_proto::protobuf::Any;
use kiln_proto::rpc;
use prost::Message;
use tonic::Code;

use crate::digest::Digest;
use kiln_storage::error::list_digests;

/// Result alias for the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in kiln-server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A digest with a bad hash (length, alphabet) or a negative size.
    #[error("invalid digest {digest}: {reason}")]
    InvalidDigest { digest: String, reason: String },

    /// A required field of a request is absent.
    #[error("missing field {0}")]
    MissingField(String),

    /// A digest function other than SHA-256.
    #[error("digest function {0} is not supported; this server supports SHA256 only")]
    UnsupportedDigestFunction(String),

    /// Data whose hash is not the digest it was sent under.
    #[error("data sent for blob {expected} does not match its digest: it hashes to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },

    /// Data longer or shorter than the size in its digest.
    #[error("blob {digest}: {detail}")]
    SizeMismatch { digest: Digest, detail: String },

    /// A ByteStream resource name that does not parse.
    #[error("invalid resource name {name:?}: {reason}")]
    InvalidResourceName { name: String, reason: String },

    /// An instance name this server does not serve.
    #[error("unknown instance name {name:?}; this server serves {known}")]
    UnknownInstance { name: String, known: String },

    /// A batch request over `max_batch_total_size_bytes`.
    #[error(
        "{what} totals {total} bytes, over the advertised max_batch_total_size_bytes of {limit}"
    )]
    BatchTooLarge {
        what: &'static str,
        total: u64,
        limit: u64,
    },

    /// A request argument that is wrong in some other way (the message says how).
    #[error("{0}")]
    InvalidArgument(String),

    /// A blob that is not in the CAS.
    #[error("blob {0} not found")]
    BlobNotFound(Digest),

    /// Something else that does not exist (the message says what).
    #[error("{0}")]
    NotFound(String),

    /// A blob that should hold a proto message but does not decode as one.
    #[error("blob {digest} is not a valid {what}: {source}")]
    Decode {
        what: &'static str,
        digest: Digest,
        #[source]
        source: prost::DecodeError,
    },

    /// A request that references blobs the CAS lacks.
    #[error("{context}: {} referenced blob(s) missing from the CAS: {}", missing.len(), list_digests(missing))]
    MissingBlobs {
        context: String,
        missing: Vec<Digest>,
    },

    /// The action cannot run as asked (e.g. no worker offers its platform).
    #[error("{0}")]
    FailedPrecondition(String),

    /// A read offset past the end of a blob.
    #[error("{0}")]
    OutOfRange(String),

    /// A blob larger than the store can ever hold.
    #[error("blob {digest} is larger than the storage limit of {limit} bytes")]
    TooLarge { digest: Digest, limit: u64 },

    /// Uploads in progress already hold so much of the storage limit that
    /// this one cannot fit beside them; retryable once they finish or are
    /// swept.
    #[error(
        "blob {digest}: uploads in progress already hold {reserved} of the storage limit of {limit} bytes, leaving no room for it; retry when they finish"
    )]
    UploadsFull {
        digest: Digest,
        reserved: u64,
        limit: u64,
    },

    /// A blob found damaged on disk (it has been removed).
    #[error("blob {digest} was damaged on disk ({reason}) and has been removed")]
    Corrupt { digest: Digest, reason: String },

    /// An RPC this server does not offer (and does not advertise).
    #[error("{0}")]
    Unsupported(String),

    /// The disk failed us.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A background task died.
    #[error("internal task failed: {0}")]
    Task(String),

    /// Invalid configuration.
    #[error("configuration: {0}")]
    Config(String),

    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },

    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),

    /// A call to a remote server failed (client side).
    #[error("{context}: {} ({:?})", status.message(), status.code())]
    Rpc {
        context: String,
        status: Box<tonic::Status>,
    },
}

impl Error {
    /// An I/O error with the operation and path it concerns.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A failed call to a remote server.
    pub fn rpc(context: impl Into<String>, status: tonic::Status) -> Self {
        Error::Rpc {
            context: context.into(),
            status: Box::new(status),
        }
    }

    /// The gRPC code this error stands for. Clients (BuildStream) treat
    /// INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED and INTERNAL as
    /// fatal, so each is used only for what it means.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidDigest { .. }
            | Error::MissingField(_)
            | Error::UnsupportedDigestFunction(_)
            | Error::DigestMismatch { .. }
            | Error::SizeMismatch { .. }
            | Error::InvalidResourceName { .. }
            | Error::UnknownInstance { .. }
            | Error::BatchTooLarge { .. }
            | Error::InvalidArgument(_)
            | Error::Decode { .. } => Code::InvalidArgument,
            Error::BlobNotFound(_) | Error::NotFound(_) | Error::Corrupt { .. } => Code::NotFound,
            Error::MissingBlobs { .. } | Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::TooLarge { .. } => Code::ResourceExhausted,
            // Transient: the uploads holding the space finish or are swept.
            Error::UploadsFull { .. } => Code::Unavailable,
            Error::Io { source, .. } if is_out_of_space(source) => Code::ResourceExhausted,
            Error::Unsupported(_) => Code::Unimplemented,
            Error::Rpc { status, .. } => status.code(),
            Error::Io { .. }
            | Error::Task(_)
            | Error::Config(_)
            | Error::Bind { .. }
            | Error::Transport(_) => Code::Internal,
        }
    }

    /// The `google.rpc.Status` form, for per-item statuses inside batch
    /// responses.
    pub fn to_rpc_status(&self) -> rpc::Status {
        rpc::Status {
            code: self.code() as i32,
            message: self.to_string(),
            details: self.details(),
        }
    }

    /// The gRPC status for this error. Missing blobs carry a
    /// `google.rpc.PreconditionFailure` with one `MISSING` violation per blob
    /// (subject `blobs/{hash}/{size}`), which Bazel uses to re-upload.
    pub fn into_status(self) -> tonic::Status {
        let code = self.code();
        let message = self.to_string();
        // Server faults are logged loudly; client mistakes and misses only
        // at debug level, since clients probe (FindMissing, AC misses).
        match code {
            Code::Internal => tracing::error!(%message, "request failed"),
            Code::ResourceExhausted => tracing::warn!(%message, "request failed"),
            _ => tracing::debug!(code = ?code, %message, "request refused"),
        }
        let details = self.details();
        if details.is_empty() {
            tonic::Status::new(code, message)
        } else {
            let status = rpc::Status {
                code: code as i32,
                message: message.clone(),
                details,
            };
            tonic::Status::with_details(code, message, status.encode_to_vec().into())
        }
    }

    fn details(&self) -> Vec<Any> {
        match self {
            Error::MissingBlobs { missing, .. } => vec![precondition_failure_missing(missing)],
            _ => Vec::new(),
        }
    }
}

impl From<kiln_proto::DigestError> for Error {
    fn from(e: kiln_proto::DigestError) -> Self {
        kiln_storage::Error::from(e).into()
    }
}

/// Storage errors keep their meaning (and message) here, variant for
/// variant, so the status a client sees is what it was before storage
/// became its own crate.
impl From<kiln_storage::Error> for Error {
    fn from(e: kiln_storage::Error) -> Self {
        use kiln_storage::Error as S;
        match e {
            S::InvalidDigest { digest, reason } => Error::InvalidDigest { digest, reason },
            S::MissingField(f) => Error::MissingField(f),
            S::DigestMismatch { expected, actual } => Error::DigestMismatch { expected, actual },
            S::SizeMismatch { digest, detail } => Error::SizeMismatch { digest, detail },
            S::InvalidArgument(m) => Error::InvalidArgument(m),
            S::Decode {
                what,
                digest,
                source,
            } => Error::Decode {
                what,
                digest,
                source,
            },
            S::MissingBlobs { context, missing } => Error::MissingBlobs { context, missing },
            S::OutOfRange(m) => Error::OutOfRange(m),
            S::TooLarge { digest, limit } => Error::TooLarge { digest, limit },
            S::UploadsFull {
                digest,
                reserved,
                limit,
            } => Error::UploadsFull {
                digest,
                reserved,
                limit,
            },
            S::Corrupt { digest, reason } => Error::Corrupt { digest, reason },
            S::Io { op, path, source } => Error::Io { op, path, source },
            S::Task(m) => Error::Task(m),
            S::Config(m) => Error::Config(m),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.into_status()
    }
}

fn is_out_of_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// `google.rpc.PreconditionFailure`, which the REAPI uses to list missing
/// blobs. Not part of the generated bindings, so declared here.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PreconditionFailure {
    /// The violations.
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<Violation>,
}

/// One `google.rpc.PreconditionFailure.Violation`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Violation {
    /// `MISSING` for a missing blob.
    #[prost(string, tag = "1")]
    pub r#type: String,
    /// `blobs/{hash}/{size}` for a missing blob.
    #[prost(string, tag = "2")]
    pub subject: String,
    /// Free text.
    #[prost(string, tag = "3")]
    pub description: String,
}

/// The `Any` holding a PreconditionFailure with one `MISSING` violation per
/// digest, as the REAPI prescribes for missing inputs.
pub fn precondition_failure_missing(missing: &[Digest]) -> Any {
    let failure = PreconditionFailure {
        violations: missing
            .iter()
            .map(|d| Violation {
                r#type: "MISSING".into(),
                subject: format!("blobs/{}/{}", d.hex(), d.size()),
                description: String::new(),
            })
            .collect(),
    };
    Any {
        type_url: "type.googleapis.com/google.rpc.PreconditionFailure".into(),
        value: failure.encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_errors_keep_their_codes() {
        let d = Digest::of(b"x");
        let cases = [
            (
                kiln_storage::Error::UploadsFull {
                    digest: d,
                    reserved: 1,
                    limit: 2,
                },
                Code::Unavailable,
            ),
            (
                kiln_storage::Error::TooLarge {
                    digest: d,
                    limit: 1,
                },
                Code::ResourceExhausted,
            ),
            (
                kiln_storage::Error::Corrupt {
                    digest: d,
                    reason: "bad".into(),
                },
                Code::NotFound,
            ),
            (
                kiln_storage::Error::MissingBlobs {
                    context: "c".into(),
                    missing: vec![d],
                },
                Code::FailedPrecondition,
            ),
            (
                kiln_storage::Error::DigestMismatch {
                    expected: d,
                    actual: Digest::EMPTY,
                },
                Code::InvalidArgument,
            ),
            (
                kiln_storage::Error::OutOfRange("o".into()),
                Code::OutOfRange,
            ),
            (kiln_storage::Error::Task("t".into()), Code::Internal),
            (
                kiln_storage::Error::io("write", "/x", io::Error::from_raw_os_error(libc::ENOSPC)),
                Code::ResourceExhausted,
            ),
        ];
        for (e, code) in cases {
            let message = e.to_string();
            let e = Error::from(e);
            assert_eq!(e.code(), code, "{message}");
            assert_eq!(e.to_string(), message);
        }
    }
}
