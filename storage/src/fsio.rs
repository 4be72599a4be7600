//! What the disk-backed stores (packs, files, records, the data directory)
//! share: their options, the report of start-up verification, and making a
//! rename durable.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// Options of the disk backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskOptions {
    /// `fsync` each blob (pack append, file) and directory before
    /// acknowledging it. Off by default: Kiln relies on periodic `syncfs`
    /// checkpoints and verification after an unclean shutdown instead.
    pub fsync: bool,
}

/// What start-up verification found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Blobs rehashed.
    pub checked: u64,
    /// Blobs that did not match their digest and were removed.
    pub removed: u64,
}

/// `fsync` on a directory, making renames into it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}
