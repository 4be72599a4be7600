//! An action's input tree as fetched from CAS: every Directory reachable
//! from the root, validated before anything is written to disk.

use std::collections::{HashMap, HashSet};

use kiln_proto::digest;
use kiln_proto::reapi::{Digest, Directory};
use kiln_proto::tree::{subtree_read_only, validate_directory};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct InputTree {
    pub root: Digest,
    dirs: HashMap<String, Directory>,
}

impl InputTree {
    /// Checks every directory reachable from `root` (names, order,
    /// duplicates, presence) and keeps them.
    pub fn new(root: Digest, mut dirs: HashMap<String, Directory>) -> Result<Self> {
        if digest::is_empty(&root) {
            dirs.entry(root.hash.clone()).or_default();
        }
        let mut seen = HashSet::new();
        let mut stack = vec![(root.clone(), String::new())];
        while let Some((d, path)) = stack.pop() {
            if !seen.insert(d.hash.clone()) {
                continue;
            }
            let dir = match dirs.get(&d.hash) {
                Some(dir) => dir,
                None if digest::is_empty(&d) => {
                    dirs.insert(d.hash.clone(), Directory::default());
                    continue;
                }
                None => return Err(Error::MissingBlobs(vec![d])),
            };
            validate_directory(dir).map_err(|why| {
                Error::InvalidTree(format!("directory {} (at /{path}): {why}", digest::key(&d)))
            })?;
            for sub in &dir.directories {
                let child = sub.digest.clone().expect("validated");
                stack.push((child, join(&path, &sub.name)));
            }
        }
        let tree = Self { root, dirs };
        if let Some(why) = kiln_proto::tree::shape_problem(&tree.root.hash, |hash| {
            let Some(dir) = tree.dirs.get(hash) else {
                return (Vec::new(), 0);
            };
            let kids = dir
                .directories
                .iter()
                .map(|n| (n.name.clone(), n.digest.clone().expect("validated").hash))
                .collect();
            (kids, (dir.files.len() + dir.symlinks.len()) as u64)
        }) {
            return Err(Error::InvalidTree(format!(
                "input root {}: {why}",
                digest::key(&tree.root)
            )));
        }
        Ok(tree)
    }

    pub fn directory(&self, d: &Digest) -> &Directory {
        static EMPTY: Directory = Directory {
            files: Vec::new(),
            directories: Vec::new(),
            symlinks: Vec::new(),
            node_properties: None,
        };
        self.dirs.get(&d.hash).unwrap_or(&EMPTY)
    }

    pub fn root_directory(&self) -> &Directory {
        self.directory(&self.root)
    }

    /// Every distinct non-empty file blob of the tree.
    pub fn file_blobs(&self) -> Vec<Digest> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for dir in self.dirs.values() {
            for f in &dir.files {
                let d = f.digest.clone().expect("validated");
                if d.size_bytes > 0 && seen.insert(d.hash.clone()) {
                    out.push(d);
                }
            }
        }
        out
    }

    pub fn file_count(&self) -> usize {
        let mut count = 0;
        self.walk(|_, dir| count += dir.files.len());
        count
    }

    /// `SubtreeReadOnly` markings in pre-order as (path relative to the
    /// root, read-only). Only changes of state are listed, so the sandbox
    /// mounts as few read-only binds as needed.
    pub fn read_only_marks(&self) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let mut stack = vec![(self.root.clone(), String::new(), false)];
        while let Some((d, path, inherited)) = stack.pop() {
            let dir = self.directory(&d);
            let mut state = inherited;
            if let Some(ro) = subtree_read_only(dir)
                && ro != inherited
            {
                out.push((path.clone(), ro));
                state = ro;
            }
            for sub in dir.directories.iter().rev() {
                let child = sub.digest.clone().expect("validated");
                stack.push((child, join(&path, &sub.name), state));
            }
        }
        out
    }

    /// Visits every directory with its path, parents first.
    pub fn walk(&self, mut f: impl FnMut(&str, &Directory)) {
        let mut stack = vec![(self.root.clone(), String::new())];
        while let Some((d, path)) = stack.pop() {
            let dir = self.directory(&d);
            f(&path, dir);
            for sub in dir.directories.iter().rev() {
                stack.push((
                    sub.digest.clone().expect("validated"),
                    join(&path, &sub.name),
                ));
            }
        }
    }
}

pub fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{DirectoryNode, FileNode, NodeProperties, NodeProperty};

    fn marked(ro: bool, children: Vec<DirectoryNode>) -> Directory {
        Directory {
            directories: children,
            node_properties: Some(NodeProperties {
                properties: vec![NodeProperty {
                    name: "SubtreeReadOnly".into(),
                    value: ro.to_string(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn read_only_marks_follow_buildstream_layout() {
        let install = marked(false, vec![]);
        let (install_d, _) = digest::of_message(&install);
        let build = Directory {
            files: vec![FileNode {
                name: "main.c".into(),
                digest: Some(digest::of_bytes(b"int main(){}")),
                ..Default::default()
            }],
            ..marked(false, vec![])
        };
        let (build_d, _) = digest::of_message(&build);
        let usr = Directory::default();
        let (usr_d, _) = digest::of_message(&usr);
        let root = marked(
            true,
            vec![
                DirectoryNode {
                    name: "build".into(),
                    digest: Some(build_d.clone()),
                },
                DirectoryNode {
                    name: "install".into(),
                    digest: Some(install_d.clone()),
                },
                DirectoryNode {
                    name: "usr".into(),
                    digest: Some(usr_d.clone()),
                },
            ],
        );
        let (root_d, _) = digest::of_message(&root);
        let dirs: HashMap<String, Directory> = [
            (root_d.hash.clone(), root),
            (build_d.hash.clone(), build),
            (install_d.hash.clone(), install),
            (usr_d.hash.clone(), usr),
        ]
        .into();
        let tree = InputTree::new(root_d, dirs).unwrap();
        assert_eq!(
            tree.read_only_marks(),
            vec![
                (String::new(), true),
                ("build".to_string(), false),
                ("install".to_string(), false)
            ]
        );
        assert_eq!(tree.file_blobs().len(), 1);
        assert_eq!(tree.file_count(), 1);
    }

    #[test]
    fn escaping_names_and_missing_directories_are_refused() {
        let evil = Directory {
            files: vec![FileNode {
                name: "..".into(),
                digest: Some(digest::empty()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (d, _) = digest::of_message(&evil);
        let err = InputTree::new(d.clone(), [(d.hash.clone(), evil)].into()).unwrap_err();
        assert!(matches!(err, Error::InvalidTree(_)), "{err}");
        let missing = digest::of_bytes(b"not a directory we have");
        let err = InputTree::new(missing, HashMap::new()).unwrap_err();
        assert!(matches!(err, Error::MissingBlobs(_)), "{err}");
    }
}
