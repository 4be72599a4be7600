//! The worker's local blob cache: one file per blob, never written after it is cached, which staging
//! hardlinks into input trees. Files are written to `tmp/` and renamed into
//! place only once complete and verified, so a crash never leaves a partial
//! blob in the cache, and a restart finds every blob again.
//!
//! Hardlinks share the inode's mode, so an executable copy of a blob lives
//! beside the plain one (`<hash>.x`). Eviction (least recently used, above
//! the size limit) only unlinks the cache's name: trees staged earlier keep
//! their links, and a stage racing an eviction sees ENOENT and fetches again.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_proto::digest;
use kiln_proto::reapi::Digest;

use crate::error::{Error, Result};

const MODE_PLAIN: u32 = 0o644;
const MODE_EXEC: u32 = 0o755;

#[derive(Debug)]
struct Entry {
    size: i64,
    tick: u64,
    inode: u64,
    exec_inode: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    lru: BTreeMap<u64, String>,
    by_inode: HashMap<u64, (String, i64)>,
    tick: u64,
    bytes: u64,
}

impl State {
    fn touch(&mut self, hash: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(hash) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, hash.to_string());
        }
    }

    fn add(&mut self, hash: &str, size: i64, inode: u64, exec_inode: Option<u64>) {
        if self.entries.contains_key(hash) {
            self.touch(hash);
            return;
        }
        self.tick += 1;
        self.entries.insert(
            hash.to_string(),
            Entry {
                size,
                tick: self.tick,
                inode,
                exec_inode,
            },
        );
        self.lru.insert(self.tick, hash.to_string());
        self.by_inode.insert(inode, (hash.to_string(), size));
        if let Some(x) = exec_inode {
            self.by_inode.insert(x, (hash.to_string(), size));
        }
        self.bytes += size.max(0) as u64 * if exec_inode.is_some() { 2 } else { 1 };
    }

    fn remove(&mut self, hash: &str) -> Option<Entry> {
        let e = self.entries.remove(hash)?;
        self.lru.remove(&e.tick);
        self.by_inode.remove(&e.inode);
        if let Some(x) = e.exec_inode {
            self.by_inode.remove(&x);
        }
        self.bytes -= e.size.max(0) as u64 * if e.exec_inode.is_some() { 2 } else { 1 };
        Some(e)
    }
}

/// The on-disk blob cache of one worker.
#[derive(Debug)]
pub struct BlobCache {
    blobs: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
    device: u64,
    state: Mutex<State>,
}

impl BlobCache {
    /// Opens (or creates) the cache under `dir`, indexing what a previous run
    /// left and discarding unfinished writes.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        let blobs = dir.join("blobs");
        let tmp = dir.join("tmp");
        let _ = fs::remove_dir_all(&tmp);
        for d in [&blobs, &tmp] {
            fs::create_dir_all(d).map_err(|e| Error::io("create cache directory", d, e))?;
        }
        let device = fs::metadata(&blobs)
            .map_err(|e| Error::io("stat", &blobs, e))?
            .dev();
        let cache = Self {
            blobs,
            tmp,
            max_bytes,
            device,
            state: Mutex::new(State::default()),
        };
        cache.index_existing()?;
        Ok(cache)
    }

    fn index_existing(&self) -> Result<()> {
        let mut state = self.state.lock().expect("cache lock");
        let shards = fs::read_dir(&self.blobs).map_err(|e| Error::io("list", &self.blobs, e))?;
        for shard in shards.flatten() {
            let Ok(files) = fs::read_dir(shard.path()) else {
                continue;
            };
            let mut exec: HashMap<String, u64> = HashMap::new();
            let mut plain: Vec<(String, i64, u64)> = Vec::new();
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let Ok(meta) = f.metadata() else { continue };
                match name.strip_suffix(".x") {
                    Some(hash) => {
                        exec.insert(hash.to_string(), meta.ino());
                    }
                    None => plain.push((name, meta.len() as i64, meta.ino())),
                }
            }
            for (hash, size, inode) in plain {
                let x = exec.remove(&hash);
                state.add(&hash, size, inode, x);
            }
            // An executable copy without its plain blob is an interrupted
            // eviction: finish it.
            for hash in exec.keys() {
                let _ = fs::remove_file(shard.path().join(format!("{hash}.x")));
            }
        }
        Ok(())
    }

    /// The device the cache lives on; staged trees must be on it too for
    /// hardlinks to work.
    pub fn device(&self) -> u64 {
        self.device
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    pub fn path(&self, hash: &str, executable: bool) -> PathBuf {
        let shard = &hash[..2.min(hash.len())];
        let name = if executable {
            format!("{hash}.x")
        } else {
            hash.to_string()
        };
        self.blobs.join(shard).join(name)
    }

    pub fn contains(&self, d: &Digest) -> bool {
        let mut state = self.state.lock().expect("cache lock");
        let present = state
            .entries
            .get(&d.hash)
            .is_some_and(|e| e.size == d.size_bytes);
        if present {
            state.touch(&d.hash);
        }
        present
    }

    /// The subset of `digests` not in the cache.
    pub fn missing(&self, digests: impl IntoIterator<Item = Digest>) -> Vec<Digest> {
        let mut state = self.state.lock().expect("cache lock");
        let mut out = Vec::new();
        for d in digests {
            if state
                .entries
                .get(&d.hash)
                .is_some_and(|e| e.size == d.size_bytes)
            {
                state.touch(&d.hash);
            } else {
                out.push(d);
            }
        }
        out
    }

    /// The digest of a cached blob by inode: lets output collection skip
    /// hashing a file that is still the staged input it was linked from.
    pub fn digest_of_inode(&self, inode: u64, size: i64) -> Option<Digest> {
        let state = self.state.lock().expect("cache lock");
        let (hash, cached_size) = state.by_inode.get(&inode)?;
        (*cached_size == size).then(|| Digest {
            hash: hash.clone(),
            size_bytes: size,
        })
    }

    /// A fresh path under `tmp/` for a blob being written.
    pub fn tmp_path(&self) -> PathBuf {
        self.tmp.join(uuid::Uuid::new_v4().to_string())
    }

    /// Stores verified bytes.
    pub fn insert_bytes(&self, d: &Digest, data: &[u8]) -> Result<()> {
        if self.contains(d) {
            return Ok(());
        }
        let tmp = self.tmp_path();
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(data).map_err(|e| Error::io("write", &tmp, e))?;
        drop(f);
        self.insert_file(d, &tmp)
    }

    /// Moves a complete, verified file from `tmp/` into the cache.
    pub fn insert_file(&self, d: &Digest, tmp: &Path) -> Result<()> {
        fs::set_permissions(tmp, fs::Permissions::from_mode(MODE_PLAIN))
            .map_err(|e| Error::io("chmod", tmp, e))?;
        let dest = self.path(&d.hash, false);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
        }
        let inode = fs::metadata(tmp)
            .map_err(|e| Error::io("stat", tmp, e))?
            .ino();
        fs::rename(tmp, &dest).map_err(|e| Error::io("rename into cache", &dest, e))?;
        self.state
            .lock()
            .expect("cache lock")
            .add(&d.hash, d.size_bytes, inode, None);
        self.evict_over_limit();
        Ok(())
    }

    /// Hardlinks a cached blob to `dest`. Returns `Ok(false)` when the blob
    /// is no longer cached (evicted meanwhile): the caller fetches it again.
    pub fn link_to(&self, d: &Digest, executable: bool, dest: &Path) -> Result<bool> {
        if executable && !self.ensure_executable(d)? {
            return Ok(false);
        }
        let src = self.path(&d.hash, executable);
        match fs::hard_link(&src, dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(&d.hash);
                Ok(false)
            }
            // The per-inode link limit (~65,000 on ext4): give the cache a
            // fresh inode for this blob; trees already staged keep the old one.
            Err(e) if e.raw_os_error() == Some(libc::EMLINK) => {
                self.replace_inode(d, executable)?;
                fs::hard_link(&src, dest).map_err(|e| Error::io("hardlink", dest, e))?;
                Ok(true)
            }
            Err(e) => Err(Error::io("hardlink", dest, e)),
        }
    }

    fn ensure_executable(&self, d: &Digest) -> Result<bool> {
        {
            let state = self.state.lock().expect("cache lock");
            match state.entries.get(&d.hash) {
                None => return Ok(false),
                Some(e) if e.exec_inode.is_some() => return Ok(true),
                Some(_) => {}
            }
        }
        let src = self.path(&d.hash, false);
        let tmp = self.tmp_path();
        match fs::copy(&src, &tmp) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(&d.hash);
                return Ok(false);
            }
            Err(e) => return Err(Error::io("copy", &src, e)),
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(MODE_EXEC))
            .map_err(|e| Error::io("chmod", &tmp, e))?;
        let inode = fs::metadata(&tmp)
            .map_err(|e| Error::io("stat", &tmp, e))?
            .ino();
        let dest = self.path(&d.hash, true);
        fs::rename(&tmp, &dest).map_err(|e| Error::io("rename into cache", &dest, e))?;
        let mut state = self.state.lock().expect("cache lock");
        let size = d.size_bytes.max(0) as u64;
        if let Some(e) = state.entries.get_mut(&d.hash) {
            if let Some(old) = e.exec_inode.replace(inode) {
                state.by_inode.remove(&old);
            } else {
                state.bytes += size;
            }
            state.by_inode.insert(inode, (d.hash.clone(), d.size_bytes));
        }
        Ok(true)
    }

    fn replace_inode(&self, d: &Digest, executable: bool) -> Result<()> {
        let src = self.path(&d.hash, executable);
        let tmp = self.tmp_path();
        fs::copy(&src, &tmp).map_err(|e| Error::io("copy", &src, e))?;
        let mode = if executable { MODE_EXEC } else { MODE_PLAIN };
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("chmod", &tmp, e))?;
        let inode = fs::metadata(&tmp)
            .map_err(|e| Error::io("stat", &tmp, e))?
            .ino();
        fs::rename(&tmp, &src).map_err(|e| Error::io("rename into cache", &src, e))?;
        let mut state = self.state.lock().expect("cache lock");
        if let Some(e) = state.entries.get_mut(&d.hash) {
            let old = if executable {
                e.exec_inode.replace(inode)
            } else {
                Some(std::mem::replace(&mut e.inode, inode))
            };
            if let Some(old) = old {
                state.by_inode.remove(&old);
            }
            state.by_inode.insert(inode, (d.hash.clone(), d.size_bytes));
        }
        Ok(())
    }

    fn forget(&self, hash: &str) {
        self.state.lock().expect("cache lock").remove(hash);
    }

    fn evict_over_limit(&self) {
        let victims: Vec<String> = {
            let mut state = self.state.lock().expect("cache lock");
            let mut out = Vec::new();
            while state.bytes > self.max_bytes {
                let Some((_, hash)) = state.lru.pop_first() else {
                    break;
                };
                state.remove(&hash);
                out.push(hash);
            }
            out
        };
        for hash in victims {
            let _ = fs::remove_file(self.path(&hash, true));
            let _ = fs::remove_file(self.path(&hash, false));
        }
    }

    pub fn bytes(&self) -> u64 {
        self.state.lock().expect("cache lock").bytes
    }

    pub fn len(&self) -> usize {
        self.state.lock().expect("cache lock").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Verifies `data` against `d` before it may enter the cache.
pub fn verify(d: &Digest, data: &[u8]) -> Result<()> {
    let actual = digest::of_bytes(data);
    if actual != *d {
        return Err(Error::CorruptBlob {
            digest: digest::key(d),
            actual: digest::key(&actual),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_survive_a_restart_and_link_with_the_right_mode() {
        let dir = tempfile::tempdir().unwrap();
        let d = digest::of_bytes(b"#!/bin/sh\necho hi\n");
        {
            let cache = BlobCache::open(dir.path(), 1 << 20).unwrap();
            cache.insert_bytes(&d, b"#!/bin/sh\necho hi\n").unwrap();
            assert!(cache.link_to(&d, true, &dir.path().join("x")).unwrap());
        }
        let cache = BlobCache::open(dir.path(), 1 << 20).unwrap();
        assert!(cache.contains(&d));
        assert!(cache.link_to(&d, false, &dir.path().join("plain")).unwrap());
        let mode = |p: &str| {
            fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("x"), 0o755);
        assert_eq!(mode("plain"), 0o644);
        let ino = fs::metadata(dir.path().join("plain")).unwrap().ino();
        assert_eq!(cache.digest_of_inode(ino, d.size_bytes), Some(d.clone()));
        assert_eq!(cache.digest_of_inode(ino, d.size_bytes + 1), None);
    }

    #[test]
    fn eviction_keeps_the_limit_and_staged_links_alive() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path(), 100).unwrap();
        let a = digest::of_bytes(&[b'a'; 60]);
        let b = digest::of_bytes(&[b'b'; 60]);
        cache.insert_bytes(&a, &[b'a'; 60]).unwrap();
        assert!(
            cache
                .link_to(&a, false, &dir.path().join("staged-a"))
                .unwrap()
        );
        cache.insert_bytes(&b, &[b'b'; 60]).unwrap();
        assert!(!cache.contains(&a), "least recently used blob evicted");
        assert!(cache.contains(&b));
        assert!(cache.bytes() <= 100);
        assert_eq!(fs::read(dir.path().join("staged-a")).unwrap(), [b'a'; 60]);
        assert!(!cache.link_to(&a, false, &dir.path().join("again")).unwrap());
        assert_eq!(cache.missing([a.clone(), b.clone()]), vec![a]);
    }
}
