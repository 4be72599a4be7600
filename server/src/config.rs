//! Server configuration: typed structs that parse the TOML file and back the
//! command-line flags. Every field has a documented default; unknown keys
//! are errors.
//!
//! ```toml
//! listen = "127.0.0.1:50051"
//! data_dir = "/var/cache/kiln"
//! instance_names = ["main", "ci/linux"]
//!
//! [storage]
//! backend = "disk"
//! max_size_bytes = 17179869184
//!
//! [cas]
//! max_batch_total_size_bytes = 4194304
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Everything `kiln serve` needs to know.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the single gRPC endpoint. Default `127.0.0.1:50051`.
    /// Port 0 picks a free port. The socket is bound without
    /// `SO_REUSEPORT`, so a port in use is a start-up error.
    pub listen: SocketAddr,
    /// Where Kiln keeps its data. Default `$XDG_CACHE_HOME/kiln`, or
    /// `~/.cache/kiln` when `XDG_CACHE_HOME` is unset.
    pub data_dir: Option<PathBuf>,
    /// Instance names served in addition to `""`. Default none. A request
    /// naming any other instance is INVALID_ARGUMENT. All instances share
    /// one CAS; action-cache entries and asset mappings are per instance.
    pub instance_names: Vec<String>,
    /// The blob store.
    pub storage: StorageConfig,
    /// CAS and ByteStream protocol limits.
    pub cas: CasConfig,
    /// gRPC transport settings.
    pub grpc: GrpcConfig,
    /// Remote execution: timeouts, platform rules, graces.
    pub execution: crate::execution::ExecutionConfig,
}

pub use kiln_storage::config::{Backend, StorageConfig};

/// CAS and ByteStream protocol limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CasConfig {
    /// Advertised `max_batch_total_size_bytes`: the most blob data one
    /// BatchUpdateBlobs or BatchReadBlobs may carry. Default 4 MiB (clients
    /// such as buildbox-casd fill batches up to it).
    pub max_batch_total_size_bytes: u64,
    /// Size of the chunks ByteStream.Read sends. Default 256 KiB.
    pub read_chunk_bytes: usize,
    /// Seconds an interrupted ByteStream upload is kept for resumption
    /// (QueryWriteStatus) after its last write. Default 600.
    pub upload_idle_timeout_secs: u64,
    /// Support and advertise zstd (`compressed-blobs/zstd/...` and batch
    /// compressors). Default true.
    pub zstd: bool,
}

/// gRPC transport settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Largest gRPC message accepted or sent, in bytes. Must exceed
    /// `cas.max_batch_total_size_bytes` with room for framing. Default 16 MiB
    /// (tonic's own default of 4 MiB would reject full batches).
    pub max_message_bytes: usize,
    /// HTTP/2 per-stream flow-control window. Default 4 MiB (the HTTP/2
    /// default of 64 KiB throttles ByteStream).
    pub stream_window_bytes: u32,
    /// HTTP/2 per-connection flow-control window. Default 16 MiB.
    pub connection_window_bytes: u32,
    /// Largest HTTP/2 frame the server accepts. Default 1 MiB (the HTTP/2
    /// default of 16 KiB splits every ByteStream chunk into 64 frames).
    pub max_frame_bytes: u32,
    /// Seconds in-flight calls get to finish after a shutdown signal before
    /// connections are dropped (long-lived streams would otherwise hold the
    /// shutdown forever). Default 10.
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: None,
            instance_names: Vec::new(),
            storage: StorageConfig::default(),
            cas: CasConfig::default(),
            grpc: GrpcConfig::default(),
            execution: Default::default(),
        }
    }
}

impl Default for CasConfig {
    fn default() -> Self {
        CasConfig {
            max_batch_total_size_bytes: 4 << 20,
            read_chunk_bytes: 256 << 10,
            upload_idle_timeout_secs: 600,
            zstd: true,
        }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            max_message_bytes: 16 << 20,
            stream_window_bytes: 4 << 20,
            connection_window_bytes: 16 << 20,
            max_frame_bytes: 1 << 20,
            shutdown_grace_secs: 10,
        }
    }
}

impl ServerConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: ServerConfig =
            toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks settings that depend on each other.
    pub fn validate(&self) -> Result<()> {
        let batch = self.cas.max_batch_total_size_bytes;
        if batch < 64 << 10 {
            return Err(Error::Config(format!(
                "cas.max_batch_total_size_bytes = {batch} is too small (at least 65536)"
            )));
        }
        // Framing of a full batch of tiny blobs costs ~80 bytes per blob on
        // top of the data; a quarter more covers any realistic batch.
        let needed = batch + batch / 4 + (64 << 10);
        if (self.grpc.max_message_bytes as u64) < needed {
            return Err(Error::Config(format!(
                "grpc.max_message_bytes = {} must be at least {needed} to carry a full batch of {batch} bytes",
                self.grpc.max_message_bytes
            )));
        }
        if self.cas.read_chunk_bytes == 0
            || self.cas.read_chunk_bytes as u64 + (64 << 10) > self.grpc.max_message_bytes as u64
        {
            return Err(Error::Config(format!(
                "cas.read_chunk_bytes = {} must be positive and fit in a gRPC message",
                self.cas.read_chunk_bytes
            )));
        }
        if !(16 << 10..16 << 20).contains(&self.grpc.max_frame_bytes) {
            return Err(Error::Config(format!(
                "grpc.max_frame_bytes = {} must be between 16384 and 16777215 (HTTP/2 limits)",
                self.grpc.max_frame_bytes
            )));
        }
        self.storage.validate()?;
        crate::instances::Instances::new(&self.instance_names)?;
        Ok(())
    }

    /// The data directory: the configured one, or the default.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.data_dir {
            return d.clone();
        }
        default_data_dir()
    }
}

/// `$XDG_CACHE_HOME/kiln`, else `$HOME/.cache/kiln`, else `./kiln-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("kiln");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".cache").join("kiln");
    }
    PathBuf::from("kiln-data")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_parsing() {
        let c = ServerConfig::from_toml("").unwrap();
        assert_eq!(c, ServerConfig::default());
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
        let c = ServerConfig::from_toml(
            "listen = \"0.0.0.0:6000\"\ninstance_names = [\"a\"]\n[storage]\nbackend = \"memory\"\n",
        )
        .unwrap();
        assert_eq!(c.storage.backend, Backend::Memory);
        assert_eq!(c.instance_names, vec!["a".to_string()]);
        let e = ServerConfig::from_toml("[storage]\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = ServerConfig::from_toml("[grpc]\nmax_message_bytes = 1000\n").unwrap_err();
        assert!(e.to_string().contains("max_message_bytes"), "{e}");
    }
}
