//! The subcommands of `kiln`, one module each.

pub mod bench_cas;
pub mod bench_exec;
pub mod bench_sandbox;
pub mod cas;
pub mod config;
pub mod health;
pub mod sandbox;
pub mod serve;
pub mod worker;

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

/// Logs to stderr at `default` (e.g. `info`, `warn`) unless `RUST_LOG`
/// says otherwise. libcontainer and libcgroups warn about host features Kiln
/// does not use; what matters reaches the sandbox outcome's warnings.
pub fn init_logging_at(default: &str) {
    init_logging_with(default, crate::config::LogFormat::Human);
}

/// Logs to stderr in `format` at the filter `level` unless `RUST_LOG` says
/// otherwise. Spans (an RPC with the client's tool and invocation id, an
/// action with its digest and operation) appear on every line inside them:
/// as `span{field=value}:` prefixes in human form, as `span` and `spans`
/// objects in JSON.
pub fn init_logging_with(level: &str, format: crate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},libcontainer=error,libcgroups=error"))
    });
    // Colour codes only for a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        crate::config::LogFormat::Human => builder.try_init(),
        crate::config::LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
}

/// Logs per the config file's `[log]` table.
pub fn init_logging_from(log: &crate::config::LogConfig) {
    init_logging_with(&log.level, log.format);
}

/// Logs to stderr at `info` unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    init_logging_at("info");
}

/// Parses sizes such as `4096`, `64K`, `512M`, `16G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?}")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}
