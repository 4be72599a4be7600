//! The real `kiln serve` binary: killed with SIGKILL in the middle of
//! writes and restarted on the same data directory, shut down with
//! SIGTERM, refused a port in use; and the `kiln cas` commands against it.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kiln_server::Digest;
use kiln_server::client::CasClient;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

struct Server {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Server {
    fn start(data_dir: &Path, log: &Path) -> Server {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = Command::new(KILN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn kiln serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("kiln serve printed its address");
        let addr = line
            .trim()
            .strip_prefix("kiln: listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected line {line:?}; log: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
            .to_string();
        Server {
            child,
            url: format!("http://{addr}"),
            log: log.to_path_buf(),
        }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling the child we spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_writes_loses_no_committed_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let log = tmp.path().join("server.log");
    let server = Server::start(&data_dir, &log);
    let client = CasClient::connect(&server.url, "").await.unwrap();

    // Committed before the storm.
    let committed: Arc<Mutex<Vec<(Digest, Bytes)>>> = Arc::default();
    let mut first = Vec::new();
    for i in 0..200 {
        let b = Bytes::from(pseudo_random(i, 3000 + i as usize));
        first.push((Digest::of(&b), b));
    }
    client.batch_update(first.clone()).await.unwrap();
    committed.lock().unwrap().extend(first);
    for i in 0..3 {
        let b = Bytes::from(pseudo_random(1000 + i, (2 << 20) + i as usize));
        let d = Digest::of(&b);
        client.write(d, b.clone()).await.unwrap();
        committed.lock().unwrap().push((d, b));
    }

    // Writers that keep going until the server dies. Only what the server
    // acknowledged counts as committed.
    let partial = Bytes::from(pseudo_random(7, 64 << 20));
    let partial_d = Digest::of(&partial);
    let mut tasks = Vec::new();
    {
        let client = client.clone();
        let partial = partial.clone();
        tasks.push(tokio::spawn(async move {
            // A big upload fed slowly, so the kill lands in the middle.
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let name = format!(
                "uploads/{}/blobs/{}/{}",
                uuid::Uuid::new_v4(),
                partial_d.hex(),
                partial_d.size()
            );
            let feeder = tokio::spawn(async move {
                for (k, chunk) in partial.chunks(64 << 10).enumerate() {
                    let req = kiln_proto::bytestream::WriteRequest {
                        resource_name: if k == 0 { name.clone() } else { String::new() },
                        write_offset: (k * (64 << 10)) as i64,
                        finish_write: (k + 1) * (64 << 10) >= partial.len(),
                        data: chunk.to_vec(),
                    };
                    if tx.send(req).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            let mut bs =
                kiln_proto::bytestream::byte_stream_client::ByteStreamClient::new(client.channel());
            let r = bs
                .write(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            feeder.abort();
            assert!(
                r.is_err(),
                "the slow upload cannot have finished before the kill"
            );
        }));
    }
    for w in 0..2u64 {
        let client = client.clone();
        let committed = committed.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0u64.. {
                let batch: Vec<(Digest, Bytes)> = (0..100)
                    .map(|i| {
                        let b = Bytes::from(pseudo_random(
                            1_000_000 * (w + 1) + round * 1000 + i,
                            4096,
                        ));
                        (Digest::of(&b), b)
                    })
                    .collect();
                if client.batch_update(batch.clone()).await.is_err() {
                    return;
                }
                committed.lock().unwrap().extend(batch);
            }
        }));
    }
    {
        let client = client.clone();
        let committed = committed.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let b = Bytes::from(pseudo_random(5_000_000 + i, (1 << 20) + 12345));
                let d = Digest::of(&b);
                if client.write(d, b.clone()).await.is_err() {
                    return;
                }
                committed.lock().unwrap().push((d, b));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let committed = committed.lock().unwrap().clone();
    assert!(
        committed.len() > 400,
        "writers made progress before the kill: {}",
        committed.len()
    );

    // Restart on the same directory.
    let server = Server::start(&data_dir, &log);
    let log = server.log();
    assert!(log.contains("did not shut down cleanly"), "{log}");
    // What recovery found, for whoever reads the test output.
    for line in log.lines().filter(|l| {
        l.contains("truncating") || l.contains("unfinished") || l.contains("verification")
    }) {
        eprintln!("restart: {line}");
    }
    eprintln!("{} blobs acknowledged before the kill", committed.len());
    let client = CasClient::connect(&server.url, "").await.unwrap();
    let digests: Vec<Digest> = committed.iter().map(|(d, _)| *d).collect();
    assert_eq!(
        client.find_missing(&digests).await.unwrap(),
        vec![],
        "every acknowledged blob survived"
    );
    assert_eq!(
        client.find_missing(&[partial_d]).await.unwrap(),
        vec![partial_d]
    );
    // Everything reads back intact (the client checks hashes too).
    let small: Vec<&(Digest, Bytes)> = committed
        .iter()
        .filter(|(d, _)| d.size() < 100_000)
        .collect();
    for chunk in small.chunks(500) {
        let ds: Vec<Digest> = chunk.iter().map(|(d, _)| *d).collect();
        let got = client.batch_read(&ds).await.unwrap();
        for ((_, want), (_, have)) in chunk.iter().zip(got) {
            assert_eq!(want, &have);
        }
    }
    for (d, want) in committed.iter().filter(|(d, _)| d.size() >= 100_000) {
        assert_eq!(&client.read(*d).await.unwrap(), want);
    }
    assert_eq!(
        std::fs::read_dir(data_dir.join("tmp")).unwrap().count(),
        0,
        "no partial upload left behind"
    );
    assert!(server.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let log = tmp.path().join("server.log");
    let server = Server::start(&data_dir, &log);
    let client = CasClient::connect(&server.url, "").await.unwrap();
    let d = Digest::of(b"kept");
    client
        .batch_update(vec![(d, Bytes::from_static(b"kept"))])
        .await
        .unwrap();
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        !data_dir.join("dirty").exists(),
        "clean shutdown removes the marker"
    );
    let server = Server::start(&data_dir, &log);
    assert!(!server.log().contains("did not shut down cleanly"));
    let client = CasClient::connect(&server.url, "").await.unwrap();
    assert!(client.find_missing(&[d]).await.unwrap().is_empty());
    assert!(server.terminate().success());
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(KILN)
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr) && err.contains("in use"), "{err}");
}

#[test]
fn bad_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("kiln.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\n[storage]\nmax_size = 5\n").unwrap();
    let out = Command::new(KILN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_size") && err.contains("kiln.toml"),
        "{err}"
    );
}

fn kiln(args: &[&str]) -> String {
    let out = Command::new(KILN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kiln {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every entry under `root`: relative path → (kind, content or target, mode).
fn snapshot(root: &Path) -> Vec<(String, String, Vec<u8>, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.push((
                    rel,
                    "link".into(),
                    std::fs::read_link(&p)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                        .into_bytes(),
                    0,
                ));
            } else if meta.is_dir() {
                out.push((rel, "dir".into(), vec![], 0));
                stack.push(p);
            } else {
                let exec = meta.permissions().mode() & 0o111 != 0;
                out.push((rel, "file".into(), std::fs::read(&p).unwrap(), exec as u32));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn kiln_cas_upload_download_cat() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("server.log");
    let server = Server::start(&tmp.path().join("data"), &log);
    let src = tmp.path().join("rootfs");
    std::fs::create_dir_all(src.join("usr/bin")).unwrap();
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::create_dir_all(src.join("lib")).unwrap();
    std::fs::write(src.join("usr/bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        src.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(src.join("usr/readme"), b"plain").unwrap();
    std::fs::write(src.join("lib/same-a"), b"duplicate content").unwrap();
    std::fs::write(src.join("lib/same-b"), b"duplicate content").unwrap();
    let big = pseudo_random(9, 3 << 20);
    std::fs::write(src.join("lib/big.so"), &big).unwrap();
    std::os::unix::fs::symlink("/lib/big.so", src.join("lib64")).unwrap();
    std::os::unix::fs::symlink("../readme", src.join("usr/bin/rel")).unwrap();

    let root = kiln(&[
        "cas",
        "--server",
        &server.url,
        "upload-dir",
        src.to_str().unwrap(),
    ]);
    let root = root.trim();
    assert!(root.parse::<Digest>().is_ok(), "{root}");
    // Uploading again gives the same digest.
    assert_eq!(
        kiln(&[
            "cas",
            "--server",
            &server.url,
            "upload-dir",
            src.to_str().unwrap()
        ])
        .trim(),
        root
    );
    let dest = tmp.path().join("copy");
    kiln(&[
        "cas",
        "--server",
        &server.url,
        "download-tree",
        root,
        dest.to_str().unwrap(),
    ]);
    assert_eq!(snapshot(&src), snapshot(&dest));

    let big_d = Digest::of(&big).to_string();
    let out = Command::new(KILN)
        .args(["cas", "--server", &server.url, "cat", &big_d])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, big);
    let f = tmp.path().join("note.txt");
    std::fs::write(&f, b"a note").unwrap();
    let d = kiln(&["cas", "--server", &server.url, "put", f.to_str().unwrap()]);
    assert_eq!(
        kiln(&["cas", "--server", &server.url, "cat", d.trim()]),
        "a note"
    );
    // A digest that is not there is a clear error.
    let absent = Digest::of(b"absent").to_string();
    let out = Command::new(KILN)
        .args(["cas", "--server", &server.url, "cat", &absent])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&absent));
    assert!(server.terminate().success());
}
