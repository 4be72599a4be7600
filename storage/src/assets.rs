//! The Remote Asset API (Fetch and Push), as BuildStream's artifact and
//! source caches use it: Push records "these URIs (with these qualifiers)
//! name this blob / directory", Fetch answers from those records. Kiln
//! never downloads anything itself: an asset nobody pushed is NOT_FOUND.
//!
//! Pushing a mapping whose content (the blob, or the whole directory tree)
//! is not in the CAS is FAILED_PRECONDITION listing what is missing.
//! References are checked too, but BuildStream lists its artifact's
//! `buildtree`, `sources` and `buildroot` as references even when it could
//! not upload them (it skips them on `FileNotFoundError`), so a reference
//! that is absent at push time is accepted and recorded as not required.
//! A mapping is then returned only while its content and every reference
//! that was present at push time are still in the CAS, mirroring the action
//! cache's completeness rule: after eviction a fetch is a miss, never a
//! dangling digest.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kiln_proto::Digest;
use kiln_proto::asset::Qualifier;
use kiln_proto::reapi;
use prost::Message;
use sha2::{Digest as _, Sha256};
use tracing::debug;

use crate::cas::Cas;
use crate::error::{Error, Result};
use crate::records::{self, RecordStore};
use crate::tree;

/// What an asset names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssetKind {
    /// A blob.
    Blob,
    /// The root Directory of a tree.
    Directory,
}

impl AssetKind {
    /// The name used in record keys and messages.
    pub fn tag(self) -> &'static str {
        match self {
            AssetKind::Blob => "blob",
            AssetKind::Directory => "directory",
        }
    }
}

/// What Push recorded for one URI.
#[derive(Clone, PartialEq, Message)]
pub struct AssetRecord {
    /// The blob or root directory.
    #[prost(message, optional, tag = "1")]
    pub digest: Option<reapi::Digest>,
    /// When the mapping was pushed (Unix nanoseconds).
    #[prost(int64, tag = "2")]
    pub pushed_at_unix_nanos: i64,
    /// When it stops being served (Unix nanoseconds); 0 = never.
    #[prost(int64, tag = "3")]
    pub expire_at_unix_nanos: i64,
    /// Referenced blobs that were present at push time: they must stay for
    /// the mapping to be served.
    #[prost(message, repeated, tag = "4")]
    pub references_blobs: Vec<reapi::Digest>,
    /// Referenced directory trees that were complete at push time: they
    /// must stay for the mapping to be served.
    #[prost(message, repeated, tag = "5")]
    pub references_directories: Vec<reapi::Digest>,
}

/// A mapping found by [`AssetStore::fetch`].
#[derive(Clone, Debug)]
pub struct FoundAsset {
    /// The URI that matched.
    pub uri: String,
    /// The blob or root directory.
    pub digest: Digest,
    /// When it expires, if ever.
    pub expires_at: Option<SystemTime>,
}

/// A push request, validated.
#[derive(Clone, Debug)]
pub struct PushAsset<'a> {
    /// Instance name.
    pub instance: &'a str,
    /// Blob or directory.
    pub kind: AssetKind,
    /// URIs naming the content.
    pub uris: &'a [String],
    /// Qualifiers, part of the key.
    pub qualifiers: &'a [Qualifier],
    /// The content.
    pub digest: Digest,
    /// When to stop serving it.
    pub expire_at: Option<SystemTime>,
    /// Blobs it depends on.
    pub references_blobs: Vec<Digest>,
    /// Directory trees it depends on.
    pub references_directories: Vec<Digest>,
}

/// Handle to the asset mappings. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AssetStore {
    records: Arc<dyn RecordStore>,
    cas: Cas,
}

impl AssetStore {
    /// Mappings kept in `records`, checked against `cas`.
    pub fn new(records: Arc<dyn RecordStore>, cas: Cas) -> Self {
        AssetStore { records, cas }
    }

    fn key(instance: &str, kind: AssetKind, uri: &str, qualifiers: &[Qualifier]) -> String {
        let mut sorted: Vec<&Qualifier> = qualifiers.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut h = Sha256::new();
        // Length-prefixed fields: no two different keys hash the same input.
        for part in [kind.tag(), uri].into_iter().chain(
            sorted
                .iter()
                .flat_map(|q| [q.name.as_str(), q.value.as_str()]),
        ) {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        records::key("asset", instance, &hex::encode(h.finalize()))
    }

    /// Records the mapping for every URI. The content must be complete in
    /// the CAS; references absent from it are recorded as not required.
    pub async fn push(&self, push: PushAsset<'_>) -> Result<()> {
        validate_uris(push.uris)?;
        validate_qualifiers(push.qualifiers)?;
        let missing = self.missing(push.kind, push.digest, &[], &[]).await?;
        if !missing.is_empty() {
            return Err(Error::MissingBlobs {
                context: format!("push of {} {}", push.kind.tag(), push.digest),
                missing,
            });
        }
        let absent_blobs = self.cas.find_missing(&push.references_blobs).await?;
        let blobs: Vec<Digest> = push
            .references_blobs
            .iter()
            .filter(|d| !absent_blobs.contains(d))
            .copied()
            .collect();
        let mut dirs = Vec::new();
        for d in &push.references_directories {
            if tree::missing_in_directory_tree(&self.cas, *d)
                .await?
                .is_empty()
            {
                dirs.push(*d);
            }
        }
        let skipped = push.references_blobs.len() - blobs.len() + push.references_directories.len()
            - dirs.len();
        if skipped > 0 {
            debug!(
                digest = %push.digest,
                skipped,
                "references not in the CAS at push time are not required for this mapping"
            );
        }
        let record = AssetRecord {
            digest: Some(push.digest.to_proto()),
            pushed_at_unix_nanos: unix_nanos(SystemTime::now()),
            expire_at_unix_nanos: push.expire_at.map(unix_nanos).unwrap_or(0),
            references_blobs: blobs.iter().map(Digest::to_proto).collect(),
            references_directories: dirs.iter().map(Digest::to_proto).collect(),
        };
        let bytes = Bytes::from(record.encode_to_vec());
        for uri in push.uris {
            let key = Self::key(push.instance, push.kind, uri, push.qualifiers);
            self.records.put(&key, bytes.clone()).await?;
        }
        Ok(())
    }

    /// The first of `uris` with a live mapping whose content is all still in
    /// the CAS; `oldest` rejects mappings pushed before it.
    pub async fn fetch(
        &self,
        instance: &str,
        kind: AssetKind,
        uris: &[String],
        qualifiers: &[Qualifier],
        oldest: Option<SystemTime>,
    ) -> Result<Option<FoundAsset>> {
        validate_uris(uris)?;
        validate_qualifiers(qualifiers)?;
        let now = unix_nanos(SystemTime::now());
        for uri in uris {
            let key = Self::key(instance, kind, uri, qualifiers);
            let Some(bytes) = self.records.get(&key).await? else {
                continue;
            };
            let Ok(record) = AssetRecord::decode(bytes) else {
                self.records.delete(&key).await?;
                continue;
            };
            if record.expire_at_unix_nanos != 0 && record.expire_at_unix_nanos <= now {
                debug!(uri, "asset mapping expired");
                self.records.delete(&key).await?;
                continue;
            }
            if oldest.is_some_and(|o| record.pushed_at_unix_nanos < unix_nanos(o)) {
                continue;
            }
            let parse = |d: &reapi::Digest| Digest::from_proto(d).map_err(Error::from);
            let digest = Digest::from_field(record.digest.as_ref(), "digest")?;
            let blobs: Vec<Digest> = record
                .references_blobs
                .iter()
                .map(parse)
                .collect::<Result<_>>()?;
            let dirs: Vec<Digest> = record
                .references_directories
                .iter()
                .map(parse)
                .collect::<Result<_>>()?;
            let missing = self.missing(kind, digest, &blobs, &dirs).await?;
            if !missing.is_empty() {
                debug!(
                    uri,
                    missing = missing.len(),
                    "asset content no longer complete in the CAS"
                );
                continue;
            }
            return Ok(Some(FoundAsset {
                uri: uri.clone(),
                digest,
                expires_at: (record.expire_at_unix_nanos != 0)
                    .then(|| from_unix_nanos(record.expire_at_unix_nanos)),
            }));
        }
        Ok(None)
    }

    async fn missing(
        &self,
        kind: AssetKind,
        digest: Digest,
        blobs: &[Digest],
        dirs: &[Digest],
    ) -> Result<Vec<Digest>> {
        let mut want_blobs = blobs.to_vec();
        let mut want_dirs = dirs.to_vec();
        match kind {
            AssetKind::Blob => want_blobs.push(digest),
            AssetKind::Directory => want_dirs.push(digest),
        }
        let mut missing = self.cas.find_missing(&want_blobs).await?;
        for d in want_dirs {
            missing.extend(tree::missing_in_directory_tree(&self.cas, d).await?);
        }
        missing.sort();
        missing.dedup();
        Ok(missing)
    }
}

/// At least one URI, none empty.
pub fn validate_uris(uris: &[String]) -> Result<()> {
    if uris.is_empty() {
        return Err(Error::InvalidArgument(
            "at least one URI is required".into(),
        ));
    }
    if let Some(i) = uris.iter().position(|u| u.is_empty()) {
        return Err(Error::InvalidArgument(format!("uris[{i}] is empty")));
    }
    Ok(())
}

fn validate_qualifiers(qualifiers: &[Qualifier]) -> Result<()> {
    let mut names: Vec<&str> = qualifiers.iter().map(|q| q.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidArgument(format!(
            "qualifier {:?} is given more than once",
            w[0]
        )));
    }
    if names.iter().any(|n| n.is_empty()) {
        return Err(Error::InvalidArgument(
            "a qualifier has an empty name".into(),
        ));
    }
    Ok(())
}

fn unix_nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

fn from_unix_nanos(n: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n.max(0) as u64)
}
