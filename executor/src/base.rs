//! Base root filesystems (KILN-CONTRACT §6): what recc and Bazel actions,
//! whose input root holds only sources, run on top of.
//!
//! * `chrootRootDigest=<hash>/<size>`: a Directory in CAS, staged like any
//!   input tree (and, like one, cached and never modified);
//! * `container-image=<name>`: a root filesystem directory the worker was
//!   configured with.
//!
//! The action's input root is the top overlay layer; bases lie under it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kiln_proto::reapi::Digest;

use crate::cas::CasClient;
use crate::error::{Error, Result};
use crate::run::Executor;
use crate::stage::StagedTree;

/// One base layer in use.
#[derive(Debug)]
pub enum BaseLayer {
    Staged(StagedTree),
    Image(PathBuf),
}

impl BaseLayer {
    pub fn path(&self) -> &Path {
        match self {
            BaseLayer::Staged(t) => t.path(),
            BaseLayer::Image(p) => p,
        }
    }
}

/// The images this worker offers, by name.
#[derive(Debug, Clone, Default)]
pub struct BaseRoots {
    images: BTreeMap<String, PathBuf>,
}

impl BaseRoots {
    pub fn new(images: BTreeMap<String, PathBuf>) -> Self {
        Self { images }
    }

    pub fn image_names(&self) -> impl Iterator<Item = &str> {
        self.images.keys().map(String::as_str)
    }

    /// The base layers an action asks for, top first.
    pub async fn resolve(
        &self,
        props: &HashMap<&str, &str>,
        cas: &CasClient,
        exec: &Executor,
    ) -> Result<Vec<BaseLayer>> {
        let mut layers = Vec::new();
        if let Some(value) = props.get("chrootRootDigest") {
            let digest = parse_digest(value).ok_or_else(|| {
                Error::BaseRoot(format!("chrootRootDigest {value:?} is not <hash>/<size>"))
            })?;
            let tree = exec.input_tree_for(cas, &digest).await?;
            layers.push(BaseLayer::Staged(exec.stage(cas, &tree).await?));
        }
        if let Some(name) = props.get("container-image") {
            let path = self.images.get(*name).ok_or_else(|| {
                Error::BaseRoot(format!(
                    "container-image {name:?} is not configured on this worker (it has: {})",
                    self.images.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            layers.push(BaseLayer::Image(path.clone()));
        }
        Ok(layers)
    }
}

fn parse_digest(value: &str) -> Option<Digest> {
    let (hash, size) = value.split_once('/')?;
    Some(Digest {
        hash: hash.to_ascii_lowercase(),
        size_bytes: size.parse().ok()?,
    })
}
