//! Container images as base root filesystems (KILN-CONTRACT §6): a worker
//! configured with an OCI image layout directory, an OCI layout tarball or
//! a `docker save` tarball runs `container-image=<name>` actions on the
//! unpacked image, with the action's input root laid over it at `/`.
//! Layers apply in order with their whiteouts, the image is unpacked once
//! per worker and no action can change it, and a layer member that would
//! land outside the root is refused.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use kiln_proto::reapi::{Directory, FileNode};
use sha2::{Digest as _, Sha256};
use tonic::Code;

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Appends a plain 0644 file to a layer.
fn add_file<W: std::io::Write>(b: &mut tar::Builder<W>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, path, data).unwrap();
}

/// Layer 1: the busybox fixture plus files the next layer changes.
fn base_layer(busybox: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", busybox).unwrap();
    let mut add = |path: &str, data: &[u8]| add_file(&mut b, path, data);
    add("etc/removed", b"gone soon\n");
    add("etc/kept", b"v1\n");
    add("opaque/old", b"hidden by the next layer\n");
    add("opaque/sub/old", b"hidden too\n");
    b.into_inner().unwrap()
}

/// Layer 2, gzipped: a whiteout, an opaque directory, a changed file.
fn top_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| add_file(&mut b, path, data);
    add("etc/.wh.removed", b"");
    add("etc/kept", b"v2\n");
    add("opaque/.wh..wh..opq", b"");
    add("opaque/new", b"from layer 2\n");
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// Writes an OCI image layout with these layers (bottom first).
fn oci_layout(dir: &Path, layers: &[(Vec<u8>, &str)]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let h = sha256(data);
        std::fs::write(blobs.join(&h), data).unwrap();
        (format!("sha256:{h}"), data.len())
    };
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let (config_digest, config_size) = put(config);
    let layer_descs: Vec<String> = layers
        .iter()
        .map(|(data, media_type)| {
            let (d, n) = put(data);
            format!(r#"{{"mediaType":"{media_type}","digest":"{d}","size":{n}}}"#)
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_size}}},"layers":[{}]}}"#,
        layer_descs.join(",")
    );
    let (m_digest, m_size) = put(manifest.as_bytes());
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{m_digest}","size":{m_size},"annotations":{{"org.opencontainers.image.ref.name":"test"}}}}]}}"#
        ),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A tarball of a directory's contents.
fn tar_of(dir: &Path, dest: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(dest).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// `docker save` output: manifest.json naming layer tarballs.
fn docker_save(dest: &Path, layers: &[Vec<u8>]) {
    let mut b = tar::Builder::new(std::fs::File::create(dest).unwrap());
    let mut add = |path: &str, data: &[u8]| add_file(&mut b, path, data);
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        add(&name, l);
        names.push(format!("\"{name}\""));
    }
    add("config.json", b"{}");
    add(
        "manifest.json",
        format!(
            r#"[{{"Config":"config.json","RepoTags":["kiln/test:1"],"Layers":[{}]}}]"#,
            names.join(",")
        )
        .as_bytes(),
    );
    b.finish().unwrap();
}

/// A layer with a member named `../escape`, which `tar::Builder` itself
/// would refuse to write.
fn escaping_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_old();
    let name = b"../escape";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_size(1);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    b.into_inner().unwrap()
}

const SCRIPT: &str = "cat /etc/kept; ls /opaque; test -e /etc/removed || echo removed-is-gone; \
     cat /from-input; echo scribble > /etc/kept; rm -f /bin/ls; echo done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_layouts_and_tarballs_are_unpacked_once_and_never_changed() {
    let Some(busybox) = busybox_root() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let layers = vec![base_layer(&busybox), top_layer()];

    let layout = images.join("layout");
    oci_layout(
        &layout,
        &[
            (layers[0].clone(), "application/vnd.oci.image.layer.v1.tar"),
            (
                layers[1].clone(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            ),
        ],
    );
    let oci_tar = images.join("oci.tar");
    tar_of(&layout, &oci_tar);
    let saved = images.join("saved.tar");
    docker_save(&saved, &layers);
    let evil = images.join("evil");
    oci_layout(
        &evil,
        &[(escaping_layer(), "application/vnd.oci.image.layer.v1.tar")],
    );

    let arg = |name: &str, p: &PathBuf| format!("{name}={}", p.display());
    let image_args = [
        arg("layout", &layout),
        arg("oci-tar", &oci_tar),
        arg("docker-save", &saved),
        arg("evil", &evil),
        arg("plain", &busybox),
    ];
    let mut args = vec!["--workers", "1"];
    for a in &image_args {
        args.extend(["--image", a.as_str()]);
    }
    let server = serve(tmp.path(), &args);
    let ch = channel(&server.url()).await;

    // The input root: one file, laid over the image at `/`.
    let data = b"from the input root\n".to_vec();
    let d = kiln_proto::digest::of_bytes(&data);
    let root = Directory {
        files: vec![FileNode {
            name: "from-input".into(),
            digest: Some(d.clone()),
            is_executable: false,
            node_properties: None,
        }],
        ..Default::default()
    };
    let (root_digest, root_bytes) = directory(&root);
    upload(&ch, vec![(d, data), (root_digest.clone(), root_bytes)]).await;

    for image in ["layout", "oci-tar", "docker-save"] {
        // Twice: the second run sees the image as it was, not as the
        // first one left it.
        for round in 0..2 {
            let mut spec = ActionSpec::shell(root_digest.clone(), SCRIPT);
            spec.platform.push(("container-image".into(), image.into()));
            spec.salt = format!("{image}-{round}").into_bytes();
            let (_, resp) = run(&ch, &spec.upload(&ch).await).await;
            let status = resp.status.clone().unwrap_or_default();
            assert_eq!(status.code, 0, "{image}: {status:?}");
            let result = resp.result.unwrap();
            let stdout = read_blob(&ch, result.stdout_digest.as_ref().unwrap()).await;
            let stderr = read_blob(&ch, result.stderr_digest.as_ref().unwrap()).await;
            assert_eq!(result.exit_code, 0, "{image}: {stderr:?}");
            assert_eq!(
                String::from_utf8_lossy(&stdout),
                "v2\nnew\nremoved-is-gone\nfrom the input root\ndone\n",
                "{image} round {round}"
            );
        }
    }

    // One unpacked copy per image source, kept in the worker's data
    // directory, as the layers made it.
    let unpacked = tmp.path().join("data/worker-0/images");
    let dirs: Vec<PathBuf> = std::fs::read_dir(&unpacked)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join(".done").exists())
        .collect();
    assert_eq!(dirs.len(), 3, "{dirs:?}");
    for d in &dirs {
        assert_eq!(
            std::fs::read_to_string(d.join("rootfs/etc/kept")).unwrap(),
            "v2\n"
        );
        assert!(d.join("rootfs/bin/ls").exists() || d.join("rootfs/bin/ls").is_symlink());
    }

    // A plain rootfs directory still works as before.
    let mut spec = ActionSpec::shell(root_digest.clone(), "cat /from-input");
    spec.platform
        .push(("container-image".into(), "plain".into()));
    let (_, resp) = run(&ch, &spec.upload(&ch).await).await;
    assert_eq!(resp.result.unwrap().exit_code, 0);

    // An image whose layer reaches outside the root is refused, and
    // nothing lands outside the worker's image cache.
    let mut spec = ActionSpec::shell(root_digest.clone(), "true");
    spec.platform
        .push(("container-image".into(), "evil".into()));
    let (_, resp) = run(&ch, &spec.upload(&ch).await).await;
    let status = resp.status.unwrap_or_default();
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    assert!(status.message.contains("leaves the root"), "{status:?}");
    assert!(!unpacked.join("escape").exists());
    assert!(!tmp.path().join("data/worker-0/escape").exists());
}

/// An empty member of `kind` (a directory, or a link to `link`).
fn raw_member(
    b: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    link: &str,
    mode: u32,
) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(0);
    if link.is_empty() {
        b.append_data(&mut h, name, std::io::empty()).unwrap();
    } else {
        b.append_link(&mut h, name, link).unwrap();
    }
}

/// Finding 5: image layers reach the host. A docker-save tarball whose
/// manifest names a layer that is a symlink member made the worker unpack
/// whatever host tar it pointed to; a layer that replaces a directory with
/// a symlink to `/` made the worker apply the image's directory modes to
/// host directories. Every image file is now reached through directory
/// handles, members only as regular files inside the tarball.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_layers_never_reach_the_host() {
    let Some(busybox) = busybox_root() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();

    // A host tar the worker must never unpack, named by a symlink member.
    let host_tar = tmp.path().join("host.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&host_tar).unwrap());
        add_file(&mut b, "host-marker", b"read from the host\n");
        b.finish().unwrap();
    }
    let pointing = images.join("pointing.tar");
    {
        let mut b = tar::Builder::new(Vec::new());
        raw_member(
            &mut b,
            "layer0/layer.tar",
            tar::EntryType::Symlink,
            host_tar.to_str().unwrap(),
            0o777,
        );
        add_file(&mut b, "config.json", b"{}");
        add_file(
            &mut b,
            "manifest.json",
            br#"[{"Config":"config.json","RepoTags":["kiln/evil:1"],"Layers":["layer0/layer.tar"]}]"#,
        );
        std::fs::write(&pointing, b.into_inner().unwrap()).unwrap();
    }

    // A host directory, private, that a layer's directory mode must not reach.
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o700)).unwrap();
    let victim_rel = victim.strip_prefix("/").unwrap().to_str().unwrap();
    let chmodding = images.join("chmodding.tar");
    {
        let mut modes = tar::Builder::new(Vec::new());
        raw_member(
            &mut modes,
            &format!("evil/{victim_rel}/"),
            tar::EntryType::Directory,
            "",
            0o777,
        );
        let mut swap = tar::Builder::new(Vec::new());
        raw_member(&mut swap, "evil", tar::EntryType::Symlink, "/", 0o777);
        docker_save(
            &chmodding,
            &[
                base_layer(&busybox),
                modes.into_inner().unwrap(),
                swap.into_inner().unwrap(),
            ],
        );
    }

    let server = serve(
        tmp.path(),
        &[
            "--workers",
            "1",
            "--image",
            &format!("pointing={}", pointing.display()),
            "--image",
            &format!("chmodding={}", chmodding.display()),
        ],
    );
    let ch = channel(&server.url()).await;
    let empty = kiln_proto::digest::empty();

    let mut spec = ActionSpec::shell(empty.clone(), "cat /host-marker");
    spec.platform
        .push(("container-image".into(), "pointing".into()));
    let (_, resp) = run(&ch, &spec.upload(&ch).await).await;
    let status = resp.status.unwrap_or_default();
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    assert!(
        status.message.contains("layer0/layer.tar"),
        "names the layer: {}",
        status.message
    );

    let mut spec = ActionSpec::shell(empty, "ls -ld /evil");
    spec.platform
        .push(("container-image".into(), "chmodding".into()));
    let (_, resp) = run(&ch, &spec.upload(&ch).await).await;
    assert_eq!(resp.status.unwrap_or_default().code, 0);
    assert_eq!(resp.result.unwrap().exit_code, 0);
    let mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "the host directory's mode is untouched");
}
