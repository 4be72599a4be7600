//! The instance names a server answers to.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Path segments that mark the end of an instance name in resource names;
/// an instance name containing one would make those names ambiguous.
const RESERVED: &[&str] = &[
    "blobs",
    "uploads",
    "compressed-blobs",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
];

/// The instance names served: `""` always, plus configured ones. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct Instances {
    names: Arc<BTreeSet<String>>,
}

impl Instances {
    /// `""` plus `extra`, each checked to be a valid instance name.
    pub fn new(extra: &[String]) -> Result<Self> {
        let mut names = BTreeSet::new();
        names.insert(String::new());
        for name in extra {
            validate(name)?;
            names.insert(name.clone());
        }
        Ok(Instances {
            names: Arc::new(names),
        })
    }

    /// OK if `name` is served; INVALID_ARGUMENT naming it otherwise.
    pub fn check(&self, name: &str) -> Result<()> {
        if self.names.contains(name) {
            return Ok(());
        }
        Err(Error::UnknownInstance {
            name: name.to_string(),
            known: self.describe(),
        })
    }

    /// Whether `name` is served.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// All names served.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    fn describe(&self) -> String {
        self.names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn validate(name: &str) -> Result<()> {
    let bad = |reason: String| Error::Config(format!("instance name {name:?}: {reason}"));
    if name.is_empty() {
        return Ok(());
    }
    if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        return Err(bad(
            "must not start or end with '/' or contain an empty segment".into(),
        ));
    }
    if let Some(seg) = name.split('/').find(|s| RESERVED.contains(s)) {
        return Err(bad(format!("segment {seg:?} is reserved by the REAPI")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown() {
        let i = Instances::new(&["main".into(), "ci/linux".into()]).unwrap();
        assert!(i.check("").is_ok());
        assert!(i.check("ci/linux").is_ok());
        let e = i.check("nope").unwrap_err().to_string();
        assert!(e.contains("\"nope\"") && e.contains("\"main\""), "{e}");
        assert!(Instances::new(&["a/blobs".into()]).is_err());
        assert!(Instances::new(&["/a".into()]).is_err());
    }
}
