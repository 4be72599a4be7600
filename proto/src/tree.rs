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

/// The longest chain of directories below `root`, as the names leading
/// down it (empty when `root` has no subdirectory). The tree is given by
/// `children(dir)`: its subdirectories, by name. Iterative, and every
/// distinct directory is looked at once however often it is shared, so a
/// deep or wide tree costs neither stack nor time.
pub fn deepest_path<K, F>(root: &K, children: F) -> Vec<String>
where
    K: Clone + Eq + std::hash::Hash,
    F: Fn(&K) -> Vec<(String, K)>,
{
    use std::collections::HashMap;
    // directory → (levels below it, the child leading down the longest chain)
    let mut height: HashMap<K, (usize, Option<(String, K)>)> = HashMap::new();
    let mut walking = std::collections::HashSet::new();
    let mut stack = vec![(root.clone(), false)];
    while let Some((dir, expanded)) = stack.pop() {
        if height.contains_key(&dir) || (!expanded && walking.contains(&dir)) {
            continue;
        }
        let kids = children(&dir);
        if !expanded {
            walking.insert(dir.clone());
            stack.push((dir, true));
            stack.extend(
                kids.into_iter()
                    .filter(|(_, k)| !height.contains_key(k))
                    .map(|(_, k)| (k, false)),
            );
            continue;
        }
        let mut best: (usize, Option<(String, K)>) = (0, None);
        for (name, kid) in kids {
            // A child not measured yet can only be one still being walked
            // (a cycle, which content addressing rules out): count it as a leaf.
            let h = height.get(&kid).map_or(0, |(h, _)| *h) + 1;
            if h > best.0 {
                best = (h, Some((name, kid)));
            }
        }
        height.insert(dir, best);
    }
    let mut path = Vec::new();
    let mut at = root.clone();
    while let Some((_, Some((name, next)))) = height.get(&at) {
        path.push(name.clone());
        at = next.clone();
    }
    path
}

/// Why a tree is too deep for Kiln, naming the chain that is (cut short
/// after [`MAX_DEPTH`] + 1 levels), or None when it is not.
pub fn too_deep<K, F>(root: &K, children: F) -> Option<String>
where
    K: Clone + Eq + std::hash::Hash,
    F: Fn(&K) -> Vec<(String, K)>,
{
    let path = deepest_path(root, children);
    (path.len() > MAX_DEPTH).then(|| {
        format!(
            "directories are nested {} levels deep, deeper than {MAX_DEPTH} levels, the most Kiln handles (at {}/...)",
            path.len(),
            path[..=MAX_DEPTH].join("/")
        )
    })
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
    fn the_deepest_chain_is_found_once_per_shared_directory() {
        use std::collections::HashMap;
        // a → {b → c → d, e → c}: c is shared; the longest chain is b/c/d.
        let tree: HashMap<&str, Vec<(&str, &str)>> = [
            ("a", vec![("b", "b"), ("e", "c")]),
            ("b", vec![("c", "c")]),
            ("c", vec![("d", "d")]),
            ("d", vec![]),
        ]
        .into();
        let kids = |k: &&str| -> Vec<(String, &str)> {
            tree[k].iter().map(|(n, c)| (n.to_string(), *c)).collect()
        };
        assert_eq!(deepest_path(&"a", kids), ["b", "c", "d"]);
        assert_eq!(too_deep(&"a", kids), None);
        // A chain far deeper than any stack would allow to recurse over.
        let n = 200_000usize;
        let chain = |k: &usize| -> Vec<(String, usize)> {
            if *k < n {
                vec![("d".into(), k + 1)]
            } else {
                vec![]
            }
        };
        assert_eq!(deepest_path(&0, chain).len(), n);
        let why = too_deep(&0, chain).unwrap();
        assert!(
            why.contains("200000 levels") && why.contains("deeper than 256"),
            "{why}"
        );
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
