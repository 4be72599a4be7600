//! Container images as base root filesystems: an OCI image layout directory
//! or an OCI / `docker save` tarball, unpacked once per worker into a plain
//! directory that actions then use as a read-only overlay lower layer.
//!
//! Layers are applied in order with the OCI whiteout rules (`.wh.NAME`
//! deletes NAME from the layers below, `.wh..wh..opq` empties its directory
//! of what the layers below put there). An image is untrusted input, so all
//! work on it goes through directory handles, never path strings:
//!
//! * manifests, indexes and layer blobs are opened relative to the layout
//!   (or the unpacked tarball) with `openat2(RESOLVE_IN_ROOT)`: a symlink
//!   member resolves inside the image, never to a host file, and what opens
//!   must be a regular file;
//! * a layer's members are created relative to a handle of the root, one
//!   component at a time with `O_NOFOLLOW`; a member that goes through a
//!   symlink is refused;
//! * directory modes, applied once all layers are in, are set through a
//!   handle opened with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: a directory
//!   a later layer replaced with a symlink (to `/`, say) is skipped, never
//!   followed to the host.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use kiln_proto::tree::MAX_DEPTH;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, linkat, symlinkat, unlinkat};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// What a configured image path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A directory that already is a root filesystem: used as is.
    Rootfs(PathBuf),
    /// An OCI image layout (`oci-layout`, `index.json`, `blobs/`).
    OciLayout(PathBuf),
    /// A tar archive of an OCI image layout or of `docker save` output.
    Tarball(PathBuf),
}

impl ImageSource {
    /// Tells the kinds apart by what is on disk.
    pub fn detect(path: &Path) -> Result<Self> {
        let meta = fs::metadata(path).map_err(|e| Error::io("open image", path, e))?;
        Ok(if meta.is_dir() {
            if path.join("oci-layout").is_file() && path.join("index.json").is_file() {
                ImageSource::OciLayout(path.to_path_buf())
            } else {
                ImageSource::Rootfs(path.to_path_buf())
            }
        } else {
            ImageSource::Tarball(path.to_path_buf())
        })
    }
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::BaseRoot(format!("image {}: {why}", path.display()))
}

/// The root filesystem of `source`, unpacked under `cache` if it is not a
/// plain directory. `name` is the image's configured name, used to pick a
/// manifest from an index holding several. A finished unpack is marked
/// with `.done` and reused across worker restarts; its directory is keyed
/// by content (the manifest's or the tarball's digest), so a changed image
/// is unpacked afresh.
pub fn prepare(name: &str, source: &ImageSource, cache: &Path) -> Result<PathBuf> {
    match source {
        ImageSource::Rootfs(dir) => Ok(dir.clone()),
        ImageSource::OciLayout(dir) => {
            let layout = Dir::open(dir, dir)?;
            let (key, layers) = oci_layers(name, &layout)?;
            unpack_cached(cache, &key, &layers)
        }
        ImageSource::Tarball(file) => {
            let key = sha256_file(file)?;
            let done = cache.join(&key);
            if done.join(".done").exists() {
                return Ok(done.join("rootfs"));
            }
            // The layers are members of the tarball: take it apart in a
            // scratch directory first, then read it like a layout.
            let scratch = cache.join(format!("src-{}", uuid::Uuid::new_v4().simple()));
            fs::create_dir_all(&scratch).map_err(|e| Error::io("create", &scratch, e))?;
            let result = (|| {
                let f = File::open(file).map_err(|e| Error::io("open image", file, e))?;
                let unpacked = Dir::open(&scratch, file)?;
                apply_layer(tar::Archive::new(decompress(f, file)?), &unpacked, file)?;
                let layers = if unpacked.has_file("manifest.json") {
                    docker_layers(&unpacked)?
                } else if unpacked.has_file("index.json") {
                    oci_layers(name, &unpacked)?.1
                } else {
                    return Err(bad(
                        file,
                        "neither a docker-save (manifest.json) nor an OCI layout (index.json) tarball",
                    ));
                };
                unpack_cached(cache, &key, &layers)
            })();
            let _ = fs::remove_dir_all(&scratch);
            result
        }
    }
}

/// A directory everything of an image is reached through, and the path
/// it stands for in messages.
#[derive(Debug, Clone)]
struct Dir {
    fd: Arc<OwnedFd>,
    label: PathBuf,
}

impl Dir {
    /// Opens `path` (a directory Kiln was configured with or made itself).
    fn open(path: &Path, label: &Path) -> Result<Dir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open", path, e.into()))?;
        Ok(Dir {
            fd: Arc::new(owned(fd)),
            label: label.to_path_buf(),
        })
    }

    /// A regular file inside: symlinks are followed, but only inside the
    /// directory, as if it were `/`.
    fn file(&self, rel: &Path) -> Result<File> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_IN_ROOT
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV,
            );
        let fd = openat2(self.fd.as_raw_fd(), rel, how).map_err(|e| {
            let why = match e {
                Errno::ENOENT => "is not in the image".to_string(),
                e => e.desc().to_string(),
            };
            bad(&self.label, format!("{}: {why}", rel.display()))
        })?;
        // SAFETY: openat2 returned a fresh descriptor that nothing else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        let st = fstat(f.as_raw_fd()).map_err(|e| Error::io("stat", rel, e.into()))?;
        if file_type(&st) != SFlag::S_IFREG {
            return Err(bad(
                &self.label,
                format!("{} is not a regular file", rel.display()),
            ));
        }
        Ok(f)
    }

    fn has_file(&self, rel: &str) -> bool {
        self.file(Path::new(rel)).is_ok()
    }
}

/// One layer: a regular file inside an image directory.
#[derive(Debug, Clone)]
struct Layer {
    dir: Dir,
    rel: PathBuf,
}

impl Layer {
    fn open(&self) -> Result<File> {
        self.dir.file(&self.rel)
    }

    /// How messages name it.
    fn label(&self) -> PathBuf {
        self.dir.label.join(&self.rel)
    }
}

/// Applies `layers` (bottom first) into `cache/<key>/rootfs` unless that is
/// already done.
fn unpack_cached(cache: &Path, key: &str, layers: &[Layer]) -> Result<PathBuf> {
    let dest = cache.join(key);
    if dest.join(".done").exists() {
        return Ok(dest.join("rootfs"));
    }
    let tmp = cache.join(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let rootfs = tmp.join("rootfs");
    fs::create_dir_all(&rootfs).map_err(|e| Error::io("create", &rootfs, e))?;
    let result = (|| {
        let root = Dir::open(&rootfs, &rootfs)?;
        let mut dirs = DirModes::default();
        for layer in layers {
            // Whiteouts hide what the layers below put there, never what
            // this layer adds: remove first, then extract.
            let label = layer.label();
            let open =
                || -> Result<_> { Ok(tar::Archive::new(decompress(layer.open()?, &label)?)) };
            apply_whiteouts(open()?, &root, &label)?;
            dirs.merge(apply_layer(open()?, &root, &label)?);
        }
        dirs.apply(&root);
        File::create(tmp.join(".done")).map_err(|e| Error::io("mark image unpacked", &tmp, e))?;
        if let Err(e) = fs::rename(&tmp, &dest) {
            // Another worker of this data directory won the race: use its.
            if !dest.join(".done").exists() {
                return Err(Error::io("install unpacked image", &dest, e));
            }
            let _ = fs::remove_dir_all(&tmp);
        }
        Ok(dest.join("rootfs"))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// gzip, zstd or plain tar, told apart by the first bytes rather than by
/// media types (docker-save tarballs carry none).
fn decompress(f: File, path: &Path) -> Result<Box<dyn Read>> {
    let mut r = BufReader::new(f);
    let magic = {
        use std::io::BufRead;
        let buf = r.fill_buf().map_err(|e| Error::io("read", path, e))?;
        buf.get(..4).map(<[u8]>::to_vec).unwrap_or_default()
    };
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::Decoder::with_buffer(r).map_err(|e| Error::io("zstd", path, e))?)
    } else {
        Box::new(r)
    })
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    sha256_of(&mut f, path)
}

fn sha256_of(f: &mut File, label: &Path) -> Result<String> {
    let mut h = Sha256::new();
    std::io::copy(f, &mut h).map_err(|e| Error::io("read", label, e))?;
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<PlatformDesc>,
}

#[derive(Deserialize)]
struct PlatformDesc {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// A blob of an OCI layout, checked against its digest.
fn blob(layout: &Dir, digest: &str) -> Result<Layer> {
    let (alg, hash) = digest
        .split_once(':')
        .ok_or_else(|| bad(&layout.label, format!("malformed digest {digest:?}")))?;
    if alg != "sha256" || hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(
            &layout.label,
            format!("unsupported digest {digest:?} (sha256 only)"),
        ));
    }
    let layer = Layer {
        dir: layout.clone(),
        rel: Path::new("blobs").join(alg).join(hash),
    };
    let actual = sha256_of(&mut layer.open()?, &layer.label())?;
    if actual != hash.to_ascii_lowercase() {
        return Err(bad(
            &layout.label,
            format!("blob {digest} is corrupt (its content hashes to {actual})"),
        ));
    }
    Ok(layer)
}

/// Manifests and indexes are small; anything far larger is not one.
const JSON_LIMIT: u64 = 64 << 20;

fn read_json<T: serde::de::DeserializeOwned>(dir: &Dir, rel: &Path) -> Result<T> {
    let mut bytes = Vec::new();
    dir.file(rel)?
        .take(JSON_LIMIT)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("read", dir.label.join(rel), e))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(&dir.label, format!("{}: {e}", rel.display())))
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Picks the manifest for `name` from an index: the only one, else the one
/// whose `org.opencontainers.image.ref.name` is the name (or its tag), else
/// the one for this host's platform.
fn pick<'a>(name: &str, layout: &Path, manifests: &'a [Descriptor]) -> Result<&'a Descriptor> {
    if let [only] = manifests {
        return Ok(only);
    }
    let tag = name.rsplit_once(':').map_or(name, |(_, t)| t);
    let by_name = manifests.iter().find(|m| {
        m.annotations
            .get("org.opencontainers.image.ref.name")
            .is_some_and(|r| r == name || r == tag)
    });
    let by_platform = || {
        manifests.iter().find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
        })
    };
    by_name.or_else(by_platform).ok_or_else(|| {
        bad(
            layout,
            format!(
                "index.json holds {} manifests and none is named {name:?} or for linux/{}",
                manifests.len(),
                host_arch()
            ),
        )
    })
}

/// The manifest digest (the cache key) and layer blobs of an OCI layout.
fn oci_layers(name: &str, layout: &Dir) -> Result<(String, Vec<Layer>)> {
    let index: Index = read_json(layout, Path::new("index.json"))?;
    let picked = pick(name, &layout.label, &index.manifests)?;
    let (mut media_type, mut digest) = (picked.media_type.clone(), picked.digest.clone());
    // An index may point to a further index (a multi-platform image).
    for _ in 0..4 {
        if !media_type.ends_with("image.index.v1+json")
            && !media_type.ends_with("manifest.list.v2+json")
        {
            break;
        }
        let nested: Index = read_json(layout, &blob(layout, &digest)?.rel)?;
        let picked = pick(name, &layout.label, &nested.manifests)?;
        (media_type, digest) = (picked.media_type.clone(), picked.digest.clone());
    }
    let manifest: Manifest = read_json(layout, &blob(layout, &digest)?.rel)?;
    let layers = manifest
        .layers
        .iter()
        .map(|l| blob(layout, &l.digest))
        .collect::<Result<Vec<_>>>()?;
    let key = digest.replace(':', "-");
    Ok((key, layers))
}

/// The layer files of an unpacked `docker save` tarball, bottom first,
/// each checked to be a regular file of the tarball.
fn docker_layers(dir: &Dir) -> Result<Vec<Layer>> {
    let manifests: Vec<DockerManifest> = read_json(dir, Path::new("manifest.json"))?;
    let [m] = manifests.as_slice() else {
        return Err(bad(
            &dir.label,
            format!(
                "manifest.json lists {} images; save exactly one",
                manifests.len()
            ),
        ));
    };
    m.layers
        .iter()
        .map(|l| {
            let rel = clean(Path::new(l))
                .filter(|r| !r.as_os_str().is_empty())
                .ok_or_else(|| bad(&dir.label, format!("layer path {l:?}")))?;
            let layer = Layer {
                dir: dir.clone(),
                rel,
            };
            layer.open()?;
            Ok(layer)
        })
        .collect()
}

/// A member path made relative and checked: `None` if it would leave the
/// root (`..`), `Some("")` for the root itself.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass descriptors they just received from the kernel.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn lstat_at(dir: &OwnedFd, name: &OsStr) -> nix::Result<FileStat> {
    fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

fn open_dir_at(dir: &OwnedFd, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(owned)
}

/// A directory below the root by a relative path, with no symlink on the
/// way (`ELOOP` then). `""` is the root itself.
fn dir_beneath(root: &Dir, rel: &Path) -> nix::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    // RESOLVE_NO_SYMLINKS covers the last component too (ELOOP).
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    openat2(root.fd.as_raw_fd(), rel, how).map(owned)
}

fn io_at(context: &'static str, rel: &Path, e: Errno) -> Error {
    Error::io(context, rel, e.into())
}

/// The directory that will hold member `rel`, made (a file in the way is
/// replaced, as a later layer's directory replaces it) one component at a
/// time; going through a symlink, which could point anywhere, is refused.
/// Returns it and the member's own name.
fn parent_dirs(root: &Dir, rel: &Path, layer: &Path) -> Result<(OwnedFd, OsString)> {
    let name = rel
        .file_name()
        .ok_or_else(|| bad(layer, format!("member {rel:?} has no name")))?
        .to_os_string();
    let mut cur = nix::unistd::dup(root.fd.as_raw_fd())
        .map(owned)
        .map_err(|e| io_at("dup", &root.label, e))?;
    let mut at = PathBuf::new();
    for c in rel.parent().unwrap_or(Path::new("")).components() {
        let c = c.as_os_str();
        at.push(c);
        cur = match open_dir_at(&cur, c) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                mkdirat(Some(cur.as_raw_fd()), c, Mode::from_bits_truncate(0o755))
                    .map_err(|e| io_at("create", &at, e))?;
                open_dir_at(&cur, c).map_err(|e| io_at("open", &at, e))?
            }
            Err(Errno::ENOTDIR | Errno::ELOOP) => {
                let st = lstat_at(&cur, c).map_err(|e| io_at("stat", &at, e))?;
                if file_type(&st) == SFlag::S_IFLNK {
                    return Err(bad(
                        layer,
                        format!(
                            "member {} goes through the symlink {}",
                            rel.display(),
                            at.display()
                        ),
                    ));
                }
                unlinkat(Some(cur.as_raw_fd()), c, UnlinkatFlags::NoRemoveDir)
                    .map_err(|e| io_at("replace", &at, e))?;
                mkdirat(Some(cur.as_raw_fd()), c, Mode::from_bits_truncate(0o755))
                    .map_err(|e| io_at("create", &at, e))?;
                open_dir_at(&cur, c).map_err(|e| io_at("open", &at, e))?
            }
            Err(e) => return Err(io_at("open", &at, e)),
        };
    }
    Ok((cur, name))
}

/// Removes `name` from `dir`, a directory with everything in it. Trees
/// here come from members at most [`MAX_DEPTH`] deep, which bounds the
/// recursion.
fn remove_at(dir: &OwnedFd, name: &OsStr, rel: &Path, depth: usize) -> Result<()> {
    let st = match lstat_at(dir, name) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(io_at("stat", rel, e)),
    };
    if file_type(&st) != SFlag::S_IFDIR {
        return unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| io_at("remove", rel, e));
    }
    if depth > MAX_DEPTH + 1 {
        return Err(Error::Internal(format!(
            "removing {}: nested deeper than any member can be",
            rel.display()
        )));
    }
    let sub = open_dir_at(dir, name).map_err(|e| io_at("open", rel, e))?;
    for child in list(&sub).map_err(|e| io_at("list", rel, e))? {
        remove_at(&sub, &child, &rel.join(&child), depth + 1)?;
    }
    unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir)
        .map_err(|e| io_at("remove", rel, e))
}

fn list(dir: &OwnedFd) -> nix::Result<Vec<OsString>> {
    let dup = nix::unistd::dup(dir.as_raw_fd())?;
    let mut d = nix::dir::Dir::from_fd(dup)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(out)
}

/// Where a link member points, or why it cannot be used.
fn link_target<R: Read>(
    entry: &tar::Entry<'_, R>,
    layer: &Path,
    raw: &Path,
    what: &str,
) -> Result<PathBuf> {
    entry
        .link_name()
        .map_err(|e| Error::io("read layer", layer, e))?
        .map(|t| t.into_owned())
        .ok_or_else(|| bad(layer, format!("{what} {raw:?} without a target")))
}

/// A member's path, relative and no deeper than Kiln handles.
fn member_path(raw: &Path, layer: &Path) -> Result<PathBuf> {
    let rel = clean(raw).ok_or_else(|| bad(layer, format!("member {raw:?} leaves the root")))?;
    if rel.components().count() > MAX_DEPTH + 1 {
        return Err(bad(
            layer,
            format!(
                "member {:?} is nested deeper than {MAX_DEPTH} levels, the most Kiln handles",
                raw
            ),
        ));
    }
    Ok(rel)
}

fn apply_whiteouts<R: Read>(mut archive: tar::Archive<R>, root: &Dir, layer: &Path) -> Result<()> {
    let entries = archive
        .entries()
        .map_err(|e| Error::io("read layer", layer, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("read layer", layer, e))?;
        let raw = entry
            .path()
            .map_err(|e| Error::io("read layer", layer, e))?
            .into_owned();
        let Some(name) = raw.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(hidden) = name.strip_prefix(".wh.") else {
            continue;
        };
        let rel = member_path(&raw, layer)?;
        let dir_rel = rel.parent().unwrap_or(Path::new(""));
        // Whiteouts in directories the layers below never made are no-ops.
        let dir = match dir_beneath(root, dir_rel) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
            Err(Errno::ELOOP | Errno::EXDEV) => {
                return Err(bad(
                    layer,
                    format!("whiteout in {} goes through a symlink", dir_rel.display()),
                ));
            }
            Err(e) => return Err(io_at("open", dir_rel, e)),
        };
        if hidden == ".wh..opq" {
            for child in list(&dir).map_err(|e| io_at("list", dir_rel, e))? {
                remove_at(&dir, &child, &dir_rel.join(&child), 0)?;
            }
        } else if !hidden.is_empty() && hidden != "." && hidden != ".." {
            remove_at(&dir, OsStr::new(hidden), &dir_rel.join(hidden), 0)?;
        }
    }
    Ok(())
}

/// Directory modes, applied once all layers are in: a read-only directory
/// must stay writable while later members go into it (the worker may not
/// be root).
#[derive(Default)]
struct DirModes(HashMap<PathBuf, u32>);

impl DirModes {
    fn merge(&mut self, other: DirModes) {
        self.0.extend(other.0);
    }

    /// Sets each mode through a handle of the directory itself, reached
    /// without any symlink: one that a later layer replaced with a symlink
    /// is skipped, not followed.
    fn apply(self, root: &Dir) {
        let mut dirs: Vec<_> = self.0.into_iter().collect();
        // Deepest first, so a parent becomes read-only last.
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, mode) in dirs {
            if let Ok(fd) = dir_beneath(root, &rel) {
                let _ = nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode));
            }
        }
    }
}

/// setuid and setgid bits are dropped: nothing in a build needs them, and
/// a privileged worker should not hold setuid-root files an image chose.
const MODE_MASK: u32 = 0o1777;

fn apply_layer<R: Read>(
    mut archive: tar::Archive<R>,
    root: &Dir,
    layer: &Path,
) -> Result<DirModes> {
    let mut modes = DirModes::default();
    let entries = archive
        .entries()
        .map_err(|e| Error::io("read layer", layer, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::io("read layer", layer, e))?;
        let raw = entry
            .path()
            .map_err(|e| Error::io("read layer", layer, e))?
            .into_owned();
        if raw
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".wh."))
        {
            continue;
        }
        let rel = member_path(&raw, layer)?;
        let mode = entry.header().mode().unwrap_or(0o644) & MODE_MASK;
        let kind = entry.header().entry_type();
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                modes.0.insert(rel, mode | 0o700);
            }
            continue;
        }
        let (parent, name) = parent_dirs(root, &rel, layer)?;
        let existing = lstat_at(&parent, &name).ok();
        if kind.is_dir() {
            match existing {
                Some(st) if file_type(&st) == SFlag::S_IFDIR => {}
                other => {
                    if other.is_some() {
                        remove_at(&parent, &name, &rel, 0)?;
                    }
                    mkdirat(
                        Some(parent.as_raw_fd()),
                        name.as_os_str(),
                        Mode::from_bits_truncate(0o755),
                    )
                    .map_err(|e| io_at("create", &rel, e))?;
                }
            }
            modes.0.insert(rel, mode);
            continue;
        }
        if existing.is_some() {
            remove_at(&parent, &name, &rel, 0)?;
        }
        if kind.is_file() || kind == tar::EntryType::Continuous {
            let fd = openat(
                Some(parent.as_raw_fd()),
                name.as_os_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| io_at("create", &rel, e))?;
            // SAFETY: openat returned a fresh descriptor that nothing else owns.
            let mut f = unsafe { File::from_raw_fd(fd) };
            std::io::copy(&mut entry, &mut f).map_err(|e| Error::io("write", &rel, e))?;
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io("chmod", &rel, e))?;
        } else if kind.is_symlink() {
            // The target is only ever read inside the sandbox, where `/` is
            // the image: absolute and `..` targets are fine as they are.
            let target = link_target(&entry, layer, &raw, "symlink")?;
            symlinkat(&target, Some(parent.as_raw_fd()), name.as_os_str())
                .map_err(|e| io_at("symlink", &rel, e))?;
        } else if kind.is_hard_link() {
            let target = link_target(&entry, layer, &raw, "hard link")?;
            let target_rel = clean(&target)
                .filter(|t| !t.as_os_str().is_empty())
                .ok_or_else(|| bad(layer, format!("hard link {raw:?} points outside the root")))?;
            let (source_dir, source_name) = parent_dirs(root, &target_rel, layer)?;
            // Without AT_SYMLINK_FOLLOW: a symlink is linked as itself.
            linkat(
                Some(source_dir.as_raw_fd()),
                source_name.as_os_str(),
                Some(parent.as_raw_fd()),
                name.as_os_str(),
                AtFlags::empty(),
            )
            .map_err(|e| io_at("hard link", &rel, e))?;
        } else {
            // Devices and FIFOs: the sandbox brings its own /dev, and an
            // unprivileged worker could not make them anyway.
            tracing::debug!(member = %raw.display(), kind = ?kind, "image member skipped");
        }
    }
    Ok(modes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar member with any name, also ones `tar::Builder` refuses.
    fn member(
        b: &mut tar::Builder<Vec<u8>>,
        name: &str,
        kind: tar::EntryType,
        link: &str,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_old();
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        if !link.is_empty() {
            let l = link.as_bytes();
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
        }
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn layer(members: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (n, k, l, d) in members {
            member(&mut b, n, *k, l, d);
        }
        b.into_inner().unwrap()
    }

    fn unpack(layers: &[Vec<u8>]) -> (tempfile::TempDir, Result<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let p = dir.path().join(format!("layer{i}.tar"));
            fs::write(&p, l).unwrap();
            paths.push(p);
        }
        let layers = as_layers(dir.path(), &paths);
        let r = unpack_cached(&dir.path().join("cache"), "key", &layers);
        (dir, r)
    }

    use tar::EntryType as T;

    fn as_layers(dir: &Path, paths: &[PathBuf]) -> Vec<Layer> {
        let d = Dir::open(dir, dir).unwrap();
        paths
            .iter()
            .map(|p| Layer {
                dir: d.clone(),
                rel: p.strip_prefix(dir).unwrap().to_path_buf(),
            })
            .collect()
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let (_d, root) = unpack(&[
            layer(&[
                ("etc/", T::Directory, "", b""),
                ("etc/gone", T::Regular, "", b"1"),
                ("etc/kept", T::Regular, "", b"old"),
                ("opq/old", T::Regular, "", b"x"),
                ("bin/sh", T::Regular, "", b"#!"),
                ("bin/ash", T::Link, "bin/sh", b""),
                ("lib64", T::Symlink, "/lib", b""),
            ]),
            layer(&[
                ("etc/.wh.gone", T::Regular, "", b""),
                ("etc/kept", T::Regular, "", b"new"),
                ("opq/.wh..wh..opq", T::Regular, "", b""),
                ("opq/new", T::Regular, "", b"y"),
                ("./dev/null", T::Char, "", b""),
            ]),
        ]);
        let root = root.unwrap();
        assert!(!root.join("etc/gone").exists());
        assert_eq!(fs::read(root.join("etc/kept")).unwrap(), b"new");
        assert!(!root.join("opq/old").exists());
        assert_eq!(fs::read(root.join("opq/new")).unwrap(), b"y");
        assert_eq!(
            fs::read_link(root.join("lib64")).unwrap(),
            Path::new("/lib")
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(root.join("bin/ash")).unwrap().ino(),
            fs::metadata(root.join("bin/sh")).unwrap().ino()
        );
        assert!(!root.join("dev/null").exists());
    }

    #[test]
    fn members_cannot_leave_the_root() {
        for (i, bad_layer) in [
            layer(&[("../escape", T::Regular, "", b"x")]),
            layer(&[("a/../../escape", T::Regular, "", b"x")]),
            layer(&[
                ("link", T::Symlink, "/tmp", b""),
                ("link/escape", T::Regular, "", b"x"),
            ]),
            layer(&[("hard", T::Link, "../../etc/passwd", b"")]),
            // A whiteout through a symlink a lower layer made.
            layer(&[("link", T::Symlink, "..", b"")]),
        ]
        .into_iter()
        .enumerate()
        {
            let mut layers = vec![bad_layer];
            if i == 4 {
                layers.push(layer(&[("link/.wh.escape", T::Regular, "", b"")]));
            }
            let (d, r) = unpack(&layers);
            let err = r
                .expect_err(&format!("escaping layer {i} refused"))
                .to_string();
            assert!(err.contains("root") || err.contains("symlink"), "{err}");
            assert!(!d.path().join("escape").exists());
            assert!(
                !d.path().join("cache/key").exists(),
                "nothing half-done is kept"
            );
        }
    }

    #[test]
    fn directory_modes_never_follow_a_symlink_a_later_layer_made() {
        let host = tempfile::tempdir().unwrap();
        let victim = host.path().join("victim");
        fs::create_dir(&victim).unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o700)).unwrap();
        let rel = victim.strip_prefix("/").unwrap().to_str().unwrap();
        let mut first = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(T::Directory);
        h.set_mode(0o777);
        h.set_size(0);
        first
            .append_data(&mut h, format!("evil/{rel}/"), std::io::empty())
            .unwrap();
        let (_d, root) = unpack(&[
            first.into_inner().unwrap(),
            layer(&[("evil", T::Symlink, "/", b"")]),
        ]);
        let root = root.unwrap();
        assert_eq!(fs::read_link(root.join("evil")).unwrap(), Path::new("/"));
        let mode = fs::metadata(&victim).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "the host directory is untouched");
    }

    #[test]
    fn tarball_members_are_read_only_as_regular_files_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let host_tar = dir.path().join("host.tar");
        fs::write(
            &host_tar,
            layer(&[("host-marker", T::Regular, "", b"host")]),
        )
        .unwrap();
        let mut b = tar::Builder::new(Vec::new());
        member(
            &mut b,
            "l/layer.tar",
            T::Symlink,
            host_tar.to_str().unwrap(),
            b"",
        );
        let manifest = br#"[{"Layers":["l/layer.tar"]}]"#;
        member(&mut b, "manifest.json", T::Regular, "", manifest);
        let tarball = dir.path().join("image.tar");
        fs::write(&tarball, b.into_inner().unwrap()).unwrap();
        let cache = dir.path().join("cache");
        let err = prepare("x", &ImageSource::Tarball(tarball), &cache).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("l/layer.tar") && msg.contains("not in the image"),
            "{msg}"
        );
        assert!(!cache.join("host-marker").exists());
    }

    #[test]
    fn unpacked_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.tar");
        fs::write(&p, layer(&[("f", T::Regular, "", b"1")])).unwrap();
        let cache = dir.path().join("cache");
        let layers = as_layers(dir.path(), std::slice::from_ref(&p));
        let a = unpack_cached(&cache, "k", &layers).unwrap();
        fs::remove_file(&p).unwrap();
        let b = unpack_cached(&cache, "k", &layers).unwrap();
        assert_eq!(a, b);
        assert_eq!(fs::read(b.join("f")).unwrap(), b"1");
    }
}
