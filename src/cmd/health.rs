//! `kiln health`: asks a server for its capabilities and exits 0 if it
//! answered. Container images built FROM scratch have no shell, curl or nc to
//! probe the gRPC port with, so the compose healthcheck uses this.

use std::time::Duration;

use anyhow::Context;
use kiln_proto::reapi::GetCapabilitiesRequest;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use tonic::transport::Endpoint;

/// Arguments of `kiln health`.
#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// Server URL.
    #[arg(long, env = "KILN_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Instance name to ask about.
    #[arg(long, default_value = "")]
    pub instance: String,
    /// Give up after this many seconds (connecting and the call together).
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
}

/// Runs `kiln health`: exit 0 with one line on stdout if the server answered
/// GetCapabilities with execution enabled, an error otherwise.
pub fn run(args: HealthArgs) -> anyhow::Result<()> {
    // A probe runs every few seconds for the container's whole life: one
    // thread is plenty and keeps it cheap.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let limit = Duration::from_secs(args.timeout);
    rt.block_on(async move {
        let probe = async {
            let channel = Endpoint::from_shared(args.server.clone())
                .with_context(|| format!("server URL {:?}", args.server))?
                .connect_timeout(limit)
                .connect()
                .await
                .with_context(|| format!("connecting to {}", args.server))?;
            let caps = CapabilitiesClient::new(channel)
                .get_capabilities(GetCapabilitiesRequest {
                    instance_name: args.instance.clone(),
                })
                .await
                .context("GetCapabilities")?
                .into_inner();
            let exec = caps.execution_capabilities.is_some_and(|e| e.exec_enabled);
            anyhow::ensure!(exec, "{} answers but execution is disabled", args.server);
            println!("kiln: {} is serving (execution enabled)", args.server);
            Ok(())
        };
        tokio::time::timeout(limit, probe)
            .await
            .with_context(|| format!("{} did not answer within {limit:?}", args.server))?
    })
}
