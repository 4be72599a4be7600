//! Staging: an input tree becomes a directory of hardlinks into the blob
//! cache. Staged trees are immutable — the sandbox mounts them as overlay
//! lower layers, so every write of an action lands in its own upper
//! directory — which makes them reusable: an action whose input root was
//! staged before starts without staging anything.
//!
//! A tree is built under a temporary name and renamed into place, so a
//! half-built tree is never used. Trees beyond the cache's limit are moved to
//! `trash/` and deleted by a background thread (mass deletion is slow on the
//! ext4 these workers run on, and must not delay an action).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_proto::reapi::Digest;

use crate::cache::BlobCache;
use crate::error::{Error, Result};
use crate::trash::Trash;
use crate::tree::InputTree;

#[derive(Debug, Default)]
struct State {
    /// root hash → (tick, users)
    trees: HashMap<String, (u64, usize)>,
    lru: BTreeMap<u64, String>,
    tick: u64,
}

/// A staged tree in use; it is not evicted while this handle lives.
#[derive(Debug)]
pub struct StagedTree {
    path: PathBuf,
    key: String,
    stager: Arc<Stager>,
}

impl StagedTree {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagedTree {
    fn drop(&mut self) {
        let mut state = self.stager.state.lock().expect("stager lock");
        if let Some((_, users)) = state.trees.get_mut(&self.key) {
            *users = users.saturating_sub(1);
        }
    }
}

/// What staging found: the tree, or blobs evicted from the cache while it
/// was being built (the caller fetches them and tries again).
pub enum Staged {
    Ready(StagedTree),
    Evicted(Vec<Digest>),
}

#[derive(Debug)]
pub struct Stager {
    cache: Arc<BlobCache>,
    dir: PathBuf,
    trash: Arc<Trash>,
    max_trees: usize,
    state: Mutex<State>,
}

impl Stager {
    pub fn open(
        cache: Arc<BlobCache>,
        dir: &Path,
        trash: Arc<Trash>,
        max_trees: usize,
    ) -> Result<Arc<Self>> {
        fs::create_dir_all(dir).map_err(|e| Error::io("create staging directory", dir, e))?;
        let mut state = State::default();
        // Trees a previous run finished are complete (they were renamed into
        // place) and immutable: keep them. Unfinished ones go to the trash.
        for entry in fs::read_dir(dir)
            .map_err(|e| Error::io("list", dir, e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                trash.discard(&entry.path());
            } else {
                state.tick += 1;
                state.trees.insert(name.clone(), (state.tick, 0));
                state.lru.insert(state.tick, name);
            }
        }
        Ok(Arc::new(Self {
            cache,
            dir: dir.to_path_buf(),
            trash,
            max_trees: max_trees.max(1),
            state: Mutex::new(state),
        }))
    }

    /// Stages `tree` (or reuses an earlier staging of the same root).
    /// Blocking: call from a blocking thread.
    pub fn stage(self: &Arc<Self>, tree: &InputTree) -> Result<Staged> {
        let key = tree.root.hash.clone();
        let path = self.dir.join(&key);
        if self.acquire(&key) {
            return Ok(Staged::Ready(self.handle(key, path)));
        }
        let tmp = self.dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        let mut evicted = Vec::new();
        let built = self.build(tree, &tree.root, &tmp, &mut evicted);
        if let Err(e) = built {
            self.trash.discard(&tmp);
            return Err(e);
        }
        if !evicted.is_empty() {
            self.trash.discard(&tmp);
            evicted.sort_by(|a, b| a.hash.cmp(&b.hash));
            evicted.dedup();
            return Ok(Staged::Evicted(evicted));
        }
        match fs::rename(&tmp, &path) {
            Ok(()) => {}
            // Another action staged the same root meanwhile: use theirs.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTEMPTY)
                    || e.kind() == io::ErrorKind::AlreadyExists =>
            {
                self.trash.discard(&tmp);
            }
            Err(e) => {
                self.trash.discard(&tmp);
                return Err(Error::io("rename staged tree", &path, e));
            }
        }
        self.register(&key);
        self.evict_over_limit();
        Ok(Staged::Ready(self.handle(key, path)))
    }

    fn handle(self: &Arc<Self>, key: String, path: PathBuf) -> StagedTree {
        StagedTree {
            path,
            key,
            stager: Arc::clone(self),
        }
    }

    fn acquire(&self, key: &str) -> bool {
        let mut state = self.state.lock().expect("stager lock");
        state.tick += 1;
        let tick = state.tick;
        let Some((old_tick, users)) = state.trees.get_mut(key) else {
            return false;
        };
        let old = std::mem::replace(old_tick, tick);
        *users += 1;
        state.lru.remove(&old);
        state.lru.insert(tick, key.to_string());
        true
    }

    fn register(&self, key: &str) {
        let mut state = self.state.lock().expect("stager lock");
        state.tick += 1;
        let tick = state.tick;
        let previous = state.trees.insert(key.to_string(), (tick, 1));
        if let Some((old, users)) = previous {
            state.lru.remove(&old);
            state.trees.insert(key.to_string(), (tick, users + 1));
        }
        state.lru.insert(tick, key.to_string());
    }

    fn evict_over_limit(&self) {
        let victims: Vec<String> = {
            let mut state = self.state.lock().expect("stager lock");
            let mut out = Vec::new();
            let mut skipped = Vec::new();
            while state.trees.len() > self.max_trees {
                let Some((tick, key)) = state.lru.pop_first() else {
                    break;
                };
                if state.trees.get(&key).is_some_and(|(_, users)| *users > 0) {
                    skipped.push((tick, key));
                    continue;
                }
                state.trees.remove(&key);
                out.push(key);
            }
            for (tick, key) in skipped {
                state.lru.insert(tick, key);
            }
            out
        };
        for key in victims {
            self.trash.discard(&self.dir.join(key));
        }
    }

    fn build(
        &self,
        tree: &InputTree,
        d: &Digest,
        dest: &Path,
        evicted: &mut Vec<Digest>,
    ) -> Result<()> {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(dest)
            .map_err(|e| Error::io("create directory", dest, e))?;
        let dir = tree.directory(d);
        for f in &dir.files {
            let blob = f.digest.as_ref().expect("validated");
            let path = dest.join(&f.name);
            if blob.size_bytes == 0 {
                let mode = if f.is_executable { 0o755 } else { 0o644 };
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&path)
                    .map_err(|e| Error::io("create file", &path, e))?;
            } else if !self.cache.link_to(blob, f.is_executable, &path)? {
                evicted.push(blob.clone());
            }
        }
        for s in &dir.symlinks {
            let path = dest.join(&s.name);
            symlink(&s.target, &path).map_err(|e| Error::io("create symlink", &path, e))?;
        }
        for sub in &dir.directories {
            let child = sub.digest.as_ref().expect("validated");
            self.build(tree, child, &dest.join(&sub.name), evicted)?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.state.lock().expect("stager lock").trees.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::digest;
    use kiln_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn setup(dir: &Path, max_trees: usize) -> (Arc<BlobCache>, Arc<Stager>) {
        let cache = Arc::new(BlobCache::open(&dir.join("cache"), 1 << 30).unwrap());
        let trash = Arc::new(Trash::start(&dir.join("trash")).unwrap());
        let stager = Stager::open(cache.clone(), &dir.join("staged"), trash, max_trees).unwrap();
        (cache, stager)
    }

    fn tree_with(cache: &BlobCache, content: &[u8]) -> InputTree {
        let blob = digest::of_bytes(content);
        cache.insert_bytes(&blob, content).unwrap();
        let sub = Directory {
            files: vec![FileNode {
                name: "run.sh".into(),
                digest: Some(blob.clone()),
                is_executable: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let (sub_d, _) = digest::of_message(&sub);
        let root = Directory {
            files: vec![
                FileNode {
                    name: "data".into(),
                    digest: Some(blob),
                    ..Default::default()
                },
                FileNode {
                    name: "empty".into(),
                    digest: Some(digest::empty()),
                    ..Default::default()
                },
            ],
            directories: vec![DirectoryNode {
                name: "bin".into(),
                digest: Some(sub_d.clone()),
            }],
            symlinks: vec![SymlinkNode {
                name: "abs".into(),
                target: "/bin/run.sh".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (root_d, _) = digest::of_message(&root);
        InputTree::new(
            root_d.clone(),
            [(root_d.hash, root), (sub_d.hash, sub)].into(),
        )
        .unwrap()
    }

    #[test]
    fn staging_links_files_keeps_modes_and_reuses_trees() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, stager) = setup(dir.path(), 8);
        let tree = tree_with(&cache, b"#!/bin/sh\n");
        let Staged::Ready(staged) = stager.stage(&tree).unwrap() else {
            panic!("nothing was evicted")
        };
        let p = staged.path().to_path_buf();
        let meta = |rel: &str| fs::symlink_metadata(p.join(rel)).unwrap();
        assert_eq!(meta("bin/run.sh").permissions().mode() & 0o777, 0o755);
        assert_eq!(meta("data").permissions().mode() & 0o777, 0o644);
        assert_eq!(meta("data").nlink(), 2, "hardlinked from the cache");
        assert_eq!(
            fs::read_link(p.join("abs")).unwrap(),
            Path::new("/bin/run.sh")
        );
        assert_eq!(meta("empty").len(), 0);
        let Staged::Ready(again) = stager.stage(&tree).unwrap() else {
            panic!()
        };
        assert_eq!(again.path(), staged.path());
        assert_eq!(meta("data").nlink(), 2, "reused, not staged twice");
    }

    #[test]
    fn trees_in_use_are_not_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, stager) = setup(dir.path(), 1);
        let first = tree_with(&cache, b"one");
        let Staged::Ready(held) = stager.stage(&first).unwrap() else {
            panic!()
        };
        let second = tree_with(&cache, b"two");
        let Staged::Ready(other) = stager.stage(&second).unwrap() else {
            panic!()
        };
        assert!(held.path().exists(), "in use, so kept");
        drop(held);
        drop(other);
        let third = tree_with(&cache, b"three");
        let _ = stager.stage(&third).unwrap();
        assert_eq!(stager.len(), 1);
    }

    #[test]
    fn evicted_blobs_are_reported_for_refetch() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(BlobCache::open(&dir.path().join("cache"), 10).unwrap());
        let trash = Arc::new(Trash::start(&dir.path().join("trash")).unwrap());
        let stager = Stager::open(cache.clone(), &dir.path().join("staged"), trash, 8).unwrap();
        let tree = tree_with(&cache, b"more than ten bytes of content");
        match stager.stage(&tree).unwrap() {
            Staged::Evicted(blobs) => assert_eq!(blobs.len(), 1),
            Staged::Ready(_) => panic!("blob larger than the cache cannot stay cached"),
        }
    }
}
