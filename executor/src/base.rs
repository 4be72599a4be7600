//! Base root filesystems (KILN-CONTRACT §6): what recc and Bazel actions,
//! whose input root holds only sources, run on top of.
//!
//! * `chrootRootDigest=<hash>/<size>`: a Directory in CAS, staged like any
//!   input tree (and, like one, cached and never modified);
//! * `container-image=<name>`: an image the worker was configured with: a
//!   root filesystem directory, or an OCI image layout or OCI/docker-save
//!   tarball unpacked once into the worker's data directory ([`crate::image`]).
//!
//! The action's input root is the top overlay layer; bases lie under it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::OnceCell;

use kiln_proto::reapi::Digest;

use crate::cas::CasClient;
use crate::error::{Error, Result};
use crate::image::{self, ImageSource};
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
    images: BTreeMap<String, Arc<Image>>,
    /// Where images that need unpacking are unpacked.
    cache: PathBuf,
}

#[derive(Debug)]
struct Image {
    configured: PathBuf,
    /// The unpacked root filesystem, once the first action asked for it
    /// (unpacking a large image at worker start would delay every action,
    /// also those that never use it). A failure is not remembered: the
    /// next action tries again.
    rootfs: OnceCell<PathBuf>,
}

impl BaseRoots {
    /// `cache` is the directory (in the worker's data directory) that
    /// unpacked images live in.
    pub fn new(images: BTreeMap<String, PathBuf>, cache: PathBuf) -> Self {
        let images = images
            .into_iter()
            .map(|(name, configured)| {
                let image = Image {
                    configured,
                    rootfs: OnceCell::new(),
                };
                (name, Arc::new(image))
            })
            .collect();
        Self { images, cache }
    }

    /// The root filesystem of image `name`, unpacking it if needed.
    pub async fn image_rootfs(&self, name: &str) -> Result<PathBuf> {
        let image = self.images.get(name).ok_or_else(|| {
            Error::BaseRoot(format!(
                "container-image {name:?} is not configured on this worker (it has: {})",
                self.images.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let rootfs = image
            .rootfs
            .get_or_try_init(|| {
                let (name, configured, cache) = (
                    name.to_string(),
                    image.configured.clone(),
                    self.cache.clone(),
                );
                async move {
                    let what = name.clone();
                    tokio::task::spawn_blocking(move || {
                        let source = ImageSource::detect(&configured)?;
                        let started = std::time::Instant::now();
                        let rootfs = image::prepare(&name, &source, &cache)?;
                        tracing::info!(image = %name, source = ?source, rootfs = %rootfs.display(),
                            elapsed_ms = started.elapsed().as_millis() as u64, "base image ready");
                        Ok::<_, Error>(rootfs)
                    })
                    .await
                    .map_err(|e| Error::Internal(format!("unpacking image {what:?}: {e}")))?
                }
            })
            .await?;
        Ok(rootfs.clone())
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
            layers.push(BaseLayer::Image(self.image_rootfs(name).await?));
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
