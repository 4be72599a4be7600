//! Checks on REAPI `Directory` messages shared by the server (before an
//! action is queued) and the worker (before anything touches its disk).

use crate::reapi::Directory;

/// BuildStream's node property marking a subtree read-only (`"true"`) or
/// writable (`"false"`); descendants inherit it until they override it.
pub const SUBTREE_READ_ONLY: &str = "SubtreeReadOnly";

/// The deepest a directory may be nested below the root of a tree Kiln
/// handles (input roots at Execute and on the worker, outputs when they are
/// collected). Real build trees stay far below it; deeper trees are what an
/// attack uses to exhaust a walker's stack or file descriptors.
pub const MAX_DEPTH: usize = 256;

/// Why a name cannot be a directory entry, or None when it can.
pub fn invalid_name_reason(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name == "." || name == ".." {
        Some("is a relative reference")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains('\0') {
        Some("contains a NUL byte")
    } else {
        None
    }
}

/// Checks one Directory: every name valid, each list sorted, no name used
/// twice. The message names the offending entry.
pub fn validate_directory(dir: &Directory) -> Result<(), String> {
    let lists: [(&str, Vec<&str>); 3] = [
        ("file", dir.files.iter().map(|n| n.name.as_str()).collect()),
        (
            "directory",
            dir.directories.iter().map(|n| n.name.as_str()).collect(),
        ),
        (
            "symlink",
            dir.symlinks.iter().map(|n| n.name.as_str()).collect(),
        ),
    ];
    let mut all: Vec<&str> = Vec::new();
    for (kind, names) in &lists {
        for pair in names.windows(2) {
            if pair[0] >= pair[1] {
                return Err(if pair[0] == pair[1] {
                    format!("{kind} name {:?} appears twice", pair[1])
                } else {
                    format!(
                        "{kind} names are not sorted: {:?} before {:?}",
                        pair[0], pair[1]
                    )
                });
            }
        }
        for name in names {
            if let Some(why) = invalid_name_reason(name) {
                return Err(format!("{kind} name {name:?} {why}"));
            }
        }
        all.extend(names);
    }
    all.sort_unstable();
    if let Some(pair) = all.windows(2).find(|p| p[0] == p[1]) {
        return Err(format!("name {:?} is used by two entries", pair[0]));
    }
    for f in &dir.files {
        if f.digest.is_none() {
            return Err(format!("file {:?} has no digest", f.name));
        }
    }
    for d in &dir.directories {
        if d.digest.is_none() {
            return Err(format!("directory {:?} has no digest", d.name));
        }
    }
    for s in &dir.symlinks {
        if s.target.is_empty() {
            return Err(format!("symlink {:?} has an empty target", s.name));
        }
        if s.target.contains('\0') {
            return Err(format!(
                "symlink {:?} has a NUL byte in its target, which no path can hold",
                s.name
            ));
        }
    }
    Ok(())
}

/// Resolves `path` (an output path, or a working directory when `base` is
/// empty) against `base` lexically; the result is relative to the input root
/// (`""` is the root itself). Absolute paths and paths climbing above the
/// root are refused with the reason.
pub fn resolve_relative(base: &str, path: &str) -> Result<String, &'static str> {
    if path.starts_with('/') || base.starts_with('/') {
        return Err("is absolute; paths are relative to the working directory");
    }
    let mut parts: Vec<&str> = Vec::new();
    for component in base.split('/').chain(path.split('/')) {
        match component {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err("escapes the input root");
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// The most entries (files, directories, symlinks) a tree may hold once
/// expanded, a shared directory counted every time it is reached. Content
/// addressing lets a few hundred bytes of Directory messages stand for an
/// astronomically large tree; staging must write every entry of it.
pub const MAX_ENTRIES: u64 = 1 << 24;

/// What matters of a tree's size: its longest chain of directories (the
/// names leading down it) and how many entries it expands to (saturating).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub deepest: Vec<String>,
    pub entries: u64,
}

/// The [`Shape`] of the tree under `root`, given by `dir(d)`: its
/// subdirectories by name, and how many other entries (files, symlinks) it
/// holds. Iterative, and every distinct directory is looked at once however
/// often it is shared, so neither a deep nor an exploding tree costs stack
/// or time.
pub fn shape<K, F>(root: &K, dir: F) -> Shape
where
    K: Clone + Eq + std::hash::Hash,
    F: Fn(&K) -> (Vec<(String, K)>, u64),
{
    use std::collections::{HashMap, HashSet};
    struct Measured<K> {
        height: usize,
        /// The child leading down the longest chain.
        down: Option<(String, K)>,
        entries: u64,
    }
    let mut measured: HashMap<K, Measured<K>> = HashMap::new();
    let mut walking = HashSet::new();
    let mut stack = vec![(root.clone(), false)];
    while let Some((d, expanded)) = stack.pop() {
        if measured.contains_key(&d) || (!expanded && walking.contains(&d)) {
            continue;
        }
        let (kids, own) = dir(&d);
        if !expanded {
            walking.insert(d.clone());
            stack.push((d, true));
            stack.extend(
                kids.into_iter()
                    .filter(|(_, k)| !measured.contains_key(k))
                    .map(|(_, k)| (k, false)),
            );
            continue;
        }
        let mut m = Measured {
            height: 0,
            down: None,
            entries: own,
        };
        for (name, kid) in kids {
            // A child not measured yet can only be one still being walked
            // (a cycle, which content addressing rules out): a leaf.
            let (h, n) = measured.get(&kid).map_or((0, 0), |k| (k.height, k.entries));
            m.entries = m.entries.saturating_add(1).saturating_add(n);
            if h + 1 > m.height {
                m.height = h + 1;
                m.down = Some((name, kid));
            }
        }
        measured.insert(d, m);
    }
    let entries = measured.get(root).map_or(0, |m| m.entries);
    let mut deepest = Vec::new();
    let mut at = root.clone();
    while let Some(Measured {
        down: Some((name, next)),
        ..
    }) = measured.get(&at)
    {
        deepest.push(name.clone());
        at = next.clone();
    }
    Shape { deepest, entries }
}

/// Why a tree is too deep or too large for Kiln (naming the deepest chain,
/// cut short after [`MAX_DEPTH`] + 1 levels), or None when it is not.
pub fn shape_problem<K, F>(root: &K, dir: F) -> Option<String>
where
    K: Clone + Eq + std::hash::Hash,
    F: Fn(&K) -> (Vec<(String, K)>, u64),
{
    let s = shape(root, dir);
    if s.deepest.len() > MAX_DEPTH {
        return Some(format!(
            "directories are nested {} levels deep, deeper than {MAX_DEPTH} levels, the most Kiln handles (at {}/...)",
            s.deepest.len(),
            s.deepest[..=MAX_DEPTH].join("/")
        ));
    }
    if s.entries > MAX_ENTRIES {
        return Some(format!(
            "the tree expands to more than {MAX_ENTRIES} entries (shared directories counted each \
             time they appear), the most Kiln stages"
        ));
    }
    None
}

/// The `SubtreeReadOnly` marking of a directory, if it has one.
pub fn subtree_read_only(dir: &Directory) -> Option<bool> {
    dir.node_properties
        .as_ref()?
        .properties
        .iter()
        .find(|p| p.name == SUBTREE_READ_ONLY)
        .map(|p| p.value == "true")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reapi::{DirectoryNode, FileNode, SymlinkNode};

    fn file(name: &str) -> FileNode {
        FileNode {
            name: name.into(),
            digest: Some(crate::digest::empty()),
            ..Default::default()
        }
    }

    #[test]
    fn shapes_are_measured_once_per_shared_directory() {
        use std::collections::HashMap;
        // a → {b → c → d, e → c}: c is shared; the longest chain is b/c/d.
        let tree: HashMap<&str, Vec<(&str, &str)>> = [
            ("a", vec![("b", "b"), ("e", "c")]),
            ("b", vec![("c", "c")]),
            ("c", vec![("d", "d")]),
            ("d", vec![]),
        ]
        .into();
        let dir = |k: &&str| -> (Vec<(String, &str)>, u64) {
            let kids = tree[k].iter().map(|(n, c)| (n.to_string(), *c)).collect();
            (kids, 1)
        };
        let s = shape(&"a", dir);
        assert_eq!(s.deepest, ["b", "c", "d"]);
        // One file each; a directory entry counts 1 plus what is in it:
        // d = 1, c = 1 + (1 + d) = 3, b = 1 + (1 + c) = 5,
        // a = 1 + (1 + b) + (1 + c) = 11.
        assert_eq!(s.entries, 11);
        assert_eq!(shape_problem(&"a", dir), None);

        // A chain far deeper than any stack would allow to recurse over.
        let n = 200_000usize;
        let chain = |k: &usize| -> (Vec<(String, usize)>, u64) {
            let kids = if *k < n {
                vec![("d".into(), k + 1)]
            } else {
                vec![]
            };
            (kids, 0)
        };
        assert_eq!(shape(&0, chain).deepest.len(), n);
        let why = shape_problem(&0, chain).unwrap();
        assert!(
            why.contains("200000 levels") && why.contains("deeper than 256"),
            "{why}"
        );

        // 64 levels of "two names for the next directory": a few hundred
        // bytes of messages, 2^64 directories once staged.
        let bomb = |k: &usize| -> (Vec<(String, usize)>, u64) {
            let kids = if *k < 64 {
                vec![("a".into(), k + 1), ("b".into(), k + 1)]
            } else {
                vec![]
            };
            (kids, 1)
        };
        assert_eq!(shape(&0, bomb).entries, u64::MAX);
        let why = shape_problem(&0, bomb).unwrap();
        assert!(why.contains("expands to more than"), "{why}");
    }

    #[test]
    fn good_and_bad_directories() {
        let mut dir = Directory {
            files: vec![file("a"), file("b")],
            directories: vec![DirectoryNode {
                name: "c".into(),
                digest: Some(crate::digest::empty()),
            }],
            symlinks: vec![SymlinkNode {
                name: "d".into(),
                target: "/lib/x".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(validate_directory(&dir), Ok(()));
        dir.files.reverse();
        assert!(validate_directory(&dir).unwrap_err().contains("not sorted"));
        dir.files = vec![file("a"), file("a")];
        assert!(validate_directory(&dir).unwrap_err().contains("twice"));
        dir.files = vec![file("c")];
        assert!(
            validate_directory(&dir)
                .unwrap_err()
                .contains("two entries")
        );
        for bad in ["", ".", "..", "x/y"] {
            dir.files = vec![file(bad)];
            assert!(validate_directory(&dir).is_err(), "{bad:?} accepted");
        }
    }
}
