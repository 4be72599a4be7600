//! `kiln serve`: the gRPC endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use kiln_server::config::Backend;
use kiln_server::{KilnServer, ServerConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// Flags of `kiln serve`; each overrides the config file.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// TOML configuration file (see docs/storage.md for every field).
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
}

impl ServeArgs {
    /// The configuration: file (if any), then flags.
    pub fn config(&self) -> anyhow::Result<ServerConfig> {
        let mut config = match &self.config {
            Some(p) => ServerConfig::from_file(p)?,
            None => ServerConfig::default(),
        };
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
        config.validate()?;
        Ok(config)
    }
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    super::init_logging();
    let config = args.config()?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let server = KilnServer::open(config.clone())
            .await
            .with_context(|| format!("opening storage in {}", config.data_dir().display()))?;
        let listener = server.bind().await?;
        let addr = listener.local_addr()?;
        // Tests and the benchmark read this line to find a port-0 server.
        println!("kiln: listening on {addr}");
        info!(%addr, data_dir = %config.data_dir().display(), "Kiln is up");
        let routes = server.routes().routes();
        server.serve(listener, routes, shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
}
