//! The ContentAddressableStorage gRPC service.
//!
//! Batch calls answer per blob: a blob with a wrong hash or size, or a
//! malformed digest, gets its own INVALID_ARGUMENT naming it and is not
//! stored, while the rest of the batch goes through. Whole-request errors
//! (unknown instance, unsupported digest function, a batch over
//! `max_batch_total_size_bytes`) fail the call and store nothing.

use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use kiln_proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use kiln_proto::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest, GetTreeResponse,
    RegisterChunkMappingRequest, RegisterChunkMappingResponse, SpliceBlobRequest,
    SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse, batch_read_blobs_response,
    batch_update_blobs_request, batch_update_blobs_response, compressor,
};
use kiln_proto::rpc;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::compression;
use crate::config::CasConfig;
use crate::digest::{Digest, check_digest_function};
use crate::error::{Error, Result};
use crate::instances::Instances;
use kiln_storage::tree;
use kiln_storage::{Cas, VerifiedBlob};

/// Directories per GetTree response when the client does not say.
const DEFAULT_PAGE_SIZE: usize = 1000;
/// Encoded Directory bytes per GetTree response, well under clients' 4 MiB
/// message limit.
const PAGE_BYTES: usize = 2 << 20;
/// Blobs this small are sent uncompressed even when zstd is acceptable.
const COMPRESS_MIN: usize = 1024;
/// Batches with less data than this are verified on the calling task.
const INLINE_VERIFY_MAX: usize = 64 << 10;

/// The CAS gRPC service.
#[derive(Clone, Debug)]
pub struct CasService {
    cas: Cas,
    instances: Instances,
    max_batch: u64,
    zstd: bool,
}

fn ok() -> rpc::Status {
    rpc::Status {
        code: tonic::Code::Ok as i32,
        message: String::new(),
        details: Vec::new(),
    }
}

fn parse_list(list: &[kiln_proto::reapi::Digest], field: &str) -> Result<Vec<Digest>> {
    list.iter()
        .enumerate()
        .map(|(i, d)| {
            Digest::from_proto(d).map_err(|e| Error::InvalidArgument(format!("{field}[{i}]: {e}")))
        })
        .collect()
}

/// Checks one BatchUpdateBlobs entry: digest, compressor, size and hash.
fn prepare(req: batch_update_blobs_request::Request, zstd: bool) -> Result<VerifiedBlob> {
    let digest = Digest::from_field(req.digest.as_ref(), "digest")?;
    let data = match compressor::Value::try_from(req.compressor) {
        Ok(compressor::Value::Identity) => req.data,
        Ok(compressor::Value::Zstd) if zstd => compression::decompress(&digest, &req.data)?,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "blob {digest}: compressor {} is not supported{}",
                req.compressor,
                if zstd {
                    " (IDENTITY and ZSTD are)"
                } else {
                    " (only IDENTITY is)"
                }
            )));
        }
    };
    VerifiedBlob::new(digest, Bytes::from(data)).map_err(Error::from)
}

impl CasService {
    /// A service over `cas`, answering for `instances`.
    pub fn new(cas: Cas, instances: Instances, config: &CasConfig) -> Self {
        CasService {
            cas,
            instances,
            max_batch: config.max_batch_total_size_bytes,
            zstd: config.zstd,
        }
    }

    async fn find_missing(&self, req: FindMissingBlobsRequest) -> Result<FindMissingBlobsResponse> {
        self.instances.check(&req.instance_name)?;
        check_digest_function(req.digest_function)?;
        let digests = parse_list(&req.blob_digests, "blob_digests")?;
        let mut missing = self.cas.find_missing(&digests).await?;
        let mut seen = std::collections::HashSet::with_capacity(missing.len());
        missing.retain(|d| seen.insert(*d));
        Ok(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        })
    }

    async fn batch_update(&self, req: BatchUpdateBlobsRequest) -> Result<BatchUpdateBlobsResponse> {
        self.instances.check(&req.instance_name)?;
        check_digest_function(req.digest_function)?;
        let total: u64 = req
            .requests
            .iter()
            .map(|r| {
                let declared = r.digest.as_ref().map_or(0, |d| d.size_bytes.max(0) as u64);
                declared.max(r.data.len() as u64)
            })
            .sum();
        if total > self.max_batch {
            return Err(Error::BatchTooLarge {
                what: "BatchUpdateBlobs request",
                total,
                limit: self.max_batch,
            });
        }
        let digests: Vec<Option<kiln_proto::reapi::Digest>> =
            req.requests.iter().map(|r| r.digest.clone()).collect();
        crate::metrics::global()
            .cas_received_bytes
            .inc_by(req.requests.iter().map(|r| r.data.len() as u64).sum());
        let zstd = self.zstd;
        let prepare_all = move || -> Vec<Result<VerifiedBlob>> {
            req.requests.into_iter().map(|r| prepare(r, zstd)).collect()
        };
        // Hashing a 4 MiB batch takes a few milliseconds: off the runtime.
        let prepared = if total as usize <= INLINE_VERIFY_MAX {
            prepare_all()
        } else {
            tokio::task::spawn_blocking(prepare_all)
                .await
                .map_err(|e| Error::Task(e.to_string()))?
        };
        let mut statuses: Vec<Option<rpc::Status>> = Vec::with_capacity(prepared.len());
        let mut good = Vec::new();
        let mut good_idx = Vec::new();
        for (i, p) in prepared.into_iter().enumerate() {
            match p {
                Ok(b) => {
                    good_idx.push(i);
                    good.push(b);
                    statuses.push(None);
                }
                Err(e) => statuses.push(Some(e.to_rpc_status())),
            }
        }
        for (i, r) in good_idx.into_iter().zip(self.cas.put_many(good).await) {
            statuses[i] = Some(match r {
                Ok(()) => ok(),
                Err(e) => Error::from(e).to_rpc_status(),
            });
        }
        Ok(BatchUpdateBlobsResponse {
            responses: digests
                .into_iter()
                .zip(statuses)
                .map(|(digest, status)| batch_update_blobs_response::Response {
                    digest,
                    status: Some(status.unwrap_or_else(ok)),
                })
                .collect(),
        })
    }

    async fn batch_read(&self, req: BatchReadBlobsRequest) -> Result<BatchReadBlobsResponse> {
        self.instances.check(&req.instance_name)?;
        check_digest_function(req.digest_function)?;
        let parsed: Vec<Result<Digest>> = req
            .digests
            .iter()
            .map(|d| Digest::from_proto(d).map_err(Error::from))
            .collect();
        let total: u64 = parsed.iter().flatten().map(Digest::size).sum();
        if total > self.max_batch {
            return Err(Error::BatchTooLarge {
                what: "BatchReadBlobs request",
                total,
                limit: self.max_batch,
            });
        }
        let compress = self.zstd
            && req
                .acceptable_compressors
                .contains(&(compressor::Value::Zstd as i32));
        let valid: Vec<Digest> = parsed.iter().flatten().copied().collect();
        let mut blobs = self.cas.get_many(&valid).await.into_iter();
        let mut responses = Vec::with_capacity(parsed.len());
        for (proto, p) in req.digests.into_iter().zip(parsed) {
            let mut resp = batch_read_blobs_response::Response {
                digest: Some(proto),
                data: Vec::new(),
                compressor: compressor::Value::Identity as i32,
                status: None,
            };
            let status = match p {
                Err(e) => e.to_rpc_status(),
                Ok(d) => match blobs.next().unwrap_or(Ok(None)) {
                    Ok(Some(data)) => {
                        if compress && data.len() >= COMPRESS_MIN {
                            resp.data = compression::compress(&data)?;
                            resp.compressor = compressor::Value::Zstd as i32;
                        } else {
                            resp.data = Vec::from(data);
                        }
                        ok()
                    }
                    Ok(None) => Error::BlobNotFound(d).to_rpc_status(),
                    Err(e) => Error::from(e).to_rpc_status(),
                },
            };
            resp.status = Some(status);
            responses.push(resp);
        }
        crate::metrics::global()
            .cas_sent_bytes
            .inc_by(responses.iter().map(|r| r.data.len() as u64).sum());
        Ok(BatchReadBlobsResponse { responses })
    }

    async fn get_tree(&self, req: GetTreeRequest) -> Result<Vec<GetTreeResponse>> {
        self.instances.check(&req.instance_name)?;
        check_digest_function(req.digest_function)?;
        let root = Digest::from_field(req.root_digest.as_ref(), "root_digest")?;
        if req.page_size < 0 {
            return Err(Error::InvalidArgument(format!(
                "page_size {} is negative",
                req.page_size
            )));
        }
        let page_size = if req.page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            req.page_size as usize
        };
        let start: usize = if req.page_token.is_empty() {
            0
        } else {
            req.page_token.parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "page_token {:?} was not issued by this server",
                    req.page_token
                ))
            })?
        };
        let walk = tree::walk(&self.cas, root).await?;
        if walk.directories.is_empty() {
            return Err(Error::NotFound(format!("root directory {root} not found")));
        }
        let total = walk.directories.len();
        if start > total {
            return Err(Error::InvalidArgument(format!(
                "page_token {:?} is past the end of the tree under {root} ({total} directories)",
                req.page_token
            )));
        }
        // Pages are cut by count and by size; every response carries the
        // token of the next, so a client may stop after any page and resume.
        let mut pages = Vec::new();
        let mut page = Vec::new();
        let mut bytes = 0;
        for (i, (_, dir)) in walk.directories.into_iter().enumerate().skip(start) {
            let len = dir.encoded_len();
            if !page.is_empty() && (page.len() >= page_size || bytes + len > PAGE_BYTES) {
                pages.push(GetTreeResponse {
                    directories: std::mem::take(&mut page),
                    next_page_token: i.to_string(),
                });
                bytes = 0;
            }
            bytes += len;
            page.push(dir);
        }
        pages.push(GetTreeResponse {
            directories: page,
            next_page_token: String::new(),
        });
        Ok(pages)
    }

    fn unsupported(what: &str) -> Status {
        Error::Unsupported(format!(
            "{what} is not supported by this server (capabilities advertise split_blob_support = false and splice_blob_support = false)"
        ))
        .into_status()
    }
}

type TreeStream = Pin<Box<dyn Stream<Item = std::result::Result<GetTreeResponse, Status>> + Send>>;
type ChunkMappingStream =
    Pin<Box<dyn Stream<Item = std::result::Result<GetChunkMappingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> std::result::Result<Response<FindMissingBlobsResponse>, Status> {
        Ok(Response::new(
            self.find_missing(request.into_inner()).await?,
        ))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> std::result::Result<Response<BatchUpdateBlobsResponse>, Status> {
        Ok(Response::new(
            self.batch_update(request.into_inner()).await?,
        ))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> std::result::Result<Response<BatchReadBlobsResponse>, Status> {
        Ok(Response::new(self.batch_read(request.into_inner()).await?))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> std::result::Result<Response<Self::GetTreeStream>, Status> {
        let pages = self.get_tree(request.into_inner()).await?;
        Ok(Response::new(Box::pin(futures::stream::iter(
            pages.into_iter().map(Ok),
        ))))
    }

    async fn split_blob(
        &self,
        _request: Request<SplitBlobRequest>,
    ) -> std::result::Result<Response<SplitBlobResponse>, Status> {
        Err(Self::unsupported("SplitBlob"))
    }

    type GetChunkMappingStream = ChunkMappingStream;

    async fn get_chunk_mapping(
        &self,
        _request: Request<GetChunkMappingRequest>,
    ) -> std::result::Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Self::unsupported("GetChunkMapping"))
    }

    async fn splice_blob(
        &self,
        _request: Request<SpliceBlobRequest>,
    ) -> std::result::Result<Response<SpliceBlobResponse>, Status> {
        Err(Self::unsupported("SpliceBlob"))
    }

    async fn register_chunk_mapping(
        &self,
        _request: Request<Streaming<RegisterChunkMappingRequest>>,
    ) -> std::result::Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Self::unsupported("RegisterChunkMapping"))
    }
}
