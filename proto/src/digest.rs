//! Small helpers around REAPI digests shared by the server and the worker:
//! SHA-256 of bytes, the empty blob, `hash/size` keys and validation.

use sha2::{Digest as _, Sha256};

use crate::reapi::Digest;

/// SHA-256 of the empty blob.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The digest of `data`.
pub fn of_bytes(data: &[u8]) -> Digest {
    Digest {
        hash: hex(&Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

/// The digest of an encoded protobuf message.
pub fn of_message(message: &impl prost::Message) -> (Digest, Vec<u8>) {
    let bytes = message.encode_to_vec();
    (of_bytes(&bytes), bytes)
}

pub fn empty() -> Digest {
    Digest {
        hash: EMPTY_SHA256.to_string(),
        size_bytes: 0,
    }
}

pub fn is_empty(digest: &Digest) -> bool {
    digest.size_bytes == 0 && digest.hash == EMPTY_SHA256
}

/// `hash/size`, the form used in resource names and error messages.
pub fn key(digest: &Digest) -> String {
    format!("{}/{}", digest.hash, digest.size_bytes)
}

/// Why a digest is malformed (for SHA-256), or None when it is well formed.
pub fn invalid_reason(digest: &Digest) -> Option<String> {
    if digest.hash.len() != 64 {
        return Some(format!(
            "digest {} has a hash of {} hex characters; SHA-256 needs 64",
            key(digest),
            digest.hash.len()
        ));
    }
    if !digest
        .hash
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Some(format!(
            "digest {} has a hash that is not lowercase hex",
            key(digest)
        ));
    }
    if digest.size_bytes < 0 {
        return Some(format!("digest {} has a negative size", key(digest)));
    }
    None
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// An incremental SHA-256 that ends in a [`Digest`].
#[derive(Default, Clone)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }

    pub fn finish(self) -> Digest {
        Digest {
            hash: hex(&self.inner.finalize()),
            size_bytes: self.len as i64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_blob_and_keys() {
        assert_eq!(of_bytes(b""), empty());
        assert!(is_empty(&of_bytes(b"")));
        let d = of_bytes(b"hello");
        assert_eq!(
            key(&d),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824/5"
        );
        let mut h = Hasher::new();
        h.update(b"hel");
        h.update(b"lo");
        assert_eq!(h.finish(), d);
    }

    #[test]
    fn malformed_digests_are_explained() {
        let mut d = of_bytes(b"x");
        assert!(invalid_reason(&d).is_none());
        d.size_bytes = -1;
        assert!(invalid_reason(&d).unwrap().contains("negative"));
        d.hash.pop();
        assert!(invalid_reason(&d).unwrap().contains("63 hex"));
        d.hash = "G".repeat(64);
        assert!(invalid_reason(&d).unwrap().contains("not lowercase hex"));
    }
}
