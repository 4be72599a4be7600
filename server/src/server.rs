//! Composing the gRPC endpoint: storage services plus whatever else the
//! caller adds (Execution, Operations, the worker protocol), on one port.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use kiln_proto::asset::fetch_server::FetchServer;
use kiln_proto::asset::push_server::PushServer;
use kiln_proto::bytestream::byte_stream_server::ByteStreamServer;
use kiln_proto::reapi::action_cache_server::ActionCacheServer;
use kiln_proto::reapi::capabilities_server::CapabilitiesServer;
use kiln_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::codec::CompressionEncoding;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::action_cache::ActionCacheService;
use crate::asset::AssetService;
use crate::bytestream::ByteStreamService;
use crate::capabilities::{CapabilitiesService, ExecutionCapabilitiesHandle};
use crate::cas::CasService;
use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::instances::Instances;
use kiln_storage::Storage;

/// A Kiln server: opened storage and the services over it.
///
/// ```no_run
/// # async fn demo() -> kiln_server::Result<()> {
/// use kiln_server::{KilnServer, ServerConfig};
/// let server = KilnServer::open(ServerConfig::default()).await?;
/// let storage = server.storage().clone(); // for the scheduler, the executor...
/// server.execution_capabilities().set_enabled(true);
/// let mut routes = server.routes();
/// // routes.add_service(ExecutionServer::new(...)
/// //     .max_decoding_message_size(server.max_message_bytes()));
/// let listener = server.bind().await?;
/// server.serve(listener, routes.routes(), std::future::pending()).await
/// # }
/// ```
#[derive(Debug)]
pub struct KilnServer {
    config: ServerConfig,
    storage: Storage,
    instances: Instances,
    execution: ExecutionCapabilitiesHandle,
    bytestream: ByteStreamService,
}

impl KilnServer {
    /// Validates `config` and opens its storage.
    pub async fn open(config: ServerConfig) -> Result<Self> {
        config.validate()?;
        let storage = Storage::open(
            &config.storage,
            &config.data_dir(),
            std::sync::Arc::new(crate::metrics::GlobalStorageMetrics),
        )
        .await?;
        Self::with_storage(config, storage)
    }

    /// A server over storage opened elsewhere.
    pub fn with_storage(config: ServerConfig, storage: Storage) -> Result<Self> {
        config.validate()?;
        let instances = Instances::new(&config.instance_names)?;
        let bytestream =
            ByteStreamService::new(storage.cas.clone(), instances.clone(), &config.cas);
        Ok(KilnServer {
            config,
            storage,
            instances,
            execution: ExecutionCapabilitiesHandle::disabled(),
            bytestream,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The storage handles (CAS, action cache, assets).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The instance names served.
    pub fn instances(&self) -> &Instances {
        &self.instances
    }

    /// What Capabilities says about execution (disabled until set).
    pub fn execution_capabilities(&self) -> &ExecutionCapabilitiesHandle {
        &self.execution
    }

    /// The gRPC message size limit; apply it to services you add
    /// (`.max_decoding_message_size(..)` / `.max_encoding_message_size(..)`).
    pub fn max_message_bytes(&self) -> usize {
        self.config.grpc.max_message_bytes
    }

    /// Capabilities, CAS, ByteStream, ActionCache and Remote Asset
    /// Fetch/Push, with message limits raised above the batch size. Add more
    /// services with [`RoutesBuilder::add_service`], then pass
    /// [`RoutesBuilder::routes`] to [`serve`](Self::serve).
    pub fn routes(&self) -> RoutesBuilder {
        let max = self.max_message_bytes();
        let cas_config = &self.config.cas;
        let caps =
            CapabilitiesService::new(self.instances.clone(), cas_config, self.execution.clone());
        let cas = CasService::new(self.storage.cas.clone(), self.instances.clone(), cas_config);
        let ac = ActionCacheService::new(self.storage.action_cache.clone(), self.instances.clone());
        let asset = AssetService::new(self.storage.assets.clone(), self.instances.clone());
        let mut routes = RoutesBuilder::default();
        routes
            .add_service(
                CapabilitiesServer::new(caps)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                ContentAddressableStorageServer::new(cas)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max)
                    .accept_compressed(CompressionEncoding::Zstd),
            )
            .add_service(
                ByteStreamServer::new(self.bytestream.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max)
                    .accept_compressed(CompressionEncoding::Zstd),
            )
            .add_service(
                ActionCacheServer::new(ac)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                FetchServer::new(asset.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                PushServer::new(asset)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            );
        routes
    }

    /// Binds the configured address. A port in use is an error naming it
    /// (no `SO_REUSEPORT`).
    pub async fn bind(&self) -> Result<TcpListener> {
        let addr = self.config.listen;
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })
    }

    /// The tonic transport with Kiln's HTTP/2 settings (large flow-control
    /// windows for ByteStream, TCP_NODELAY for small-call latency).
    pub fn transport(&self) -> tonic::transport::Server {
        let g = &self.config.grpc;
        tonic::transport::Server::builder()
            .initial_stream_window_size(g.stream_window_bytes)
            .initial_connection_window_size(g.connection_window_bytes)
            .max_frame_size(g.max_frame_bytes)
            .tcp_nodelay(true)
    }

    /// Serves `routes` on `listener` until `shutdown` resolves, then flushes
    /// and closes the storage (marking the shutdown clean).
    pub async fn serve(
        &self,
        listener: TcpListener,
        routes: Routes,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let addr = listener.local_addr().ok();
        info!(addr = ?addr, instances = ?self.instances.names().collect::<Vec<_>>(), "serving");
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stopping_tx, stopping_rx) = oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            let _ = stopping_tx.send(());
        };
        let serving = self
            .transport()
            .layer(crate::metrics::RpcMetricsLayer)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, signal);
        tokio::pin!(serving);
        let grace = Duration::from_secs(self.config.grpc.shutdown_grace_secs);
        let served = tokio::select! {
            r = &mut serving => r.map_err(Error::from),
            _ = async {
                if stopping_rx.await.is_ok() {
                    tokio::time::sleep(grace).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                warn!(grace_secs = grace.as_secs(), "calls still in flight after the shutdown grace period; dropping them");
                Ok(())
            }
        };
        let closed = self.storage.close().await;
        served?;
        closed.map_err(Error::from)
    }

    /// Binds, then serves `routes` in a background task. For tests and
    /// embedding; [`RunningServer::stop`] shuts it down cleanly.
    pub async fn start(self, routes: Routes) -> Result<RunningServer> {
        let listener = self.bind().await?;
        let addr = listener.local_addr().map_err(|e| Error::Bind {
            addr: self.config.listen,
            source: e,
        })?;
        let (tx, rx) = oneshot::channel::<()>();
        let storage = self.storage.clone();
        let task = tokio::spawn(async move {
            self.serve(listener, routes, async {
                let _ = rx.await;
            })
            .await
        });
        Ok(RunningServer {
            addr,
            storage,
            stop: Some(tx),
            task,
        })
    }
}

/// A server serving in the background.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    storage: Storage,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
}

impl RunningServer {
    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The storage behind it.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Stops serving, waits for in-flight calls, closes the storage.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| Error::Task(e.to_string()))?
    }
}
