//! Logs and traces. Logs are `tracing` events written to stderr as text or
//! JSON (`RULEHOOK_LOG_FORMAT=json`), filtered by `RULEHOOK_LOG`. Traces are
//! OpenTelemetry spans ([`Span`]), made with the SDK: one tree per ingest
//! request (`ingest` → `event` → `match`, `plugins` → `plugin`; `commit`)
//! and one per attempt (`attempt` → `sign`, `send`, `record`), exported
//! over OTLP (HTTP, protobuf) only when `otlp_endpoint` is configured.
//! Logs are apart from them: delivery log lines carry their ids as fields.
//!
//! With no endpoint no span is made: each site checks one flag ([`root`],
//! [`child`]). With one, a share of events
//! (`otlp_sample_ratio`, by a hash of the event id, so an event's ingest
//! and all its attempts are traced together or not at all) get their
//! spans, which go through OpenTelemetry's batch processor: a bounded
//! queue that drops spans when full, drained by its own thread, so a slow
//! or dead collector costs spans, never a delivery's time.
//!
//! Span attributes are ids, rule and plugin names, endpoint keys
//! (`scheme://host:port`, never a URL's path or query, which can hold a
//! token) and status codes: nothing secret.

use std::hash::Hash as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, ContextGuard, KeyValue, Value};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The tracer every pipeline span comes from: the first `init` with an
/// `otlp_endpoint` sets it (tests that run the server in-process keep it).
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The share of events traced, as `f64` bits; 0 while traces are off.
static SAMPLED: AtomicU64 = AtomicU64::new(0);

/// Whether the event `event_id` is traced (`None`: an event whose id is
/// not known yet, decided at random). The same id always gets the same
/// answer, so its ingest and every attempt, on any node, agree.
fn sampled(event_id: Option<&str>) -> bool {
    let ratio = f64::from_bits(SAMPLED.load(Relaxed));
    if ratio <= 0.0 {
        return false;
    }
    if ratio >= 1.0 {
        return true;
    }
    let x = match event_id {
        Some(id) => {
            // FNV-1a: the same on every node and across releases, which
            // std's `DefaultHasher` does not promise.
            let mut h = Fnv(0xcbf2_9ce4_8422_2325);
            id.hash(&mut h);
            (h.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        None => rand::random::<f64>(),
    };
    x < ratio
}

struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Changes the share of events traced (the benchmarks compare them in one
/// process; the server sets it once, in `init`).
pub fn set_sample_ratio(ratio: f64) {
    SAMPLED.store(ratio.clamp(0.0, 1.0).to_bits(), Relaxed);
}

/// One stage of a trace: an OpenTelemetry span while its event is traced,
/// else nothing (and nothing is made or costs). The span ends when the
/// last clone of it is dropped, so a stage's span covers what holds it.
///
/// Why not `tracing` spans turned into OpenTelemetry ones by
/// `tracing-opentelemetry`: that layer builds each span twice (a builder in
/// the registry's extensions, the SDK's span at close) and the registry
/// tracks every enter and exit; measured, the nine spans of one delivery
/// cost 6–9 µs that way and 2.9–3.3 µs made straight with the SDK
/// (`--bench pipeline -- spans`), and tracing 10 % of events cost the
/// server 7.7 % of its CPU per delivery at saturation that way and 3.7 %
/// this way (`-- telemetry`, BENCHMARKS.md).
#[derive(Clone)]
pub struct Span(Option<Context>);

impl Span {
    /// The span current on this thread (entered with [`Span::in_scope`],
    /// [`Span::entered`] or [`Span::instrument`]), or none.
    pub fn current() -> Span {
        if SAMPLED.load(Relaxed) == 0 {
            return Span(None);
        }
        Span(Context::map_current(|cx| {
            cx.has_active_span().then(|| cx.clone())
        }))
    }

    pub fn is_traced(&self) -> bool {
        self.0.is_some()
    }

    /// A span under this one, named `name`, with the attributes `attributes`
    /// makes (called only when this span is traced).
    pub fn child<A: IntoIterator<Item = KeyValue>>(
        &self,
        name: &'static str,
        attributes: impl FnOnce() -> A,
    ) -> Span {
        match &self.0 {
            Some(parent) => start(name, attributes(), parent),
            None => Span(None),
        }
    }

    /// Sets the attribute `key` to what `value` makes (called only when this
    /// span is traced).
    pub fn record<V: Into<Value>>(&self, key: &'static str, value: impl FnOnce() -> V) {
        if let Some(cx) = &self.0 {
            cx.span().set_attribute(KeyValue::new(key, value()));
        }
    }

    /// Runs `f` with this span current, so the spans `f` makes with
    /// [`child`] go under it.
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let _entered = self.clone().entered();
        f()
    }

    /// Makes this span current until the guard is dropped.
    pub fn entered(self) -> Entered {
        Entered {
            _current: self.0.map(Context::attach),
        }
    }

    /// `fut`, with this span current whenever it runs; the span ends after
    /// it (unless a clone lives on). Not an `async fn`: that kept `fut`
    /// twice (the argument and what it awaits), which doubled an attempt's
    /// task to 8 KiB.
    pub fn instrument<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        match self.0 {
            Some(cx) => futures_util::future::Either::Left(fut.with_context(cx)),
            None => futures_util::future::Either::Right(fut),
        }
    }
}

/// Keeps a span current on this thread (see [`Span::entered`]).
pub struct Entered {
    _current: Option<ContextGuard>,
}

fn start(
    name: &'static str,
    attributes: impl IntoIterator<Item = KeyValue>,
    parent: &Context,
) -> Span {
    let Some(tracer) = TRACER.get() else {
        return Span(None);
    };
    let span = tracer
        .span_builder(name)
        .with_attributes(attributes)
        .start_with_context(tracer, parent);
    Span(Some(parent.with_span(span)))
}

/// A trace's root span for the event `event_id`, named `name`: made (with
/// the attributes `attributes` makes) when traces are on and the event is
/// sampled, else none.
pub fn root<A: IntoIterator<Item = KeyValue>>(
    event_id: Option<&str>,
    name: &'static str,
    attributes: impl FnOnce() -> A,
) -> Span {
    if sampled(event_id) {
        start(name, attributes(), &Context::new())
    } else {
        Span(None)
    }
}

/// A span under the current one ([`Span::current`]): made only while that
/// one is traced, so an unsampled event's stages do not become traces of
/// their own.
pub fn child<A: IntoIterator<Item = KeyValue>>(
    name: &'static str,
    attributes: impl FnOnce() -> A,
) -> Span {
    Span::current().child(name, attributes)
}

/// Spans waiting for export; past this they are dropped, not waited for.
const QUEUE: usize = 8_192;
/// Spans per export request.
const BATCH: usize = 512;
/// How long spans gather before an export, at most.
const EVERY: Duration = Duration::from_secs(1);
/// One export request (connect, send, answer) at most; the processor's
/// thread waits this long for a dead collector while the queue fills.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// At a stop, the spans still queued get this long to go out.
const FLUSH_AT_STOP: Duration = Duration::from_secs(2);
/// A collector's answer is read up to this size (it is a small protobuf).
const ANSWER_CAP: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "`otlp_endpoint`: cannot make the OTLP exporter for {endpoint}: {why}; write e.g. http://127.0.0.1:4318"
    )]
    Exporter { endpoint: String, why: String },
    #[error("cannot make the TLS client for `otlp_endpoint`: {0}")]
    Tls(String),
}

/// Keeps the trace exporter running; `shutdown` sends what is queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes the queued spans (within `FLUSH_AT_STOP`) and stops the
    /// exporter. Blocking: call it off the async reactor.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown_with_timeout(FLUSH_AT_STOP)
        {
            tracing::warn!(error = %e, "could not send the last spans to the OTLP collector");
        }
    }
}

/// Where traces go: the collector's OTLP/HTTP traces URL. A URL without a
/// path gets the standard `/v1/traces`.
pub fn traces_url(endpoint: &url::Url) -> String {
    if endpoint.path() == "/" || endpoint.path().is_empty() {
        let mut u = endpoint.clone();
        u.set_path("/v1/traces");
        u.to_string()
    } else {
        endpoint.to_string()
    }
}

/// Installs the log layer and, with `otlp_endpoint`, the trace exporter
/// for `sample_ratio` of the events (0 to 1). Must run inside the tokio
/// runtime the exporter's requests go through.
pub fn init(
    otlp_endpoint: Option<&url::Url>,
    sample_ratio: f64,
) -> Result<Telemetry, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RULEHOOK_LOG")
        .unwrap_or_else(|_| "info".into());
    let json = std::env::var("RULEHOOK_LOG_FORMAT").is_ok_and(|f| f == "json");
    // Colours only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let logs = if json {
        logs.json().boxed()
    } else {
        logs.boxed()
    };
    let logs = logs.with_filter(filter);
    let provider = match otlp_endpoint {
        Some(endpoint) => Some(provider(endpoint)?),
        None => None,
    };
    if let Some(p) = &provider {
        // A second init (tests that run the server in-process) keeps the
        // first tracer, as it keeps the first log layer.
        let _ = TRACER.set(p.tracer("rulehook"));
    }
    let _ = tracing_subscriber::registry().with(logs).try_init();
    if let Some(endpoint) = otlp_endpoint {
        set_sample_ratio(sample_ratio);
        tracing::info!(collector = %traces_url(endpoint), sample_ratio, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

fn provider(endpoint: &url::Url) -> Result<SdkTracerProvider, TelemetryError> {
    let url = traces_url(endpoint);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(Export::new()?)
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: url.clone(),
            why: e.to_string(),
        })?;
    let batches = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(QUEUE)
                .with_max_export_batch_size(BATCH)
                .with_scheduled_delay(EVERY)
                .build(),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("rulehook")
                .build(),
        )
        .build())
}

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// The exporter's HTTP client: hyper on the server's runtime. The batch
/// processor calls it from its own thread; each request is spawned on the
/// runtime and awaited from there, bounded by `EXPORT_TIMEOUT`.
#[derive(Debug)]
struct Export {
    runtime: tokio::runtime::Handle,
    client: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
}

impl Export {
    fn new() -> Result<Export, TelemetryError> {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| TelemetryError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Export {
            runtime: tokio::runtime::Handle::current(),
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build(connector),
        })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Export {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, Full::new(body));
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let answer = async {
                let response = client.request(request).await?;
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, ANSWER_CAP).collect().await?.to_bytes();
                Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
            };
            tokio::time::timeout(EXPORT_TIMEOUT, answer)
                .await
                .map_err(|_| format!("no answer within {EXPORT_TIMEOUT:?}"))?
        });
        sent.await?
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry_sdk::trace::SpanData;

    use super::*;

    /// The tests that set the sample ratio (a process-wide setting) take
    /// turns.
    static RATIO: Mutex<()> = Mutex::new(());

    /// Keeps every span it is given.
    #[derive(Debug, Clone, Default)]
    struct Kept(Arc<Mutex<Vec<SpanData>>>);

    impl opentelemetry_sdk::trace::SpanExporter for Kept {
        async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    #[test]
    fn an_instrumented_future_is_the_size_of_the_future_and_a_context() {
        // An attempt's task holds its future nested in two `instrument`s;
        // an `async fn` wrapper kept the future twice (as its argument and
        // as what it awaits), and the task was 8 KiB, moved and faulted in
        // for every attempt.
        let payload = [0u8; 4096];
        let fut = async move { std::hint::black_box(&payload).len() };
        let bare = std::mem::size_of_val(&fut);
        let wrapped = Span(None).instrument(fut);
        let extra = std::mem::size_of_val(&wrapped) - bare;
        assert!(
            extra <= std::mem::size_of::<Context>() + 16,
            "instrument added {extra} bytes to a {bare}-byte future"
        );
        let nested = Span(None)
            .instrument(Span(None).instrument(async move { std::hint::black_box(&payload).len() }));
        assert!(std::mem::size_of_val(&nested) <= bare + 2 * (std::mem::size_of::<Context>() + 16));
        assert_eq!(futures_util::FutureExt::now_or_never(nested), Some(4096));
    }

    #[test]
    fn stages_nest_under_the_span_current_on_their_thread_or_future() {
        let _turn = RATIO.lock().unwrap_or_else(|e| e.into_inner());
        let kept = Kept::default();
        // Exported as each span ends, so what `kept` holds is what ended.
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(kept.clone())
            .build();
        assert!(
            TRACER.set(provider.tracer("test")).is_ok(),
            "no other test sets the tracer"
        );
        set_sample_ratio(1.0);
        let ingest = root(Some("evt-1"), "ingest", || [KeyValue::new("events", 1)]);
        ingest.in_scope(|| {
            let _event = child("event", || [KeyValue::new("event.id", "evt-1")]).entered();
            child("match", || []).in_scope(|| ());
        });
        let commit = ingest.child("commit", || []);
        let attempt = root(Some("evt-1"), "attempt", || []);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(attempt.clone().instrument(async {
            tokio::task::yield_now().await;
            // Still current after a pause: the future carries its span.
            Span::current().record("outcome", || "succeeded");
            drop(child("send", || []));
        }));
        let ended = |name: &str| kept.0.lock().unwrap().iter().any(|s| s.name == name);
        assert!(ended("send") && ended("match") && ended("event"));
        assert!(!ended("attempt"), "a span lives while a clone of it does");
        assert!(!ended("ingest") && !ended("commit"));
        drop((attempt, commit, ingest));
        set_sample_ratio(0.0);
        assert!(
            !root(Some("evt-2"), "ingest", || []).is_traced(),
            "traces off make no span"
        );
        let spans = kept.0.lock().unwrap().clone();
        let named = |name: &str| spans.iter().find(|s| s.name == name).unwrap();
        let parent = |name: &str| {
            let id = named(name).parent_span_id;
            spans
                .iter()
                .find(|s| s.span_context.span_id() == id)
                .map(|s| &*s.name)
        };
        for (name, expected) in [
            ("ingest", None),
            ("event", Some("ingest")),
            ("match", Some("event")),
            ("commit", Some("ingest")),
            ("attempt", None),
            ("send", Some("attempt")),
        ] {
            assert_eq!(parent(name), expected, "the parent of {name}");
        }
        assert_eq!(spans.len(), 6, "{spans:?}");
        assert!(
            named("attempt")
                .attributes
                .contains(&KeyValue::new("outcome", "succeeded")),
            "{:?}",
            named("attempt").attributes
        );
    }

    #[test]
    fn an_events_trace_is_sampled_by_its_id_alone() {
        let _turn = RATIO.lock().unwrap_or_else(|e| e.into_inner());
        SAMPLED.store(0.5f64.to_bits(), Relaxed);
        let ids: Vec<String> = (0..2_000).map(|i| format!("evt-{i}")).collect();
        let first: Vec<bool> = ids.iter().map(|id| sampled(Some(id))).collect();
        let again: Vec<bool> = ids.iter().map(|id| sampled(Some(id))).collect();
        assert_eq!(first, again, "the same id, the same decision");
        let share = first.iter().filter(|s| **s).count();
        assert!((800..1_200).contains(&share), "{share} of 2000 at 0.5");
        SAMPLED.store(0, Relaxed);
        assert!(!sampled(Some("evt-1")), "off means off");
    }

    #[test]
    fn a_collector_url_without_a_path_gets_the_traces_path() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(
            traces_url(&u("http://127.0.0.1:4318")),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url(&u("https://otel.example/custom/traces")),
            "https://otel.example/custom/traces"
        );
    }
}
