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
//! Configuration comes through the injected environment lookup like everything else. The
//! OpenTelemetry crates also read a few variables from the process environment themselves
//! (the `OTEL_EXPORTER_OTLP_*HEADERS` again, `OTEL_SPAN_*_LIMIT`, and `OTEL_BSP_*` that are
//! not set here); in `permgate serve` that is the same environment, so it makes no
//! difference there, but a test's injected environment cannot switch those off.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hyper::header::HeaderMap;
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
///
/// On when `OTEL_TRACES_EXPORTER=otlp`, or when it is unset and an OTLP endpoint variable is
/// set; off when `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
pub fn settings(env: &Env) -> Result<Option<Settings>, String> {
    if var(env, "OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match var(env, "OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase()) {
        Some(v) if v == "none" => return Ok(None),
        Some(v) if v == "otlp" => {}
        Some(v) => {
            return Err(format!(
                "OTEL_TRACES_EXPORTER: '{v}' is not supported (otlp or none)"
            ))
        }
        None if signal_var(env, "ENDPOINT").is_none() => return Ok(None),
        None => {}
    }

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
    let endpoint = match (
        var(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        var(env, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        // The signal-specific URL is used as is; the generic one is a base.
        (Some(url), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url.trim().to_string()),
        (None, base) => {
            let base = base.unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
            let url = format!("{}{TRACES_PATH}", base.trim().trim_end_matches('/'));
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url)
        }
    };
    let endpoint = endpoint
        .1
        .parse::<Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
        .ok_or_else(|| format!("{}: not an http:// or https:// URL", endpoint.0))?;
    let headers = match signal_var(env, "HEADERS") {
        Some((name, text)) => parse_pairs(&name, &text)?.into_iter().collect(),
        None => HashMap::new(),
    };
    let timeout = match signal_var(env, "TIMEOUT") {
        Some((name, ms)) => Duration::from_millis(
            ms.trim()
                .parse()
                .map_err(|_| format!("{name}: '{ms}' is not a number of milliseconds"))?,
        ),
        None => DEFAULT_TIMEOUT,
    };
    let ca_file = signal_var(env, "CERTIFICATE").map(|(_, path)| PathBuf::from(path));

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

    let ratio = || -> Result<f64, String> {
        match var(env, "OTEL_TRACES_SAMPLER_ARG") {
            None => Ok(1.0),
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| format!("OTEL_TRACES_SAMPLER_ARG: '{v}' is not a ratio in 0..=1")),
        }
    };
    let sampler = match var(env, "OTEL_TRACES_SAMPLER").map(|v| v.trim().to_ascii_lowercase()) {
        None => SamplerChoice::ParentBasedAlwaysOn,
        Some(s) => match s.as_str() {
            "always_on" => SamplerChoice::AlwaysOn,
            "always_off" => SamplerChoice::AlwaysOff,
            "traceidratio" => SamplerChoice::Ratio(ratio()?),
            "parentbased_always_on" => SamplerChoice::ParentBasedAlwaysOn,
            "parentbased_always_off" => SamplerChoice::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => SamplerChoice::ParentBasedRatio(ratio()?),
            other => return Err(format!("OTEL_TRACES_SAMPLER: '{other}' is not supported")),
        },
    };
    let continue_traces = match var(env, "OTEL_PROPAGATORS") {
        None => true,
        Some(list) => list.split(',').any(|p| p.trim() == "tracecontext"),
    };

    Ok(Some(Settings {
        endpoint,
        headers,
        timeout,
        ca_file,
        service_name,
        resource,
        sampler,
        schedule_delay: parse_num(env, "OTEL_BSP_SCHEDULE_DELAY")?.map(Duration::from_millis),
        max_queue_size: parse_num(env, "OTEL_BSP_MAX_QUEUE_SIZE")?,
        max_export_batch_size: parse_num(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE")?,
        continue_traces,
    }))
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
        .with_headers(s.headers.clone())
        .with_http_client(client)
        .build()
        .map_err(|e| format!("OpenTelemetry exporter: {e}"))?;
    let mut batch = BatchConfigBuilder::default();
    if let Some(d) = s.schedule_delay {
        batch = batch.with_scheduled_delay(d);
    }
    if let Some(n) = s.max_queue_size {
        batch = batch.with_max_queue_size(n);
    }
    if let Some(n) = s.max_export_batch_size {
        batch = batch.with_max_export_batch_size(n);
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
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
