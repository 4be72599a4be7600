//! What the worker adds to an action's stderr when its command was not
//! found and the reason is plain to Kiln but not to the user: the action
//! named no base root filesystem, and its input root does not hold
//! `argv[0]`. recc and Bazel send only sources and name the compiler by its
//! host path; without `chrootRootDigest` or `container-image` the sandbox's
//! root is the input root alone, and the sandbox's own "not found" leaves
//! the user guessing why.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kiln_proto::reapi::{Command, Directory};

use crate::error::{Error, Result};
use crate::tree::InputTree;

/// Whether a path exists in the input tree. `Unknown` when a symlink or a
/// `..` stands in the way: the hint is given only when the program is
/// certainly absent.
#[derive(Debug, PartialEq, Eq)]
enum Lookup {
    Found,
    Absent,
    Unknown,
}

/// The stderr addition for an action that exited 127 on no base root, or
/// `None` when `argv[0]` may be in the input root (the 127 then came from
/// the command itself, e.g. a shell's "command not found").
pub fn no_base_root(command: &Command, tree: &InputTree) -> Option<String> {
    let argv0 = command.arguments.first()?;
    let candidates: Vec<String> = if argv0.contains('/') {
        vec![join_path(&command.working_directory, argv0)]
    } else {
        // A bare name is looked up on the command's PATH; without one the
        // sandbox's default applies, which this module does not second-guess.
        let path = command
            .environment_variables
            .iter()
            .rev()
            .find(|v| v.name == "PATH")?;
        path.value
            .split(':')
            .map(|d| join_path(&command.working_directory, &format!("{d}/{argv0}")))
            .collect()
    };
    let absent = candidates.iter().all(|c| lookup(tree, c) == Lookup::Absent);
    absent.then(|| {
        format!(
            "kiln: {argv0} is not in this action's input root, and the action names no base root \
             filesystem, so the input root is all the sandbox has. An action that uploads only \
             its sources (recc, Bazel) must name a root filesystem holding its tools in its \
             platform properties: chrootRootDigest=<hash>/<size> of a tree pushed with \
             `kiln cas upload-dir` (recc: RECC_REMOTE_PLATFORM_chrootRootDigest), or \
             container-image=<name> of an image the workers offer \
             (recc: RECC_REMOTE_PLATFORM_container-image). See docs/clients/base-roots.md.\n"
        )
    })
}

/// Appends the hint to the action's stderr file, through the worker's own
/// handle of it (`path` only names it in errors).
pub fn append(stderr: &File, path: &Path, hint: &str) -> Result<()> {
    stderr
        .metadata()
        .and_then(|m| stderr.write_all_at(hint.as_bytes(), m.len()))
        .map_err(|e| Error::io("append the hint to stderr", path, e))
}

/// `path` as seen from the input root: absolute paths start at the root,
/// relative ones at the working directory.
fn join_path(working_directory: &str, path: &str) -> String {
    if path.starts_with('/') || working_directory.is_empty() {
        path.to_string()
    } else {
        format!("{working_directory}/{path}")
    }
}

fn lookup(tree: &InputTree, path: &str) -> Lookup {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let mut dir: &Directory = tree.root_directory();
    for (i, part) in parts.iter().enumerate() {
        if *part == ".." || dir.symlinks.iter().any(|s| s.name == *part) {
            return Lookup::Unknown;
        }
        if let Some(sub) = dir.directories.iter().find(|d| d.name == *part) {
            match &sub.digest {
                Some(d) => dir = tree.directory(d),
                None => return Lookup::Unknown,
            }
            continue;
        }
        let is_last = i + 1 == parts.len();
        return if is_last && dir.files.iter().any(|f| f.name == *part) {
            Lookup::Found
        } else {
            Lookup::Absent
        };
    }
    // The path names a directory (or the root): there, but not a program.
    Lookup::Found
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::digest;
    use kiln_proto::reapi::command::EnvironmentVariable;
    use kiln_proto::reapi::{DirectoryNode, FileNode, SymlinkNode};
    use std::collections::HashMap;

    /// An input root holding `usr/bin/cc`, `src/main.c` and a symlink
    /// `bin -> usr/bin`.
    fn tree() -> InputTree {
        let file = |name: &str| FileNode {
            name: name.into(),
            digest: Some(digest::of_bytes(name.as_bytes())),
            ..Default::default()
        };
        let bin = Directory {
            files: vec![file("cc")],
            ..Default::default()
        };
        let (bin_d, _) = digest::of_message(&bin);
        let usr = Directory {
            directories: vec![DirectoryNode {
                name: "bin".into(),
                digest: Some(bin_d.clone()),
            }],
            ..Default::default()
        };
        let (usr_d, _) = digest::of_message(&usr);
        let src = Directory {
            files: vec![file("main.c")],
            ..Default::default()
        };
        let (src_d, _) = digest::of_message(&src);
        let root = Directory {
            directories: vec![
                DirectoryNode {
                    name: "src".into(),
                    digest: Some(src_d.clone()),
                },
                DirectoryNode {
                    name: "usr".into(),
                    digest: Some(usr_d.clone()),
                },
            ],
            symlinks: vec![SymlinkNode {
                name: "bin".into(),
                target: "usr/bin".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (root_d, _) = digest::of_message(&root);
        let dirs: HashMap<String, Directory> = [
            (root_d.hash.clone(), root),
            (usr_d.hash.clone(), usr),
            (bin_d.hash.clone(), bin),
            (src_d.hash.clone(), src),
        ]
        .into();
        InputTree::new(root_d, dirs).unwrap()
    }

    fn command(argv0: &str, wd: &str, path: Option<&str>) -> Command {
        Command {
            arguments: vec![argv0.into(), "-c".into(), "main.c".into()],
            working_directory: wd.into(),
            environment_variables: path
                .map(|p| EnvironmentVariable {
                    name: "PATH".into(),
                    value: p.into(),
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_host_compiler_path_missing_from_the_input_root_gets_the_hint() {
        let hint = no_base_root(&command("/usr/bin/gcc", "src", None), &tree()).unwrap();
        assert!(hint.contains("/usr/bin/gcc is not in this action's input root"));
        assert!(hint.contains("chrootRootDigest") && hint.contains("container-image"));
        // Relative to the working directory, and bare names on PATH.
        assert!(no_base_root(&command("./cc", "src", None), &tree()).is_some());
        assert!(no_base_root(&command("gcc", "", Some("/usr/bin:/bin2")), &tree()).is_some());
    }

    #[test]
    fn no_hint_when_the_program_may_be_there() {
        let t = tree();
        // In the input root: the 127 came from the command itself.
        assert_eq!(no_base_root(&command("/usr/bin/cc", "", None), &t), None);
        assert_eq!(
            no_base_root(&command("cc", "", Some("/nowhere:/usr/bin")), &t),
            None
        );
        // Through a symlink or `..`: not worth guessing.
        assert_eq!(no_base_root(&command("/bin/gcc", "", None), &t), None);
        assert_eq!(
            no_base_root(&command("../usr/bin/gcc", "src", None), &t),
            None
        );
        // A bare name and no PATH: the sandbox's default PATH decides.
        assert_eq!(no_base_root(&command("gcc", "", None), &t), None);
    }
}
