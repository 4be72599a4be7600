//! The disk backend: small blobs packed into segment files
//! ([`PackStore`]), large ones one per file ([`FileStore`]), routed by size
//! ([`SizeSplit`]). Both write only verified data and make it visible
//! atomically; see [`crate::durability`] for crashes and power loss.

use std::path::Path;
use std::time::SystemTime;

use crate::error::Result;
use crate::files::FileStore;
pub use crate::fsio::{DiskOptions, VerifyReport};
use crate::packs::PackStore;
use crate::split::SizeSplit;

/// Blobs up to this size are packed. Above a few KiB the per-file cost is
/// not creating the file but allocating its inode: ext4 without a journal
/// scans for inodes not recently deleted, which took ~18% of the server's
/// CPU when 1 MiB blobs were files. Larger blobs are few, and compaction
/// would copy them.
pub const PACK_MAX: u64 = 2 << 20;
/// Pack segments roll over at this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// The disk backend.
pub type DiskStore = SizeSplit<PackStore, FileStore>;

/// Opens the disk backend under `root` (`packs/`, `cas/`, `tmp/`),
/// rehashing what was written at or after `verify_since`. Blocking.
pub fn open(
    root: &Path,
    options: DiskOptions,
    verify_since: Option<SystemTime>,
) -> Result<(DiskStore, VerifyReport)> {
    let (files, a) = FileStore::open(root, options, verify_since)?;
    let (packs, b) = PackStore::open(root, options, SEGMENT_BYTES, verify_since)?;
    let report = VerifyReport {
        checked: a.checked + b.checked,
        removed: a.removed + b.removed,
    };
    Ok((SizeSplit::new(packs, files, PACK_MAX), report))
}
