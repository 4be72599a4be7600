//! Platform properties: what an action asks for, what a worker offers, and
//! the strict matching between them (KILN-CONTRACT §3).
//!
//! * Matched: `OSFamily` exactly; `ISA` as a set with aliases normalised;
//!   `container-image` exactly against the images a worker advertises;
//!   `network=on` only on workers that allow it.
//! * Honoured, not matched: `unixUID`, `unixGID`, `network`,
//!   `chrootRootDigest`.
//! * Everything else is rejected with the list of accepted keys, unless the
//!   server is configured to ignore unknown keys.

use std::collections::BTreeSet;
use std::fmt;

pub const OS_FAMILY: &str = "OSFamily";
pub const ISA: &str = "ISA";
pub const CONTAINER_IMAGE: &str = "container-image";
pub const UNIX_UID: &str = "unixUID";
pub const UNIX_GID: &str = "unixGID";
pub const NETWORK: &str = "network";
pub const CHROOT_ROOT_DIGEST: &str = "chrootRootDigest";
pub const REMOTE_APIS_SOCKET_PATH: &str = "remoteApisSocketPath";

/// Every key Kiln understands, in the order error messages list them.
pub const ACCEPTED_KEYS: &[&str] = &[
    OS_FAMILY,
    ISA,
    CONTAINER_IMAGE,
    UNIX_UID,
    UNIX_GID,
    NETWORK,
    CHROOT_ROOT_DIGEST,
];

/// Canonical ISA spelling: BuildStream's, since it is the client that names
/// ISAs most often. Aliases from the REAPI lexicon, `uname -m` and Debian are
/// folded into it.
pub fn normalize_isa(isa: &str) -> String {
    let lower = isa.trim().to_ascii_lowercase();
    let canonical = match lower.as_str() {
        "x86-64" | "x86_64" | "amd64" | "x64" => "x86-64",
        "aarch64" | "arm-a64" | "arm64" => "aarch64",
        "x86-32" | "x86_32" | "i386" | "i486" | "i586" | "i686" | "x86" => "x86-32",
        "power-isa-le" | "ppc64le" | "ppc64el" => "power-isa-le",
        "power-isa-be" | "ppc64" => "power-isa-be",
        "rv64g" | "riscv64" => "rv64g",
        "aarch32" | "arm-a32" | "armv7" | "armv7l" | "armhf" => "aarch32",
        "sparc-v9" | "sparc64" => "sparc-v9",
        _ => return lower,
    };
    canonical.to_string()
}

/// The ISA of the machine this code runs on, in canonical spelling.
pub fn host_isa() -> String {
    normalize_isa(std::env::consts::ARCH)
}

/// The OSFamily of the machine this code runs on, as REAPI spells it.
pub fn host_os_family() -> String {
    std::env::consts::OS.to_string()
}

/// A property that is wrong in itself, before any worker is considered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    #[error(
        "unknown platform property {key:?} (value {value:?}); Kiln accepts {}",
        ACCEPTED_KEYS.join(", ")
    )]
    UnknownKey { key: String, value: String },
    #[error(
        "platform property {key} is given twice with different values ({first:?} and {second:?})"
    )]
    Conflicting {
        key: String,
        first: String,
        second: String,
    },
    #[error("platform property {key}={value:?} is invalid: {why}")]
    BadValue {
        key: String,
        value: String,
        why: String,
    },
    #[error(
        "platform property remoteApisSocketPath={0:?} is not supported by Kiln yet (no REAPI socket is offered inside the sandbox)"
    )]
    RemoteApisSocketUnsupported(String),
}

/// What an action asks for, normalised.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Requirements {
    pub os_family: Option<String>,
    pub isas: BTreeSet<String>,
    pub container_image: Option<String>,
    pub network: bool,
    pub unix_uid: Option<u32>,
    pub unix_gid: Option<u32>,
    /// `hash/size` of a Directory in CAS laid under the input root.
    pub chroot_root_digest: Option<(String, i64)>,
}

impl Requirements {
    /// Parses REAPI platform properties. `ignore_unknown` turns the
    /// unknown-key error into a warning-free skip (a server setting).
    pub fn parse<'a>(
        properties: impl IntoIterator<Item = (&'a str, &'a str)>,
        ignore_unknown: bool,
    ) -> Result<Self, PlatformError> {
        let mut req = Requirements::default();
        let mut network = None;
        for (name, value) in properties {
            match name {
                OS_FAMILY => set_once(&mut req.os_family, name, value.to_string())?,
                ISA => {
                    if value.trim().is_empty() {
                        return Err(bad(name, value, "an ISA name is required"));
                    }
                    req.isas.insert(normalize_isa(value));
                }
                CONTAINER_IMAGE => {
                    if value.is_empty() {
                        return Err(bad(name, value, "an image name is required"));
                    }
                    set_once(&mut req.container_image, name, value.to_string())?
                }
                UNIX_UID => set_once(&mut req.unix_uid, name, parse_id(name, value)?)?,
                UNIX_GID => set_once(&mut req.unix_gid, name, parse_id(name, value)?)?,
                NETWORK => {
                    let on = match value {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad(name, value, "expected \"on\" or \"off\"")),
                    };
                    set_once(&mut network, name, on)?;
                }
                CHROOT_ROOT_DIGEST => {
                    let digest = parse_digest(value)
                        .ok_or_else(|| bad(name, value, "expected <sha256 hex>/<size in bytes>"))?;
                    set_once(&mut req.chroot_root_digest, name, digest)?
                }
                REMOTE_APIS_SOCKET_PATH => {
                    return Err(PlatformError::RemoteApisSocketUnsupported(
                        value.to_string(),
                    ));
                }
                _ if ignore_unknown => {}
                _ => {
                    return Err(PlatformError::UnknownKey {
                        key: name.to_string(),
                        value: value.to_string(),
                    });
                }
            }
        }
        req.network = network.unwrap_or(false);
        Ok(req)
    }

    /// The part of the requirements that decides which workers may run the
    /// action; actions with equal keys share a queue.
    pub fn match_key(&self) -> MatchKey {
        MatchKey {
            os_family: self.os_family.clone(),
            isas: self.isas.clone(),
            container_image: self.container_image.clone(),
            network: self.network,
        }
    }
}

fn bad(key: &str, value: &str, why: &str) -> PlatformError {
    PlatformError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn parse_id(key: &str, value: &str) -> Result<u32, PlatformError> {
    value
        .parse::<u32>()
        .map_err(|_| bad(key, value, "expected a numeric id"))
}

fn parse_digest(value: &str) -> Option<(String, i64)> {
    let (hash, size) = value.split_once('/')?;
    let size: i64 = size.parse().ok()?;
    let valid_hash = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    (valid_hash && size >= 0).then(|| (hash.to_ascii_lowercase(), size))
}

fn set_once<T: PartialEq + fmt::Debug>(
    slot: &mut Option<T>,
    key: &str,
    value: T,
) -> Result<(), PlatformError> {
    match slot {
        Some(existing) if *existing != value => Err(PlatformError::Conflicting {
            key: key.to_string(),
            first: format!("{existing:?}").trim_matches('"').to_string(),
            second: format!("{value:?}").trim_matches('"').to_string(),
        }),
        _ => {
            *slot = Some(value);
            Ok(())
        }
    }
}

/// The matched part of an action's platform.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MatchKey {
    pub os_family: Option<String>,
    pub isas: BTreeSet<String>,
    pub container_image: Option<String>,
    pub network: bool,
}

impl fmt::Display for MatchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(os) = &self.os_family {
            parts.push(format!("{OS_FAMILY}={os}"));
        }
        for isa in &self.isas {
            parts.push(format!("{ISA}={isa}"));
        }
        if let Some(image) = &self.container_image {
            parts.push(format!("{CONTAINER_IMAGE}={image}"));
        }
        if self.network {
            parts.push(format!("{NETWORK}=on"));
        }
        if parts.is_empty() {
            f.write_str("(no platform properties)")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// What a worker offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Capabilities {
    pub os_family: String,
    pub isas: BTreeSet<String>,
    pub images: BTreeSet<String>,
    pub network_allowed: bool,
}

impl Capabilities {
    pub fn can_run(&self, key: &MatchKey) -> bool {
        key.os_family
            .as_ref()
            .is_none_or(|os| *os == self.os_family)
            && key.isas.is_subset(&self.isas)
            && key
                .container_image
                .as_ref()
                .is_none_or(|image| self.images.contains(image))
            && (!key.network || self.network_allowed)
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{OS_FAMILY}={}", self.os_family)?;
        for isa in &self.isas {
            write!(f, " {ISA}={isa}")?;
        }
        if !self.images.is_empty() {
            let images: Vec<&str> = self.images.iter().map(String::as_str).collect();
            write!(f, " {CONTAINER_IMAGE}∈{{{}}}", images.join(","))?;
        }
        if self.network_allowed {
            write!(f, " network=on allowed")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(props: &[(&str, &str)]) -> Result<Requirements, PlatformError> {
        Requirements::parse(props.iter().copied(), false)
    }

    fn worker(isas: &[&str]) -> Capabilities {
        Capabilities {
            os_family: "linux".into(),
            isas: isas.iter().map(|i| normalize_isa(i)).collect(),
            images: ["debian:12".to_string()].into(),
            network_allowed: false,
        }
    }

    #[test]
    fn isa_aliases_fold_to_one_spelling() {
        for alias in ["x86-64", "x86_64", "amd64", "X86_64"] {
            assert_eq!(normalize_isa(alias), "x86-64");
        }
        for alias in ["aarch64", "arm-a64", "arm64"] {
            assert_eq!(normalize_isa(alias), "aarch64");
        }
        assert_eq!(normalize_isa("mips64el"), "mips64el");
    }

    #[test]
    fn buildstream_platform_matches_an_x86_64_worker() {
        let req = parse(&[
            ("ISA", "x86-64"),
            ("OSFamily", "linux"),
            ("unixGID", "1000"),
            ("unixUID", "1000"),
        ])
        .unwrap();
        assert_eq!(req.unix_uid, Some(1000));
        assert!(worker(&["x86_64"]).can_run(&req.match_key()));
    }

    #[test]
    fn os_and_isa_must_match_exactly() {
        let w = worker(&["x86-64"]);
        let arm = parse(&[("ISA", "arm-a64"), ("OSFamily", "linux")]).unwrap();
        assert!(!w.can_run(&arm.match_key()));
        let mac = parse(&[("OSFamily", "macos")]).unwrap();
        assert!(!w.can_run(&mac.match_key()));
        let two = parse(&[("ISA", "x86-64"), ("ISA", "x86-32")]).unwrap();
        assert!(!w.can_run(&two.match_key()));
        assert!(worker(&["x86-64", "x86-32"]).can_run(&two.match_key()));
        assert!(w.can_run(&parse(&[]).unwrap().match_key()));
    }

    #[test]
    fn image_and_network_are_matched() {
        let w = worker(&["x86-64"]);
        assert!(
            w.can_run(
                &parse(&[("container-image", "debian:12")])
                    .unwrap()
                    .match_key()
            )
        );
        assert!(
            !w.can_run(
                &parse(&[("container-image", "debian:13")])
                    .unwrap()
                    .match_key()
            )
        );
        let net = parse(&[("network", "on")]).unwrap().match_key();
        assert!(!w.can_run(&net));
        let mut open = w.clone();
        open.network_allowed = true;
        assert!(open.can_run(&net));
        assert!(w.can_run(&parse(&[("network", "off")]).unwrap().match_key()));
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_accepted_ones() {
        let err = parse(&[("gpu", "yes")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"gpu\""), "{text}");
        assert!(text.contains("OSFamily, ISA"), "{text}");
        assert!(Requirements::parse([("gpu", "yes")], true).is_ok());
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(matches!(
            parse(&[("unixUID", "root")]).unwrap_err(),
            PlatformError::BadValue { .. }
        ));
        assert!(matches!(
            parse(&[("network", "yes")]).unwrap_err(),
            PlatformError::BadValue { .. }
        ));
        assert!(matches!(
            parse(&[("OSFamily", "linux"), ("OSFamily", "macos")]).unwrap_err(),
            PlatformError::Conflicting { .. }
        ));
        assert!(matches!(
            parse(&[("chrootRootDigest", "abc/1")]).unwrap_err(),
            PlatformError::BadValue { .. }
        ));
        assert!(matches!(
            parse(&[("remoteApisSocketPath", "/run/reapi")]).unwrap_err(),
            PlatformError::RemoteApisSocketUnsupported(_)
        ));
        let digest = format!("{}/42", "a".repeat(64));
        let req = parse(&[("chrootRootDigest", &digest)]).unwrap();
        assert_eq!(req.chroot_root_digest, Some(("a".repeat(64), 42)));
    }
}
