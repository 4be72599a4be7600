//! The operator's HTTP port: Prometheus metrics at `/metrics`, a read-only
//! status page at `/` (and `/status`), and `/healthz`.
//!
//! The page is plain server-rendered HTML (it refreshes itself with a meta
//! tag), so it works with JavaScript off, in a text browser and in `curl`.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use kiln_proto::worker::Stage;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::execution::{ExecutionState, OpTimes, OpView};
use kiln_storage::Storage;

/// `[metrics]` in the config file: the HTTP port for metrics and the
/// status page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP port serving `/metrics` and the status page.
    /// Default none: off. Port 0 picks a free port (`kiln serve` prints
    /// `kiln: metrics on ADDR`). Neither page has authentication: keep it on
    /// loopback or a private network.
    pub listen: Option<SocketAddr>,
    /// Finished operations listed on the status page. Default 50.
    pub recent_operations: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            recent_operations: 50,
        }
    }
}

/// What the pages read.
#[derive(Clone)]
pub struct StatusSource {
    /// The execution state; `None` for a storage-only server.
    pub execution: Option<Arc<ExecutionState>>,
    pub storage: Storage,
    pub recent_operations: usize,
    pub started: Instant,
    /// The gRPC address clients use, shown on the page.
    pub grpc_addr: Option<SocketAddr>,
}

/// Binds the metrics address; a port in use is an error naming it.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// The routes, for tests that serve them on their own listener.
pub fn router(source: StatusSource) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/status", get(status_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Arc::new(source))
}

/// Serves the pages on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    source: StatusSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(source))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Task(format!("metrics server: {e}")))
}

/// Sets the gauges that are read, not counted, then renders everything.
fn refresh_gauges(src: &StatusSource) {
    let m = crate::metrics::global();
    let usage = src.storage.cas.usage();
    m.store_bytes.set(usage.bytes as i64);
    m.store_blobs.set(usage.blobs as i64);
    m.store_limit_bytes.set(usage.limit.unwrap_or(0) as i64);
    if let Some(state) = &src.execution {
        // Reset first: a platform whose last worker left must disappear,
        // not stay at its last value.
        m.queue_length.reset();
        for (platform, n) in state.queues() {
            m.queue_length
                .with_label_values(&[platform.as_str()])
                .set(n as i64);
        }
        m.workers.reset();
        m.worker_slots.reset();
        for w in state.workers() {
            let p = w.caps.to_string();
            m.workers.with_label_values(&[p.as_str()]).inc();
            m.worker_slots
                .with_label_values(&[p.as_str()])
                .add(w.slots as i64);
        }
        m.executing.set(state.totals().executing as i64);
    }
}

async fn metrics(State(src): State<Arc<StatusSource>>) -> impl IntoResponse {
    refresh_gauges(&src);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::global().render(),
    )
}

async fn status_page(State(src): State<Arc<StatusSource>>) -> Html<String> {
    Html(render_status(&src))
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1.23 s`, `45 ms`, `2 min 3 s`.
fn dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 3600.0 {
        format!("{} h {} min", d.as_secs() / 3600, d.as_secs() % 3600 / 60)
    } else if s >= 60.0 {
        format!("{} min {} s", d.as_secs() / 60, d.as_secs() % 60)
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.001 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{} µs", d.as_micros())
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The phases of an operation as table cells: queued, fetch, stage, sandbox
/// set-up, run, upload. Reported durations when the worker sent them;
/// otherwise from the progress messages, the phase under way marked "…".
pub fn phases(t: &OpTimes, now: Instant) -> [String; 6] {
    let queued = match t.started {
        Some(s) => dur(s.saturating_duration_since(t.queued)),
        None if t.completed.is_none() => format!("{} …", dur(now - t.queued)),
        None => "–".into(),
    };
    if let Some(r) = &t.reported {
        let us = Duration::from_micros;
        return [
            queued,
            dur(us(r.fetch_us)),
            dur(us(r.stage_us)),
            dur(us(r.sandbox_setup_us)),
            dur(us(r.run_us)),
            dur(us(r.upload_us)),
        ];
    }
    let start_of = |stage: Stage| {
        t.stages
            .iter()
            .rev()
            .find(|(s, _)| *s == stage)
            .map(|(_, at)| *at)
    };
    let order = [
        Stage::Fetching,
        Stage::Staging,
        Stage::Running,
        Stage::Uploading,
    ];
    let mut cells: Vec<String> = Vec::new();
    for (i, stage) in order.iter().enumerate() {
        let cell = match start_of(*stage) {
            None => "–".into(),
            Some(begin) => {
                let next = order[i + 1..].iter().find_map(|s| start_of(*s));
                match next.or(t.completed) {
                    Some(end) => dur(end.saturating_duration_since(begin)),
                    None => format!("{} …", dur(now.saturating_duration_since(begin))),
                }
            }
        };
        cells.push(cell);
    }
    let [fetch, stage, run, upload]: [String; 4] = cells.try_into().expect("four stages");
    [queued, fetch, stage, "–".into(), run, upload]
}

fn short_op(name: &str) -> &str {
    let id = name.strip_prefix("operations/").unwrap_or(name);
    id.get(..8).unwrap_or(id)
}

fn short_digest(d: &str) -> String {
    match d.split_once('/') {
        Some((h, size)) => format!("{}…/{size}", h.get(..12).unwrap_or(h)),
        None => d.to_string(),
    }
}

/// The status page.
pub fn render_status(src: &StatusSource) -> String {
    let now = Instant::now();
    let usage = src.storage.cas.usage();
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Kiln status</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.5em; margin: 0 0 .2em; }} h2 {{ font-size: 1.1em; margin: 1.4em 0 .4em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .25em .6em; border-bottom: 1px solid #ddd; vertical-align: top; }}
th {{ background: #f3f1ee; font-weight: 600; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
code {{ font: 12px ui-monospace, monospace; }}
.summary span {{ display: inline-block; margin-right: 1.6em; }}
.muted {{ color: #777; }} .why {{ color: #a34a00; }}
.executing {{ color: #0a5; font-weight: 600; }} .queued {{ color: #a34a00; font-weight: 600; }}
</style></head><body>
<h1>Kiln</h1>
<p class="muted">version {version} · up {uptime} · gRPC {grpc} · refreshes every 5 s · <a href="/metrics">metrics</a></p>
"#,
        version = env!("CARGO_PKG_VERSION"),
        uptime = dur(Duration::from_secs(src.started.elapsed().as_secs())),
        grpc = src
            .grpc_addr
            .map_or_else(|| "–".to_string(), |a| a.to_string()),
    );
    let _ = write!(
        h,
        "<p class=\"summary\"><span>CAS: <b>{}</b> in {} blobs{}</span>",
        bytes(usage.bytes),
        usage.blobs,
        usage
            .limit
            .map_or(String::new(), |l| format!(" (limit {})", bytes(l))),
    );
    let Some(state) = &src.execution else {
        h.push_str("</p><p>Remote execution is not enabled on this server.</p></body></html>\n");
        return h;
    };
    let totals = state.totals();
    let _ = writeln!(
        h,
        "<span>Workers: <b>{}</b> ({} slots)</span><span>Executing: <b>{}</b></span><span>Queued: <b>{}</b></span></p>",
        totals.workers, totals.slots, totals.executing, totals.queued
    );

    let ops = state.operations(src.recent_operations);

    // Workers.
    h.push_str("<h2>Workers</h2>\n");
    let workers = state.workers();
    if workers.is_empty() {
        h.push_str("<p>No worker is connected.</p>\n");
    } else {
        h.push_str("<table><tr><th>Worker</th><th>Host</th><th>Platform</th><th>Slots used</th><th>Running</th><th>Connected for</th></tr>\n");
        for w in &workers {
            let running: Vec<String> = w
                .running
                .iter()
                .map(|name| {
                    let action = ops
                        .iter()
                        .find(|o| &o.name == name)
                        .map(|o| short_digest(&o.action_digest))
                        .unwrap_or_default();
                    format!(
                        "<code title=\"{}\">{}</code> {}",
                        esc(name),
                        esc(short_op(name)),
                        esc(&action)
                    )
                })
                .collect();
            let _ = writeln!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td><code>{}</code></td><td class=\"n\">{} / {}</td><td>{}</td><td class=\"n\">{}</td></tr>",
                esc(&w.id),
                esc(&w.hostname),
                esc(&w.caps.to_string()),
                w.running.len(),
                w.slots,
                if running.is_empty() {
                    "<span class=\"muted\">idle</span>".to_string()
                } else {
                    running.join("<br>")
                },
                dur(Duration::from_secs(w.connected_for.as_secs())),
            );
        }
        h.push_str("</table>\n");
    }

    // Queues.
    h.push_str("<h2>Queues</h2>\n");
    let queues: Vec<(String, usize)> = state.queues().into_iter().filter(|(_, n)| *n > 0).collect();
    if queues.is_empty() {
        h.push_str("<p>Nothing is waiting.</p>\n");
    } else {
        h.push_str(
            "<table><tr><th>Platform</th><th>Queued</th><th>Why the first one waits</th></tr>\n",
        );
        for (platform, n) in &queues {
            let why = ops
                .iter()
                .filter(|o| &o.platform == platform && o.state == "queued")
                .min_by_key(|o| o.times.queued)
                .and_then(|o| o.wait_reason.clone())
                .unwrap_or_default();
            let _ = writeln!(
                h,
                "<tr><td><code>{}</code></td><td class=\"n\">{n}</td><td class=\"why\">{}</td></tr>",
                esc(platform),
                esc(&why)
            );
        }
        h.push_str("</table>\n");
    }

    // Operations.
    let _ = writeln!(
        h,
        "<h2>Operations</h2>\n<p class=\"muted\">Everything unfinished and the last {} finished, newest first.</p>",
        src.recent_operations
    );
    if ops.is_empty() {
        h.push_str("<p>No operation yet.</p>\n");
    } else {
        h.push_str("<table><tr><th>Operation</th><th>Action</th><th>Client</th><th>State</th><th>Worker</th><th>Queued</th><th>Fetch</th><th>Stage</th><th>Set-up</th><th>Run</th><th>Upload</th><th>Outcome / why it waits</th></tr>\n");
        for o in &ops {
            h.push_str(&op_row(o, now));
        }
        h.push_str("</table>\n");
    }
    h.push_str("</body></html>\n");
    h
}

fn op_row(o: &OpView, now: Instant) -> String {
    let p = phases(&o.times, now);
    let client = match (o.client.tool.as_str(), o.client.invocation.as_str()) {
        ("", "") => "<span class=\"muted\">–</span>".to_string(),
        (tool, "") => esc(tool),
        (tool, inv) => format!(
            "{} <code class=\"muted\" title=\"{}\">{}</code>",
            esc(tool),
            esc(inv),
            esc(inv.get(..8).unwrap_or(inv))
        ),
    };
    let note = match &o.wait_reason {
        Some(why) => format!("<span class=\"why\">{}</span>", esc(why)),
        None => esc(&o.outcome),
    };
    let attempt = if o.attempt > 1 {
        format!(" (attempt {})", o.attempt)
    } else {
        String::new()
    };
    let mut row = format!(
        "<tr><td><code title=\"{}\">{}</code></td><td><code title=\"{}\">{}</code></td><td>{}</td><td class=\"{}\">{}{}</td><td><code>{}</code></td>",
        esc(&o.name),
        esc(short_op(&o.name)),
        esc(&o.action_digest),
        esc(&short_digest(&o.action_digest)),
        client,
        esc(&o.state),
        esc(&o.state),
        attempt,
        esc(o.worker.as_deref().unwrap_or("")),
    );
    for cell in p {
        let _ = write!(row, "<td class=\"n\">{}</td>", esc(&cell));
    }
    let _ = writeln!(row, "<td>{note}</td></tr>");
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_formats() {
        assert_eq!(
            esc("<a href=\"x\">&</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
        assert_eq!(dur(Duration::from_millis(1500)), "1.50 s");
        assert_eq!(dur(Duration::from_micros(250)), "250 µs");
        assert_eq!(dur(Duration::from_secs(125)), "2 min 5 s");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn phases_in_progress_are_marked() {
        let t0 = Instant::now();
        let t = OpTimes {
            queued: t0,
            started: Some(t0 + Duration::from_millis(10)),
            completed: None,
            stages: vec![
                (Stage::Fetching, t0 + Duration::from_millis(10)),
                (Stage::Staging, t0 + Duration::from_millis(30)),
                (Stage::Running, t0 + Duration::from_millis(40)),
            ],
            reported: None,
        };
        let p = phases(&t, t0 + Duration::from_millis(1040));
        assert_eq!(p[0], "10.0 ms");
        assert_eq!(p[1], "20.0 ms");
        assert_eq!(p[2], "10.0 ms");
        assert_eq!(p[4], "1.00 s …");
        assert_eq!(p[5], "–");
    }
}
