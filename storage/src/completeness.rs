//! Which directory trees were recently found complete in the CAS, so that
//! the action cache and the asset service need not walk a hot tree on every
//! hit. An entry is trusted only while the store reports no removal since it
//! was made (its removals epoch) and for a short time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_proto::Digest;

/// A tree found complete is trusted without a new walk for this long, as
/// long as nothing has been removed from the CAS meanwhile. Short, because
/// a walk also marks every blob of the tree as used, which keeps hot trees
/// away from eviction.
const COMPLETE_TTL: Duration = Duration::from_secs(60);
const COMPLETE_CACHE_MAX: usize = 100_000;

/// Remembers which trees were recently found complete.
#[derive(Debug, Default)]
pub struct CompletenessCache {
    complete: Mutex<HashMap<Digest, (u64, Instant)>>,
}

impl CompletenessCache {
    pub(crate) fn fresh(&self, root: &Digest, removals: u64) -> bool {
        let map = self.complete.lock().unwrap_or_else(|p| p.into_inner());
        map.get(root)
            .is_some_and(|(epoch, at)| *epoch == removals && at.elapsed() < COMPLETE_TTL)
    }

    pub(crate) fn record(&self, root: Digest, removals: u64) {
        let mut map = self.complete.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= COMPLETE_CACHE_MAX {
            map.clear();
        }
        map.insert(root, (removals, Instant::now()));
    }
}
