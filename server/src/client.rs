//! A CAS client over gRPC: what `kiln cas` and the benchmark use, and a
//! convenient way for tests to talk to a server.
//!
//! Small blobs travel in batches sized to the server's advertised
//! `max_batch_total_size_bytes`; larger ones over ByteStream, streamed from
//! and to files so a large file is never held in memory.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, Directory, DirectoryNode, FileNode,
    FindMissingBlobsRequest, GetCapabilitiesRequest, GetTreeRequest, SymlinkNode,
    batch_update_blobs_request,
};
use prost::Message;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Blobs up to this size go in batches; larger ones over ByteStream.
const BATCH_BLOB_MAX: u64 = 1 << 20;
/// ByteStream write chunk.
const WRITE_CHUNK: usize = 1 << 20;
/// Digests per FindMissingBlobs call.
const FIND_MISSING_CHUNK: usize = 10_000;
/// Client-side message limit.
const MAX_MESSAGE: usize = 64 << 20;

/// Opens a channel to `url` with settings suited to bulk transfers.
pub async fn connect(url: &str) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::Config(format!("server URL {url:?}: {e}")))?
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .tcp_nodelay(true);
    Ok(endpoint.connect().await?)
}

/// A CAS client bound to one instance name.
#[derive(Clone, Debug)]
pub struct CasClient {
    channel: Channel,
    instance: String,
    max_batch: u64,
}

/// Where the bytes of a blob to upload come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Already in memory.
    Bytes(Bytes),
    /// A file (read when uploaded).
    File(PathBuf),
}

impl CasClient {
    /// Connects and asks the server for its batch limit.
    pub async fn connect(url: &str, instance: &str) -> Result<Self> {
        let channel = connect(url).await?;
        Self::with_channel(channel, instance).await
    }

    /// A client over an existing channel.
    pub async fn with_channel(channel: Channel, instance: &str) -> Result<Self> {
        let caps = CapabilitiesClient::new(channel.clone())
            .get_capabilities(GetCapabilitiesRequest {
                instance_name: instance.to_string(),
            })
            .await
            .map_err(|s| Error::rpc("GetCapabilities", s))?
            .into_inner();
        let advertised = caps
            .cache_capabilities
            .map(|c| c.max_batch_total_size_bytes)
            .unwrap_or(0);
        let max_batch = if advertised <= 0 {
            4 << 20
        } else {
            advertised as u64
        };
        Ok(CasClient {
            channel,
            instance: instance.to_string(),
            max_batch,
        })
    }

    /// The channel (to build other clients on).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The server's batch limit.
    pub fn max_batch(&self) -> u64 {
        self.max_batch
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn prefix(&self) -> String {
        if self.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.instance)
        }
    }

    /// The digests the server lacks.
    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut missing = Vec::new();
        for chunk in digests.chunks(FIND_MISSING_CHUNK) {
            let resp = self
                .cas()
                .find_missing_blobs(FindMissingBlobsRequest {
                    instance_name: self.instance.clone(),
                    blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                    digest_function: 0,
                })
                .await
                .map_err(|s| Error::rpc("FindMissingBlobs", s))?
                .into_inner();
            for d in resp.missing_blob_digests {
                missing.push(Digest::from_proto(&d)?);
            }
        }
        Ok(missing)
    }

    /// Uploads blobs the server lacks; returns how many were sent.
    pub async fn upload(&self, blobs: Vec<(Digest, Source)>) -> Result<usize> {
        let mut by_digest: HashMap<Digest, Source> = HashMap::new();
        for (d, s) in blobs {
            by_digest.entry(d).or_insert(s);
        }
        let digests: Vec<Digest> = by_digest.keys().copied().collect();
        let missing = self.find_missing(&digests).await?;
        let mut batch: Vec<(Digest, Bytes)> = Vec::new();
        let mut batch_bytes = 0;
        for d in &missing {
            let source = by_digest
                .remove(d)
                .expect("missing digests come from the request");
            if d.size() > BATCH_BLOB_MAX || d.size() > self.max_batch / 2 {
                match source {
                    Source::Bytes(b) => self.write(*d, b).await?,
                    Source::File(p) => self.write_file(*d, &p).await?,
                }
                continue;
            }
            let data = match source {
                Source::Bytes(b) => b,
                Source::File(p) => Bytes::from(fs::read(&p).map_err(|e| Error::io("read", &p, e))?),
            };
            if batch_bytes + d.size() > self.max_batch {
                self.batch_update(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
            batch_bytes += d.size();
            batch.push((*d, data));
        }
        if !batch.is_empty() {
            self.batch_update(batch).await?;
        }
        Ok(missing.len())
    }

    /// One BatchUpdateBlobs call; any per-blob failure is an error.
    pub async fn batch_update(&self, blobs: Vec<(Digest, Bytes)>) -> Result<()> {
        let resp = self
            .cas()
            .batch_update_blobs(BatchUpdateBlobsRequest {
                instance_name: self.instance.clone(),
                requests: blobs
                    .into_iter()
                    .map(|(d, data)| batch_update_blobs_request::Request {
                        digest: Some(d.to_proto()),
                        data: Vec::from(data),
                        compressor: 0,
                    })
                    .collect(),
                digest_function: 0,
            })
            .await
            .map_err(|s| Error::rpc("BatchUpdateBlobs", s))?
            .into_inner();
        for r in resp.responses {
            if let Some(s) = r.status.filter(|s| s.code != 0) {
                return Err(Error::rpc(
                    "BatchUpdateBlobs",
                    tonic::Status::new(tonic::Code::from(s.code), s.message),
                ));
            }
        }
        Ok(())
    }

    /// Reads blobs with BatchReadBlobs (sizes must fit the batch limit).
    pub async fn batch_read(&self, digests: &[Digest]) -> Result<Vec<(Digest, Bytes)>> {
        let resp = self
            .cas()
            .batch_read_blobs(BatchReadBlobsRequest {
                instance_name: self.instance.clone(),
                digests: digests.iter().map(Digest::to_proto).collect(),
                acceptable_compressors: Vec::new(),
                digest_function: 0,
            })
            .await
            .map_err(|s| Error::rpc("BatchReadBlobs", s))?
            .into_inner();
        let mut out = Vec::with_capacity(resp.responses.len());
        for r in resp.responses {
            let d = Digest::from_field(r.digest.as_ref(), "digest")?;
            if let Some(s) = r.status.filter(|s| s.code != 0) {
                return Err(Error::rpc(
                    format!("BatchReadBlobs {d}"),
                    tonic::Status::new(tonic::Code::from(s.code), s.message),
                ));
            }
            out.push((d, Bytes::from(r.data)));
        }
        Ok(out)
    }

    /// Writes one blob over ByteStream.
    pub async fn write(&self, digest: Digest, data: Bytes) -> Result<()> {
        let mut cursor = std::io::Cursor::new(data);
        self.write_from(digest, &mut cursor).await
    }

    /// Writes one blob over ByteStream, streaming it from a file.
    pub async fn write_file(&self, digest: Digest, path: &Path) -> Result<()> {
        let mut f = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::io("open", path, e))?;
        self.write_from(digest, &mut f).await
    }

    async fn write_from<R: AsyncRead + Unpin + Send>(
        &self,
        digest: Digest,
        reader: &mut R,
    ) -> Result<()> {
        let name = format!(
            "{}uploads/{}/blobs/{}/{}",
            self.prefix(),
            uuid::Uuid::new_v4(),
            digest.hex(),
            digest.size()
        );
        // Read ahead the whole message list lazily through a channel so the
        // file is read while earlier chunks are on the wire.
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let size = digest.size();
        let mut send_err = None;
        let producer = async {
            let mut offset = 0u64;
            loop {
                let want = WRITE_CHUNK.min((size - offset) as usize);
                let mut buf = vec![0u8; want];
                if want > 0
                    && let Err(e) = reader.read_exact(&mut buf).await
                {
                    send_err = Some(Error::io("read", "upload source", e));
                    return;
                }
                let finish = offset + want as u64 == size;
                let req = WriteRequest {
                    resource_name: if offset == 0 {
                        name.clone()
                    } else {
                        String::new()
                    },
                    write_offset: offset as i64,
                    finish_write: finish,
                    data: buf,
                };
                offset += want as u64;
                if tx.send(req).await.is_err() || finish {
                    return;
                }
            }
        };
        let mut client = self.bytestream();
        let call = client.write(tokio_stream::wrappers::ReceiverStream::new(rx));
        let (_, resp) = tokio::join!(producer, call);
        if let Some(e) = send_err {
            return Err(e);
        }
        let resp = resp
            .map_err(|s| Error::rpc(format!("ByteStream.Write {digest}"), s))?
            .into_inner();
        if resp.committed_size != size as i64 {
            return Err(Error::rpc(
                format!("ByteStream.Write {digest}"),
                tonic::Status::data_loss(format!(
                    "server committed {} of {size} bytes",
                    resp.committed_size
                )),
            ));
        }
        Ok(())
    }

    /// Reads a whole blob over ByteStream, checking its hash.
    pub async fn read(&self, digest: Digest) -> Result<Bytes> {
        let mut out = Vec::with_capacity(digest.size() as usize);
        self.read_into(digest, &mut out).await?;
        Ok(Bytes::from(out))
    }

    /// Streams a blob over ByteStream into `writer`, checking its hash.
    pub async fn read_into<W: AsyncWrite + Unpin + Send>(
        &self,
        digest: Digest,
        writer: &mut W,
    ) -> Result<()> {
        let mut stream = self
            .bytestream()
            .read(ReadRequest {
                resource_name: format!("{}blobs/{}/{}", self.prefix(), digest.hex(), digest.size()),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .map_err(|s| Error::rpc(format!("ByteStream.Read {digest}"), s))?
            .into_inner();
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        while let Some(msg) = stream.next().await {
            let msg = msg.map_err(|s| Error::rpc(format!("ByteStream.Read {digest}"), s))?;
            hasher.update(&msg.data);
            n += msg.data.len() as u64;
            writer
                .write_all(&msg.data)
                .await
                .map_err(|e| Error::io("write", "download destination", e))?;
        }
        writer
            .flush()
            .await
            .map_err(|e| Error::io("write", "download destination", e))?;
        let got = Digest::new(hasher.finalize().into(), n);
        if got != digest {
            return Err(Error::DigestMismatch {
                expected: digest,
                actual: got,
            });
        }
        Ok(())
    }

    /// All directories of the tree under `root` (GetTree, following pages).
    pub async fn get_tree(&self, root: Digest) -> Result<Vec<Directory>> {
        let mut dirs = Vec::new();
        let mut token = String::new();
        loop {
            let mut stream = self
                .cas()
                .get_tree(GetTreeRequest {
                    instance_name: self.instance.clone(),
                    root_digest: Some(root.to_proto()),
                    page_size: 0,
                    page_token: token.clone(),
                    digest_function: 0,
                })
                .await
                .map_err(|s| Error::rpc(format!("GetTree {root}"), s))?
                .into_inner();
            let mut next = String::new();
            while let Some(page) = stream.next().await {
                let page = page.map_err(|s| Error::rpc(format!("GetTree {root}"), s))?;
                dirs.extend(page.directories);
                next = page.next_page_token;
            }
            if next.is_empty() {
                return Ok(dirs);
            }
            token = next;
        }
    }

    /// Uploads the directory `path` (files, subdirectories, symlinks; modes
    /// reduced to the executable bit) and returns its root Directory digest.
    pub async fn upload_directory(&self, path: &Path) -> Result<Digest> {
        let path = path.to_path_buf();
        let (root, blobs) = tokio::task::spawn_blocking(move || {
            let mut blobs = Vec::new();
            let root = build_directory(&path, &mut blobs)?;
            Ok::<_, Error>((root, blobs))
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
        self.upload(blobs).await?;
        Ok(root)
    }

    /// Recreates the tree under `root` at `dest`, which must not exist or
    /// be empty.
    pub async fn download_tree(&self, root: Digest, dest: &Path) -> Result<()> {
        if dest.exists()
            && fs::read_dir(dest)
                .map_err(|e| Error::io("list", dest, e))?
                .next()
                .is_some()
        {
            return Err(Error::InvalidArgument(format!(
                "destination {} exists and is not empty",
                dest.display()
            )));
        }
        let dirs = self.get_tree(root).await?;
        let by_digest: HashMap<Digest, Directory> = dirs
            .into_iter()
            .map(|d| (Digest::of_message(&d).0, d))
            .collect();
        // Lay out directories and symlinks; collect where each file goes.
        let mut files: BTreeMap<Digest, Vec<(PathBuf, bool)>> = BTreeMap::new();
        let mut stack = vec![(root, dest.to_path_buf())];
        while let Some((digest, at)) = stack.pop() {
            let dir = by_digest.get(&digest).ok_or_else(|| {
                Error::NotFound(format!(
                    "directory {digest} ({}) is missing from the CAS",
                    at.display()
                ))
            })?;
            fs::create_dir_all(&at).map_err(|e| Error::io("create directory", &at, e))?;
            for f in &dir.files {
                let d = Digest::from_field(f.digest.as_ref(), "file digest")?;
                files
                    .entry(d)
                    .or_default()
                    .push((at.join(safe_name(&f.name, &digest)?), f.is_executable));
            }
            for s in &dir.symlinks {
                let p = at.join(safe_name(&s.name, &digest)?);
                std::os::unix::fs::symlink(&s.target, &p)
                    .map_err(|e| Error::io("create symlink", &p, e))?;
            }
            for d in &dir.directories {
                let child = Digest::from_field(d.digest.as_ref(), "directory digest")?;
                stack.push((child, at.join(safe_name(&d.name, &digest)?)));
            }
        }
        // Small files in batches, large ones streamed.
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for (&d, _) in files.iter().filter(|(d, _)| d.size() <= BATCH_BLOB_MAX) {
            if batch_bytes + d.size() > self.max_batch && !batch.is_empty() {
                self.write_batch_files(&std::mem::take(&mut batch), &files)
                    .await?;
                batch_bytes = 0;
            }
            batch_bytes += d.size();
            batch.push(d);
        }
        if !batch.is_empty() {
            self.write_batch_files(&batch, &files).await?;
        }
        for (&d, places) in files.iter().filter(|(d, _)| d.size() > BATCH_BLOB_MAX) {
            let (first, exec) = &places[0];
            let mut f = tokio::fs::File::create(first)
                .await
                .map_err(|e| Error::io("create", first, e))?;
            self.read_into(d, &mut f).await?;
            set_mode(first, *exec)?;
            for (p, exec) in &places[1..] {
                fs::copy(first, p).map_err(|e| Error::io("copy to", p, e))?;
                set_mode(p, *exec)?;
            }
        }
        Ok(())
    }

    async fn write_batch_files(
        &self,
        digests: &[Digest],
        places: &BTreeMap<Digest, Vec<(PathBuf, bool)>>,
    ) -> Result<()> {
        for (d, data) in self.batch_read(digests).await? {
            if Digest::of(&data) != d {
                return Err(Error::DigestMismatch {
                    expected: d,
                    actual: Digest::of(&data),
                });
            }
            for (p, exec) in &places[&d] {
                fs::write(p, &data).map_err(|e| Error::io("write", p, e))?;
                set_mode(p, *exec)?;
            }
        }
        Ok(())
    }
}

fn set_mode(p: &Path, exec: bool) -> Result<()> {
    let mode = if exec { 0o755 } else { 0o644 };
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(|e| Error::io("chmod", p, e))
}

/// A Directory entry name that is safe to join to a path.
fn safe_name<'a>(name: &'a str, dir: &Digest) -> Result<&'a str> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "directory {dir} has an entry with the invalid name {name:?}"
        )));
    }
    Ok(name)
}

/// Builds the Directory protos of `path` bottom-up, recording every blob
/// (file contents by path, Directory messages in memory) in `blobs`.
fn build_directory(path: &Path, blobs: &mut Vec<(Digest, Source)>) -> Result<Digest> {
    let mut dir = Directory::default();
    let mut entries: Vec<_> = fs::read_dir(path)
        .map_err(|e| Error::io("list", path, e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io("list", path, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let p = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| Error::InvalidArgument(format!("{} is not valid UTF-8", p.display())))?;
        let meta = fs::symlink_metadata(&p).map_err(|e| Error::io("stat", &p, e))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&p).map_err(|e| Error::io("read link", &p, e))?;
            let target = target.into_os_string().into_string().map_err(|_| {
                Error::InvalidArgument(format!("target of {} is not valid UTF-8", p.display()))
            })?;
            dir.symlinks.push(SymlinkNode {
                name,
                target,
                node_properties: None,
            });
        } else if ft.is_dir() {
            let d = build_directory(&p, blobs)?;
            dir.directories.push(DirectoryNode {
                name,
                digest: Some(d.to_proto()),
            });
        } else if ft.is_file() {
            let d = hash_file(&p)?;
            blobs.push((d, Source::File(p.clone())));
            dir.files.push(FileNode {
                name,
                digest: Some(d.to_proto()),
                is_executable: meta.mode() & 0o111 != 0,
                node_properties: None,
            });
        } else {
            return Err(Error::InvalidArgument(format!(
                "{} is neither a file, a directory nor a symlink",
                p.display()
            )));
        }
    }
    let bytes = dir.encode_to_vec();
    let digest = Digest::of(&bytes);
    blobs.push((digest, Source::Bytes(Bytes::from(bytes))));
    Ok(digest)
}

fn hash_file(p: &Path) -> Result<Digest> {
    let mut f = fs::File::open(p).map_err(|e| Error::io("open", p, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| Error::io("read", p, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok(Digest::new(h.finalize().into(), n))
}
