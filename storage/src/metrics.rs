//! What storage reports to whoever keeps metrics. Storage does not know the
//! metrics registry; the server passes a handle in when it opens storage.

use std::sync::Arc;

/// Receives storage events worth counting.
pub trait StorageMetrics: Send + Sync + 'static {
    /// The LRU evicted `blobs` blobs totalling `bytes` bytes.
    fn evicted(&self, blobs: u64, bytes: u64);
}

/// Counts nothing (tests, tools).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoMetrics;

impl StorageMetrics for NoMetrics {
    fn evicted(&self, _blobs: u64, _bytes: u64) {}
}

/// A shared metrics handle.
pub type MetricsHandle = Arc<dyn StorageMetrics>;

/// The handle that counts nothing.
pub fn no_metrics() -> MetricsHandle {
    Arc::new(NoMetrics)
}
