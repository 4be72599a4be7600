//! Deferred deletion. Directories that are done with (staged trees, action
//! scratch space) are renamed into `trash/` at once — a cheap metadata
//! operation — and a background thread deletes them, so no action waits for
//! a large `rm -rf` (slow on journal-less ext4, and it would stall the next
//! file creations).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct Trash {
    dir: PathBuf,
    tx: mpsc::Sender<PathBuf>,
}

impl Trash {
    /// Starts the deleting thread; whatever a previous run left in `dir` is
    /// deleted first.
    pub fn start(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io("create trash directory", dir, e))?;
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let leftovers: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|e| Error::io("list", dir, e))?
            .flatten()
            .map(|e| e.path())
            .collect();
        std::thread::Builder::new()
            .name("kiln-trash".into())
            .spawn(move || {
                for path in leftovers.into_iter().chain(rx) {
                    remove_tree(&path);
                }
            })
            .map_err(|e| Error::io("spawn trash thread", dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tx,
        })
    }

    /// Moves `path` out of the way now and deletes it later. Falls back to
    /// deleting in place when it cannot be renamed (another filesystem).
    pub fn discard(&self, path: &Path) {
        let target = self.dir.join(uuid::Uuid::new_v4().to_string());
        let doomed = match fs::rename(path, &target) {
            Ok(()) => target,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => path.to_path_buf(),
        };
        if self.tx.send(doomed.clone()).is_err() {
            remove_tree(&doomed);
        }
    }
}

fn remove_tree(path: &Path) {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).or_else(|_| {
            // Read-only directories inside (an action may chmod its outputs)
            // block unlinking their entries: open them up and retry.
            make_writable(path);
            fs::remove_dir_all(path)
        }),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "could not delete");
    }
}

fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = fs::symlink_metadata(path)
        && m.is_dir()
    {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                make_writable(&e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discarded_trees_disappear() {
        let dir = tempfile::tempdir().unwrap();
        let trash = Trash::start(&dir.path().join("trash")).unwrap();
        let doomed = dir.path().join("doomed");
        fs::create_dir_all(doomed.join("a/b")).unwrap();
        fs::write(doomed.join("a/b/f"), b"x").unwrap();
        trash.discard(&doomed);
        assert!(!doomed.exists(), "moved out of the way at once");
        for _ in 0..200 {
            if fs::read_dir(dir.path().join("trash")).unwrap().count() == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("trash not emptied within 2 s");
    }
}
