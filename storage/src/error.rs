//! The storage layer's one error type.
//!
//! Every variant names the digest or path it is about. Storage knows nothing
//! of gRPC: the services map each variant to a status at their edge.

use std::io;
use std::path::PathBuf;

use kiln_proto::DigestError;

use kiln_proto::Digest;

/// Result alias for the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in storage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A digest with a bad hash (length, alphabet) or a negative size.
    #[error("invalid digest {digest}: {reason}")]
    InvalidDigest { digest: String, reason: String },

    /// A required digest field is absent (in a stored record or a request).
    #[error("missing field {0}")]
    MissingField(String),

    /// Data whose hash is not the digest it was sent under.
    #[error("data sent for blob {expected} does not match its digest: it hashes to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },

    /// Data longer or shorter than the size in its digest.
    #[error("blob {digest}: {detail}")]
    SizeMismatch { digest: Digest, detail: String },

    /// An argument that is wrong in some other way (the message says how):
    /// a directory entry without a digest, an empty URI, ...
    #[error("{0}")]
    InvalidArgument(String),

    /// A blob that should hold a proto message but does not decode as one.
    #[error("blob {digest} is not a valid {what}: {source}")]
    Decode {
        what: &'static str,
        digest: Digest,
        #[source]
        source: prost::DecodeError,
    },

    /// Something refers to blobs the CAS lacks.
    #[error("{context}: {} referenced blob(s) missing from the CAS: {}", missing.len(), list_digests(missing))]
    MissingBlobs {
        context: String,
        missing: Vec<Digest>,
    },

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

    /// Invalid configuration, or a data directory that cannot be used as
    /// configured (e.g. held by another process).
    #[error("configuration: {0}")]
    Config(String),
}

/// Lists at most ten digests, then how many more.
pub fn list_digests(digests: &[Digest]) -> String {
    const SHOWN: usize = 10;
    let mut s = digests
        .iter()
        .take(SHOWN)
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if digests.len() > SHOWN {
        s.push_str(&format!(", and {} more", digests.len() - SHOWN));
    }
    s
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
}

impl From<DigestError> for Error {
    fn from(e: DigestError) -> Self {
        match e {
            DigestError::Invalid { digest, reason } => Error::InvalidDigest { digest, reason },
            DigestError::MissingField(field) => Error::MissingField(field),
        }
    }
}
