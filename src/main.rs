//! The `kiln` command line: a thin layer composing the server, the executor
//! and the sandbox crates.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: hermetic remote execution (REAPI v2)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a hermetic sandbox.
    #[command(subcommand)]
    Sandbox(cmd::sandbox::SandboxCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // libcontainer and libcgroups warn about host features Kiln
                // does not use; what matters is in the outcome's warnings.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,libcontainer=error,libcgroups=error")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    // The sandbox helper must start before anything else (no threads, no
    // async runtime): it forks sandboxes.
    if std::env::args_os().nth(1).as_deref() == Some(kiln_sandbox::HELPER_ARG.as_ref()) {
        init_logging();
        kiln_sandbox::helper_main();
    }
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        // The command's own exit code, or 125 when Kiln itself failed (as
        // docker and podman do), with the error on one line.
        Command::Sandbox(c) => std::process::exit(cmd::sandbox::run(c).unwrap_or_else(|e| {
            eprintln!("kiln: {e:#}");
            125
        })),
        Command::Bench(c) => cmd::bench::run(c),
    }
}
