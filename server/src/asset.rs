//! The Remote Asset API (Fetch and Push), as BuildStream's artifact and
//! source caches use it: Push records "these URIs (with these qualifiers)
//! name this blob / directory", Fetch answers from those records. Kiln
//! never downloads anything itself: an asset nobody pushed is NOT_FOUND.
//!
//! Pushing a mapping whose content (the blob, or the whole directory tree)
//! is not in the CAS is FAILED_PRECONDITION listing what is missing.
//! References are checked too, but BuildStream lists its artifact's
//! `buildtree`, `sources` and `buildroot` as references even when it could
//! not upload them (it skips them on `FileNotFoundError`), so a reference
//! that is absent at push time is accepted and recorded as not required.
//! A mapping is then returned only while its content and every reference
//! that was present at push time are still in the CAS, mirroring the action
//! cache's completeness rule: after eviction a fetch is a miss, never a
//! dangling digest.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_proto::asset::fetch_server::Fetch;
use kiln_proto::asset::push_server::Push;
use kiln_proto::asset::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse,
    PushBlobRequest, PushBlobResponse, PushDirectoryRequest, PushDirectoryResponse, Qualifier,
};
use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::{self, digest_function};
use kiln_proto::rpc;

use tonic::{Code, Request, Response, Status};

use crate::digest::{Digest, check_digest_function};
use crate::error::{Error, Result};
use crate::instances::Instances;
use kiln_storage::assets::{AssetKind, AssetStore, FoundAsset, PushAsset, validate_uris};

fn to_timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn from_timestamp(t: &Timestamp, field: &str) -> Result<SystemTime> {
    if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::InvalidArgument(format!(
            "{field} is not a valid timestamp ({}s {}ns)",
            t.seconds, t.nanos
        )));
    }
    Ok(UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32))
}

fn digests(list: &[reapi::Digest], field: &str) -> Result<Vec<Digest>> {
    list.iter()
        .enumerate()
        .map(|(i, d)| {
            Digest::from_proto(d).map_err(|e| Error::InvalidArgument(format!("{field}[{i}]: {e}")))
        })
        .collect()
}

fn not_found(kind: AssetKind, uris: &[String], qualifiers: &[Qualifier]) -> rpc::Status {
    let q: Vec<String> = qualifiers
        .iter()
        .map(|q| format!("{}={}", q.name, q.value))
        .collect();
    rpc::Status {
        code: Code::NotFound as i32,
        message: format!(
            "no {} was pushed for {:?} with qualifiers [{}] (or its content has been evicted); Kiln does not download assets",
            kind.tag(),
            uris,
            q.join(", ")
        ),
        details: Vec::new(),
    }
}

fn ok_status() -> Option<rpc::Status> {
    Some(rpc::Status {
        code: Code::Ok as i32,
        message: String::new(),
        details: Vec::new(),
    })
}

/// The Fetch and Push gRPC services.
#[derive(Clone, Debug)]
pub struct AssetService {
    store: AssetStore,
    instances: Instances,
}

impl AssetService {
    /// Services over `store`, answering for `instances`.
    pub fn new(store: AssetStore, instances: Instances) -> Self {
        AssetService { store, instances }
    }

    async fn fetch(
        &self,
        instance: &str,
        kind: AssetKind,
        uris: &[String],
        qualifiers: &[Qualifier],
        df: i32,
        oldest: Option<&Timestamp>,
    ) -> Result<Option<FoundAsset>> {
        self.instances.check(instance)?;
        check_digest_function(df)?;
        let oldest = oldest
            .map(|t| from_timestamp(t, "oldest_content_accepted"))
            .transpose()?;
        self.store
            .fetch(instance, kind, uris, qualifiers, oldest)
            .await
            .map_err(Error::from)
    }

    #[allow(clippy::too_many_arguments)]
    async fn push(
        &self,
        instance: &str,
        kind: AssetKind,
        uris: &[String],
        qualifiers: &[Qualifier],
        df: i32,
        digest: Option<&reapi::Digest>,
        digest_field: &str,
        expire_at: Option<&Timestamp>,
        references_blobs: &[reapi::Digest],
        references_directories: &[reapi::Digest],
    ) -> Result<()> {
        self.instances.check(instance)?;
        check_digest_function(df)?;
        validate_uris(uris)?;
        let digest = Digest::from_field(digest, digest_field)?;
        let expire_at = expire_at
            .map(|t| from_timestamp(t, "expire_at"))
            .transpose()?;
        self.store
            .push(PushAsset {
                instance,
                kind,
                uris,
                qualifiers,
                digest,
                expire_at,
                references_blobs: digests(references_blobs, "references_blobs")?,
                references_directories: digests(references_directories, "references_directories")?,
            })
            .await
            .map_err(Error::from)
    }
}

#[tonic::async_trait]
impl Fetch for AssetService {
    async fn fetch_blob(
        &self,
        request: Request<FetchBlobRequest>,
    ) -> std::result::Result<Response<FetchBlobResponse>, Status> {
        let r = request.into_inner();
        let found = self
            .fetch(
                &r.instance_name,
                AssetKind::Blob,
                &r.uris,
                &r.qualifiers,
                r.digest_function,
                r.oldest_content_accepted.as_ref(),
            )
            .await?;
        Ok(Response::new(match found {
            Some(f) => FetchBlobResponse {
                status: ok_status(),
                uri: f.uri,
                qualifiers: r.qualifiers,
                expires_at: f.expires_at.map(to_timestamp),
                blob_digest: Some(f.digest.to_proto()),
                digest_function: digest_function::Value::Sha256 as i32,
            },
            None => FetchBlobResponse {
                status: Some(not_found(AssetKind::Blob, &r.uris, &r.qualifiers)),
                digest_function: digest_function::Value::Sha256 as i32,
                ..Default::default()
            },
        }))
    }

    async fn fetch_directory(
        &self,
        request: Request<FetchDirectoryRequest>,
    ) -> std::result::Result<Response<FetchDirectoryResponse>, Status> {
        let r = request.into_inner();
        let found = self
            .fetch(
                &r.instance_name,
                AssetKind::Directory,
                &r.uris,
                &r.qualifiers,
                r.digest_function,
                r.oldest_content_accepted.as_ref(),
            )
            .await?;
        Ok(Response::new(match found {
            Some(f) => FetchDirectoryResponse {
                status: ok_status(),
                uri: f.uri,
                qualifiers: r.qualifiers,
                expires_at: f.expires_at.map(to_timestamp),
                root_directory_digest: Some(f.digest.to_proto()),
                digest_function: digest_function::Value::Sha256 as i32,
            },
            None => FetchDirectoryResponse {
                status: Some(not_found(AssetKind::Directory, &r.uris, &r.qualifiers)),
                digest_function: digest_function::Value::Sha256 as i32,
                ..Default::default()
            },
        }))
    }
}

#[tonic::async_trait]
impl Push for AssetService {
    async fn push_blob(
        &self,
        request: Request<PushBlobRequest>,
    ) -> std::result::Result<Response<PushBlobResponse>, Status> {
        let r = request.into_inner();
        self.push(
            &r.instance_name,
            AssetKind::Blob,
            &r.uris,
            &r.qualifiers,
            r.digest_function,
            r.blob_digest.as_ref(),
            "blob_digest",
            r.expire_at.as_ref(),
            &r.references_blobs,
            &r.references_directories,
        )
        .await?;
        Ok(Response::new(PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        request: Request<PushDirectoryRequest>,
    ) -> std::result::Result<Response<PushDirectoryResponse>, Status> {
        let r = request.into_inner();
        self.push(
            &r.instance_name,
            AssetKind::Directory,
            &r.uris,
            &r.qualifiers,
            r.digest_function,
            r.root_directory_digest.as_ref(),
            "root_directory_digest",
            r.expire_at.as_ref(),
            &r.references_blobs,
            &r.references_directories,
        )
        .await?;
        Ok(Response::new(PushDirectoryResponse {}))
    }
}
