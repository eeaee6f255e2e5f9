//! OpenTelemetry export of the request spans (cargo feature `otel`; README "Tracing export").
//!
//! When the standard `OTEL_*` environment asks for it, [`layer`] builds a
//! `tracing-opentelemetry` layer over an OpenTelemetry SDK tracer provider whose batch span
//! processor sends OTLP over HTTP (protobuf) to the collector. The `request` span of every
//! data-listener request and its `upstream` children (with their fields and the events logged
//! inside them) become OpenTelemetry spans; nothing else is added to them, so they carry
//! exactly what the logs carry: no header, token or key.
//!
//! [`continue_trace`] makes a caller's W3C `traceparent` / `tracestate` the parent of its
//! `request` span. permgate never forwards trace context upstream (the upstream header
//! allow-list stays as it is).
//!
//! Transport: the SDK's batch processor exports from its own thread by blocking on the
//! exporter's future, and the hyper client needs a Tokio runtime, so the client's requests
//! run on a one-thread runtime owned here ([`Guard`]), apart from the gateway's runtime. TLS
//! is rustls with Mozilla's roots (plus `OTEL_EXPORTER_OTLP_CERTIFICATE`), as for upstream.
//!
//! Configuration: [`settings`] reads the standard `OTEL_*` variables itself, through the
//! injected environment lookup like everything else, rather than letting the OpenTelemetry
//! crates read them. It exists because those crates (0.33) read only `std::env`, so a test's
//! injected environment would not reach them; they silently ignore or replace bad values
//! (an unparsable timeout, batch size or sampler argument, an unknown sampler or protocol, a
//! malformed header entry), where permgate refuses to start; they do not read
//! `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER` or `OTEL_PROPAGATORS` at all, nor
//! `OTEL_EXPORTER_OTLP_CERTIFICATE` (their hyper client is plain HTTP); and they do not
//! percent-decode `OTEL_RESOURCE_ATTRIBUTES`. Each of these has a test below.
//!
//! Every resolved value is set on the builders explicitly, so the process environment cannot
//! override it. What the crates still read from the process environment: the
//! `OTEL_EXPORTER_OTLP_*HEADERS` (merged over the ones set here), `OTEL_SPAN_*_LIMIT`, and
//! `OTEL_EXPORTER_OTLP_*COMPRESSION` (which this build can only ignore, with a warning). In
//! `permgate serve` that is the same environment, so it makes no difference there, but a
//! test's injected environment cannot switch those off.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
    OTEL_BSP_MAX_EXPORT_BATCH_SIZE_DEFAULT, OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT,
    OTEL_BSP_SCHEDULE_DELAY_DEFAULT,
};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

use crate::env::Env;
use crate::tls::{self, Alpn};

const DEFAULT_ENDPOINT: &str = "http://localhost:4318";
const TRACES_PATH: &str = "/v1/traces";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SERVICE_NAME: &str = "permgate";

/// Whether callers' `traceparent` is honoured: set once the exporter is installed.
static CONTINUE_TRACES: AtomicBool = AtomicBool::new(false);

/// The export settings resolved from the `OTEL_*` variables.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The full URL spans are POSTed to (`.../v1/traces`).
    pub endpoint: Uri,
    /// Extra headers for the collector (`OTEL_EXPORTER_OTLP_HEADERS`); may hold credentials.
    pub headers: HashMap<String, String>,
    pub timeout: Duration,
    /// Extra trusted roots for an `https` endpoint.
    pub ca_file: Option<PathBuf>,
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES`, without `service.name`.
    pub resource: Vec<(String, String)>,
    pub sampler: SamplerChoice,
    pub schedule_delay: Option<Duration>,
    pub max_queue_size: Option<usize>,
    pub max_export_batch_size: Option<usize>,
    /// `OTEL_PROPAGATORS` includes `tracecontext` (the default).
    pub continue_traces: bool,
}

/// `OTEL_TRACES_SAMPLER` (and `_ARG` for the ratio samplers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerChoice {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedRatio(f64),
}

impl SamplerChoice {
    fn build(self) -> Sampler {
        let parent_based = |root| Sampler::ParentBased(Box::new(root));
        match self {
            SamplerChoice::AlwaysOn => Sampler::AlwaysOn,
            SamplerChoice::AlwaysOff => Sampler::AlwaysOff,
            SamplerChoice::Ratio(r) => Sampler::TraceIdRatioBased(r),
            SamplerChoice::ParentBasedAlwaysOn => parent_based(Sampler::AlwaysOn),
            SamplerChoice::ParentBasedAlwaysOff => parent_based(Sampler::AlwaysOff),
            SamplerChoice::ParentBasedRatio(r) => parent_based(Sampler::TraceIdRatioBased(r)),
        }
    }
}

/// A variable's value, an empty one counting as unset (as the OpenTelemetry spec says).
fn var(env: &Env, name: &str) -> Option<String> {
    env(name).filter(|v| !v.trim().is_empty())
}

/// The traces-specific variable, else the generic one: `(name it came from, value)`.
fn signal_var(env: &Env, suffix: &str) -> Option<(String, String)> {
    [
        format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}"),
        format!("OTEL_EXPORTER_OTLP_{suffix}"),
    ]
    .into_iter()
    .find_map(|name| var(env, &name).map(|v| (name, v)))
}

fn parse_num<T: std::str::FromStr>(env: &Env, name: &str) -> Result<Option<T>, String> {
    var(env, name)
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| format!("{name}: '{v}' is not a non-negative integer"))
        })
        .transpose()
}

/// `key=value,key=value` with percent-encoded values (W3C baggage style), as used by
/// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_EXPORTER_OTLP_HEADERS`. Errors never quote values:
/// headers may hold collector credentials.
fn parse_pairs(name: &str, text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .enumerate()
        .map(|(i, pair)| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{name}: entry {} is not key=value", i + 1))?;
            let k = k.trim();
            if k.is_empty() {
                return Err(format!("{name}: entry {} has an empty key", i + 1));
            }
            let v = percent_encoding::percent_decode_str(v.trim())
                .decode_utf8()
                .map_err(|_| format!("{name}: the value of '{k}' is not UTF-8"))?;
            Ok((k.to_string(), v.into_owned()))
        })
        .collect()
}

/// Resolves the standard variables. `Ok(None)`: export is off (the default).
pub fn settings(env: &Env) -> Result<Option<Settings>, String> {
    if !export_on(env)? {
        return Ok(None);
    }
    check_transport(env)?;
    let endpoint = endpoint(env)?;
    let headers = headers(env)?;
    let timeout = timeout(env)?;
    let ca_file = signal_var(env, "CERTIFICATE").map(|(_, path)| PathBuf::from(path));
    let (service_name, resource) = resource(env)?;
    let sampler = sampler(env)?;
    let batch = batch(env)?;
    Ok(Some(Settings {
        endpoint,
        headers,
        timeout,
        ca_file,
        service_name,
        resource,
        sampler,
        schedule_delay: batch.schedule_delay,
        max_queue_size: batch.max_queue_size,
        max_export_batch_size: batch.max_export_batch_size,
        continue_traces: continue_traces(env),
    }))
}

/// On when `OTEL_TRACES_EXPORTER=otlp`, or when it is unset and an OTLP endpoint variable is
/// set; off when `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
fn export_on(env: &Env) -> Result<bool, String> {
    if var(env, "OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    match var(env, "OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase()) {
        Some(v) if v == "none" => Ok(false),
        Some(v) if v == "otlp" => Ok(true),
        Some(v) => Err(format!(
            "OTEL_TRACES_EXPORTER: '{v}' is not supported (otlp or none)"
        )),
        None => Ok(signal_var(env, "ENDPOINT").is_some()),
    }
}

/// What this build cannot do is an error: only http/protobuf, uncompressed, without client
/// certificates.
fn check_transport(env: &Env) -> Result<(), String> {
    if let Some((name, protocol)) = signal_var(env, "PROTOCOL") {
        if protocol.trim() != "http/protobuf" {
            return Err(format!(
                "{name}: '{protocol}' is not supported: this build exports http/protobuf only"
            ));
        }
    }
    if let Some((name, c)) = signal_var(env, "COMPRESSION") {
        if !c.trim().eq_ignore_ascii_case("none") {
            return Err(format!("{name}: '{c}' is not supported (none)"));
        }
    }
    for suffix in ["CLIENT_CERTIFICATE", "CLIENT_KEY"] {
        if let Some((name, _)) = signal_var(env, suffix) {
            return Err(format!("{name}: client certificates are not supported"));
        }
    }
    Ok(())
}

/// The signal-specific URL is used as is; the generic one is a base for `/v1/traces`.
fn endpoint(env: &Env) -> Result<Uri, String> {
    let (name, url) = match var(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        Some(url) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url.trim().to_string()),
        None => {
            let base = var(env, "OTEL_EXPORTER_OTLP_ENDPOINT");
            let base = base.as_deref().unwrap_or(DEFAULT_ENDPOINT);
            let url = format!("{}{TRACES_PATH}", base.trim().trim_end_matches('/'));
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url)
        }
    };
    url.parse::<Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
        .ok_or_else(|| format!("{name}: not an http:// or https:// URL"))
}

/// `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, each a valid HTTP header (the exporter would drop
/// an invalid one silently). Errors never quote values.
fn headers(env: &Env) -> Result<HashMap<String, String>, String> {
    let Some((name, text)) = signal_var(env, "HEADERS") else {
        return Ok(HashMap::new());
    };
    parse_pairs(&name, &text)?
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| {
            // Not quoted: `Authorization: Basic dXNlcjpwYXNz=` would be all key.
            HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("{name}: entry {} is not a valid header name", i + 1))?;
            HeaderValue::from_str(&v)
                .map_err(|_| format!("{name}: the value of '{k}' is not a valid header value"))?;
            Ok((k, v))
        })
        .collect()
}

fn timeout(env: &Env) -> Result<Duration, String> {
    match signal_var(env, "TIMEOUT") {
        Some((name, ms)) => ms
            .trim()
            .parse()
            .map(Duration::from_millis)
            .map_err(|_| format!("{name}: '{ms}' is not a number of milliseconds")),
        None => Ok(DEFAULT_TIMEOUT),
    }
}

/// The service name (`OTEL_SERVICE_NAME`, else `service.name` in `OTEL_RESOURCE_ATTRIBUTES`,
/// else `permgate`) and the other resource attributes.
fn resource(env: &Env) -> Result<(String, Vec<(String, String)>), String> {
    let mut resource = match var(env, "OTEL_RESOURCE_ATTRIBUTES") {
        Some(text) => parse_pairs("OTEL_RESOURCE_ATTRIBUTES", &text)?,
        None => Vec::new(),
    };
    let from_attributes = resource
        .iter()
        .position(|(k, _)| k == "service.name")
        .map(|i| resource.remove(i).1);
    let service_name = var(env, "OTEL_SERVICE_NAME")
        .or(from_attributes)
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());
    Ok((service_name, resource))
}

/// `OTEL_TRACES_SAMPLER`; `parentbased_always_on` when unset.
fn sampler(env: &Env) -> Result<SamplerChoice, String> {
    let Some(name) = var(env, "OTEL_TRACES_SAMPLER") else {
        return Ok(SamplerChoice::ParentBasedAlwaysOn);
    };
    Ok(match name.trim().to_ascii_lowercase().as_str() {
        "always_on" => SamplerChoice::AlwaysOn,
        "always_off" => SamplerChoice::AlwaysOff,
        "traceidratio" => SamplerChoice::Ratio(ratio(env)?),
        "parentbased_always_on" => SamplerChoice::ParentBasedAlwaysOn,
        "parentbased_always_off" => SamplerChoice::ParentBasedAlwaysOff,
        "parentbased_traceidratio" => SamplerChoice::ParentBasedRatio(ratio(env)?),
        other => return Err(format!("OTEL_TRACES_SAMPLER: '{other}' is not supported")),
    })
}

/// `OTEL_TRACES_SAMPLER_ARG` for the ratio samplers; 1 when unset.
fn ratio(env: &Env) -> Result<f64, String> {
    match var(env, "OTEL_TRACES_SAMPLER_ARG") {
        None => Ok(1.0),
        Some(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or_else(|| format!("OTEL_TRACES_SAMPLER_ARG: '{v}' is not a ratio in 0..=1")),
    }
}

/// The `OTEL_BSP_*` values that are set.
struct Batch {
    schedule_delay: Option<Duration>,
    max_queue_size: Option<usize>,
    max_export_batch_size: Option<usize>,
}

/// A zero queue would drop every span, so sizes must be positive; an explicit batch size
/// larger than the queue is an error (the SDK would shrink it silently).
fn batch(env: &Env) -> Result<Batch, String> {
    let size = |name: &str| -> Result<Option<usize>, String> {
        match parse_num::<usize>(env, name)? {
            Some(0) => Err(format!("{name}: must be at least 1")),
            n => Ok(n),
        }
    };
    let max_queue_size = size("OTEL_BSP_MAX_QUEUE_SIZE")?;
    let max_export_batch_size = size("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")?;
    let queue = max_queue_size.unwrap_or(OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT);
    if let Some(n) = max_export_batch_size.filter(|n| *n > queue) {
        return Err(format!(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE: {n} is larger than the queue ({queue})"
        ));
    }
    Ok(Batch {
        schedule_delay: parse_num(env, "OTEL_BSP_SCHEDULE_DELAY")?.map(Duration::from_millis),
        max_queue_size,
        max_export_batch_size,
    })
}

/// `OTEL_PROPAGATORS` includes `tracecontext` (the default).
fn continue_traces(env: &Env) -> bool {
    match var(env, "OTEL_PROPAGATORS") {
        None => true,
        Some(list) => list.split(',').any(|p| p.trim() == "tracecontext"),
    }
}

/// Keeps the exporter running; dropping it flushes the spans still queued (bounded by the
/// export timeout) and stops the exporter's thread and runtime. A no-op when export is off.
#[must_use = "dropping the guard stops span export"]
pub struct Guard {
    running: Option<(SdkTracerProvider, tokio::runtime::Runtime)>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some((provider, runtime)) = self.running.take() {
            CONTINUE_TRACES.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "OpenTelemetry: flushing spans at shutdown failed");
            }
            runtime.shutdown_background();
        }
    }
}

/// The OpenTelemetry layer for the subscriber, if the environment turns export on.
pub fn layer<S>(env: &Env) -> Result<(Option<OpenTelemetryLayer<S, SdkTracer>>, Guard), String>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let Some(settings) = settings(env)? else {
        return Ok((None, Guard { running: None }));
    };
    let (provider, runtime) = provider(&settings)?;
    let tracer = provider.tracer("permgate");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_tracked_inactivity(false);
    CONTINUE_TRACES.store(settings.continue_traces, Ordering::Relaxed);
    let guard = Guard {
        running: Some((provider, runtime)),
    };
    Ok((Some(layer), guard))
}

fn provider(s: &Settings) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("permgate-otlp")
        .enable_all()
        .build()
        .map_err(|e| format!("OpenTelemetry: starting the exporter's runtime: {e}"))?;
    let client = OnRuntime {
        client: HyperClient::new(connector(s)?, s.timeout, None),
        runtime: runtime.handle().clone(),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(s.endpoint.to_string())
        .with_timeout(s.timeout)
        .with_headers(escape_percent(&s.headers))
        .with_http_client(client)
        .build()
        .map_err(|e| format!("OpenTelemetry exporter: {e}"))?;
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch_config(s))
        .build();
    // Not `Resource::builder()`: its detectors read OTEL_SERVICE_NAME and
    // OTEL_RESOURCE_ATTRIBUTES from the process environment, not the injected one.
    let resource = Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attributes(
            s.resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_service_name(s.service_name.clone())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(s.sampler.build())
        .with_resource(resource)
        .build();
    tracing::debug!(
        scheme = s.endpoint.scheme_str(),
        host = s.endpoint.host(),
        port = s.endpoint.port_u16(),
        path = s.endpoint.path(),
        service = %s.service_name,
        "OpenTelemetry span export on"
    );
    Ok((provider, runtime))
}

/// Every value set, defaults included: `BatchConfigBuilder::default()` reads `OTEL_BSP_*`
/// from the process environment, and the injected one must be the only source.
fn batch_config(s: &Settings) -> opentelemetry_sdk::trace::BatchConfig {
    BatchConfigBuilder::default()
        .with_scheduled_delay(s.schedule_delay.unwrap_or(OTEL_BSP_SCHEDULE_DELAY_DEFAULT))
        .with_max_queue_size(s.max_queue_size.unwrap_or(OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT))
        .with_max_export_batch_size(
            s.max_export_batch_size
                .unwrap_or(OTEL_BSP_MAX_EXPORT_BATCH_SIZE_DEFAULT),
        )
        .build()
}

/// The exporter's `with_headers` percent-decodes values again: escaping `%` makes that an
/// identity, so a decoded value such as `p%41ss` reaches the collector as is.
fn escape_percent(headers: &HashMap<String, String>) -> HashMap<String, String> {
    headers
        .iter()
        .map(|(k, v)| (k.clone(), v.replace('%', "%25")))
        .collect()
}

/// HTTPS (rustls, ring, Mozilla roots plus the configured CA file) or plain HTTP.
fn connector(s: &Settings) -> Result<HttpsConnector<HttpConnector>, String> {
    let tls = tls::client_config(s.ca_file.as_deref(), "OTEL_EXPORTER_OTLP_CERTIFICATE")?;
    Ok(tls::https_connector(tls, s.timeout, Alpn::Http1))
}

/// Runs the hyper client on the exporter's own runtime: the SDK's batch thread polls the
/// export future outside any Tokio runtime.
#[derive(Debug)]
struct OnRuntime {
    client: HyperClient<HttpsConnector<HttpConnector>>,
    runtime: tokio::runtime::Handle,
}

#[async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as HttpError)?
    }
}

/// Makes the caller's W3C trace context (`traceparent`, `tracestate`) the parent of `span`,
/// which must not have been entered yet. Does nothing when export is off, when the caller
/// sent none, or when it is malformed (the span then starts a new trace). Only those two
/// headers are read; none is recorded.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !CONTINUE_TRACES.load(Ordering::Relaxed) || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&TraceHeaders(headers));
    if cx.span().span_context().is_valid() {
        // Fails only if the span was already started or the layer is absent: then the span
        // simply keeps its own trace.
        let _ = span.set_parent(cx);
    }
}

/// Exposes only the W3C trace-context headers to the propagator.
struct TraceHeaders<'a>(&'a HeaderMap);

impl Extractor for TraceHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" | "tracestate" => self.0.get(key)?.to_str().ok(),
            _ => None,
        }
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        match key {
            "traceparent" | "tracestate" => {
                let all: Vec<&str> = self
                    .0
                    .get_all(key)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                (!all.is_empty()).then_some(all)
            }
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        ["traceparent", "tracestate"]
            .into_iter()
            .filter(|k| self.0.contains_key(*k))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn resolve(pairs: &[(&str, &str)]) -> Result<Option<Settings>, String> {
        settings(&env_of(pairs))
    }

    #[test]
    fn off_unless_the_environment_asks() {
        assert_eq!(resolve(&[]), Ok(None));
        assert_eq!(resolve(&[("OTEL_SERVICE_NAME", "x")]), Ok(None));
        assert_eq!(resolve(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]), Ok(None));
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")];
        assert!(resolve(&on).unwrap().is_some());
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert_eq!(resolve(&[on[0], off]), Ok(None), "{off:?}");
        }
        assert!(resolve(&[on[0], ("OTEL_SDK_DISABLED", "false")])
            .unwrap()
            .is_some());
    }

    #[test]
    fn exporter_otlp_alone_uses_the_default_endpoint_and_service_name() {
        let s = resolve(&[("OTEL_TRACES_EXPORTER", "otlp")])
            .unwrap()
            .unwrap();
        assert_eq!(s.endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(s.service_name, "permgate");
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert_eq!(s.sampler, SamplerChoice::ParentBasedAlwaysOn);
        assert!(s.continue_traces);
        assert!(s.headers.is_empty());
    }

    #[test]
    fn endpoints_follow_the_spec() {
        let s = |pairs: &[(&str, &str)]| resolve(pairs).unwrap().unwrap().endpoint;
        assert_eq!(
            s(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c.example:4318/")]),
            "https://c.example:4318/v1/traces"
        );
        assert_eq!(
            s(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/otlp")]),
            "http://c:4318/otlp/v1/traces"
        );
        assert_eq!(
            s(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://wrong:1"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:9/custom"),
            ]),
            "http://c:9/custom"
        );
        for bad in ["collector:4318", "ftp://c/", "not a url"] {
            let e = resolve(&[("OTEL_EXPORTER_OTLP_ENDPOINT", bad)]).unwrap_err();
            assert!(e.starts_with("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e}");
        }
    }

    #[test]
    fn unsupported_choices_are_errors_not_silently_ignored() {
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        for bad in [
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_TRACES_SAMPLER", "xray"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "5s"),
            ("OTEL_BSP_SCHEDULE_DELAY", "-1"),
        ] {
            let e = resolve(&[on, bad]).unwrap_err();
            assert!(e.starts_with(bad.0), "{bad:?}: {e}");
        }
        assert!(resolve(&[on, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).is_ok());
        assert!(resolve(&[on, ("OTEL_EXPORTER_OTLP_COMPRESSION", "none")]).is_ok());
    }

    #[test]
    fn headers_resource_sampler_and_batch_settings() {
        let s = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "ignored=1"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "authorization=Bearer%20abc, x-tenant = acme",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod,service.name=from-attrs",
            ),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_PROPAGATORS", "baggage"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.headers.len(), 2);
        assert_eq!(s.headers["authorization"], "Bearer abc");
        assert_eq!(s.headers["x-tenant"], "acme");
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert_eq!(s.service_name, "from-attrs");
        assert_eq!(
            s.resource,
            vec![("deployment.environment".into(), "prod".into())]
        );
        assert_eq!(s.sampler, SamplerChoice::ParentBasedRatio(0.25));
        assert_eq!(s.schedule_delay, Some(Duration::from_millis(100)));
        assert!(!s.continue_traces);

        let named = resolve(&[
            ("OTEL_TRACES_EXPORTER", "otlp"),
            ("OTEL_SERVICE_NAME", "gw-eu"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=ignored"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(named.service_name, "gw-eu");
        assert!(named.resource.is_empty());
    }

    #[test]
    fn header_errors_never_quote_values() {
        let e = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "ok=1,secret-token-value"),
        ])
        .unwrap_err();
        assert!(e.contains("entry 2"), "{e}");
        assert!(!e.contains("secret-token-value"), "{e}");
    }

    /// Each of these the OpenTelemetry crates would accept silently, falling back or dropping
    /// the value (opentelemetry_sdk trace/config.rs, span_processor.rs `init_from_env_vars`;
    /// opentelemetry-otlp exporter/mod.rs `resolve_timeout`, `parse_header_key_value_string`,
    /// exporter/http/mod.rs `add_header_from_string`).
    #[test]
    fn values_the_sdk_would_ignore_are_errors() {
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let ratio = ("OTEL_TRACES_SAMPLER", "traceidratio");
        for bad in [
            vec![ratio, ("OTEL_TRACES_SAMPLER_ARG", "half")],
            vec![ratio, ("OTEL_TRACES_SAMPLER_ARG", "5")],
            vec![("OTEL_BSP_MAX_QUEUE_SIZE", "lots")],
            vec![("OTEL_BSP_MAX_QUEUE_SIZE", "0")],
            vec![("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096")],
            vec![("OTEL_EXPORTER_OTLP_HEADERS", "x tenant=acme")],
            vec![("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=a%0Ab")],
            vec![("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/key.pem")],
            vec![
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "soon"),
            ],
        ] {
            let name = bad.last().unwrap().0;
            let mut pairs = vec![on];
            pairs.extend(bad.iter().copied());
            let e = resolve(&pairs).unwrap_err();
            assert!(e.starts_with(name), "{bad:?}: {e}");
        }
        // A smaller queue alone shrinks the default batch, as the spec's defaults imply.
        let small = resolve(&[on, ("OTEL_BSP_MAX_QUEUE_SIZE", "100")]).unwrap();
        assert_eq!(small.unwrap().max_queue_size, Some(100));
        let big = resolve(&[
            on,
            ("OTEL_BSP_MAX_QUEUE_SIZE", "8192"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096"),
        ]);
        assert_eq!(big.unwrap().unwrap().max_export_batch_size, Some(4096));
    }

    #[test]
    fn a_header_name_error_never_quotes_the_entry() {
        let e = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-tenant=acme,Authorization: Basic dXNlcjpwYXNz=",
            ),
        ])
        .unwrap_err();
        assert!(e.contains("entry 2"), "{e}");
        assert!(!e.contains("dXNlcjpwYXNz"), "{e}");
    }

    /// The SDK's `EnvResourceDetector` keeps `%2C` as is (resource/env.rs
    /// `construct_otel_resources`); the spec says the values are percent-encoded.
    #[test]
    fn resource_attributes_are_percent_decoded() {
        let s = resolve(&[
            ("OTEL_TRACES_EXPORTER", "otlp"),
            ("OTEL_RESOURCE_ATTRIBUTES", "region=eu%2Cwest,team=a%20b"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            s.resource,
            vec![
                ("region".into(), "eu,west".into()),
                ("team".into(), "a b".into())
            ]
        );
    }

    /// opentelemetry-otlp has no CERTIFICATE variable; a CA file that cannot be used stops
    /// the start, naming the variable.
    #[test]
    fn an_unusable_ca_file_is_a_startup_error() {
        let dir = std::env::temp_dir().join(format!("permgate-otel-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for path in [dir.join("missing.pem"), empty] {
            let s = resolve(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c.example:4318"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", path.to_str().unwrap()),
            ])
            .unwrap()
            .unwrap();
            let e = provider(&s).map(|_| ()).unwrap_err();
            assert!(e.starts_with("OTEL_EXPORTER_OTLP_CERTIFICATE"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What one export request looked like at the collector.
    struct Seen {
        path: String,
        content_type: String,
        key: String,
        body_len: usize,
    }

    /// An OTLP/HTTP collector over TLS whose certificate only `ca_pem` vouches for.
    async fn tls_collector() -> (u16, String, std::sync::Arc<std::sync::Mutex<Vec<Seen>>>) {
        use http_body_util::BodyExt;
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        use std::sync::{Arc, Mutex};

        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf_cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let store = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, store) = (acceptor.clone(), store.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let store = store.clone();
                            async move {
                                let header = |n: &str| {
                                    let v = req.headers().get(n).map(|v| v.to_str().unwrap());
                                    v.unwrap_or_default().to_string()
                                };
                                let (path, content_type) =
                                    (req.uri().path().to_string(), header("content-type"));
                                let key = header("x-key");
                                let body = req.into_body().collect().await?.to_bytes();
                                store.lock().unwrap().push(Seen {
                                    path,
                                    content_type,
                                    key,
                                    body_len: body.len(),
                                });
                                Ok::<_, hyper::Error>(hyper::Response::new(
                                    http_body_util::Full::new(Bytes::new()),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (port, ca_cert.pem(), seen)
    }

    /// The whole configuration comes from the injected environment (the process has no
    /// `OTEL_*`): an `https` collector trusted only through `OTEL_EXPORTER_OTLP_CERTIFICATE`
    /// gets the span over the hyper client, with the configured header exactly as decoded
    /// once (`p%2541ss` is `p%41ss`, not `pAss`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn https_export_trusts_the_certificate_variable() {
        use opentelemetry::trace::Tracer as _;

        let (port, ca_pem, seen) = tls_collector().await;
        let dir = std::env::temp_dir().join(format!("permgate-otel-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca_pem).unwrap();
        let endpoint = format!("https://localhost:{port}");
        let s = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_path.to_str().unwrap()),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-key=p%2541ss"),
        ])
        .unwrap()
        .unwrap();
        tokio::task::spawn_blocking(move || {
            let (provider, runtime) = provider(&s).unwrap();
            provider.tracer("test").in_span("probe", |_| {});
            let flushed = provider.shutdown();
            runtime.shutdown_background();
            flushed.unwrap();
        })
        .await
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "one export request");
        assert_eq!(seen[0].path, "/v1/traces");
        assert_eq!(seen[0].content_type, "application/x-protobuf");
        assert_eq!(seen[0].key, "p%41ss");
        assert!(seen[0].body_len > 0);
    }

    #[test]
    fn only_trace_context_headers_are_visible_to_the_propagator() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", "00-abc-def-01".parse().unwrap());
        h.insert("authorization", "Bearer token".parse().unwrap());
        let x = TraceHeaders(&h);
        assert_eq!(x.get("traceparent"), Some("00-abc-def-01"));
        assert_eq!(x.get("authorization"), None);
        assert_eq!(x.keys(), vec!["traceparent"]);
    }
}
