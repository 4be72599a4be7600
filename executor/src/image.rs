//! Container images as base root filesystems: an OCI image layout directory
//! or an OCI / `docker save` tarball, unpacked once per worker into a plain
//! directory that actions then use as a read-only overlay lower layer.
//!
//! Layers are applied in order with the OCI whiteout rules (`.wh.NAME`
//! deletes NAME from the layers below, `.wh..wh..opq` empties its directory
//! of what the layers below put there). Every path is resolved inside the
//! root without following symlinks, so no entry can write outside it: a
//! layer is untrusted input.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

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
            let (key, layers) = oci_layers(name, dir)?;
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
                apply_layer(tar::Archive::new(decompress(f, file)?), &scratch, file)?;
                let layers = if scratch.join("manifest.json").is_file() {
                    docker_layers(&scratch)?
                } else if scratch.join("index.json").is_file() {
                    oci_layers(name, &scratch)?.1
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

/// Applies `layers` (paths of layer blobs, bottom first) into
/// `cache/<key>/rootfs` unless that is already done.
fn unpack_cached(cache: &Path, key: &str, layers: &[PathBuf]) -> Result<PathBuf> {
    let dest = cache.join(key);
    if dest.join(".done").exists() {
        return Ok(dest.join("rootfs"));
    }
    let tmp = cache.join(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let rootfs = tmp.join("rootfs");
    fs::create_dir_all(&rootfs).map_err(|e| Error::io("create", &rootfs, e))?;
    let result = (|| {
        let mut dirs = DirModes::default();
        for layer in layers {
            // Whiteouts hide what the layers below put there, never what
            // this layer adds: remove first, then extract.
            let open = || -> Result<_> {
                let f = File::open(layer).map_err(|e| Error::io("open layer", layer, e))?;
                Ok(tar::Archive::new(decompress(f, layer)?))
            };
            apply_whiteouts(open()?, &rootfs, layer)?;
            dirs.merge(apply_layer(open()?, &rootfs, layer)?);
        }
        dirs.apply(&rootfs);
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
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io("read", path, e))?;
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
fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, hash) = digest
        .split_once(':')
        .ok_or_else(|| bad(layout, format!("malformed digest {digest:?}")))?;
    if alg != "sha256" || hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(
            layout,
            format!("unsupported digest {digest:?} (sha256 only)"),
        ));
    }
    let path = layout.join("blobs").join(alg).join(hash);
    let actual = sha256_file(&path)?;
    if actual != hash.to_ascii_lowercase() {
        return Err(bad(
            layout,
            format!("blob {digest} is corrupt (its content hashes to {actual})"),
        ));
    }
    Ok(path)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, layout: &Path) -> Result<T> {
    let bytes = fs::read(path).map_err(|e| Error::io("read", path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(layout, format!("{}: {e}", path.display())))
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
fn oci_layers(name: &str, layout: &Path) -> Result<(String, Vec<PathBuf>)> {
    let index: Index = read_json(&layout.join("index.json"), layout)?;
    let picked = pick(name, layout, &index.manifests)?;
    let (mut media_type, mut digest) = (picked.media_type.clone(), picked.digest.clone());
    // An index may point to a further index (a multi-platform image).
    for _ in 0..4 {
        if !media_type.ends_with("image.index.v1+json")
            && !media_type.ends_with("manifest.list.v2+json")
        {
            break;
        }
        let nested: Index = read_json(&blob_path(layout, &digest)?, layout)?;
        let picked = pick(name, layout, &nested.manifests)?;
        (media_type, digest) = (picked.media_type.clone(), picked.digest.clone());
    }
    let manifest: Manifest = read_json(&blob_path(layout, &digest)?, layout)?;
    let layers = manifest
        .layers
        .iter()
        .map(|l| blob_path(layout, &l.digest))
        .collect::<Result<Vec<_>>>()?;
    let key = digest.replace(':', "-");
    Ok((key, layers))
}

/// The layer files of an unpacked `docker save` tarball, bottom first.
fn docker_layers(dir: &Path) -> Result<Vec<PathBuf>> {
    let manifests: Vec<DockerManifest> = read_json(&dir.join("manifest.json"), dir)?;
    let [m] = manifests.as_slice() else {
        return Err(bad(
            dir,
            format!(
                "manifest.json lists {} images; save exactly one",
                manifests.len()
            ),
        ));
    };
    m.layers
        .iter()
        .map(|l| {
            let rel = clean(Path::new(l)).ok_or_else(|| bad(dir, format!("layer path {l:?}")))?;
            Ok(dir.join(rel))
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

/// Makes sure every directory leading to `rel` exists inside `root` as a
/// real directory (a file in the way is replaced, as a later layer's
/// directory replaces it) and refuses to go through a symlink, which could
/// point anywhere on the worker.
fn parent_dirs(root: &Path, rel: &Path, layer: &Path) -> Result<PathBuf> {
    let mut at = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            at.push(c);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(bad(
                        layer,
                        format!(
                            "member {} goes through the symlink {}",
                            rel.display(),
                            at.strip_prefix(root).unwrap_or(&at).display()
                        ),
                    ));
                }
                Ok(_) => {
                    fs::remove_file(&at).map_err(|e| Error::io("replace", &at, e))?;
                    fs::create_dir(&at).map_err(|e| Error::io("create", &at, e))?;
                }
                Err(_) => fs::create_dir(&at).map_err(|e| Error::io("create", &at, e))?,
            }
        }
    }
    Ok(root.join(rel))
}

/// `rel` inside `root` if every component of it is a real directory;
/// `None` if one is missing or not a directory; an error if one is a
/// symlink (which could point anywhere on the worker).
fn existing_dir(root: &Path, rel: &Path, layer: &Path) -> Result<Option<PathBuf>> {
    let mut at = root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(bad(
                    layer,
                    format!("whiteout in {} goes through a symlink", rel.display()),
                ));
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(at))
}

fn remove_any(path: &Path) -> Result<()> {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => return Ok(()),
    };
    r.map_err(|e| Error::io("remove", path, e))
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

fn apply_whiteouts<R: Read>(mut archive: tar::Archive<R>, root: &Path, layer: &Path) -> Result<()> {
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
        let rel =
            clean(&raw).ok_or_else(|| bad(layer, format!("member {raw:?} leaves the root")))?;
        let dir_rel = rel.parent().unwrap_or(Path::new(""));
        // Whiteouts in directories the layers below never made are no-ops.
        let Some(dir) = existing_dir(root, dir_rel, layer)? else {
            continue;
        };
        if hidden == ".wh..opq" {
            if let Ok(list) = fs::read_dir(&dir) {
                for e in list.flatten() {
                    remove_any(&e.path())?;
                }
            }
        } else if !hidden.is_empty() && hidden != "." && hidden != ".." {
            remove_any(&dir.join(hidden))?;
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

    fn apply(self, root: &Path) {
        let mut dirs: Vec<_> = self.0.into_iter().collect();
        // Deepest first, so a parent becomes read-only last.
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, mode) in dirs {
            let path = root.join(rel);
            if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                let _ = fs::set_permissions(&path, fs::Permissions::from_mode(mode));
            }
        }
    }
}

/// setuid and setgid bits are dropped: nothing in a build needs them, and
/// a privileged worker should not hold setuid-root files an image chose.
const MODE_MASK: u32 = 0o1777;

fn apply_layer<R: Read>(
    mut archive: tar::Archive<R>,
    root: &Path,
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
        let rel =
            clean(&raw).ok_or_else(|| bad(layer, format!("member {raw:?} leaves the root")))?;
        let mode = entry.header().mode().unwrap_or(0o644) & MODE_MASK;
        let kind = entry.header().entry_type();
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                modes.0.insert(rel, mode | 0o700);
            }
            continue;
        }
        let path = parent_dirs(root, &rel, layer)?;
        let existing = fs::symlink_metadata(&path).ok();
        if kind.is_dir() {
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    remove_any(&path)?;
                    fs::create_dir(&path).map_err(|e| Error::io("create", &path, e))?;
                }
                None => fs::create_dir(&path).map_err(|e| Error::io("create", &path, e))?,
            }
            modes.0.insert(rel, mode);
            continue;
        }
        if existing.is_some() {
            remove_any(&path)?;
        }
        if kind.is_file() || kind == tar::EntryType::Continuous {
            let mut f = File::create(&path).map_err(|e| Error::io("create", &path, e))?;
            std::io::copy(&mut entry, &mut f).map_err(|e| Error::io("write", &path, e))?;
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io("chmod", &path, e))?;
        } else if kind.is_symlink() {
            // The target is only ever read inside the sandbox, where `/` is
            // the image: absolute and `..` targets are fine as they are.
            let target = link_target(&entry, layer, &raw, "symlink")?;
            std::os::unix::fs::symlink(&target, &path)
                .map_err(|e| Error::io("symlink", &path, e))?;
        } else if kind.is_hard_link() {
            let target = link_target(&entry, layer, &raw, "hard link")?;
            let target_rel = clean(&target)
                .filter(|t| !t.as_os_str().is_empty())
                .ok_or_else(|| bad(layer, format!("hard link {raw:?} points outside the root")))?;
            let source = parent_dirs(root, &target_rel, layer)?;
            fs::hard_link(&source, &path).map_err(|e| Error::io("hard link", &path, e))?;
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
        let r = unpack_cached(&dir.path().join("cache"), "key", &paths);
        (dir, r)
    }

    use tar::EntryType as T;

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
    fn unpacked_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.tar");
        fs::write(&p, layer(&[("f", T::Regular, "", b"1")])).unwrap();
        let cache = dir.path().join("cache");
        let a = unpack_cached(&cache, "k", std::slice::from_ref(&p)).unwrap();
        fs::remove_file(&p).unwrap();
        let b = unpack_cached(&cache, "k", &[p]).unwrap();
        assert_eq!(a, b);
        assert_eq!(fs::read(b.join("f")).unwrap(), b"1");
    }
}
