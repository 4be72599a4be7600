//! The parsed digest (defined in `kiln-proto`, shared by every layer) and
//! the service-edge check of a request's `digest_function`.

use kiln_proto::reapi::digest_function;

pub use kiln_proto::{Digest, DigestError, HASH_LEN};

use crate::error::{Error, Result};

/// Checks the `digest_function` field of a request: unset (0) and SHA256 are
/// accepted, anything else is INVALID_ARGUMENT.
pub fn check_digest_function(value: i32) -> Result<()> {
    if value == digest_function::Value::Unknown as i32
        || value == digest_function::Value::Sha256 as i32
    {
        return Ok(());
    }
    let name = digest_function::Value::try_from(value)
        .map(|v| v.as_str_name().to_string())
        .unwrap_or_else(|_| value.to_string());
    Err(Error::UnsupportedDigestFunction(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_functions() {
        assert!(check_digest_function(0).is_ok());
        assert!(check_digest_function(1).is_ok());
        let e = check_digest_function(digest_function::Value::Md5 as i32).unwrap_err();
        assert!(e.to_string().contains("MD5"), "{e}");
    }
}
