//! The action cache's store: results kept in a [`RecordStore`], served
//! only while complete.
//!
//! The completeness rule: a result is returned only if every blob it
//! references is still in the CAS; otherwise the lookup is a miss, so the
//! client rebuilds instead of failing on a missing output. Results with a
//! non-zero exit code are never cached, and a result that references blobs
//! the CAS lacks is refused, so a cache entry can never point at nothing
//! from the start.

use std::sync::Arc;

use bytes::Bytes;
use kiln_proto::Digest;
use kiln_proto::reapi::ActionResult;
use prost::Message;
use tracing::{debug, warn};

use crate::cas::Cas;
use crate::error::{Error, Result};
use crate::records::{self, RecordStore};
use crate::tree;

/// Handle to the action cache. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ActionCache {
    records: Arc<dyn RecordStore>,
    cas: Cas,
}

/// Digests an ActionResult refers to, by kind.
#[derive(Debug, Default)]
struct References {
    blobs: Vec<Digest>,
    trees: Vec<Digest>,
    root_directories: Vec<Digest>,
}

impl ActionCache {
    /// An action cache keeping results in `records`, checked against `cas`.
    pub fn new(records: Arc<dyn RecordStore>, cas: Cas) -> Self {
        ActionCache { records, cas }
    }

    fn key(instance: &str, action: &Digest) -> String {
        records::key(
            "ac",
            instance,
            &format!("{}-{}", action.hex(), action.size()),
        )
    }

    /// The cached result of `action`, if there is one and every blob it
    /// references is still in the CAS. `None` is a miss.
    pub async fn get(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>> {
        let key = Self::key(instance, action);
        let Some(bytes) = self.records.get(&key).await? else {
            return Ok(None);
        };
        let result = match ActionResult::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                warn!(action = %action, error = %e, "removing an action-cache entry that does not decode");
                self.records.delete(&key).await?;
                return Ok(None);
            }
        };
        match self.missing_blobs(&result).await {
            Ok(missing) if missing.is_empty() => Ok(Some(result)),
            Ok(missing) => {
                debug!(action = %action, missing = missing.len(), first = %missing[0], "action-cache entry is incomplete: miss");
                Ok(None)
            }
            Err(e) => {
                warn!(action = %action, error = %e, "action-cache entry references unreadable data: miss");
                Ok(None)
            }
        }
    }

    /// Caches `result` for `action`. Returns `false` (and stores nothing)
    /// for a result with a non-zero exit code. A result that references
    /// blobs absent from the CAS is FAILED_PRECONDITION listing them; bad
    /// digests are INVALID_ARGUMENT naming the field. Callers must not call
    /// this for `do_not_cache` actions.
    pub async fn put(
        &self,
        instance: &str,
        action: &Digest,
        result: &ActionResult,
    ) -> Result<bool> {
        if result.exit_code != 0 {
            debug!(action = %action, exit_code = result.exit_code, "not caching a failed action");
            return Ok(false);
        }
        let missing = self.missing_blobs(result).await?;
        if !missing.is_empty() {
            return Err(Error::MissingBlobs {
                context: format!("action result for action {action}"),
                missing,
            });
        }
        let key = Self::key(instance, action);
        self.records
            .put(&key, Bytes::from(result.encode_to_vec()))
            .await?;
        Ok(true)
    }

    /// Every blob `result` references that the CAS lacks (outputs, stdout,
    /// stderr, Tree blobs and the files in them, output directory trees).
    pub async fn missing_blobs(&self, result: &ActionResult) -> Result<Vec<Digest>> {
        let refs = references(result)?;
        let mut missing = self.cas.find_missing(&refs.blobs).await?;
        for t in refs.trees {
            missing.extend(tree::missing_in_tree_message(&self.cas, t).await?);
        }
        for r in refs.root_directories {
            missing.extend(tree::missing_in_directory_tree(&self.cas, r).await?);
        }
        missing.sort();
        missing.dedup();
        Ok(missing)
    }

    /// The CAS this cache checks against.
    pub fn cas(&self) -> &Cas {
        &self.cas
    }
}

fn references(result: &ActionResult) -> Result<References> {
    let field = |name: String, d: &kiln_proto::reapi::Digest| {
        Digest::from_proto(d)
            .map_err(|e| Error::InvalidArgument(format!("action_result.{name}: {e}")))
    };
    let mut refs = References::default();
    for (i, f) in result.output_files.iter().enumerate() {
        let d = f.digest.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "action_result.output_files[{i}] ({:?}) has no digest",
                f.path
            ))
        })?;
        refs.blobs
            .push(field(format!("output_files[{i}] ({:?})", f.path), d)?);
    }
    if let Some(d) = &result.stdout_digest {
        refs.blobs.push(field("stdout_digest".into(), d)?);
    }
    if let Some(d) = &result.stderr_digest {
        refs.blobs.push(field("stderr_digest".into(), d)?);
    }
    for (i, dir) in result.output_directories.iter().enumerate() {
        let name = |f: &str| format!("output_directories[{i}] ({:?}).{f}", dir.path);
        if let Some(d) = &dir.tree_digest {
            refs.trees.push(field(name("tree_digest"), d)?);
        }
        if let Some(d) = &dir.root_directory_digest {
            refs.root_directories
                .push(field(name("root_directory_digest"), d)?);
        }
        if dir.tree_digest.is_none() && dir.root_directory_digest.is_none() {
            return Err(Error::InvalidArgument(format!(
                "action_result.output_directories[{i}] ({:?}) has neither tree_digest nor root_directory_digest",
                dir.path
            )));
        }
    }
    Ok(refs)
}
