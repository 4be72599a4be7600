//! The operations journal: what the server must remember across a restart
//! so a client's WaitExecution still gets an answer (KILN-CONTRACT §2).
//!
//! An append-only file of length-delimited records (queued, started,
//! completed, deleted), written by a background thread in the order the
//! state changed. On start the journal is replayed, then rewritten with only
//! what is still worth keeping. A torn last record (a crash mid-write) is
//! ignored: it can only be the newest change, which the client had not been
//! told about yet.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use prost::Message;

use crate::error::{Error, Result};

/// An operation as it was queued.
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueuedRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub instance: String,
    /// Serialized build.bazel.remote.execution.v2.Digest of the Action.
    #[prost(bytes = "vec", tag = "3")]
    pub action_digest: Vec<u8>,
    /// Serialized Action and Command.
    #[prost(bytes = "vec", tag = "4")]
    pub action: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    pub command: Vec<u8>,
    #[prost(int32, tag = "6")]
    pub priority: i32,
    #[prost(uint64, tag = "7")]
    pub seq: u64,
    #[prost(int64, tag = "8")]
    pub queued_at_unix_ns: i64,
    #[prost(uint64, tag = "9")]
    pub timeout_ms: u64,
    #[prost(bool, tag = "10")]
    pub do_not_cache: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StartedRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub worker: String,
    #[prost(uint32, tag = "3")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CompletedRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    /// Serialized google.longrunning.Operation, done.
    #[prost(bytes = "vec", tag = "2")]
    pub operation: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub completed_at_unix_ns: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeletedRecord {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// The platform of a worker that joined, so that after a restart its
/// actions are not rejected before it reconnects.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerRecord {
    #[prost(string, tag = "1")]
    pub os_family: String,
    #[prost(string, repeated, tag = "2")]
    pub isas: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    pub images: Vec<String>,
    #[prost(bool, tag = "4")]
    pub network_allowed: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    #[prost(oneof = "record::Kind", tags = "1, 2, 3, 4, 5")]
    pub kind: Option<record::Kind>,
}

pub mod record {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Queued(super::QueuedRecord),
        #[prost(message, tag = "2")]
        Started(super::StartedRecord),
        #[prost(message, tag = "3")]
        Completed(super::CompletedRecord),
        #[prost(message, tag = "4")]
        Deleted(super::DeletedRecord),
        #[prost(message, tag = "5")]
        Worker(super::WorkerRecord),
    }
}

/// A record for the writer, and who waits for it to be written.
type Entry = (Record, Option<mpsc::SyncSender<()>>);

/// Appends records from any thread; a background thread writes them.
#[derive(Debug, Clone)]
pub struct Journal {
    tx: Option<mpsc::Sender<Entry>>,
}

impl Journal {
    /// A journal that remembers nothing (for an in-memory server).
    pub fn disabled() -> Self {
        Journal { tx: None }
    }

    /// Replays `path` (if it exists), rewrites it with `keep` applied to the
    /// replayed records, and opens it for appending.
    pub fn open(
        path: &Path,
        fsync: bool,
        keep: impl FnOnce(Vec<Record>) -> Vec<Record>,
    ) -> Result<(Journal, Vec<Record>)> {
        let records = replay(path)?;
        let kept = keep(records);
        let tmp = path.with_extension("rewrite");
        {
            let mut w = BufWriter::new(
                File::create(&tmp).map_err(|e| Error::io("create journal", &tmp, e))?,
            );
            for r in &kept {
                w.write_all(&r.encode_length_delimited_to_vec())
                    .map_err(|e| Error::io("write journal", &tmp, e))?;
            }
            let f = w
                .into_inner()
                .map_err(|e| Error::io("write journal", &tmp, e.into_error()))?;
            f.sync_all()
                .map_err(|e| Error::io("sync journal", &tmp, e))?;
        }
        fs::rename(&tmp, path).map_err(|e| Error::io("replace journal", path, e))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io("open journal", path, e))?;
        let (tx, rx) = mpsc::channel::<Entry>();
        let owned_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("kiln-journal".into())
            .spawn(move || writer(file, owned_path, rx, fsync))
            .map_err(|e| Error::io("spawn journal writer", path, e))?;
        Ok((Journal { tx: Some(tx) }, kept))
    }

    pub fn append(&self, kind: record::Kind) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((Record { kind: Some(kind) }, None));
        }
    }

    /// Appends a record and returns once it is written (and synced, with
    /// `fsync`): for what must be on disk before the world hears of it,
    /// such as an attempt before its lease goes out. Records appended
    /// earlier are written first.
    pub fn append_durable(&self, kind: record::Kind) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if tx
            .send((Record { kind: Some(kind) }, Some(done_tx)))
            .is_ok()
        {
            // An error only means the writer is gone (it logs why).
            let _ = done_rx.recv();
        }
    }
}

fn writer(file: File, path: PathBuf, rx: mpsc::Receiver<Entry>, fsync: bool) {
    let mut w = BufWriter::new(file);
    // Write whatever is queued, then flush once: a burst of state changes
    // costs one write(2), not one per record.
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut failed = None;
        let mut waiting = Vec::new();
        for (r, done) in batch {
            if let Err(e) = w.write_all(&r.encode_length_delimited_to_vec()) {
                failed = Some(e);
            }
            waiting.extend(done);
        }
        if let Err(e) = w.flush() {
            failed = Some(e);
        }
        if fsync
            && failed.is_none()
            && let Err(e) = w.get_ref().sync_data()
        {
            failed = Some(e);
        }
        if let Some(e) = failed {
            tracing::error!(path = %path.display(), error = %e, "cannot write the operations journal");
        }
        for done in waiting {
            let _ = done.send(());
        }
    }
}

fn replay(path: &Path) -> Result<Vec<Record>> {
    let mut data = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut data)
                .map_err(|e| Error::io("read journal", path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("open journal", path, e)),
    }
    let mut buf = data.as_slice();
    let mut out = Vec::new();
    while !buf.is_empty() {
        match Record::decode_length_delimited(&mut buf) {
            Ok(r) => out.push(r),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a torn record at the end of the journal");
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(name: &str) -> record::Kind {
        record::Kind::Queued(QueuedRecord {
            name: name.into(),
            ..Default::default()
        })
    }

    #[test]
    fn a_durable_append_is_on_disk_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.journal");
        let (j, _) = Journal::open(&path, true, |r| r).unwrap();
        j.append(queued("a"));
        j.append_durable(record::Kind::Started(StartedRecord {
            name: "a".into(),
            worker: "w".into(),
            attempt: 1,
        }));
        // No waiting for the writer: both are there already, in order.
        let records = replay(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert!(matches!(&records[1].kind, Some(record::Kind::Started(s)) if s.attempt == 1));
    }

    #[test]
    fn records_survive_a_reopen_and_torn_tails_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.journal");
        {
            let (j, old) = Journal::open(&path, false, |r| r).unwrap();
            assert!(old.is_empty());
            j.append(queued("a"));
            j.append(queued("b"));
            drop(j);
        }
        // Let the writer thread drain.
        for _ in 0..100 {
            if replay(&path).unwrap().len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0x7f, 0x01]).unwrap();
        let (_j, records) = Journal::open(&path, false, |r| {
            r.into_iter()
                .filter(|r| !matches!(&r.kind, Some(record::Kind::Queued(q)) if q.name == "a"))
                .collect()
        })
        .unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(
            replay(&path).unwrap().len(),
            1,
            "rewritten with only what was kept"
        );
    }
}
