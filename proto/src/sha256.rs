//! A parsed, validated content digest.
//!
//! Kiln speaks SHA-256 only. The proto `Digest` carries a hex string and a
//! signed size; [`Digest`] is the validated form every other module uses, so a
//! bad hash or a negative size is rejected once, at the edge, with a message
//! naming the offending value.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::reapi;

/// Why a digest was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DigestError {
    /// A bad hash (length, alphabet) or a negative size.
    Invalid {
        /// The digest as given (`hash/size`).
        digest: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required digest field is absent (its name).
    MissingField(String),
}

impl fmt::Display for DigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DigestError::Invalid { digest, reason } => {
                write!(f, "invalid digest {digest}: {reason}")
            }
            DigestError::MissingField(field) => write!(f, "missing field {field}"),
        }
    }
}

impl std::error::Error for DigestError {}

type Result<T, E = DigestError> = std::result::Result<T, E>;

/// Length of a SHA-256 hash in bytes.
pub const HASH_LEN: usize = 32;

/// A SHA-256 content digest: the hash of a blob and its size in bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hash: [u8; HASH_LEN],
    size: u64,
}

/// SHA-256 of the empty string.
const EMPTY_HASH: [u8; HASH_LEN] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

impl Digest {
    /// The digest of the empty blob (also the digest of an empty `Directory`).
    pub const EMPTY: Digest = Digest {
        hash: EMPTY_HASH,
        size: 0,
    };

    /// Builds a digest from its parts.
    pub const fn new(hash: [u8; HASH_LEN], size: u64) -> Self {
        Digest { hash, size }
    }

    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest {
            hash: Sha256::digest(data).into(),
            size: data.len() as u64,
        }
    }

    /// Hashes the canonical encoding of a proto message, returning the digest
    /// and the encoded bytes.
    pub fn of_message<M: prost::Message>(message: &M) -> (Self, Vec<u8>) {
        let bytes = message.encode_to_vec();
        (Digest::of(&bytes), bytes)
    }

    /// Parses a hex hash and a size as they appear in resource names and
    /// proto digests.
    pub fn parse(hash_hex: &str, size: i64) -> Result<Self> {
        if size < 0 {
            return Err(DigestError::Invalid {
                digest: format!("{hash_hex}/{size}"),
                reason: "size is negative".into(),
            });
        }
        Ok(Digest {
            hash: parse_hash(hash_hex).map_err(|reason| DigestError::Invalid {
                digest: format!("{hash_hex}/{size}"),
                reason,
            })?,
            size: size as u64,
        })
    }

    /// Validates a proto digest.
    pub fn from_proto(digest: &reapi::Digest) -> Result<Self> {
        Digest::parse(&digest.hash, digest.size_bytes)
    }

    /// Validates an optional proto digest field, naming the field when it is
    /// absent.
    pub fn from_field(digest: Option<&reapi::Digest>, field: &str) -> Result<Self> {
        match digest {
            Some(d) => Digest::from_proto(d),
            None => Err(DigestError::MissingField(field.to_string())),
        }
    }

    /// The proto form.
    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hex(),
            size_bytes: self.size as i64,
        }
    }

    /// The raw hash.
    pub fn hash(&self) -> &[u8; HASH_LEN] {
        &self.hash
    }

    /// Lower-case hex of the hash.
    pub fn hex(&self) -> String {
        crate::digest::hex(&self.hash)
    }

    /// Size of the blob in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether this is the empty blob, which is always present.
    pub fn is_empty(&self) -> bool {
        self.size == 0 && self.hash == EMPTY_HASH
    }
}

impl fmt::Display for Digest {
    /// `hash/size`, the form used in resource names and error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    /// Parses `hash/size` (also accepts `hash:size`, which some tools print).
    fn from_str(s: &str) -> Result<Self> {
        let (hash, size) = s
            .split_once('/')
            .or_else(|| s.split_once(':'))
            .ok_or_else(|| DigestError::Invalid {
                digest: s.to_string(),
                reason: "expected HASH/SIZE".into(),
            })?;
        let size: i64 = size.parse().map_err(|_| DigestError::Invalid {
            digest: s.to_string(),
            reason: format!("size {size:?} is not a number"),
        })?;
        Digest::parse(hash, size)
    }
}

fn parse_hash(hex_str: &str) -> std::result::Result<[u8; HASH_LEN], String> {
    if hex_str.len() != HASH_LEN * 2 {
        return Err(format!(
            "hash has {} hex characters; a SHA-256 hash has {}",
            hex_str.len(),
            HASH_LEN * 2
        ));
    }
    // The spec requires lower case; accepting upper case would give one blob
    // two resource names.
    if let Some(c) = hex_str
        .chars()
        .find(|c| !matches!(c, '0'..='9' | 'a'..='f'))
    {
        return Err(format!("hash contains {c:?}; expected lower-case hex"));
    }
    let mut out = [0u8; HASH_LEN];
    hex::decode_to_slice(hex_str, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_digest_matches_sha256_of_nothing() {
        assert_eq!(Digest::of(b""), Digest::EMPTY);
        assert!(Digest::EMPTY.is_empty());
        assert_eq!(
            Digest::EMPTY.to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/0"
        );
    }

    #[test]
    fn parses_and_rejects() {
        let d: Digest = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/0"
            .parse()
            .unwrap();
        assert!(d.is_empty());
        let short = Digest::parse("abcd", 3).unwrap_err().to_string();
        assert!(
            short.contains("abcd/3") && short.contains("4 hex"),
            "{short}"
        );
        let upper = Digest::parse(&"A".repeat(64), 1).unwrap_err().to_string();
        assert!(upper.contains("lower-case"), "{upper}");
        let neg = Digest::parse(&"a".repeat(64), -1).unwrap_err().to_string();
        assert!(neg.contains("negative"), "{neg}");
    }
}
