//! Checks on REAPI `Directory` messages shared by the server (before an
//! action is queued) and the worker (before anything touches its disk).

use crate::reapi::Directory;

/// BuildStream's node property marking a subtree read-only (`"true"`) or
/// writable (`"false"`); descendants inherit it until they override it.
pub const SUBTREE_READ_ONLY: &str = "SubtreeReadOnly";

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
