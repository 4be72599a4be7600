//! The ByteStream service: streaming reads and resumable, verified writes.
//!
//! An upload's state (its temporary file, hash state and offset) is kept by
//! resource name after a stream breaks, so the client can ask
//! QueryWriteStatus and resume from `committed_size`. Idle uploads are
//! dropped after `cas.upload_idle_timeout_secs`. A blob that is already
//! present ends a write at once with `committed_size` = its size (`-1` for
//! compressed uploads, as the REAPI specifies). Writers of the same blob
//! under different upload ids proceed independently and all succeed.
//!
//! An upload holds its size against the storage limit until it is
//! committed or dropped (see the index decorator), and a write stream that
//! stays silent for the idle timeout is ended (`DEADLINE_EXCEEDED`) and its
//! data dropped, even if the client keeps it open: no client can keep data
//! outside the storage limit.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use kiln_proto::bytestream::byte_stream_server::ByteStream;
use kiln_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::compression::{StreamDecoder, StreamEncoder};
use crate::config::CasConfig;
use crate::error::{Error, Result};
use crate::instances::Instances;
use crate::resource::{Compression, Resource, parse_read, parse_write};
use kiln_storage::{BlobReader, Cas, Upload};

/// The ByteStream gRPC service.
#[derive(Clone)]
pub struct ByteStreamService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ByteStreamService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteStreamService").finish_non_exhaustive()
    }
}

struct Inner {
    cas: Cas,
    instances: Instances,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    read_chunk: usize,
    zstd: bool,
    idle_timeout: Duration,
    epoch: Instant,
}

/// One upload, by resource name.
struct Session {
    state: tokio::sync::Mutex<SessionState>,
    /// Bytes of the resource accepted so far (compressed bytes for
    /// compressed uploads); readable without waiting for a writer.
    committed: AtomicI64,
    complete: AtomicBool,
    /// Milliseconds since `Inner::epoch` of the last activity.
    last_used: AtomicU64,
}

#[derive(Default)]
struct SessionState {
    upload: Option<Upload>,
    decoder: Option<StreamDecoder>,
}

type ReadStream = Pin<Box<dyn Stream<Item = std::result::Result<ReadResponse, Status>> + Send>>;

impl ByteStreamService {
    /// A service over `cas`, answering for `instances`. Starts the task that
    /// drops idle uploads (it ends when the service is dropped).
    pub fn new(cas: Cas, instances: Instances, config: &CasConfig) -> Self {
        let inner = Arc::new(Inner {
            cas,
            instances,
            sessions: Mutex::default(),
            read_chunk: config.read_chunk_bytes,
            zstd: config.zstd,
            idle_timeout: Duration::from_secs(config.upload_idle_timeout_secs),
            epoch: Instant::now(),
        });
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        ByteStreamService { inner }
    }

    /// Uploads currently held (in progress, interrupted or just finished).
    pub fn sessions(&self) -> usize {
        self.inner.lock_sessions().len()
    }
}

impl Inner {
    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn session(&self, name: &str) -> Arc<Session> {
        let now = self.now_ms();
        self.lock_sessions()
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Session {
                    state: tokio::sync::Mutex::default(),
                    committed: AtomicI64::new(0),
                    complete: AtomicBool::new(false),
                    last_used: AtomicU64::new(now),
                })
            })
            .clone()
    }

    fn drop_session(&self, name: &str) {
        self.lock_sessions().remove(name);
    }

    async fn read(&self, req: ReadRequest) -> Result<ReadStream> {
        let res = parse_read(&req.resource_name, self.zstd)?;
        self.instances.check(&res.instance)?;
        if req.read_offset < 0 {
            return Err(Error::OutOfRange(format!(
                "read_offset {} of {} is negative",
                req.read_offset, req.resource_name
            )));
        }
        if req.read_limit < 0 {
            return Err(Error::InvalidArgument(format!(
                "read_limit {} of {} is negative",
                req.read_limit, req.resource_name
            )));
        }
        let offset = req.read_offset as u64;
        let limit = if req.read_limit == 0 {
            u64::MAX
        } else {
            req.read_limit as u64
        };
        match res.compression {
            Compression::Identity => {
                let reader = self
                    .cas
                    .read(&res.digest, offset)
                    .await
                    .map_err(|e| match Error::from(e) {
                        Error::OutOfRange(_) => Error::OutOfRange(format!(
                            "read_offset {offset} is past the end of {} ({} bytes)",
                            req.resource_name,
                            res.digest.size()
                        )),
                        e => e,
                    })?
                    .ok_or(Error::BlobNotFound(res.digest))?;
                Ok(plain_stream(reader, limit, self.read_chunk))
            }
            Compression::Zstd => {
                let reader = self
                    .cas
                    .read(&res.digest, 0)
                    .await?
                    .ok_or(Error::BlobNotFound(res.digest))?;
                zstd_stream(reader, offset, limit, self.read_chunk, req.resource_name)
            }
        }
    }

    async fn write(
        &self,
        mut stream: Streaming<WriteRequest>,
    ) -> std::result::Result<WriteResponse, Status> {
        let first = self
            .next_message(&mut stream, "(unnamed)")
            .await?
            .ok_or_else(|| Error::InvalidArgument("write stream carried no request".into()))?;
        let name = first.resource_name.clone();
        if name.is_empty() {
            return Err(
                Error::MissingField("resource_name (in the first WriteRequest)".into()).into(),
            );
        }
        let res = parse_write(&name, self.zstd)?;
        self.instances.check(&res.instance)?;
        let done = |res: &Resource| WriteResponse {
            committed_size: match res.compression {
                Compression::Identity => res.digest.size() as i64,
                Compression::Zstd => -1,
            },
        };
        if self.cas.contains(&res.digest).await.map_err(Error::from)? {
            debug!(resource = %name, "blob already present; write ends early");
            return Ok(done(&res));
        }

        let session = self.session(&name);
        let mut state = session.state.lock().await;
        if session.complete.load(Ordering::Acquire) {
            return Ok(done(&res));
        }
        let mut msg = first;
        loop {
            session.last_used.store(self.now_ms(), Ordering::Relaxed);
            if !msg.resource_name.is_empty() && msg.resource_name != name {
                return Err(Error::InvalidArgument(format!(
                    "resource_name changed within one write stream, from {name:?} to {:?}",
                    msg.resource_name
                ))
                .into());
            }
            let committed = session.committed.load(Ordering::Acquire);
            if msg.write_offset != committed {
                if msg.write_offset == 0 {
                    // A client starting over.
                    *state = SessionState::default();
                    session.committed.store(0, Ordering::Release);
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "write_offset {} of {name} does not match the {committed} bytes committed so far",
                        msg.write_offset
                    ))
                    .into());
                }
            }
            match self.append(&mut state, &res, msg.data).await {
                // Counted only once written, so a resumed upload starts
                // exactly where the data ends.
                Ok(n) => {
                    session.committed.fetch_add(n, Ordering::AcqRel);
                }
                Err(e) => {
                    drop(state);
                    self.drop_session(&name);
                    return Err(e.into());
                }
            }
            if msg.finish_write {
                let r = self.finish(&mut state).await;
                drop(state);
                match r {
                    Ok(()) => {
                        session.complete.store(true, Ordering::Release);
                        return Ok(WriteResponse {
                            committed_size: session.committed.load(Ordering::Acquire),
                        });
                    }
                    Err(e) => {
                        self.drop_session(&name);
                        return Err(e.into());
                    }
                }
            }
            msg = match self.next_message(&mut stream, &name).await {
                Ok(Some(m)) => m,
                Err(status) if status.code() == tonic::Code::DeadlineExceeded => {
                    // Silent too long: drop it now rather than keep its data
                    // (and its share of the storage limit) for resumption.
                    drop(state);
                    self.drop_session(&name);
                    return Err(status);
                }
                Ok(None) => {
                    return Err(Error::InvalidArgument(format!(
                        "write stream for {name} ended at offset {} without finish_write; resume from there",
                        session.committed.load(Ordering::Acquire)
                    ))
                    .into());
                }
                // The client went away: keep the upload for resumption.
                Err(status) => return Err(status),
            };
        }
    }

    /// The next request of a write stream, or DEADLINE_EXCEEDED once the
    /// client has been silent for the idle timeout.
    async fn next_message(
        &self,
        stream: &mut Streaming<WriteRequest>,
        name: &str,
    ) -> std::result::Result<Option<WriteRequest>, Status> {
        match tokio::time::timeout(self.idle_timeout, stream.message()).await {
            Ok(r) => r,
            Err(_) => {
                debug!(resource = %name, "write stream silent for the idle timeout; ended");
                Err(Status::deadline_exceeded(format!(
                    "write of {name}: no data for {} s (cas.upload_idle_timeout_secs); the upload is dropped",
                    self.idle_timeout.as_secs()
                )))
            }
        }
    }

    /// Writes one chunk of the resource; returns its length on the wire.
    async fn append(&self, state: &mut SessionState, res: &Resource, data: Vec<u8>) -> Result<i64> {
        if state.upload.is_none() {
            state.upload = Some(self.cas.begin_upload(&res.digest).await?);
            if res.compression == Compression::Zstd {
                state.decoder = Some(StreamDecoder::new(res.digest)?);
            }
        }
        let wire_len = data.len() as i64;
        crate::metrics::global()
            .cas_received_bytes
            .inc_by(data.len() as u64);
        let plain = match state.decoder.as_mut() {
            None => Bytes::from(data),
            Some(dec) => Bytes::from(dec.feed(&data)?),
        };
        if let Some(upload) = state.upload.as_mut() {
            upload.append(plain).await?;
        }
        Ok(wire_len)
    }

    async fn finish(&self, state: &mut SessionState) -> Result<()> {
        if let Some(dec) = state.decoder.as_ref() {
            dec.finish()?;
        }
        let upload = state
            .upload
            .take()
            .ok_or_else(|| Error::Task("finish without an upload".into()))?;
        upload.commit().await.map_err(Error::from)
    }

    fn query(&self, name: &str) -> Option<(i64, bool)> {
        let s = self.lock_sessions().get(name).cloned()?;
        Some((
            s.committed.load(Ordering::Acquire),
            s.complete.load(Ordering::Acquire),
        ))
    }
}

fn plain_stream(reader: BlobReader, limit: u64, chunk: usize) -> ReadStream {
    let stream = futures::stream::unfold((reader, limit), move |(mut reader, left)| async move {
        if left == 0 {
            return None;
        }
        let want = chunk.min(usize::try_from(left).unwrap_or(usize::MAX));
        match reader.next_chunk(want).await {
            Ok(Some(data)) => {
                let left = left - data.len() as u64;
                crate::metrics::global()
                    .cas_sent_bytes
                    .inc_by(data.len() as u64);
                Some((
                    Ok(ReadResponse {
                        data: Vec::from(data),
                    }),
                    (reader, left),
                ))
            }
            Ok(None) => None,
            Err(e) => Some((Err(Error::from(e).into_status()), (reader, 0))),
        }
    });
    Box::pin(stream)
}

struct ZstdRead {
    reader: BlobReader,
    /// `None` once the frame has been finished.
    encoder: Option<StreamEncoder>,
    skip: u64,
    left: u64,
    chunk: usize,
    name: String,
    sent_any: bool,
}

fn zstd_stream(
    reader: BlobReader,
    skip: u64,
    limit: u64,
    chunk: usize,
    name: String,
) -> Result<ReadStream> {
    let state = ZstdRead {
        reader,
        encoder: Some(StreamEncoder::new()?),
        skip,
        left: limit,
        chunk,
        name,
        sent_any: false,
    };
    let stream = futures::stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        while st.left > 0 {
            let produced = match next_compressed(&mut st).await {
                Ok(Some(p)) => p,
                Ok(None) if st.skip > 0 && !st.sent_any => {
                    let e = Error::OutOfRange(format!(
                        "read_offset is past the end of the compressed form of {}",
                        st.name
                    ));
                    return Some((Err(e.into_status()), None));
                }
                Ok(None) => return None,
                Err(e) => return Some((Err(e.into_status()), None)),
            };
            // The offset and limit count compressed bytes.
            let skip = st.skip.min(produced.len() as u64) as usize;
            st.skip -= skip as u64;
            let rest = &produced[skip..];
            let take = st.left.min(rest.len() as u64) as usize;
            st.left -= take as u64;
            if take > 0 {
                st.sent_any = true;
                let data = rest[..take].to_vec();
                crate::metrics::global()
                    .cas_sent_bytes
                    .inc_by(data.len() as u64);
                return Some((Ok(ReadResponse { data }), Some(st)));
            }
        }
        None
    });
    Ok(Box::pin(stream))
}

/// The next piece of compressed output, or `None` when the stream is over.
async fn next_compressed(st: &mut ZstdRead) -> Result<Option<Vec<u8>>> {
    loop {
        let Some(encoder) = st.encoder.take() else {
            return Ok(None);
        };
        match st.reader.next_chunk(st.chunk).await? {
            Some(plain) => {
                let (encoder, out) = tokio::task::spawn_blocking(move || {
                    let mut encoder = encoder;
                    let out = encoder.feed(&plain);
                    (encoder, out)
                })
                .await
                .map_err(|e| Error::Task(e.to_string()))?;
                st.encoder = Some(encoder);
                let out = out?;
                if !out.is_empty() {
                    return Ok(Some(out));
                }
            }
            // End of the blob: close the frame (never empty).
            None => return Ok(Some(encoder.finish()?)),
        }
    }
}

async fn sweep(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = inner.now_ms();
        let idle_ms = inner.idle_timeout.as_millis() as u64;
        let mut sessions = inner.lock_sessions();
        let before = sessions.len();
        sessions.retain(|_, s| {
            let idle = now.saturating_sub(s.last_used.load(Ordering::Relaxed)) > idle_ms;
            // A session whose lock is held has a writer attached: keep it.
            !(idle && s.state.try_lock().is_ok())
        });
        let dropped = before - sessions.len();
        if dropped > 0 {
            debug!(dropped, "dropped idle uploads");
        }
    }
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> std::result::Result<Response<Self::ReadStream>, Status> {
        Ok(Response::new(self.inner.read(request.into_inner()).await?))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> std::result::Result<Response<WriteResponse>, Status> {
        Ok(Response::new(self.inner.write(request.into_inner()).await?))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> std::result::Result<Response<QueryWriteStatusResponse>, Status> {
        let name = request.into_inner().resource_name;
        let res = parse_write(&name, self.inner.zstd)?;
        self.inner.instances.check(&res.instance)?;
        if let Some((committed_size, complete)) = self.inner.query(&name) {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size,
                complete,
            }));
        }
        if self
            .inner
            .cas
            .contains(&res.digest)
            .await
            .map_err(Error::from)?
        {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: res.digest.size() as i64,
                complete: true,
            }));
        }
        Err(Error::NotFound(format!("no upload in progress for {name}")).into())
    }
}
