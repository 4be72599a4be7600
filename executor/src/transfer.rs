//! Moving blobs between the server's CAS and the worker's cache: fetching
//! an action's missing inputs, uploading its outputs. Small blobs travel in
//! batches, large ones by ByteStream, several requests in flight at once.

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use kiln_proto::reapi::Digest;

use crate::cache::BlobCache;
use crate::cas::{BATCH_BLOB_LIMIT, CasClient, batches};
use crate::collect::Upload;
use crate::error::{Error, Result};

/// Requests in flight at once per action.
const PARALLEL: usize = 4;

/// Fetches the blobs of `wanted` the cache lacks. Returns how many bytes
/// were fetched. Blobs the server lacks are reported all together.
pub async fn fetch_missing(
    cas: &CasClient,
    cache: &Arc<BlobCache>,
    wanted: Vec<Digest>,
) -> Result<u64> {
    let missing = cache.missing(wanted);
    if missing.is_empty() {
        return Ok(0);
    }
    let total: u64 = missing.iter().map(|d| d.size_bytes as u64).sum();
    let (small, large): (Vec<Digest>, Vec<Digest>) = missing
        .into_iter()
        .partition(|d| d.size_bytes <= BATCH_BLOB_LIMIT);

    let mut jobs: Vec<Job> = batches(small, |d| d.size_bytes)
        .into_iter()
        .map(Job::Batch)
        .collect();
    jobs.extend(large.into_iter().map(Job::Stream));
    let results: Vec<Result<()>> = stream::iter(jobs)
        .map(|job| run_fetch(cas, cache, job))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut absent = Vec::new();
    for r in results {
        match r {
            Ok(()) => {}
            Err(Error::MissingBlobs(d)) => absent.extend(d),
            Err(e) => return Err(e),
        }
    }
    if absent.is_empty() {
        Ok(total)
    } else {
        Err(Error::MissingBlobs(absent))
    }
}

enum Job {
    Batch(Vec<Digest>),
    Stream(Digest),
}

async fn run_fetch(cas: &CasClient, cache: &Arc<BlobCache>, job: Job) -> Result<()> {
    match job {
        Job::Batch(digests) => {
            let blobs = cas.read_small(&digests).await?;
            let cache = Arc::clone(cache);
            blocking(move || {
                for (d, data) in blobs {
                    cache.insert_bytes(&d, &data)?;
                }
                Ok(())
            })
            .await
        }
        Job::Stream(d) => {
            let tmp = cache.tmp_path();
            if let Err(e) = cas.read_to_file(&d, &tmp).await {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
            let cache = Arc::clone(cache);
            blocking(move || cache.insert_file(&d, &tmp)).await
        }
    }
}

/// Makes sure the server has every blob of `uploads`: asks which it lacks,
/// then sends those.
pub async fn upload_missing(
    cas: &CasClient,
    cache: &Arc<BlobCache>,
    uploads: Vec<Upload>,
) -> Result<u64> {
    // The empty blob is always present: never ask about it.
    let uploads: Vec<Upload> = uploads
        .into_iter()
        .filter(|u| u.digest().size_bytes > 0)
        .collect();
    if uploads.is_empty() {
        return Ok(0);
    }
    let digests: Vec<Digest> = uploads.iter().map(|u| u.digest().clone()).collect();
    let missing: std::collections::HashSet<String> = cas
        .find_missing(&digests)
        .await?
        .into_iter()
        .map(|d| d.hash)
        .collect();
    let mut small: Vec<(Digest, Bytes)> = Vec::new();
    let mut large: Vec<Digest> = Vec::new();
    let mut sent = 0u64;
    for u in uploads {
        if !missing.contains(&u.digest().hash) {
            continue;
        }
        sent += u.digest().size_bytes as u64;
        match u {
            Upload::Bytes(d, data) if d.size_bytes <= BATCH_BLOB_LIMIT => small.push((d, data)),
            Upload::Bytes(d, data) => {
                let cache2 = Arc::clone(cache);
                let d2 = d.clone();
                blocking(move || cache2.insert_bytes(&d2, &data)).await?;
                large.push(d);
            }
            Upload::Cached(d) if d.size_bytes <= BATCH_BLOB_LIMIT => {
                let path = cache.path(&d.hash, false);
                let data = tokio::fs::read(&path)
                    .await
                    .map_err(|e| Error::io("read cached blob", &path, e))?;
                small.push((d, Bytes::from(data)));
            }
            Upload::Cached(d) => large.push(d),
        }
    }
    let batch_jobs =
        stream::iter(batches(small, |(d, _)| d.size_bytes)).map(|b| cas.write_small(b));
    let stream_jobs = stream::iter(large).map(|d| {
        let path = cache.path(&d.hash, false);
        async move { cas.write_file(&d, &path).await }
    });
    batch_jobs
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    stream_jobs
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(sent)
}

pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}
