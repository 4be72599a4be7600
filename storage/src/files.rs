//! Large blobs as files: `cas/<first two hex>/<hash>` under the data
//! directory. (Small blobs go to [`crate::packs`]; creating a file costs
//! ~100 µs of metadata work on this ext4, far too much per 4 KiB blob.)
//!
//! A write goes to a fresh file in `tmp/` (same filesystem) and is renamed
//! into `cas/` only after its hash was verified (the caller holds a
//! [`Verified`] proof or a [`VerifiedBlob`]). The rename is atomic, so a crash
//! or `kill -9` at any moment leaves either no blob or the whole blob; `tmp/`
//! is emptied at start-up. Renames use `RENAME_NOREPLACE` so an existing blob
//! is never rewritten and size accounting stays exact.
//!
//! Power loss is a different matter (data may still be in the page cache when
//! the rename reaches the disk); see [`crate::durability`] for how Kiln deals
//! with it, and [`DiskOptions::fsync`] for the strict option.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::fsio::{DiskOptions, VerifyReport, sync_dir};
use crate::store::{
    BlobReader, BlobStore, ChunkSource, OwnedStore, Usage, blocking, get_many_blocking,
};
use crate::verify::{self, BlobSink, Verified, VerifiedBlob};
use kiln_proto::{Digest, HASH_LEN};

/// Blobs up to this size are read whole when opened for streaming, saving a
/// trip to the blocking pool.
const READ_WHOLE_MAX: u64 = 64 * 1024;

/// Blobs stored one per file. Cloning shares the store.
#[derive(Clone, Debug)]
pub struct FileStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cas_dir: PathBuf,
    tmp_dir: PathBuf,
    options: DiskOptions,
    tmp_counter: AtomicU64,
    blobs: AtomicU64,
    bytes: AtomicU64,
    removals: AtomicU64,
    /// The start-up scan, handed to the first `inventory` call so the index
    /// above does not scan the disk a second time.
    initial_inventory: Mutex<Option<Vec<(Digest, SystemTime)>>>,
}

impl FileStore {
    /// Opens (creating if needed) the store under `root`, empties `tmp/`,
    /// scans what was committed and, when `verify_since` is given, rehashes
    /// every blob written at or after that time and removes those that do not
    /// match. Blocking: call it from a blocking context.
    pub fn open(
        root: &Path,
        options: DiskOptions,
        verify_since: Option<SystemTime>,
    ) -> Result<(Self, VerifyReport)> {
        let cas_dir = root.join("cas");
        let tmp_dir = root.join("tmp");
        for dir in [&cas_dir, &tmp_dir] {
            fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        }
        for i in 0..=255u8 {
            let sub = cas_dir.join(format!("{i:02x}"));
            if !sub.is_dir() {
                fs::create_dir(&sub).map_err(|e| Error::io("create directory", &sub, e))?;
            }
        }
        let stale = clear_dir(&tmp_dir)?;
        if stale > 0 {
            info!(files = stale, dir = %tmp_dir.display(), "removed unfinished writes left by an earlier run");
        }

        let mut found = scan(&cas_dir)?;
        let mut report = VerifyReport::default();
        if let Some(since) = verify_since {
            found.retain(|(digest, mtime, path)| {
                if *mtime < since {
                    return true;
                }
                report.checked += 1;
                match fs::read(path) {
                    Ok(data) if verify::matches(digest, &data) => true,
                    Ok(_) | Err(_) => {
                        warn!(%digest, path = %path.display(), "blob does not match its digest after an unclean shutdown; removing it");
                        report.removed += 1;
                        let _ = fs::remove_file(path);
                        false
                    }
                }
            });
        }
        let bytes = found.iter().map(|(d, _, _)| d.size()).sum();
        let inventory: Vec<(Digest, SystemTime)> =
            found.into_iter().map(|(d, t, _)| (d, t)).collect();
        info!(blobs = inventory.len(), bytes, dir = %cas_dir.display(), "file store opened");
        let store = FileStore {
            inner: Arc::new(Inner {
                cas_dir,
                tmp_dir,
                options,
                tmp_counter: AtomicU64::new(0),
                blobs: AtomicU64::new(inventory.len() as u64),
                bytes: AtomicU64::new(bytes),
                removals: AtomicU64::new(0),
                initial_inventory: Mutex::new(Some(inventory)),
            }),
        };
        Ok((store, report))
    }

    /// Where the blob `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.blob_path(digest)
    }
}

impl Inner {
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        let mut p = self.cas_dir.join(&hex[..2]);
        p.push(hex);
        p
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir.join(format!("{}-{n}", std::process::id()))
    }

    /// Opens a blob, checking its length against the digest. A file of the
    /// wrong length is damaged: it is removed and reported.
    fn open_blob(&self, digest: &Digest) -> Result<Option<File>> {
        let path = self.blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open blob", path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat blob", &path, e))?
            .len();
        if len != digest.size() {
            self.remove_damaged(digest, &path);
            return Err(Error::Corrupt {
                digest: *digest,
                reason: format!("file is {len} bytes"),
            });
        }
        Ok(Some(file))
    }

    fn remove_damaged(&self, digest: &Digest, path: &Path) {
        warn!(%digest, path = %path.display(), "removing damaged blob");
        if fs::remove_file(path).is_ok() {
            self.blobs.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(digest.size(), Ordering::Relaxed);
            self.removals.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn get(&self, digest: &Digest) -> Result<Option<Bytes>> {
        let Some(mut file) = self.open_blob(digest)? else {
            return Ok(None);
        };
        let mut buf = Vec::with_capacity(digest.size() as usize);
        file.read_to_end(&mut buf)
            .map_err(|e| Error::io("read blob", self.blob_path(digest), e))?;
        if buf.len() as u64 != digest.size() {
            self.remove_damaged(digest, &self.blob_path(digest));
            return Err(Error::Corrupt {
                digest: *digest,
                reason: format!("read {} bytes", buf.len()),
            });
        }
        Ok(Some(Bytes::from(buf)))
    }

    fn put(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        let tmp = self.tmp_path();
        let mut file = File::create_new(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        let written = file
            .write_all(data)
            .and_then(|_| {
                if self.options.fsync {
                    file.sync_data()
                } else {
                    Ok(())
                }
            })
            .map_err(|e| Error::io("write", &tmp, e));
        drop(file);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.publish(digest, &tmp)
    }

    /// Renames a finished temporary file into place, unless the blob is
    /// already there (then the temporary file is dropped).
    fn publish(&self, digest: &Digest, tmp: &Path) -> Result<()> {
        let dest = self.blob_path(digest);
        match rename_noreplace(tmp, &dest) {
            Ok(()) => {
                if self.options.fsync {
                    sync_dir(dest.parent().unwrap_or(&self.cas_dir))?;
                }
                self.blobs.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(digest.size(), Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let _ = fs::remove_file(tmp);
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(tmp);
                Err(Error::io("rename into place", dest, e))
            }
        }
    }

    fn delete(&self, digest: &Digest) -> Result<()> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.blobs.fetch_sub(1, Ordering::Relaxed);
                self.bytes.fetch_sub(digest.size(), Ordering::Relaxed);
                self.removals.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove blob", path, e)),
        }
    }
}

#[async_trait]
impl BlobStore for FileStore {
    async fn get_many(&self, digests: &[Digest]) -> Vec<Result<Option<Bytes>>> {
        let inner = self.inner.clone();
        get_many_blocking(digests, move |d| inner.get(d)).await
    }

    async fn put_many(&self, blobs: Vec<VerifiedBlob>) -> Vec<Result<()>> {
        let inner = self.inner.clone();
        let n = blobs.len();
        let put = move || {
            blobs
                .iter()
                .map(|b| inner.put(&b.digest(), b.data()))
                .collect::<Vec<_>>()
        };
        match blocking(put).await {
            Ok(v) => v,
            Err(e) => (0..n).map(|_| Err(Error::Task(e.to_string()))).collect(),
        }
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let inner = self.inner.clone();
        let owned = digests.to_vec();
        blocking(move || {
            owned
                .into_iter()
                .filter(|d| fs::metadata(inner.blob_path(d)).map_or(true, |m| m.len() != d.size()))
                .collect()
        })
        .await
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobReader>> {
        let inner = self.inner.clone();
        let digest = *digest;
        blocking(move || -> Result<Option<BlobReader>> {
            let Some(mut file) = inner.open_blob(&digest)? else {
                return Ok(None);
            };
            let remaining = digest.size().saturating_sub(offset);
            if remaining <= READ_WHOLE_MAX {
                let mut buf = Vec::with_capacity(remaining as usize);
                file.seek(SeekFrom::Start(offset))
                    .and_then(|_| file.read_to_end(&mut buf))
                    .map_err(|e| Error::io("read blob", inner.blob_path(&digest), e))?;
                return Ok(Some(BlobReader::from_bytes(buf.into())));
            }
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| Error::io("seek blob", inner.blob_path(&digest), e))?;
            let source = FileSource {
                file: Some(file),
                path: inner.blob_path(&digest),
            };
            Ok(Some(BlobReader::new(Box::new(source), remaining)))
        })
        .await?
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        let inner = self.inner.clone();
        let tmp = inner.tmp_path();
        let tmp2 = tmp.clone();
        let file = blocking(move || File::create_new(&tmp2))
            .await?
            .map_err(|e| Error::io("create", &tmp, e))?;
        Ok(Box::new(FileSink {
            inner,
            digest: *digest,
            tmp,
            file: Some(file),
            done: false,
        }))
    }

    fn owned(&self) -> Option<&dyn OwnedStore> {
        Some(self)
    }
}

#[async_trait]
impl OwnedStore for FileStore {
    async fn delete(&self, digests: &[Digest]) -> Result<()> {
        let inner = self.inner.clone();
        let owned = digests.to_vec();
        blocking(move || owned.iter().try_for_each(|d| inner.delete(d))).await?
    }

    async fn inventory(&self) -> Result<Vec<(Digest, SystemTime)>> {
        let cached = self
            .inner
            .initial_inventory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // The scan made at open saves a second one when the index is built
        // right after; once anything was written or removed it is stale.
        let now = self.usage();
        if let Some(found) = cached
            && now.removals == 0
            && now.blobs == found.len() as u64
        {
            return Ok(found);
        }
        let inner = self.inner.clone();
        let found = blocking(move || scan(&inner.cas_dir)).await??;
        Ok(found.into_iter().map(|(d, t, _)| (d, t)).collect())
    }

    fn usage(&self) -> Usage {
        Usage {
            blobs: self.inner.blobs.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
            limit: None,
            removals: self.inner.removals.load(Ordering::Relaxed),
        }
    }
}

/// Streams a blob file.
struct FileSource {
    file: Option<File>,
    path: PathBuf,
}

#[async_trait]
impl ChunkSource for FileSource {
    async fn next_chunk(&mut self, max: usize) -> Result<Bytes> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| Error::Task("read after a failed read".into()))?;
        let path = self.path.clone();
        let (file, buf) = blocking(move || -> Result<(File, Vec<u8>)> {
            let mut buf = vec![0u8; max];
            let mut filled = 0;
            while filled < max {
                match file.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io("read blob", &path, e)),
                }
            }
            buf.truncate(filled);
            Ok((file, buf))
        })
        .await??;
        self.file = Some(file);
        Ok(Bytes::from(buf))
    }
}

/// A streaming write into a temporary file.
struct FileSink {
    inner: Arc<Inner>,
    digest: Digest,
    tmp: PathBuf,
    file: Option<File>,
    done: bool,
}

#[async_trait]
impl BlobSink for FileSink {
    async fn append(&mut self, chunk: Bytes) -> Result<()> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| Error::Task("write after a failed write".into()))?;
        let tmp = self.tmp.clone();
        let file = blocking(move || -> Result<File> {
            file.write_all(&chunk)
                .map_err(|e| Error::io("write", &tmp, e))?;
            Ok(file)
        })
        .await??;
        self.file = Some(file);
        Ok(())
    }

    async fn commit(mut self: Box<Self>, _proof: Verified) -> Result<()> {
        let file = self
            .file
            .take()
            .ok_or_else(|| Error::Task("commit after a failed write".into()))?;
        self.done = true;
        let inner = self.inner.clone();
        let digest = self.digest;
        let tmp = self.tmp.clone();
        blocking(move || -> Result<()> {
            if inner.options.fsync {
                file.sync_data().map_err(|e| Error::io("fsync", &tmp, e))?;
            }
            drop(file);
            inner.publish(&digest, &tmp)
        })
        .await?
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if !self.done {
            self.file.take();
            let tmp = std::mem::take(&mut self.tmp);
            debug!(path = %tmp.display(), "discarding unfinished upload");
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(move || fs::remove_file(tmp));
                }
                Err(_) => {
                    let _ = fs::remove_file(tmp);
                }
            }
        }
    }
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c_from = CString::new(from.as_os_str().as_bytes())?;
    let c_to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD is fine as they
    // are absolute or relative to the working directory alike.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // Filesystems without RENAME_NOREPLACE: fall back to link + unlink,
        // which also refuses to replace.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            fs::hard_link(from, to)?;
            fs::remove_file(from)
        }
        _ => Err(err),
    }
}

/// Removes everything in `dir`; returns how many entries went.
fn clear_dir(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for entry in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| Error::io("remove", &path, e))?;
        n += 1;
    }
    Ok(n)
}

/// Every blob file under `cas_dir` with its modification time.
fn scan(cas_dir: &Path) -> Result<Vec<(Digest, SystemTime, PathBuf)>> {
    let mut found = Vec::new();
    for i in 0..=255u8 {
        let sub = cas_dir.join(format!("{i:02x}"));
        let entries = match fs::read_dir(&sub) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("list", &sub, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &sub, e))?;
            let name = entry.file_name();
            let mut hash = [0u8; HASH_LEN];
            let name_ok = name.len() == HASH_LEN * 2
                && hex::decode_to_slice(name.as_bytes(), &mut hash).is_ok()
                && name.as_bytes()[..2] == *format!("{i:02x}").as_bytes();
            if !name_ok {
                warn!(path = %entry.path().display(), "ignoring a file that is not a blob");
                continue;
            }
            let meta = entry
                .metadata()
                .map_err(|e| Error::io("stat", entry.path(), e))?;
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((Digest::new(hash, meta.len()), mtime, entry.path()));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(data: &'static [u8]) -> VerifiedBlob {
        VerifiedBlob::from_data(Bytes::from_static(data))
    }

    #[tokio::test]
    async fn put_get_restart_and_tmp_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = FileStore::open(dir.path(), DiskOptions::default(), None).unwrap();
        let a = blob(b"hello");
        let results = store.put_many(vec![a.clone(), a.clone()]).await;
        assert!(results.iter().all(|r| r.is_ok()));
        assert_eq!(
            store.usage().blobs,
            1,
            "a second put of the same blob is not counted"
        );
        let got = store.get_many(&[a.digest()]).await;
        assert_eq!(got[0].as_ref().unwrap().as_deref(), Some(&b"hello"[..]));

        // An unfinished upload leaves a temporary file behind if the process
        // dies; a restart removes it and keeps the committed blob.
        let mut sink = store.write(&Digest::of(b"partial")).await.unwrap();
        sink.append(Bytes::from_static(b"part")).await.unwrap();
        std::mem::forget(sink);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        drop(store);

        let (store, _) = FileStore::open(dir.path(), DiskOptions::default(), None).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let inv: Vec<Digest> = store
            .inventory()
            .await
            .unwrap()
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(inv, vec![a.digest()]);
        assert!(store.find_missing(&[a.digest()]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn damaged_blobs_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = FileStore::open(dir.path(), DiskOptions::default(), None).unwrap();
        let a = blob(b"some content");
        let b = blob(b"other content");
        store.put_many(vec![a.clone(), b.clone()]).await;
        // Same length, different bytes: only a rehash notices.
        fs::write(store.blob_path(&a.digest()), b"SOME CONTENT").unwrap();
        // Wrong length: noticed when opened.
        fs::write(store.blob_path(&b.digest()), b"short").unwrap();
        let got = store.get_many(&[b.digest()]).await;
        assert!(matches!(got[0], Err(Error::Corrupt { .. })), "{got:?}");
        assert!(!store.blob_path(&b.digest()).exists());
        drop(store);

        let (store, report) = FileStore::open(
            dir.path(),
            DiskOptions::default(),
            Some(SystemTime::UNIX_EPOCH),
        )
        .unwrap();
        assert_eq!(
            report,
            VerifyReport {
                checked: 1,
                removed: 1
            }
        );
        assert_eq!(
            store.find_missing(&[a.digest()]).await.unwrap(),
            vec![a.digest()]
        );
    }
}
