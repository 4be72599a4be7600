//! Walking Directory trees stored in the CAS: for GetTree, and for the
//! completeness checks of the action cache and the asset service.

use std::collections::{HashMap, HashSet};

use kiln_proto::reapi::{Directory, Tree};

use crate::cas::Cas;
use crate::error::{Error, Result};
use kiln_proto::Digest;

/// The directories of a tree, as far as they are present.
#[derive(Debug, Default)]
pub struct TreeWalk {
    /// Each distinct directory once, breadth-first, root first.
    pub directories: Vec<(Digest, Directory)>,
    /// Directories referenced (or the root) that the CAS lacks.
    pub missing: Vec<Digest>,
}

/// Walks the tree under `root` breadth-first, one batched read per level.
/// Absent directories are listed in `missing` and not descended into; a blob
/// that does not decode as a Directory is INVALID_ARGUMENT naming it.
pub async fn walk(cas: &Cas, root: Digest) -> Result<TreeWalk> {
    let mut out = TreeWalk::default();
    let mut seen = HashSet::new();
    seen.insert(root);
    let mut level = vec![root];
    while !level.is_empty() {
        let blobs = cas.get_many(&level).await;
        let mut next = Vec::new();
        for (digest, blob) in level.into_iter().zip(blobs) {
            let Some(bytes) = blob? else {
                out.missing.push(digest);
                continue;
            };
            let dir = decode_directory(&digest, bytes)?;
            for child in &dir.directories {
                let child_digest = child_digest(&digest, &child.name, child.digest.as_ref())?;
                if seen.insert(child_digest) {
                    next.push(child_digest);
                }
            }
            out.directories.push((digest, dir));
        }
        level = next;
    }
    Ok(out)
}

impl TreeWalk {
    /// Why the walked tree is too deep or expands to too many entries for
    /// Kiln (see `kiln_proto::tree::shape_problem`), or None. Every distinct
    /// directory is looked at once.
    pub fn shape_problem(&self, root: &Digest) -> Option<String> {
        let dirs: HashMap<&Digest, &Directory> =
            self.directories.iter().map(|(d, dir)| (d, dir)).collect();
        kiln_proto::tree::shape_problem(root, |d| {
            let Some(dir) = dirs.get(d) else {
                return (Vec::new(), 0);
            };
            let kids = dir
                .directories
                .iter()
                .filter_map(|n| {
                    let child = Digest::from_proto(n.digest.as_ref()?).ok()?;
                    Some((n.name.clone(), child))
                })
                .collect();
            (kids, (dir.files.len() + dir.symlinks.len()) as u64)
        })
    }
}

/// Decodes a Directory blob.
pub fn decode_directory(digest: &Digest, bytes: bytes::Bytes) -> Result<Directory> {
    prost::Message::decode(bytes).map_err(|source| Error::Decode {
        what: "Directory",
        digest: *digest,
        source,
    })
}

fn child_digest(
    parent: &Digest,
    name: &str,
    d: Option<&kiln_proto::reapi::Digest>,
) -> Result<Digest> {
    let d = d.ok_or_else(|| {
        Error::InvalidArgument(format!("directory {parent}: entry {name:?} has no digest"))
    })?;
    Digest::from_proto(d)
        .map_err(|e| Error::InvalidArgument(format!("directory {parent}: entry {name:?}: {e}")))
}

/// The file digests referenced by `directories`.
pub fn file_digests<'a>(
    directories: impl IntoIterator<Item = &'a Directory>,
) -> Result<Vec<Digest>> {
    let mut out = Vec::new();
    for dir in directories {
        for f in &dir.files {
            let d = f.digest.as_ref().ok_or_else(|| {
                Error::InvalidArgument(format!("file {:?} has no digest", f.name))
            })?;
            out.push(
                Digest::from_proto(d)
                    .map_err(|e| Error::InvalidArgument(format!("file {:?}: {e}", f.name)))?,
            );
        }
    }
    Ok(out)
}

/// Every blob of the directory tree under `root` that the CAS lacks
/// (directories and files). Empty means the tree is complete. Present blobs
/// are marked used.
pub async fn missing_in_directory_tree(cas: &Cas, root: Digest) -> Result<Vec<Digest>> {
    // Only a store that accounts for its removals can vouch that a tree
    // found complete is still complete.
    let epoch = cas.removals();
    if let Some(epoch) = epoch
        && cas.completeness().fresh(&root, epoch)
    {
        return Ok(Vec::new());
    }
    let walk = walk(cas, root).await?;
    let mut missing = walk.missing;
    let files = file_digests(walk.directories.iter().map(|(_, d)| d))?;
    missing.extend(cas.find_missing(&files).await?);
    if missing.is_empty()
        && let Some(epoch) = epoch
    {
        cas.completeness().record(root, epoch);
    }
    Ok(missing)
}

/// Every blob an output-directory `Tree` message refers to that the CAS
/// lacks, including the Tree blob itself.
pub async fn missing_in_tree_message(cas: &Cas, tree_digest: Digest) -> Result<Vec<Digest>> {
    let Some(tree) = cas.get_message::<Tree>(&tree_digest, "Tree").await? else {
        return Ok(vec![tree_digest]);
    };
    let files = file_digests(tree.root.iter().chain(tree.children.iter()))?;
    cas.find_missing(&files).await
}
