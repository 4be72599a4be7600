//! Prometheus metrics: one registry for the process, the per-RPC tower
//! layer, and the scrape-time gauges read from the storage and the
//! execution state.
//!
//! The registry is process-wide (like the log subscriber): the services,
//! the storage evictor and the execution state increment it from wherever
//! the event happens, without a handle threaded through every constructor.
//! `/metrics` renders it (see [`crate::http`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body, Frame};
use kiln_proto::reapi::RequestMetadata;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use prost::Message;
use tracing::Instrument;

/// The header REAPI clients attach `RequestMetadata` to.
pub const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// The name recc (up to at least its 2021 releases) sends `RequestMetadata`
/// under instead: accepted too, so its actions are traceable in the logs.
pub const SHORT_REQUEST_METADATA_HEADER: &str = "requestmetadata-bin";

/// Buckets for RPC latencies: 100 µs to ~100 s (CAS calls are sub-ms on
/// loopback, Execute streams last as long as the action).
const RPC_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Buckets for an action's phases: 100 µs (a warm staging) to an hour (a
/// long compile or a long queue).
const PHASE_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Every metric Kiln exports. Names follow Prometheus conventions
/// (`_total` counters, `_seconds`/`_bytes` units).
pub struct Metrics {
    registry: Registry,
    /// Finished RPCs by method (`Service/Method`) and gRPC code.
    pub rpc_requests: IntCounterVec,
    /// RPC duration by method, from request to the end of the response
    /// stream (for Execute: the whole wait for the action).
    pub rpc_duration: HistogramVec,
    /// Blob payload bytes received by BatchUpdateBlobs and ByteStream.Write
    /// (as sent on the wire: compressed bytes for zstd resources).
    pub cas_received_bytes: IntCounter,
    /// Blob payload bytes sent by BatchReadBlobs and ByteStream.Read.
    pub cas_sent_bytes: IntCounter,
    /// Blobs evicted to honour the size limit, and their bytes.
    pub cas_evicted_blobs: IntCounter,
    pub cas_evicted_bytes: IntCounter,
    /// What the CAS holds now (updated at scrape time).
    pub store_bytes: IntGauge,
    pub store_blobs: IntGauge,
    /// The configured size limit; 0 when unlimited.
    pub store_limit_bytes: IntGauge,
    /// Actions waiting per platform (scrape time).
    pub queue_length: IntGaugeVec,
    /// Actions executing (scrape time).
    pub executing: IntGauge,
    /// Connected workers and their slots per platform (scrape time).
    pub workers: IntGaugeVec,
    pub worker_slots: IntGaugeVec,
    /// Finished Execute operations by outcome: `success`, `exit_nonzero`,
    /// `timeout`, `cancelled`, `error`, `cache_hit`.
    pub actions: IntCounterVec,
    /// Action-cache lookups by path (`execute`, `get_action_result`) and
    /// result (`hit`, `miss`).
    pub cache_lookups: IntCounterVec,
    /// Hits / lookups over both paths since start (scrape time).
    pub cache_hit_ratio: Gauge,
    /// Durations of an action's phases: `queued`, `fetch`, `stage`,
    /// `sandbox_setup`, `run`, `upload` (the worker's phases as it reported
    /// them with the result).
    pub action_phase: HistogramVec,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let m = Metrics {
            rpc_requests: IntCounterVec::new(
                Opts::new("kiln_grpc_requests_total", "Finished gRPC calls"),
                &["method", "code"],
            )
            .expect("valid metric"),
            rpc_duration: HistogramVec::new(
                HistogramOpts::new(
                    "kiln_grpc_request_duration_seconds",
                    "gRPC call duration, to the end of the response stream",
                )
                .buckets(RPC_BUCKETS.to_vec()),
                &["method"],
            )
            .expect("valid metric"),
            cas_received_bytes: IntCounter::new(
                "kiln_cas_received_bytes_total",
                "Blob bytes received by BatchUpdateBlobs and ByteStream.Write",
            )
            .expect("valid metric"),
            cas_sent_bytes: IntCounter::new(
                "kiln_cas_sent_bytes_total",
                "Blob bytes sent by BatchReadBlobs and ByteStream.Read",
            )
            .expect("valid metric"),
            cas_evicted_blobs: IntCounter::new(
                "kiln_cas_evicted_blobs_total",
                "Blobs evicted to stay within the size limit",
            )
            .expect("valid metric"),
            cas_evicted_bytes: IntCounter::new(
                "kiln_cas_evicted_bytes_total",
                "Bytes evicted to stay within the size limit",
            )
            .expect("valid metric"),
            store_bytes: IntGauge::new("kiln_cas_stored_bytes", "Bytes held by the CAS")
                .expect("valid metric"),
            store_blobs: IntGauge::new("kiln_cas_stored_blobs", "Blobs held by the CAS")
                .expect("valid metric"),
            store_limit_bytes: IntGauge::new(
                "kiln_cas_limit_bytes",
                "CAS size limit in bytes (0: unlimited)",
            )
            .expect("valid metric"),
            queue_length: IntGaugeVec::new(
                Opts::new("kiln_queue_length", "Actions queued, per platform"),
                &["platform"],
            )
            .expect("valid metric"),
            executing: IntGauge::new("kiln_actions_executing", "Actions executing now")
                .expect("valid metric"),
            workers: IntGaugeVec::new(
                Opts::new("kiln_workers", "Connected workers, per platform"),
                &["platform"],
            )
            .expect("valid metric"),
            worker_slots: IntGaugeVec::new(
                Opts::new("kiln_worker_slots", "Slots of connected workers, per platform"),
                &["platform"],
            )
            .expect("valid metric"),
            actions: IntCounterVec::new(
                Opts::new("kiln_actions_total", "Finished Execute operations by outcome"),
                &["outcome"],
            )
            .expect("valid metric"),
            cache_lookups: IntCounterVec::new(
                Opts::new("kiln_action_cache_lookups_total", "Action-cache lookups"),
                &["path", "result"],
            )
            .expect("valid metric"),
            cache_hit_ratio: Gauge::new(
                "kiln_action_cache_hit_ratio",
                "Action-cache hits / lookups since start",
            )
            .expect("valid metric"),
            action_phase: HistogramVec::new(
                HistogramOpts::new(
                    "kiln_action_phase_duration_seconds",
                    "Duration of an action's phases (queued, fetch, stage, sandbox_setup, run, upload)",
                )
                .buckets(PHASE_BUCKETS.to_vec()),
                &["phase"],
            )
            .expect("valid metric"),
            registry,
        };
        let r = &m.registry;
        for c in [
            Box::new(m.rpc_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.rpc_duration.clone()),
            Box::new(m.cas_received_bytes.clone()),
            Box::new(m.cas_sent_bytes.clone()),
            Box::new(m.cas_evicted_blobs.clone()),
            Box::new(m.cas_evicted_bytes.clone()),
            Box::new(m.store_bytes.clone()),
            Box::new(m.store_blobs.clone()),
            Box::new(m.store_limit_bytes.clone()),
            Box::new(m.queue_length.clone()),
            Box::new(m.executing.clone()),
            Box::new(m.workers.clone()),
            Box::new(m.worker_slots.clone()),
            Box::new(m.actions.clone()),
            Box::new(m.cache_lookups.clone()),
            Box::new(m.cache_hit_ratio.clone()),
            Box::new(m.action_phase.clone()),
        ] {
            r.register(c).expect("metric names are unique");
        }
        // Outcomes and phases exist from the start, so a dashboard's rate()
        // sees 0 → n rather than a series appearing out of nowhere.
        for o in [
            "success",
            "exit_nonzero",
            "timeout",
            "cancelled",
            "error",
            "cache_hit",
        ] {
            m.actions.with_label_values(&[o]);
        }
        for p in ["execute", "get_action_result"] {
            for r in ["hit", "miss"] {
                m.cache_lookups.with_label_values(&[p, r]);
            }
        }
        m
    }

    /// Counts an action-cache lookup.
    pub fn cache_lookup(&self, path: &str, hit: bool) {
        self.cache_lookups
            .with_label_values(&[path, if hit { "hit" } else { "miss" }])
            .inc();
    }

    /// Records a phase duration.
    pub fn phase(&self, phase: &str, d: Duration) {
        self.action_phase
            .with_label_values(&[phase])
            .observe(d.as_secs_f64());
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
        let hits: u64 = ["execute", "get_action_result"]
            .iter()
            .map(|p| self.cache_lookups.with_label_values(&[p, "hit"]).get())
            .sum();
        let misses: u64 = ["execute", "get_action_result"]
            .iter()
            .map(|p| self.cache_lookups.with_label_values(&[p, "miss"]).get())
            .sum();
        if hits + misses > 0 {
            self.cache_hit_ratio
                .set(hits as f64 / (hits + misses) as f64);
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "could not encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

/// The handle storage reports to: evictions land in the process's metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct GlobalStorageMetrics;

impl kiln_storage::StorageMetrics for GlobalStorageMetrics {
    fn evicted(&self, blobs: u64, bytes: u64) {
        let m = global();
        m.cas_evicted_blobs.inc_by(blobs);
        m.cas_evicted_bytes.inc_by(bytes);
    }
}

/// `/pkg.Service/Method` → `Service/Method`: short labels, and still
/// unique across the services Kiln serves.
fn method_label(path: &str) -> String {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((service, method)) => {
            let service = service.rsplit('.').next().unwrap_or(service);
            format!("{service}/{method}")
        }
        None => "unknown".into(),
    }
}

/// The `RequestMetadata` of an HTTP request (or of a gRPC call's metadata,
/// through its `AsRef<HeaderMap>`), if a client sent one under either name;
/// the standard name wins when both are there.
pub fn request_metadata_of(headers: &http::HeaderMap) -> Option<RequestMetadata> {
    [REQUEST_METADATA_HEADER, SHORT_REQUEST_METADATA_HEADER]
        .into_iter()
        .find_map(|name| {
            let value = headers.get(name)?;
            // Binary metadata travels base64-encoded; tonic's metadata map
            // decodes it (padded or not). Only this one header is copied.
            let mut one = http::HeaderMap::with_capacity(1);
            one.insert(name, value.clone());
            let bytes = tonic::metadata::MetadataMap::from_headers(one)
                .get_bin(name)?
                .to_bytes()
                .ok()?;
            RequestMetadata::decode(bytes).ok()
        })
}

/// The client's tool as logged: `name version`, or empty.
pub fn tool_label(md: &RequestMetadata) -> String {
    md.tool_details.as_ref().map_or(String::new(), |t| {
        format!("{} {}", t.tool_name, t.tool_version)
            .trim()
            .to_string()
    })
}

/// A tower layer for the tonic server: counts and times every RPC by method
/// and gRPC code, and runs each handler in a `rpc` tracing span carrying the
/// method and, when the client sent `RequestMetadata`, its tool, invocation
/// id and action id, so every log line of the call can be traced back to the
/// build that caused it.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

/// The service [`RpcMetricsLayer`] makes.
#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = method_label(req.uri().path());
        let span = match request_metadata_of(req.headers()) {
            Some(md) => {
                let tool = tool_label(&md);
                tracing::info_span!(
                    "rpc",
                    method = %method,
                    tool = %tool,
                    invocation = %md.tool_invocation_id,
                    action_id = %md.action_id,
                )
            }
            None => tracing::info_span!("rpc", method = %method),
        };
        let start = Instant::now();
        let fut = self.inner.call(req).instrument(span);
        Box::pin(async move {
            let resp = fut.await?;
            // A trailers-only response (most errors) carries its status in
            // the headers; otherwise it comes in the trailers.
            let code = grpc_code(resp.headers());
            Ok(resp.map(|inner| MeteredBody {
                inner,
                record: Some(Record {
                    method,
                    start,
                    code,
                }),
            }))
        })
    }
}

struct Record {
    method: String,
    start: Instant,
    code: Option<i32>,
}

impl Record {
    fn finish(self) {
        // A body dropped before its status: the client went away.
        let code = tonic::Code::from(self.code.unwrap_or(tonic::Code::Cancelled as i32));
        let m = global();
        m.rpc_requests
            .with_label_values(&[self.method.as_str(), &format!("{code:?}")])
            .inc();
        m.rpc_duration
            .with_label_values(&[self.method.as_str()])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

fn grpc_code(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

pin_project_lite::pin_project! {
    /// A response body that records its RPC when it ends (or is dropped).
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        record: Option<Record>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(r) = this.project().record.take() {
                r.finish();
            }
        }
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(r) = this.record.as_mut()
                {
                    r.code = grpc_code(trailers).or(r.code);
                }
            }
            Poll::Ready(None) => {
                if let Some(r) = this.record.take() {
                    r.finish();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_short_and_unique() {
        assert_eq!(
            method_label("/build.bazel.remote.execution.v2.Execution/Execute"),
            "Execution/Execute"
        );
        assert_eq!(
            method_label("/google.bytestream.ByteStream/Read"),
            "ByteStream/Read"
        );
        assert_eq!(method_label("/"), "unknown");
    }

    #[test]
    fn request_metadata_is_read_from_its_binary_header() {
        let md = RequestMetadata {
            tool_invocation_id: "inv-1".into(),
            action_id: "abc".into(),
            ..Default::default()
        };
        let mut map = tonic::metadata::MetadataMap::new();
        map.insert_bin(
            REQUEST_METADATA_HEADER,
            tonic::metadata::MetadataValue::from_bytes(&md.encode_to_vec()),
        );
        let headers = map.into_headers();
        assert_eq!(request_metadata_of(&headers), Some(md));
        assert_eq!(request_metadata_of(&http::HeaderMap::new()), None);
    }

    #[test]
    fn request_metadata_is_read_from_recc_s_short_header_too() {
        let md = |inv: &str| RequestMetadata {
            tool_details: Some(kiln_proto::reapi::ToolDetails {
                tool_name: "recc".into(),
                tool_version: "ac04595e".into(),
            }),
            tool_invocation_id: inv.into(),
            ..Default::default()
        };
        let mut map = tonic::metadata::MetadataMap::new();
        map.insert_bin(
            SHORT_REQUEST_METADATA_HEADER,
            tonic::metadata::MetadataValue::from_bytes(&md("short").encode_to_vec()),
        );
        let got = request_metadata_of(map.as_ref()).expect("metadata under the short name");
        assert_eq!(got, md("short"));
        assert_eq!(tool_label(&got), "recc ac04595e");
        // Both names: the standard one is what counts.
        map.insert_bin(
            REQUEST_METADATA_HEADER,
            tonic::metadata::MetadataValue::from_bytes(&md("standard").encode_to_vec()),
        );
        assert_eq!(request_metadata_of(map.as_ref()), Some(md("standard")));
    }

    #[test]
    fn render_has_every_family() {
        let text = global().render();
        for name in [
            "kiln_actions_total",
            "kiln_action_cache_lookups_total",
            "kiln_cas_received_bytes_total",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
