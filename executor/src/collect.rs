//! Output collection (KILN-CONTRACT §5): reads what the action left in its
//! sandbox root and describes it as REAPI outputs, without ever following a
//! symlink out of the root.
//!
//! Everything an action leaves is untrusted, so collection holds to a few
//! rules:
//!
//! * Every path is resolved from a directory fd of the sandbox root: output
//!   paths with `openat2(RESOLVE_IN_ROOT)` (so `..` and absolute symlinks
//!   stay inside), and trees entry by entry with `O_NOFOLLOW`. Symlinks are
//!   recorded as symlinks.
//! * Only the root's own filesystem is read. Kiln's mounts (`/proc`, `/dev`,
//!   `/dev/shm`, `/tmp`) and any other mount of another filesystem are
//!   reported as the empty directories they were staged as, and nothing
//!   below them is opened: `proc/kallsyms` read by the worker would be the
//!   host's, and `proc/kmsg` would block it for ever. A directory belongs to
//!   the root when it is on the root's device (overlayfs reports its own
//!   device for every directory; read-only binds of the root's own
//!   subtrees are on it too); a file, when it is on its directory's mount.
//! * Only regular files are read, opened with `O_NOFOLLOW | O_NONBLOCK` and
//!   checked through the handle, so no FIFO or device can block a worker.
//! * Trees are walked with an explicit stack holding one open directory at
//!   a time, and no deeper than [`MAX_DEPTH`]: no output can exhaust the
//!   worker's stack or file descriptors.
//! * What it costs is bounded by a [`Budget`]: bytes of new data (checked
//!   from the size before anything is read, so a sparse file costs nothing
//!   to refuse), time, and cancellation.
//! * Modes carry the executable bit and never a set-id bit.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_proto::digest::{self, Hasher};
use kiln_proto::reapi::command::OutputDirectoryFormat;
use kiln_proto::reapi::{
    Digest, Directory, DirectoryNode, FileNode, NodeProperties, OutputDirectory, OutputFile,
    OutputSymlink, SymlinkNode, Tree,
};
pub use kiln_proto::tree::MAX_DEPTH;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};
use tokio_util::sync::CancellationToken;

use crate::cache::BlobCache;
use crate::error::{Error, Result};

/// Files up to this size are read into memory and uploaded in batches;
/// larger ones are copied into the blob cache and streamed from there.
const IN_MEMORY_LIMIT: i64 = 1 << 20;

/// Large files are copied (and holes hashed) in pieces of this size, with
/// the budget's deadline and cancellation checked between pieces.
const CHUNK: usize = 1 << 20;

/// The permission bits an output may carry: never set-uid or set-gid.
pub const OUTPUT_MODE_MASK: u32 = 0o1777;

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

/// What collecting one action's results may cost: bytes of new data
/// (outputs, stdout and stderr together; files still the staged inputs they
/// were are free), time, and whether the action was cancelled meanwhile.
#[derive(Debug, Clone)]
pub struct Budget {
    limit: u64,
    used: u64,
    deadline: Instant,
    allowed: Duration,
    cancel: CancellationToken,
}

impl Budget {
    /// `limit` bytes, `allowed` from now on, ending early when `cancel` fires.
    pub fn new(limit: u64, allowed: Duration, cancel: CancellationToken) -> Self {
        Budget {
            limit,
            used: 0,
            deadline: Instant::now() + allowed,
            allowed,
            cancel,
        }
    }

    /// No limit worth the name (tests, tools).
    pub fn unlimited() -> Self {
        Budget::new(
            u64::MAX,
            Duration::from_secs(86400 * 365),
            CancellationToken::new(),
        )
    }

    /// Counts `bytes` of new data about to be read from `what`; refused
    /// before anything is read when it would go over the limit.
    pub fn charge(&mut self, what: &str, bytes: u64) -> Result<()> {
        let total = self.used.saturating_add(bytes);
        if total > self.limit {
            return Err(Error::OutputLimit {
                what: what.to_string(),
                why: format!(
                    "its {bytes} bytes would bring the action's outputs, stdout and stderr to \
                     {total} bytes, over the worker's output limit of {} \
                     (worker.output_limit_bytes, --output-limit)",
                    human_size(self.limit)
                ),
            });
        }
        self.used = total;
        Ok(())
    }

    /// Fails once the action is cancelled or its time is up.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        if Instant::now() > self.deadline {
            return Err(Error::CollectDeadline {
                what: what.to_string(),
                allowed: self.allowed,
            });
        }
        Ok(())
    }
}

/// `64 MiB` rather than `67108864` when the size is a round number.
pub fn human_size(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
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

pub fn collect(spec: &OutputSpec, src: &Source, budget: &mut Budget) -> Result<Collected> {
    let root_dev = fstat(src.root.as_raw_fd())
        .map_err(|e| io_err("stat", "", e))?
        .st_dev;
    let mut c = Collector {
        src,
        spec,
        budget,
        root_dev,
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
    budget: &'a mut Budget,
    /// The device of the root's filesystem: directories elsewhere are
    /// mounts (Kiln's own), never read.
    root_dev: u64,
    out: Collected,
    uploaded: HashSet<String>,
}

/// One entry as found on disk.
enum Entry {
    File(FileNode),
    /// A directory of the root's filesystem.
    Dir,
    /// The mount point of another filesystem: an empty directory.
    Mount,
    Symlink(String),
    /// Special files, and anything that changed under the collector.
    Other,
}

/// A directory being described on the walk's stack. Only the innermost
/// one is open; the walk climbs back with `..` and checks it arrived where
/// it came from.
struct Frame {
    rel: String,
    stat: FileStat,
    mount_id: u64,
    names: std::vec::IntoIter<String>,
    /// The subdirectory being walked, while it is.
    entered: Option<String>,
    files: BTreeMap<String, FileNode>,
    dirs: BTreeMap<String, Digest>,
    links: BTreeMap<String, String>,
}

impl Collector<'_> {
    fn collect_path(&mut self, declared: &str, kind: Kind) -> Result<()> {
        let rel = resolve_output_path(&self.spec.working_directory, declared)?;
        self.budget.check(&rel)?;
        let (parent, leaf) = match rel.rsplit_once('/') {
            Some((p, l)) => (p.to_string(), l.to_string()),
            None => (String::new(), rel.clone()),
        };
        let parent_fd = if rel.is_empty() {
            None
        } else {
            match open_in_root(self.src.root, &parent)? {
                // Below a mount of another filesystem (`proc/kallsyms`, or
                // a symlink leading there): not an output.
                Some(fd) if self.on_root_fs(&fd, &parent)? => Some(fd),
                Some(_) => {
                    tracing::debug!(
                        path = declared,
                        "output below another filesystem's mount ignored"
                    );
                    return Ok(());
                }
                None => return Ok(()),
            }
        };
        let entry = match &parent_fd {
            // The whole root: always a directory.
            None => Entry::Dir,
            Some(fd) => {
                let mount_id = mount_id(fd.as_fd()).map_err(|e| io_err("stat", &parent, e))?;
                match self.entry(fd, mount_id, &leaf, &rel)? {
                    Some(e) => e,
                    None => return Ok(()),
                }
            }
        };
        match entry {
            Entry::File(node) if kind != Kind::Directory => self.out.files.push(OutputFile {
                path: declared.to_string(),
                digest: node.digest,
                is_executable: node.is_executable,
                contents: Vec::new(),
                node_properties: node.node_properties,
            }),
            Entry::Dir | Entry::Mount if kind == Kind::File => {
                tracing::warn!(
                    path = declared,
                    "declared output file is a directory; not collected"
                );
            }
            Entry::Dir => self.output_directory(declared, parent_fd.as_ref(), &leaf, &rel)?,
            Entry::Mount => {
                let (d, dir) = self.empty_directory();
                self.push_output_directory(declared, d, dir, Vec::new());
            }
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

    fn on_root_fs(&self, fd: &OwnedFd, rel: &str) -> Result<bool> {
        Ok(fstat(fd.as_raw_fd())
            .map_err(|e| io_err("stat", rel, e))?
            .st_dev
            == self.root_dev)
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
        let (root_digest, root_dir) = self.directory(fd, rel, &mut tree_dirs)?;
        self.push_output_directory(declared, root_digest, root_dir, tree_dirs);
        Ok(())
    }

    fn push_output_directory(
        &mut self,
        declared: &str,
        root_digest: Digest,
        root_dir: Directory,
        tree_dirs: Vec<(Digest, Directory)>,
    ) {
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
    }

    /// The Directory standing for a mount point.
    fn empty_directory(&mut self) -> (Digest, Directory) {
        let empty = Directory::default();
        let (d, bytes) = digest::of_message(&empty);
        self.upload_bytes(d.clone(), Bytes::from(bytes));
        (d, empty)
    }

    /// Describes the tree under the open directory `fd` (at `rel` from the
    /// root); returns its digest and message. Every subdirectory is appended
    /// to `all` (for a Tree), and every Directory blob is queued for upload.
    /// Iterative, with one directory open at a time.
    fn directory(
        &mut self,
        fd: OwnedFd,
        rel: &str,
        all: &mut Vec<(Digest, Directory)>,
    ) -> Result<(Digest, Directory)> {
        let mut cur = fd;
        let mut stack = vec![Frame::enter(&cur, rel.to_string())?];
        loop {
            let frame = stack.last_mut().expect("the walk ends when the stack does");
            let Some(name) = frame.names.next() else {
                let done = stack.pop().expect("checked above");
                let (d, dir) = self.finish_directory(done);
                all.push((d.clone(), dir.clone()));
                let Some(parent) = stack.last_mut() else {
                    return Ok((d, dir));
                };
                cur = climb(&cur, parent)?;
                let name = parent.entered.take().expect("entered before");
                parent.dirs.insert(name, d);
                continue;
            };
            let child_rel = join(&frame.rel, &name);
            self.budget.check(&child_rel)?;
            if self.src.mounts.contains(&child_rel) {
                let (d, empty) = self.empty_directory();
                all.push((d.clone(), empty));
                frame.dirs.insert(name, d);
                continue;
            }
            let mount_id = frame.mount_id;
            match self.entry(&cur, mount_id, &name, &child_rel)? {
                Some(Entry::File(node)) => {
                    stack.last_mut().expect("frame").files.insert(name, node);
                }
                Some(Entry::Symlink(target)) => {
                    stack.last_mut().expect("frame").links.insert(name, target);
                }
                Some(Entry::Mount) => {
                    let (d, empty) = self.empty_directory();
                    all.push((d.clone(), empty));
                    stack.last_mut().expect("frame").dirs.insert(name, d);
                }
                Some(Entry::Dir) => {
                    if child_rel.split('/').count() > MAX_DEPTH {
                        return Err(Error::OutputLimit {
                            what: format!("output directory {child_rel}"),
                            why: format!(
                                "nested deeper than {MAX_DEPTH} directory levels, the most Kiln handles"
                            ),
                        });
                    }
                    let child = open_dir_nofollow(&cur, &name)
                        .map_err(|e| io_err("open", &child_rel, e))?;
                    let frame = Frame::enter(&child, child_rel)?;
                    stack.last_mut().expect("frame").entered = Some(name);
                    stack.push(frame);
                    cur = child;
                }
                Some(Entry::Other) | None => {}
            }
        }
    }

    fn finish_directory(&mut self, f: Frame) -> (Digest, Directory) {
        let dir = Directory {
            files: f.files.into_values().collect(),
            directories: f
                .dirs
                .into_iter()
                .map(|(name, digest)| DirectoryNode {
                    name,
                    digest: Some(digest),
                })
                .collect(),
            symlinks: f
                .links
                .into_iter()
                .map(|(name, target)| SymlinkNode {
                    name,
                    target,
                    node_properties: None,
                })
                .collect(),
            node_properties: self.node_properties(&f.stat),
        };
        let (d, bytes) = digest::of_message(&dir);
        self.upload_bytes(d.clone(), Bytes::from(bytes));
        (d, dir)
    }

    /// A look at one entry of an open directory (whose mount is
    /// `parent_mount`); regular files are read, directories only classified.
    fn entry(
        &mut self,
        parent: &OwnedFd,
        parent_mount: u64,
        name: &str,
        rel: &str,
    ) -> Result<Option<Entry>> {
        let st = match fstatat_nofollow(parent, name) {
            Ok(st) => st,
            Err(nix::Error::ENOENT) => return Ok(None),
            Err(e) => return Err(io_err("stat", rel, e)),
        };
        Ok(Some(match file_type(&st) {
            SFlag::S_IFREG => match self.file(parent, parent_mount, name, rel, &st)? {
                Some(node) => Entry::File(node),
                None => Entry::Other,
            },
            SFlag::S_IFDIR if st.st_dev == self.root_dev => Entry::Dir,
            SFlag::S_IFDIR => Entry::Mount,
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

    /// Reads a regular file `lstat` found. `None` when what opens is not
    /// that file, or is a file mounted over it.
    fn file(
        &mut self,
        parent: &OwnedFd,
        parent_mount: u64,
        name: &str,
        rel: &str,
        seen: &FileStat,
    ) -> Result<Option<FileNode>> {
        let raw = openat(
            Some(parent.as_raw_fd()),
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("open", rel, e))?;
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        let mut file = unsafe { File::from_raw_fd(raw) };
        let st = fstat(file.as_raw_fd()).map_err(|e| io_err("stat", rel, e))?;
        let same = file_type(&st) == SFlag::S_IFREG
            && (st.st_dev, st.st_ino) == (seen.st_dev, seen.st_ino)
            && mount_id(file.as_fd()).map_err(|e| io_err("stat", rel, e))? == parent_mount;
        if !same {
            tracing::debug!(path = rel, "output file is not what was listed; skipped");
            return Ok(None);
        }
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
            None => {
                self.budget
                    .charge(&format!("output file {rel}"), size as u64)?;
                if size <= IN_MEMORY_LIMIT {
                    let mut data = Vec::with_capacity(size as usize);
                    (&mut file)
                        .take(size as u64)
                        .read_to_end(&mut data)
                        .map_err(|e| Error::io("read", rel, e))?;
                    let d = digest::of_bytes(&data);
                    self.upload_bytes(d.clone(), Bytes::from(data));
                    d
                } else {
                    let d = copy_into_cache(&file, size as u64, self.src.cache, rel, self.budget)?;
                    self.upload(Upload::Cached(d.clone()));
                    d
                }
            }
        };
        Ok(Some(FileNode {
            name: name.to_string(),
            digest: Some(d),
            is_executable: st.st_mode & 0o100 != 0,
            node_properties: self.node_properties(&st),
        }))
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
                    value: st.st_mode & OUTPUT_MODE_MASK,
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

impl Frame {
    fn enter(fd: &OwnedFd, rel: String) -> Result<Frame> {
        let stat = fstat(fd.as_raw_fd()).map_err(|e| io_err("stat", &rel, e))?;
        let mount_id = mount_id(fd.as_fd()).map_err(|e| io_err("stat", &rel, e))?;
        let mut names = list_dir(fd).map_err(|e| io_err("list", &rel, e))?;
        // In name order, so which file crosses the output limit does not
        // depend on the filesystem's hashing.
        names.sort_unstable();
        Ok(Frame {
            rel,
            stat,
            mount_id,
            names: names.into_iter(),
            entered: None,
            files: BTreeMap::new(),
            dirs: BTreeMap::new(),
            links: BTreeMap::new(),
        })
    }
}

/// Back from a walked subdirectory to `parent`, by `..`: the action is gone,
/// so nothing can have moved, but the arrival is checked all the same.
fn climb(child: &OwnedFd, parent: &Frame) -> Result<OwnedFd> {
    let up = open_dir_nofollow(child, "..").map_err(|e| io_err("open", &parent.rel, e))?;
    let st = fstat(up.as_raw_fd()).map_err(|e| io_err("stat", &parent.rel, e))?;
    if (st.st_dev, st.st_ino) != (parent.stat.st_dev, parent.stat.st_ino) {
        return Err(Error::Internal(format!(
            "collecting /{}: its subdirectory's `..` is another directory",
            parent.rel
        )));
    }
    Ok(up)
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// Copies a large output into the blob cache, hashing it on the way: read
/// once, hashed once, written once. Holes stay holes in the copy, so a
/// sparse file is not made dense on the worker.
fn copy_into_cache(
    file: &File,
    size: u64,
    cache: &BlobCache,
    rel: &str,
    budget: &Budget,
) -> Result<Digest> {
    let tmp = cache.tmp_path();
    let result = (|| {
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        out.set_len(size).map_err(|e| Error::io("size", &tmp, e))?;
        read_sparse(file, size, rel, budget, |at, data| {
            out.write_all_at(data, at)
                .map_err(|e| Error::io("write", &tmp, e))
        })
    })();
    match result {
        Ok(d) => {
            cache.insert_file(&d, &tmp)?;
            Ok(d)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The digest of the first `size` bytes of a regular file, within the
/// budget's time. `what` names it in errors.
pub fn hash_file(file: &File, size: u64, what: &str, budget: &Budget) -> Result<Digest> {
    read_sparse(file, size, what, budget, |_, _| Ok(()))
}

/// Reads a file's data extents (`SEEK_DATA` / `SEEK_HOLE`) in order, giving
/// each piece to `sink` with its offset, and hashes the whole: holes as the
/// zeros they read as, without reading them.
fn read_sparse(
    file: &File,
    size: u64,
    what: &str,
    budget: &Budget,
    mut sink: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<Digest> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let data = seek(file, pos, libc::SEEK_DATA)
            .map_err(|e| io_err("seek", what, e))?
            .unwrap_or(size)
            .min(size);
        hash_zeros(&mut hasher, data - pos, what, budget)?;
        if data >= size {
            break;
        }
        let end = seek(file, data, libc::SEEK_HOLE)
            .map_err(|e| io_err("seek", what, e))?
            .unwrap_or(size)
            .min(size);
        let mut at = data;
        while at < end {
            budget.check(what)?;
            let want = ((end - at) as usize).min(CHUNK);
            let n = file
                .read_at(&mut buf[..want], at)
                .map_err(|e| Error::io("read", what, e))?;
            if n == 0 {
                return Err(Error::Internal(format!(
                    "{what} ended at {at} bytes, short of its {size}"
                )));
            }
            hasher.update(&buf[..n]);
            sink(at, &buf[..n])?;
            at += n as u64;
        }
        pos = end;
    }
    Ok(hasher.finish())
}

fn hash_zeros(hasher: &mut Hasher, mut len: u64, rel: &str, budget: &Budget) -> Result<()> {
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    while len > 0 {
        budget.check(rel)?;
        let n = len.min(CHUNK as u64) as usize;
        hasher.update(&ZEROS[..n]);
        len -= n as u64;
    }
    Ok(())
}

/// `lseek(SEEK_DATA / SEEK_HOLE)`; `None` past the last data (`ENXIO`).
fn seek(file: &File, from: u64, whence: libc::c_int) -> nix::Result<Option<u64>> {
    // SAFETY: plain syscall on a descriptor we own; reads go by offset
    // (pread), so moving the file position disturbs nothing.
    let r = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    match nix::Error::last() {
        nix::Error::ENXIO => Ok(None),
        e => Err(e),
    }
}

/// The id of the mount `fd` was reached through (`statx` `STATX_MNT_ID`).
fn mount_id(fd: BorrowedFd) -> nix::Result<u64> {
    // SAFETY: all-zero is a valid statx.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, a NUL-terminated empty path with AT_EMPTY_PATH, and
    // a buffer of the right type.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if r < 0 {
        return Err(nix::Error::last());
    }
    Ok(stx.stx_mnt_id)
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
        let c = collect(&spec, &src, &mut Budget::unlimited()).unwrap();
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
        let c = collect(&spec, &src, &mut Budget::unlimited()).unwrap();
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
        let c = collect(&spec, &src, &mut Budget::unlimited()).unwrap();
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
        let c = collect(&spec, &src, &mut Budget::unlimited()).unwrap();
        let d = digest::of_bytes(&big);
        assert_eq!(c.files[0].digest.as_ref(), Some(&d));
        assert!(cache.contains(&d));
        assert!(matches!(c.uploads[0], Upload::Cached(_)));
    }

    fn source<'a>(root: &'a OwnedFd, cache: &'a BlobCache) -> Source<'a> {
        Source {
            root: root.as_fd(),
            mounts: &[],
            cache,
            trust_inodes: false,
        }
    }

    #[test]
    fn special_files_are_never_opened() {
        let (dir, cache, root) = setup();
        nix::unistd::mkfifo(
            &dir.path().join("root/out/fifo"),
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let spec = OutputSpec {
            paths: vec!["out/fifo".into(), "out".into()],
            directory_format: OutputDirectoryFormat::DirectoryOnly,
            ..Default::default()
        };
        // A FIFO opened for reading would block until a writer comes.
        let c = collect(&spec, &source(&root, &cache), &mut Budget::unlimited()).unwrap();
        assert!(c.files.is_empty() && c.symlinks.is_empty());
        assert_eq!(c.directories.len(), 1);
    }

    #[test]
    fn trees_deeper_than_the_limit_are_refused_by_name() {
        let (dir, cache, root) = setup();
        let mut deep = dir.path().join("root/deep");
        for _ in 0..MAX_DEPTH + 5 {
            deep.push("d");
        }
        fs::create_dir_all(&deep).unwrap();
        let spec = OutputSpec {
            paths: vec!["deep".into()],
            ..Default::default()
        };
        let err = collect(&spec, &source(&root, &cache), &mut Budget::unlimited()).unwrap_err();
        assert!(matches!(err, Error::OutputLimit { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("deeper than 256") && msg.contains("deep/d/d/"),
            "{msg}"
        );
        // At the limit, fine: one directory open at a time all the way down.
        let mut ok = dir.path().join("root");
        for _ in 0..MAX_DEPTH {
            ok.push("k");
        }
        fs::create_dir_all(&ok).unwrap();
        fs::write(ok.join("leaf"), b"bottom").unwrap();
        let spec = OutputSpec {
            paths: vec!["k".into()],
            directory_format: OutputDirectoryFormat::TreeOnly,
            ..Default::default()
        };
        let c = collect(&spec, &source(&root, &cache), &mut Budget::unlimited()).unwrap();
        let tree = c
            .uploads
            .iter()
            .find_map(|u| match u {
                Upload::Bytes(d, b) if Some(d) == c.directories[0].tree_digest.as_ref() => {
                    Some(<Tree as prost::Message>::decode(b.clone()).unwrap())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(tree.children.len(), MAX_DEPTH - 1);
    }

    #[test]
    fn the_output_limit_is_checked_before_reading_and_names_the_file() {
        let (dir, cache, root) = setup();
        let big = fs::File::create(dir.path().join("root/out/sparse")).unwrap();
        big.set_len(1 << 40).unwrap();
        let spec = OutputSpec {
            paths: vec!["out".into()],
            ..Default::default()
        };
        let mut budget = Budget::new(64 << 20, Duration::from_secs(60), CancellationToken::new());
        let started = Instant::now();
        let err = collect(&spec, &source(&root, &cache), &mut budget).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a TiB was not read"
        );
        let msg = err.to_string();
        assert!(matches!(err, Error::OutputLimit { .. }), "{msg}");
        assert!(
            msg.contains("out/sparse") && msg.contains("64 MiB"),
            "{msg}"
        );
        assert_eq!(err.to_status().code, tonic::Code::ResourceExhausted as i32);
    }

    #[test]
    fn the_deadline_and_cancellation_stop_collection() {
        let (_dir, cache, root) = setup();
        let spec = OutputSpec {
            paths: vec!["out".into()],
            ..Default::default()
        };
        let budget = Budget::new(u64::MAX, Duration::ZERO, CancellationToken::new());
        std::thread::sleep(Duration::from_millis(5));
        let err = collect(&spec, &source(&root, &cache), &mut budget.clone()).unwrap_err();
        assert!(matches!(err, Error::CollectDeadline { .. }), "{err}");
        assert_eq!(err.to_status().code, tonic::Code::DeadlineExceeded as i32);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let mut budget = Budget::new(u64::MAX, Duration::from_secs(60), cancel);
        let err = collect(&spec, &source(&root, &cache), &mut budget).unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err}");
    }

    #[test]
    fn sparse_outputs_stay_sparse_in_the_cache_and_modes_lose_set_id_bits() {
        use std::os::unix::fs::MetadataExt;
        let (dir, cache, root) = setup();
        let path = dir.path().join("root/out/holes");
        {
            let f = fs::File::create(&path).unwrap();
            f.set_len(256 << 20).unwrap();
            f.write_all_at(b"middle", 100 << 20).unwrap();
            f.write_all_at(b"end", (256 << 20) - 3).unwrap();
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o6755)).unwrap();
        let spec = OutputSpec {
            paths: vec!["out/holes".into()],
            unix_mode: true,
            ..Default::default()
        };
        let c = collect(&spec, &source(&root, &cache), &mut Budget::unlimited()).unwrap();
        let mut want = vec![0u8; 256 << 20];
        want[100 << 20..(100 << 20) + 6].copy_from_slice(b"middle");
        want[(256 << 20) - 3..].copy_from_slice(b"end");
        let d = digest::of_bytes(&want);
        let f = &c.files[0];
        assert_eq!(f.digest.as_ref(), Some(&d));
        assert!(f.is_executable);
        assert_eq!(
            f.node_properties.as_ref().unwrap().unix_mode.unwrap().value,
            0o755
        );
        let cached = fs::metadata(cache.path(&d.hash, false)).unwrap();
        assert_eq!(cached.len(), 256 << 20);
        assert!(
            cached.blocks() * 512 < 1 << 20,
            "written sparse, not dense: {} blocks",
            cached.blocks()
        );
    }
}
