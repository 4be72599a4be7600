//! The `kiln` command line: a thin layer composing the server, the executor
//! and the sandbox crates.

use clap::{Parser, Subcommand};

mod cmd;
mod config;

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
    /// Serve the REAPI endpoint (storage services; see docs/storage.md).
    Serve(cmd::serve::ServeArgs),
    /// Run a worker that joins a server and executes its actions.
    Worker(cmd::worker::WorkerArgs),
    /// Run a command in a hermetic sandbox, the way a worker would.
    #[command(subcommand)]
    Sandbox(cmd::sandbox::SandboxCommand),
    /// Talk to a server's CAS: upload a directory, download a tree, cat a blob.
    Cas(cmd::cas::CasArgs),
    /// Exit 0 if a server answers GetCapabilities (container healthchecks).
    Health(cmd::health::HealthArgs),
    /// The configuration file: print the default one, check one.
    #[command(subcommand)]
    Config(cmd::config::ConfigCommand),
    /// Benchmarks, each printed against baselines measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// CAS, ByteStream and ActionCache throughput and latency.
    Cas(cmd::bench_cas::BenchCasArgs),
    /// Trivial-action throughput and latency, and input staging cost.
    Exec(cmd::bench_exec::BenchExecArgs),
    /// Median cost of one sandboxed `/bin/true`, Kiln against unshare, bwrap, crun, runc.
    Sandbox(cmd::bench_sandbox::SandboxBench),
}

fn main() -> anyhow::Result<()> {
    // The sandbox helper is this binary re-executed; it must start before
    // anything else (no runtime, no threads).
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(kiln_sandbox::HELPER_ARG))
    {
        cmd::init_logging_at("info");
        kiln_sandbox::helper_main();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => cmd::serve::run(args),
        Command::Worker(args) => cmd::worker::run(args),
        Command::Cas(args) => cmd::cas::run(args),
        Command::Health(args) => cmd::health::run(args),
        Command::Config(c) => cmd::config::run(c),
        // The command's own exit code, or 125 when Kiln itself failed (as
        // docker and podman do), with the error on one line.
        Command::Sandbox(c) => {
            cmd::init_logging_at("warn");
            std::process::exit(cmd::sandbox::run(c).unwrap_or_else(|e| {
                eprintln!("kiln: {e:#}");
                125
            }))
        }
        Command::Bench { what } => match what {
            BenchCommand::Cas(args) => cmd::bench_cas::run(args),
            BenchCommand::Exec(args) => cmd::bench_exec::run(args),
            BenchCommand::Sandbox(args) => {
                cmd::init_logging_at("warn");
                cmd::bench_sandbox::run(args)
            }
        },
    }
}
