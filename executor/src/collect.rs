//! Output collection (KILN-CONTRACT §5): reads what the action left in its
//! sandbox root and describes it as REAPI outputs, without ever following a
//! symlink out of the root.
//!
//! Every path is resolved from a directory fd of the sandbox root: output
//! paths with `openat2(RESOLVE_IN_ROOT)` (so `..` and absolute symlinks stay
//! inside), and trees entry by entry with `O_NOFOLLOW`. Symlinks are recorded
//! as symlinks; the executable bit is kept; the sandbox's own mounts
//! (`/proc`, `/dev`, `/tmp`) are reported as the empty directories they were
//! staged as.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use bytes::Bytes;
use kiln_proto::digest::{self, Hasher};
use kiln_proto::reapi::command::OutputDirectoryFormat;
use kiln_proto::reapi::{
    Digest, Directory, DirectoryNode, FileNode, NodeProperties, OutputDirectory, OutputFile,
    OutputSymlink, SymlinkNode, Tree,
};
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};

use crate::cache::BlobCache;
use crate::error::{Error, Result};

/// Files up to this size are read into memory and uploaded in batches;
/// larger ones are copied into the blob cache and streamed from there.
const IN_MEMORY_LIMIT: i64 = 1 << 20;

/// What the Command asks to be collected.
#[derive(Debug, Clone, Default)]
pub struct OutputSpec {
    pub working_directory: String,
    /// REAPI v2.1 `output_paths`.
    pub paths: Vec<String>,
    /// Pre-v2.1 `output_files` / `output_directories`.
    pub files: Vec<String>,
    pub directories: Vec<String>,
    pub directory_format: OutputDirectoryFormat,
    pub mtime: bool,
    pub unix_mode: bool,
}

impl OutputSpec {
    // The legacy fields are deprecated in REAPI but Bazel 4 and older recc
    // still send only them.
    #[allow(deprecated)]
    pub fn from_command(cmd: &kiln_proto::reapi::Command) -> Self {
        let props: HashSet<&str> = cmd
            .output_node_properties
            .iter()
            .map(String::as_str)
            .collect();
        Self {
            working_directory: cmd.working_directory.clone(),
            paths: cmd.output_paths.clone(),
            files: cmd.output_files.clone(),
            directories: cmd.output_directories.clone(),
            directory_format: OutputDirectoryFormat::try_from(cmd.output_directory_format)
                .unwrap_or(OutputDirectoryFormat::TreeOnly),
            mtime: props.contains("mtime"),
            unix_mode: props.contains("unix_mode"),
        }
    }

    /// Every declared output as a path relative to the root, for creating
    /// parent directories before the action runs.
    pub fn root_relative_paths(&self) -> Result<Vec<String>> {
        let declared = if self.paths.is_empty() {
            self.files
                .iter()
                .chain(&self.directories)
                .collect::<Vec<_>>()
        } else {
            self.paths.iter().collect()
        };
        declared
            .into_iter()
            .map(|p| resolve_output_path(&self.working_directory, p))
            .collect()
    }
}

/// A blob to make sure the server has.
#[derive(Debug, Clone)]
pub enum Upload {
    Bytes(Digest, Bytes),
    /// In the worker's blob cache (large files).
    Cached(Digest),
}

impl Upload {
    pub fn digest(&self) -> &Digest {
        match self {
            Upload::Bytes(d, _) | Upload::Cached(d) => d,
        }
    }
}

#[derive(Debug, Default)]
pub struct Collected {
    pub files: Vec<OutputFile>,
    pub directories: Vec<OutputDirectory>,
    pub symlinks: Vec<OutputSymlink>,
    pub file_symlinks: Vec<OutputSymlink>,
    pub directory_symlinks: Vec<OutputSymlink>,
    pub uploads: Vec<Upload>,
}

/// Where collection reads from.
pub struct Source<'a> {
    /// A directory fd of the sandbox root (`O_PATH` is enough).
    pub root: BorrowedFd<'a>,
    /// Kiln's own mount points, relative to the root (e.g. `proc`, `dev`,
    /// `tmp`): reported as empty directories.
    pub mounts: &'a [String],
    pub cache: &'a BlobCache,
    /// Whether inode numbers seen through the root are the blob cache's own
    /// (every layer on the cache's filesystem), so unchanged inputs need no
    /// hashing.
    pub trust_inodes: bool,
}

/// Lexically resolves an output path against the working directory; the
/// result is relative to the root (`""` is the root itself).
pub fn resolve_output_path(working_directory: &str, path: &str) -> Result<String> {
    kiln_proto::tree::resolve_relative(working_directory, path).map_err(|why| {
        Error::InvalidOutputPath {
            path: path.to_string(),
            why: why.to_string(),
        }
    })
}

pub fn collect(spec: &OutputSpec, src: &Source) -> Result<Collected> {
    let mut c = Collector {
        src,
        spec,
        out: Collected::default(),
        uploaded: HashSet::new(),
    };
    if !spec.paths.is_empty() {
        for p in &spec.paths {
            c.collect_path(p, Kind::Any)?;
        }
    } else {
        for p in &spec.files {
            c.collect_path(p, Kind::File)?;
        }
        for p in &spec.directories {
            c.collect_path(p, Kind::Directory)?;
        }
    }
    Ok(c.out)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Any,
    File,
    Directory,
}

struct Collector<'a> {
    src: &'a Source<'a>,
    spec: &'a OutputSpec,
    out: Collected,
    uploaded: HashSet<String>,
}

/// One entry as found on disk.
enum Entry {
    File(FileNode),
    Dir(Digest),
    Symlink(String),
    Other,
}

impl Collector<'_> {
    fn collect_path(&mut self, declared: &str, kind: Kind) -> Result<()> {
        let rel = resolve_output_path(&self.spec.working_directory, declared)?;
        let (parent, leaf) = match rel.rsplit_once('/') {
            Some((p, l)) => (p.to_string(), l.to_string()),
            None => (String::new(), rel.clone()),
        };
        let parent_fd = if rel.is_empty() {
            None
        } else {
            match open_in_root(self.src.root, &parent)? {
                Some(fd) => Some(fd),
                None => return Ok(()),
            }
        };
        let entry = match &parent_fd {
            // The whole root: always a directory.
            None => Entry::Dir(digest::empty()),
            Some(fd) => match self.entry(fd, &leaf, &rel)? {
                Some(e) => e,
                None => return Ok(()),
            },
        };
        match entry {
            Entry::File(node) if kind != Kind::Directory => self.out.files.push(OutputFile {
                path: declared.to_string(),
                digest: node.digest,
                is_executable: node.is_executable,
                contents: Vec::new(),
                node_properties: node.node_properties,
            }),
            Entry::Dir(_) if kind == Kind::File => {
                tracing::warn!(
                    path = declared,
                    "declared output file is a directory; not collected"
                );
            }
            Entry::Dir(_) => self.output_directory(declared, parent_fd.as_ref(), &leaf, &rel)?,
            Entry::Symlink(target) => {
                let link = OutputSymlink {
                    path: declared.to_string(),
                    target,
                    node_properties: None,
                };
                match kind {
                    Kind::Any => self.out.symlinks.push(link),
                    Kind::File => self.out.file_symlinks.push(link),
                    Kind::Directory => self.out.directory_symlinks.push(link),
                }
            }
            Entry::File(_) => {
                tracing::warn!(
                    path = declared,
                    "declared output directory is a file; not collected"
                );
            }
            Entry::Other => {}
        }
        Ok(())
    }

    fn output_directory(
        &mut self,
        declared: &str,
        parent: Option<&OwnedFd>,
        leaf: &str,
        rel: &str,
    ) -> Result<()> {
        let fd = match parent {
            None => open_in_root(self.src.root, "")?
                .ok_or_else(|| Error::Internal("the sandbox root is gone".into()))?,
            Some(p) => open_dir_nofollow(p, leaf).map_err(|e| io_err("open", rel, e))?,
        };
        let mut tree_dirs: Vec<(Digest, Directory)> = Vec::new();
        let (root_digest, root_dir) = self.directory(&fd, rel, &mut tree_dirs)?;
        let format = self.spec.directory_format;
        let want_tree = matches!(
            format,
            OutputDirectoryFormat::TreeOnly | OutputDirectoryFormat::TreeAndDirectory
        );
        let want_dir = matches!(
            format,
            OutputDirectoryFormat::DirectoryOnly | OutputDirectoryFormat::TreeAndDirectory
        );
        let mut out = OutputDirectory {
            path: declared.to_string(),
            is_topologically_sorted: false,
            ..Default::default()
        };
        if want_tree {
            let mut seen = HashSet::new();
            let children: Vec<Directory> = tree_dirs
                .iter()
                .filter(|(d, _)| *d != root_digest && seen.insert(d.hash.clone()))
                .map(|(_, dir)| dir.clone())
                .collect();
            let tree = Tree {
                root: Some(root_dir),
                children,
            };
            let (tree_digest, bytes) = digest::of_message(&tree);
            self.upload_bytes(tree_digest.clone(), Bytes::from(bytes));
            out.tree_digest = Some(tree_digest);
        }
        if want_dir {
            out.root_directory_digest = Some(root_digest);
        }
        self.out.directories.push(out);
        Ok(())
    }

    /// Builds the Directory for an open directory fd; returns its digest and
    /// message. Every subdirectory is appended to `all` (for a Tree), and
    /// every Directory blob is queued for upload.
    fn directory(
        &mut self,
        fd: &OwnedFd,
        rel: &str,
        all: &mut Vec<(Digest, Directory)>,
    ) -> Result<(Digest, Directory)> {
        let mut files = BTreeMap::new();
        let mut dirs = BTreeMap::new();
        let mut links = BTreeMap::new();
        let names = list_dir(fd).map_err(|e| io_err("list", rel, e))?;
        for name in names {
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if self.src.mounts.contains(&child_rel) {
                let empty = Directory::default();
                let (d, bytes) = digest::of_message(&empty);
                self.upload_bytes(d.clone(), Bytes::from(bytes));
                all.push((d.clone(), empty));
                dirs.insert(name.clone(), d);
                continue;
            }
            match self.entry_in_tree(fd, &name, &child_rel, all)? {
                Some(Entry::File(node)) => {
                    files.insert(name, node);
                }
                Some(Entry::Dir(d)) => {
                    dirs.insert(name, d);
                }
                Some(Entry::Symlink(target)) => {
                    links.insert(name, target);
                }
                Some(Entry::Other) | None => {}
            }
        }
        let st = fstat(fd.as_raw_fd()).map_err(|e| io_err("stat", rel, e))?;
        let dir = Directory {
            files: files.into_values().collect(),
            directories: dirs
                .into_iter()
                .map(|(name, digest)| DirectoryNode {
                    name,
                    digest: Some(digest),
                })
                .collect(),
            symlinks: links
                .into_iter()
                .map(|(name, target)| SymlinkNode {
                    name,
                    target,
                    node_properties: None,
                })
                .collect(),
            node_properties: self.node_properties(&st),
        };
        let (d, bytes) = digest::of_message(&dir);
        self.upload_bytes(d.clone(), Bytes::from(bytes));
        all.push((d.clone(), dir.clone()));
        Ok((d, dir))
    }

    fn entry_in_tree(
        &mut self,
        parent: &OwnedFd,
        name: &str,
        rel: &str,
        all: &mut Vec<(Digest, Directory)>,
    ) -> Result<Option<Entry>> {
        let st = match fstatat_nofollow(parent, name) {
            Ok(st) => st,
            Err(nix::Error::ENOENT) => return Ok(None),
            Err(e) => return Err(io_err("stat", rel, e)),
        };
        match file_type(&st) {
            SFlag::S_IFDIR => {
                let fd = open_dir_nofollow(parent, name).map_err(|e| io_err("open", rel, e))?;
                Ok(Some(Entry::Dir(self.directory(&fd, rel, all)?.0)))
            }
            _ => self.entry(parent, name, rel),
        }
    }

    /// A non-recursive look at one entry: directories are only reported as
    /// such (with a placeholder digest); `entry_in_tree` descends into them.
    fn entry(&mut self, parent: &OwnedFd, name: &str, rel: &str) -> Result<Option<Entry>> {
        let st = match fstatat_nofollow(parent, name) {
            Ok(st) => st,
            Err(nix::Error::ENOENT) => return Ok(None),
            Err(e) => return Err(io_err("stat", rel, e)),
        };
        Ok(Some(match file_type(&st) {
            SFlag::S_IFREG => Entry::File(self.file(parent, name, rel)?),
            SFlag::S_IFDIR => Entry::Dir(digest::empty()),
            SFlag::S_IFLNK => {
                let target = readlinkat(Some(parent.as_raw_fd()), name)
                    .map_err(|e| io_err("readlink", rel, e))?;
                Entry::Symlink(target.to_string_lossy().into_owned())
            }
            _ => {
                tracing::debug!(path = rel, "special file in outputs skipped");
                Entry::Other
            }
        }))
    }

    fn file(&mut self, parent: &OwnedFd, name: &str, rel: &str) -> Result<FileNode> {
        let raw = openat(
            Some(parent.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("open", rel, e))?;
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        let mut file = unsafe { File::from_raw_fd(raw) };
        let st = fstat(file.as_raw_fd()).map_err(|e| io_err("stat", rel, e))?;
        let size = st.st_size;
        let known = if self.src.trust_inodes {
            self.src.cache.digest_of_inode(st.st_ino, size)
        } else {
            None
        };
        let d = match known {
            Some(d) => {
                // Still the staged input: the server has it already unless it
                // was evicted there, which FindMissingBlobs will tell.
                self.upload(Upload::Cached(d.clone()));
                d
            }
            None if size <= IN_MEMORY_LIMIT => {
                let mut data = Vec::with_capacity(size as usize);
                file.read_to_end(&mut data)
                    .map_err(|e| Error::io("read", rel, e))?;
                let d = digest::of_bytes(&data);
                self.upload_bytes(d.clone(), Bytes::from(data));
                d
            }
            None => {
                let d = copy_into_cache(&mut file, self.src.cache, rel)?;
                self.upload(Upload::Cached(d.clone()));
                d
            }
        };
        Ok(FileNode {
            name: name.to_string(),
            digest: Some(d),
            is_executable: st.st_mode & 0o100 != 0,
            node_properties: self.node_properties(&st),
        })
    }

    fn node_properties(&self, st: &FileStat) -> Option<NodeProperties> {
        if !self.spec.mtime && !self.spec.unix_mode {
            return None;
        }
        Some(NodeProperties {
            properties: Vec::new(),
            mtime: self.spec.mtime.then_some(kiln_proto::protobuf::Timestamp {
                seconds: st.st_mtime,
                nanos: st.st_mtime_nsec as i32,
            }),
            unix_mode: self
                .spec
                .unix_mode
                .then_some(kiln_proto::protobuf::UInt32Value {
                    value: st.st_mode & 0o7777,
                }),
        })
    }

    fn upload_bytes(&mut self, d: Digest, data: Bytes) {
        self.upload(Upload::Bytes(d, data));
    }

    fn upload(&mut self, u: Upload) {
        if u.digest().size_bytes > 0 && self.uploaded.insert(u.digest().hash.clone()) {
            self.out.uploads.push(u);
        }
    }
}

fn copy_into_cache(file: &mut File, cache: &BlobCache, rel: &str) -> Result<Digest> {
    let tmp = cache.tmp_path();
    let mut out = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io("read", rel, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::io("write", &tmp, e))?;
    }
    drop(out);
    let d = hasher.finish();
    cache.insert_file(&d, &tmp)?;
    Ok(d)
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn io_err(context: &'static str, rel: &str, e: nix::Error) -> Error {
    Error::io(context, Path::new("/").join(rel), std::io::Error::from(e))
}

fn fstatat_nofollow(dir: &OwnedFd, name: &str) -> nix::Result<FileStat> {
    nix::sys::stat::fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass descriptors they just received from the kernel.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn open_dir_nofollow(parent: &OwnedFd, name: &str) -> nix::Result<OwnedFd> {
    openat(
        Some(parent.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(owned)
}

/// Opens a directory by a path relative to the root (`""`: the root
/// itself), resolving `..` and symlinks as if the root were `/`. None when
/// it does not exist.
pub fn open_in_root(root: BorrowedFd, rel: &str) -> Result<Option<OwnedFd>> {
    let rel = if rel.is_empty() { "." } else { rel };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match openat2(root.as_raw_fd(), rel, how) {
        Ok(fd) => Ok(Some(owned(fd))),
        Err(nix::Error::ENOENT) | Err(nix::Error::ENOTDIR) => Ok(None),
        Err(e) => Err(io_err("open", rel, e)),
    }
}

fn list_dir(fd: &OwnedFd) -> nix::Result<Vec<String>> {
    let dup = nix::unistd::dup(fd.as_raw_fd())?;
    let dir = nix::dir::Dir::from_fd(dup)?;
    let mut names = Vec::new();
    for entry in dir {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        names.push(OsStr::from_bytes(name).to_string_lossy().into_owned());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn output_paths_resolve_lexically_and_never_escape() {
        assert_eq!(resolve_output_path("", ".").unwrap(), "");
        assert_eq!(resolve_output_path("build/el", "..").unwrap(), "build");
        assert_eq!(
            resolve_output_path("build/el", "../../install").unwrap(),
            "install"
        );
        assert_eq!(resolve_output_path("a", "./b/./c").unwrap(), "a/b/c");
        assert!(resolve_output_path("", "..").is_err());
        assert!(resolve_output_path("a", "../../x").is_err());
        assert!(resolve_output_path("", "/etc/passwd").is_err());
    }

    fn setup() -> (tempfile::TempDir, BlobCache, OwnedFd) {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(&dir.path().join("cache"), 1 << 30).unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("out/sub")).unwrap();
        fs::write(root.join("out/a.txt"), b"hello").unwrap();
        fs::write(root.join("out/sub/run"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("out/sub/run"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("/etc/passwd", root.join("out/abs")).unwrap();
        symlink("../../..", root.join("out/up")).unwrap();
        fs::create_dir_all(root.join("proc/1")).unwrap();
        fs::write(root.join("proc/1/status"), b"host stuff").unwrap();
        let fd = nix::fcntl::open(
            &root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(owned)
        .unwrap();
        (dir, cache, fd)
    }

    #[test]
    fn directories_files_and_symlinks_are_described_exactly() {
        let (_dir, cache, root) = setup();
        let mounts = vec!["proc".to_string()];
        let src = Source {
            root: root.as_fd(),
            mounts: &mounts,
            cache: &cache,
            trust_inodes: false,
        };
        let spec = OutputSpec {
            paths: vec![
                "out".into(),
                "out/a.txt".into(),
                "out/abs".into(),
                "missing".into(),
            ],
            directory_format: OutputDirectoryFormat::TreeAndDirectory,
            ..Default::default()
        };
        let c = collect(&spec, &src).unwrap();
        assert_eq!(c.files.len(), 1);
        assert_eq!(c.files[0].digest, Some(digest::of_bytes(b"hello")));
        assert_eq!(c.symlinks.len(), 1);
        assert_eq!(c.symlinks[0].target, "/etc/passwd");
        assert_eq!(c.directories.len(), 1);
        let out = &c.directories[0];
        assert!(out.tree_digest.is_some() && out.root_directory_digest.is_some());
        let root_dir_digest = out.root_directory_digest.clone().unwrap();
        let dir_blob = c
            .uploads
            .iter()
            .find_map(|u| match u {
                Upload::Bytes(d, b) if *d == root_dir_digest => Some(b.clone()),
                _ => None,
            })
            .expect("root Directory uploaded");
        let dir: Directory = prost::Message::decode(dir_blob).unwrap();
        let names: Vec<&str> = dir.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.txt"]);
        let links: Vec<(&str, &str)> = dir
            .symlinks
            .iter()
            .map(|s| (s.name.as_str(), s.target.as_str()))
            .collect();
        assert_eq!(links, [("abs", "/etc/passwd"), ("up", "../../..")]);
        assert_eq!(dir.directories[0].name, "sub");
    }

    #[test]
    fn the_whole_root_skips_kiln_mounts_and_keeps_exec_bits() {
        let (_dir, cache, root) = setup();
        let mounts = vec!["proc".to_string()];
        let src = Source {
            root: root.as_fd(),
            mounts: &mounts,
            cache: &cache,
            trust_inodes: false,
        };
        let spec = OutputSpec {
            working_directory: "out/sub".into(),
            paths: vec!["../..".into(), "run".into()],
            directory_format: OutputDirectoryFormat::DirectoryOnly,
            mtime: true,
            ..Default::default()
        };
        let c = collect(&spec, &src).unwrap();
        assert!(c.files[0].is_executable);
        assert!(c.files[0].node_properties.as_ref().unwrap().mtime.is_some());
        let whole = &c.directories[0];
        assert_eq!(whole.path, "../..");
        assert!(whole.tree_digest.is_none());
        let root_digest = whole.root_directory_digest.clone().unwrap();
        let find = |d: &Digest| -> Directory {
            c.uploads
                .iter()
                .find_map(|u| match u {
                    Upload::Bytes(x, b) if x == d => {
                        Some(prost::Message::decode(b.clone()).unwrap())
                    }
                    _ => None,
                })
                .unwrap_or_default()
        };
        let top = find(&root_digest);
        let proc_node = top.directories.iter().find(|n| n.name == "proc").unwrap();
        assert!(
            digest::is_empty(proc_node.digest.as_ref().unwrap())
                || find(proc_node.digest.as_ref().unwrap()).files.is_empty()
        );
        let blob_hashes: Vec<&Digest> = c.uploads.iter().map(|u| u.digest()).collect();
        assert!(!blob_hashes.contains(&&digest::of_bytes(b"host stuff")));
    }

    #[test]
    fn output_symlinks_out_of_the_root_are_not_followed() {
        let (_dir, cache, root) = setup();
        let src = Source {
            root: root.as_fd(),
            mounts: &[],
            cache: &cache,
            trust_inodes: false,
        };
        // "out/up" points far above the root: as a parent directory it
        // resolves inside the root, never to the host's directories.
        let spec = OutputSpec {
            paths: vec!["out/up/out/a.txt".into(), "out/up".into()],
            ..Default::default()
        };
        let c = collect(&spec, &src).unwrap();
        assert_eq!(c.files.len(), 1, "resolved inside the root");
        assert_eq!(c.symlinks[0].target, "../../..");
    }

    #[test]
    fn large_files_go_through_the_cache() {
        let (dir, cache, root) = setup();
        let big = vec![7u8; (IN_MEMORY_LIMIT + 1) as usize];
        fs::write(dir.path().join("root/out/big"), &big).unwrap();
        let src = Source {
            root: root.as_fd(),
            mounts: &[],
            cache: &cache,
            trust_inodes: true,
        };
        let spec = OutputSpec {
            files: vec!["out/big".into()],
            ..Default::default()
        };
        let c = collect(&spec, &src).unwrap();
        let d = digest::of_bytes(&big);
        assert_eq!(c.files[0].digest.as_ref(), Some(&d));
        assert!(cache.contains(&d));
        assert!(matches!(c.uploads[0], Upload::Cached(_)));
    }
}
