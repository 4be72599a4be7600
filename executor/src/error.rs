//! The executor's one error type. Each variant keeps the digest or path it
//! is about; [`Error::to_status`] turns it into the `google.rpc.Status` the
//! server passes on to the client.

use std::path::PathBuf;

use kiln_proto::reapi::Digest;
use kiln_proto::rpc;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Blobs the action needs are not in the server's CAS.
    #[error("{} input blob(s) missing from CAS, e.g. {}", .0.len(), .0.first().map(kiln_proto::digest::key).unwrap_or_default())]
    MissingBlobs(Vec<Digest>),
    #[error("blob {digest} from CAS does not match its digest (got {actual})")]
    CorruptBlob { digest: String, actual: String },
    #[error("invalid input tree: {0}")]
    InvalidTree(String),
    #[error("invalid output path {path:?}: {why}")]
    InvalidOutputPath { path: String, why: String },
    #[error("{context}: {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CAS request failed ({context}): {status}")]
    Remote {
        context: String,
        status: tonic::Status,
    },
    #[error("sandbox: {0}")]
    Sandbox(#[from] kiln_sandbox::SandboxError),
    #[error("base root filesystem: {0}")]
    BaseRoot(String),
    /// What the action left goes over one of the worker's output limits
    /// (size, depth). `what` names it (`output file out/big`, `stdout`).
    #[error("{what}: {why}")]
    OutputLimit { what: String, why: String },
    /// Collecting the outputs took longer than the action was allowed.
    #[error(
        "collecting the action's outputs took longer than the {allowed:?} allowed (its timeout); stopped at {what}"
    )]
    CollectDeadline {
        what: String,
        allowed: std::time::Duration,
    },
    #[error("the action was cancelled")]
    Cancelled,
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }

    pub fn remote(context: impl Into<String>, status: tonic::Status) -> Self {
        Error::Remote {
            context: context.into(),
            status,
        }
    }

    /// The status reported for the execution. Missing inputs become
    /// FAILED_PRECONDITION with one MISSING violation per blob, which is what
    /// Bazel and BuildStream re-upload from.
    pub fn to_status(&self) -> rpc::Status {
        use tonic::Code;
        let (code, details) = match self {
            Error::MissingBlobs(digests) => {
                let failure = kiln_proto::error_details::PreconditionFailure {
                    violations: digests
                        .iter()
                        .map(
                            |d| kiln_proto::error_details::precondition_failure::Violation {
                                r#type: "MISSING".into(),
                                subject: format!("blobs/{}", kiln_proto::digest::key(d)),
                                description: String::new(),
                            },
                        )
                        .collect(),
                };
                let any = kiln_proto::protobuf::Any {
                    type_url: "type.googleapis.com/google.rpc.PreconditionFailure".into(),
                    value: prost::Message::encode_to_vec(&failure),
                };
                (Code::FailedPrecondition, vec![any])
            }
            Error::InvalidTree(_) | Error::InvalidOutputPath { .. } => {
                (Code::InvalidArgument, Vec::new())
            }
            // The request was checked by the server already; what the
            // sandbox still refuses (e.g. a working directory that resolves
            // outside the root through a symlink) is the action's fault.
            Error::Sandbox(kiln_sandbox::SandboxError::InvalidRequest(_)) => {
                (Code::InvalidArgument, Vec::new())
            }
            Error::BaseRoot(_) => (Code::FailedPrecondition, Vec::new()),
            // Running it again would leave the same outputs: fatal to the
            // client, as it should be.
            Error::OutputLimit { .. } => (Code::ResourceExhausted, Vec::new()),
            Error::CollectDeadline { .. } => (Code::DeadlineExceeded, Vec::new()),
            Error::Cancelled => (Code::Cancelled, Vec::new()),
            Error::Remote { status, .. } if status.code() == Code::Unavailable => {
                (Code::Unavailable, Vec::new())
            }
            _ => (Code::Internal, Vec::new()),
        };
        rpc::Status {
            code: code as i32,
            message: self.to_string(),
            details,
        }
    }
}
