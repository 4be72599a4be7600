//! ByteStream resource names.
//!
//! * read:  `{instance}/blobs/{hash}/{size}` or
//!   `{instance}/compressed-blobs/{compressor}/{hash}/{size}`
//! * write: `{instance}/uploads/{uuid}/blobs/{hash}/{size}[/anything]` or
//!   `{instance}/uploads/{uuid}/compressed-blobs/{compressor}/{hash}/{size}[/anything]`
//!
//! The instance part may be empty or hold several segments; it ends at the
//! first reserved segment (`blobs`, `compressed-blobs`, `uploads`).

use crate::digest::Digest;
use crate::error::{Error, Result};

/// How a resource's bytes are encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw bytes.
    Identity,
    /// A zstd stream.
    Zstd,
}

/// A parsed resource name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// Instance name (may be empty).
    pub instance: String,
    /// Upload id, for write resources.
    pub upload_id: Option<String>,
    /// Wire encoding.
    pub compression: Compression,
    /// The blob.
    pub digest: Digest,
}

/// Digest-function names that may appear before the hash in newer resource
/// names; Kiln supports none of them (SHA-256 is never spelled out).
const DIGEST_FUNCTION_NAMES: &[&str] = &[
    "sha1",
    "md5",
    "vso",
    "sha384",
    "sha512",
    "murmur3",
    "sha256tree",
    "blake3",
    "sha256",
];

/// Parses a read resource name.
pub fn parse_read(name: &str, zstd: bool) -> Result<Resource> {
    let segs: Vec<&str> = name.split('/').collect();
    let bad = |reason: &str| Error::InvalidResourceName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    let i = segs
        .iter()
        .position(|s| *s == "blobs" || *s == "compressed-blobs")
        .ok_or_else(|| bad("expected {instance}/blobs/{hash}/{size}"))?;
    let instance = segs[..i].join("/");
    let (compression, digest, rest) = parse_blob_part(name, &segs[i..], zstd)?;
    if !rest.is_empty() {
        return Err(bad("unexpected segments after the size"));
    }
    Ok(Resource {
        instance,
        upload_id: None,
        compression,
        digest,
    })
}

/// Parses a write resource name.
pub fn parse_write(name: &str, zstd: bool) -> Result<Resource> {
    let segs: Vec<&str> = name.split('/').collect();
    let bad = |reason: &str| Error::InvalidResourceName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    let i = segs
        .iter()
        .position(|s| *s == "uploads")
        .ok_or_else(|| bad("expected {instance}/uploads/{uuid}/blobs/{hash}/{size}"))?;
    let instance = segs[..i].join("/");
    let upload_id = segs
        .get(i + 1)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("missing the upload id after 'uploads/'"))?;
    let (compression, digest, _metadata) = parse_blob_part(name, &segs[i + 2..], zstd)?;
    Ok(Resource {
        instance,
        upload_id: Some(upload_id.to_string()),
        compression,
        digest,
    })
}

/// Parses `blobs/{hash}/{size}` or `compressed-blobs/{c}/{hash}/{size}`,
/// returning what follows.
fn parse_blob_part<'a>(
    name: &str,
    segs: &'a [&'a str],
    zstd: bool,
) -> Result<(Compression, Digest, &'a [&'a str])> {
    let bad = |reason: String| Error::InvalidResourceName {
        name: name.to_string(),
        reason,
    };
    let (compression, mut rest) = match segs.first() {
        Some(&"blobs") => (Compression::Identity, &segs[1..]),
        Some(&"compressed-blobs") => {
            let c = segs
                .get(1)
                .ok_or_else(|| bad("missing the compressor after 'compressed-blobs/'".into()))?;
            let compression = match *c {
                "identity" => Compression::Identity,
                "zstd" if zstd => Compression::Zstd,
                other => {
                    return Err(bad(format!(
                        "compressor {other:?} is not supported{}",
                        if zstd {
                            "; use zstd or identity"
                        } else {
                            " (compression is disabled)"
                        }
                    )));
                }
            };
            (compression, &segs[2..])
        }
        _ => {
            return Err(bad(
                "expected 'blobs' or 'compressed-blobs' after the upload id".into(),
            ));
        }
    };
    if let Some(f) = rest.first().filter(|s| DIGEST_FUNCTION_NAMES.contains(s)) {
        if *f == "sha256" {
            rest = &rest[1..];
        } else {
            return Err(Error::UnsupportedDigestFunction(f.to_uppercase()));
        }
    }
    let (hash, size) = match rest {
        [hash, size, ..] => (*hash, *size),
        _ => return Err(bad("expected a hash and a size".into())),
    };
    let size: i64 = size
        .parse()
        .map_err(|_| bad(format!("size {size:?} is not a number")))?;
    let digest = Digest::parse(hash, size).map_err(|e| bad(e.to_string()))?;
    Ok((compression, digest, &rest[2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn reads() {
        let r = parse_read(&format!("blobs/{H}/0"), true).unwrap();
        assert_eq!(r.instance, "");
        assert!(r.digest.is_empty());
        let r = parse_read(&format!("a/b/compressed-blobs/zstd/{H}/0"), true).unwrap();
        assert_eq!(
            (r.instance.as_str(), r.compression),
            ("a/b", Compression::Zstd)
        );
        assert!(parse_read(&format!("compressed-blobs/zstd/{H}/0"), false).is_err());
        let e = parse_read(&format!("blobs/{H}/-1"), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("negative") && e.contains("blobs/"), "{e}");
        let e = parse_read("blobs/abc/1", true).unwrap_err().to_string();
        assert!(e.contains("hex"), "{e}");
        assert!(parse_read(&format!("blobs/{H}/0/extra"), true).is_err());
        assert!(parse_read("nothing", true).is_err());
        let e = parse_read(&format!("blobs/blake3/{H}/0"), true).unwrap_err();
        assert!(matches!(e, Error::UnsupportedDigestFunction(_)));
    }

    #[test]
    fn writes() {
        let w = parse_write(&format!("inst/uploads/u-1/blobs/{H}/0/meta/data"), true).unwrap();
        assert_eq!(w.instance, "inst");
        assert_eq!(w.upload_id.as_deref(), Some("u-1"));
        let w = parse_write(&format!("uploads/x/compressed-blobs/zstd/{H}/0"), true).unwrap();
        assert_eq!(w.compression, Compression::Zstd);
        assert!(parse_write(&format!("uploads//blobs/{H}/0"), true).is_err());
        assert!(parse_write(&format!("blobs/{H}/0"), true).is_err());
        assert!(parse_write(&format!("uploads/x/blobs/{H}"), true).is_err());
    }
}
