//! The Capabilities service.

use std::sync::{Arc, RwLock};

use kiln_proto::reapi::capabilities_server::Capabilities;
use kiln_proto::reapi::{
    ActionCacheUpdateCapabilities, CacheCapabilities, ExecutionCapabilities,
    GetCapabilitiesRequest, ServerCapabilities, compressor, digest_function,
    symlink_absolute_path_strategy,
};
use kiln_proto::semver::SemVer;
use tonic::{Request, Response, Status};

use crate::config::CasConfig;
use crate::instances::Instances;

/// The Capabilities service. Execution capabilities are settable after
/// construction (through [`ExecutionCapabilitiesHandle`]) by whoever adds the
/// Execution service to the server.
#[derive(Clone, Debug)]
pub struct CapabilitiesService {
    instances: Instances,
    cache: CacheCapabilities,
    execution: ExecutionCapabilitiesHandle,
}

/// Shared, settable execution capabilities.
#[derive(Clone, Debug)]
pub struct ExecutionCapabilitiesHandle(Arc<RwLock<ExecutionCapabilities>>);

impl ExecutionCapabilitiesHandle {
    /// Execution disabled, SHA-256.
    pub fn disabled() -> Self {
        ExecutionCapabilitiesHandle(Arc::new(RwLock::new(ExecutionCapabilities {
            digest_function: digest_function::Value::Sha256 as i32,
            exec_enabled: false,
            execution_priority_capabilities: None,
            supported_node_properties: Vec::new(),
            digest_functions: vec![digest_function::Value::Sha256 as i32],
        })))
    }

    /// Turns execution on or off.
    pub fn set_enabled(&self, enabled: bool) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .exec_enabled = enabled;
    }

    /// Replaces the execution capabilities wholesale (priorities, node
    /// properties...). `digest_function(s)` should stay SHA-256.
    pub fn set(&self, caps: ExecutionCapabilities) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = caps;
    }

    /// The current value.
    pub fn get(&self) -> ExecutionCapabilities {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl CapabilitiesService {
    /// Capabilities of the storage configured by `config`.
    pub fn new(
        instances: Instances,
        config: &CasConfig,
        execution: ExecutionCapabilitiesHandle,
    ) -> Self {
        let compressors = if config.zstd {
            vec![compressor::Value::Zstd as i32]
        } else {
            Vec::new()
        };
        let cache = CacheCapabilities {
            digest_functions: vec![digest_function::Value::Sha256 as i32],
            action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                update_enabled: true,
            }),
            cache_priority_capabilities: None,
            max_batch_total_size_bytes: config.max_batch_total_size_bytes as i64,
            symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
            supported_compressors: compressors.clone(),
            supported_batch_update_compressors: compressors,
            max_cas_blob_size_bytes: 0,
            split_blob_support: false,
            splice_blob_support: false,
            fast_cdc_2020_params: None,
            rep_max_cdc_params: None,
        };
        CapabilitiesService {
            instances,
            cache,
            execution,
        }
    }
}

fn version(major: i32, minor: i32) -> Option<SemVer> {
    Some(SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    })
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        self.instances.check(&request.get_ref().instance_name)?;
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(self.cache.clone()),
            execution_capabilities: Some(self.execution.get()),
            deprecated_api_version: version(2, 0),
            low_api_version: version(2, 0),
            high_api_version: version(2, 3),
        }))
    }
}
