//! `kiln serve`: the gRPC endpoint.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use kiln_proto::longrunning::operations_server::OperationsServer;
use kiln_proto::reapi::execution_server::ExecutionServer;
use kiln_proto::worker::workers_server::WorkersServer;
use kiln_sandbox::LauncherConfig;
use kiln_server::config::Backend;
use kiln_server::execution::Execution;
use kiln_server::{KilnServer, http};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{Config, LogFormat};

/// Flags of `kiln serve`; each overrides the config file.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// TOML configuration file (docs/configuration.md; `kiln config
    /// print-default` prints one).
    #[arg(long, short = 'c', env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051; port 0 picks one].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Data directory [default: $XDG_CACHE_HOME/kiln].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// An instance name to serve besides "" (repeatable).
    #[arg(long = "instance-name")]
    pub instance_names: Vec<String>,
    /// CAS size limit, e.g. 16G; 0 = unlimited [default: 16G].
    #[arg(long, value_parser = super::parse_size)]
    pub max_size: Option<u64>,
    /// Keep blobs in memory instead of on disk (lost on exit).
    #[arg(long)]
    pub memory: bool,
    /// fsync every blob before acknowledging it.
    #[arg(long)]
    pub fsync: bool,
    /// Workers embedded in this process, each with its own cache under the
    /// data directory; 0 for a pure server [default: 1].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Serve /metrics and the status page on this address (port 0 picks
    /// one) [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format [default: human].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Flags for the embedded workers, as for `kiln worker`.
    #[command(flatten)]
    pub worker: super::worker::WorkerFlags,
}

impl ServeArgs {
    /// The configuration: file (if any), then flags.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(l) = self.listen {
            config.listen = l;
        }
        if let Some(d) = &self.data_dir {
            config.data_dir = Some(d.clone());
        }
        config
            .instance_names
            .extend(self.instance_names.iter().cloned());
        if let Some(m) = self.max_size {
            config.storage.max_size_bytes = m;
        }
        if self.memory {
            config.storage.backend = Backend::Memory;
        }
        if self.fsync {
            config.storage.fsync = true;
        }
        if let Some(n) = self.workers {
            config.workers = n;
        }
        if let Some(a) = self.metrics_listen {
            config.metrics.listen = Some(a);
        }
        if let Some(f) = self.log_format {
            config.log.format = f;
        }
        self.worker.apply(&mut config.worker)?;
        config.validate()?;
        Ok(config)
    }
}

/// Runs the server (and its embedded workers) until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let full = args.config()?;
    super::init_logging_from(&full.log);
    let config = full.server();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let server = KilnServer::open(config.clone())
            .await
            .with_context(|| format!("opening storage in {}", config.data_dir().display()))?;
        let listener = server.bind().await?;
        let addr = listener.local_addr()?;
        let execution = Execution::new(
            config.execution.clone(),
            server.storage().cas.clone(),
            server.storage().action_cache.clone(),
            server.instances().clone(),
            Some(&config.data_dir().join("execution")),
        )?;
        server.execution_capabilities().set_enabled(true);
        let max = server.max_message_bytes();
        let mut routes = server.routes();
        routes
            .add_service(
                ExecutionServer::new(execution.execution)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(OperationsServer::new(execution.operations))
            .add_service(
                WorkersServer::new(execution.workers)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            );

        let shutdown = CancellationToken::new();
        let metrics = match full.metrics.listen {
            Some(a) => {
                let l = http::bind(a).await?;
                Some((l.local_addr()?, l))
            }
            None => None,
        };
        let mut workers = Vec::new();
        for i in 0..full.workers {
            let mut wc = full.worker.clone();
            // Embedded workers talk to this very endpoint over loopback,
            // through the same protocol as remote ones.
            let host = if addr.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                addr.ip().to_string()
            };
            wc.server = format!("http://{host}:{}", addr.port());
            wc.data_dir = Some(config.data_dir().join(format!("worker-{i}")));
            let handle = kiln_executor::start(&wc, LauncherConfig::current_exe(), shutdown.clone())
                .with_context(|| format!("starting embedded worker {i}"))?;
            workers.push(handle);
        }

        // Tests and the benchmark read this line to find a port-0 server.
        println!("kiln: listening on {addr}");
        if let Some((maddr, listener)) = metrics {
            // Printed after the gRPC line, which existing readers expect
            // first; some stop reading after it, so a closed pipe is fine.
            let _ = writeln!(std::io::stdout(), "kiln: metrics on {maddr}");
            info!(addr = %maddr, "metrics and status page: http://{maddr}/");
            let source = http::StatusSource {
                execution: Some(std::sync::Arc::clone(&execution.state)),
                storage: server.storage().clone(),
                recent_operations: full.metrics.recent_operations,
                started: std::time::Instant::now(),
                grpc_addr: Some(addr),
            };
            let stop = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    http::serve(listener, source, async move { stop.cancelled().await }).await
                {
                    tracing::error!(error = %e, "the metrics server stopped");
                }
            });
        }
        info!(%addr, data_dir = %config.data_dir().display(), workers = full.workers, "Kiln is up");
        // On a signal, stop the embedded workers and end every worker stream
        // first: those streams never finish by themselves, and the server
        // waits for open calls before it closes the storage.
        let state = std::sync::Arc::clone(&execution.state);
        let stop = shutdown.clone();
        let signal = async move {
            super::shutdown_signal().await;
            stop.cancel();
            state.close_workers();
        };
        server.serve(listener, routes.routes(), signal).await?;
        for w in workers {
            let _ = w.await;
        }
        Ok(())
    })
}
