//! Owning the data directory, and surviving power loss.
//!
//! A process kill cannot damage the store: blobs and records are renamed
//! into place after they are complete, and the page cache outlives the
//! process. Power loss can: without `fsync`, a rename may reach the disk
//! before the data it names, leaving a file of zeros under a blob's name
//! (ext4 here even runs without a journal).
//!
//! Kiln's choice, instead of an `fsync` per blob (which would cap small-blob
//! uploads at the disk's flush rate):
//!
//! * **Checkpoints.** Every `checkpoint_interval` a background task notes the
//!   time `T`, calls `syncfs` on the data directory's filesystem, and then
//!   records `T` in `checkpoint`. Everything written before `T` is then on
//!   disk.
//! * **Unclean-shutdown marker.** `dirty` is created at start-up and removed
//!   after a final `syncfs` on clean shutdown. If it is present at start-up,
//!   the previous run ended abruptly, and every blob modified after the last
//!   checkpoint (minus a small margin) is rehashed; blobs that do not match
//!   their name are removed. Records carry their own checksum and are checked
//!   on every read.
//! * **Strict mode.** `storage.fsync = true` additionally fsyncs each blob,
//!   record and directory before acknowledging it.
//!
//! An exclusive `flock` on `lock` keeps two servers off one data directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::fsio::sync_dir;

/// Blobs modified this long before the last checkpoint are rechecked too,
/// covering clock granularity.
const MARGIN: Duration = Duration::from_secs(5);

/// What the previous run left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The previous run did not shut down cleanly.
    pub unclean: bool,
    /// Blobs modified at or after this time must be verified (`None` after a
    /// clean shutdown).
    pub verify_since: Option<SystemTime>,
}

/// Exclusive ownership of a data directory. Dropping it without
/// [`close`](DataDir::close) leaves the unclean-shutdown marker in place, as a
/// crash would.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    _lock: File,
    dirty: PathBuf,
    checkpoint: PathBuf,
}

impl DataDir {
    /// Takes the data directory (creating it), and reports what the previous
    /// run left behind.
    pub fn acquire(root: &Path) -> Result<(Self, Recovery)> {
        fs::create_dir_all(root).map_err(|e| Error::io("create data directory", root, e))?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("open", &lock_path, e))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return Err(Error::Config(format!(
                "data directory {} is in use by another Kiln process ({err})",
                root.display()
            )));
        }
        let dirty = root.join("dirty");
        let checkpoint = root.join("checkpoint");
        let unclean = dirty.exists();
        let verify_since = if unclean {
            let since = read_checkpoint(&checkpoint)
                .map(|t| t.checked_sub(MARGIN).unwrap_or(UNIX_EPOCH))
                .unwrap_or(UNIX_EPOCH);
            warn!(
                data_dir = %root.display(),
                since_unix = since.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
                "previous run did not shut down cleanly; verifying blobs written since the last checkpoint"
            );
            Some(since)
        } else {
            None
        };
        write_file_durably(&dirty, std::process::id().to_string().as_bytes())?;
        Ok((
            DataDir {
                root: root.to_path_buf(),
                _lock: lock,
                dirty,
                checkpoint,
            },
            Recovery {
                unclean,
                verify_since,
            },
        ))
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Flushes everything written so far to disk and records the time.
    /// Blocking.
    pub fn checkpoint(&self) -> Result<()> {
        let started = SystemTime::now();
        syncfs(&self.root)?;
        let secs = started
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        write_file_durably(&self.checkpoint, secs.to_string().as_bytes())
    }

    /// Final flush, then removes the unclean-shutdown marker. Blocking.
    pub fn close(self) -> Result<()> {
        self.checkpoint()?;
        fs::remove_file(&self.dirty).map_err(|e| Error::io("remove", &self.dirty, e))?;
        sync_dir(&self.root)?;
        info!(data_dir = %self.root.display(), "data directory closed cleanly");
        Ok(())
    }
}

fn read_checkpoint(path: &Path) -> Option<SystemTime> {
    let text = fs::read_to_string(path).ok()?;
    let secs: u64 = text.trim().parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

fn syncfs(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| Error::io("open", dir, e))?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(Error::io("syncfs", dir, io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes a small file via a temporary name, fsyncing file and directory.
fn write_file_durably(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("new");
    let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_lock_and_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (d, rec) = DataDir::acquire(dir.path()).unwrap();
        assert_eq!(
            rec,
            Recovery {
                unclean: false,
                verify_since: None
            }
        );
        let second = DataDir::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            second.contains("in use by another Kiln process"),
            "{second}"
        );
        d.checkpoint().unwrap();
        // Dropped without close: as after a crash.
        drop(d);
        let (d, rec) = DataDir::acquire(dir.path()).unwrap();
        assert!(rec.unclean);
        let since = rec.verify_since.unwrap();
        assert!(since > UNIX_EPOCH && since <= SystemTime::now());
        d.close().unwrap();
        let (_d, rec) = DataDir::acquire(dir.path()).unwrap();
        assert!(!rec.unclean);
    }
}
