//! OpenTelemetry export (cargo feature `otel`): a real gateway in front of the real mock, its
//! spans exported over OTLP/HTTP (protobuf) to an in-process receiver on a loopback port.
//!
//! Its own test binary (`required-features = ["otel"]`): it installs the process-wide
//! subscriber through `observability::init`, exactly as `permgate serve` does, while the `it`
//! binary installs its own log capture. It shares `it/support.rs` for the gateway and client.

#[allow(dead_code)]
#[path = "it/support.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use permgate::mock_upstream::MockUpstream;
use prost::Message;
use support::{list_path, TestClient, ADMIN_KEY, CP, CP2, READER};
use tokio::net::TcpListener;
use tokio::sync::watch;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// One POST the receiver accepted.
struct Export {
    content_type: String,
    body: Bytes,
    request: ExportTraceServiceRequest,
}

/// A minimal OTLP/HTTP collector: `POST /v1/traces` with a protobuf body.
async fn start_receiver() -> (SocketAddr, Arc<Mutex<Vec<Export>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Arc<Mutex<Vec<Export>>> = Arc::default();
    let store = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move { Ok::<_, hyper::Error>(receive(req, &store).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, got)
}

async fn receive(req: Request<Incoming>, store: &Mutex<Vec<Export>>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || req.uri().path() != "/v1/traces" {
        let mut r = Response::new(Full::default());
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let content_type = req
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let request = ExportTraceServiceRequest::decode(body.clone()).expect("a protobuf export");
    store.lock().unwrap().push(Export {
        content_type,
        body,
        request,
    });
    let mut r = Response::new(Full::new(Bytes::from(
        ExportTraceServiceResponse::default().encode_to_vec(),
    )));
    r.headers_mut()
        .insert("content-type", "application/x-protobuf".parse().unwrap());
    r
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn str_attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key)? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_are_exported_and_continue_the_callers_trace() {
    let (collector, exports) = start_receiver().await;
    let vars: HashMap<&str, String> = HashMap::from([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
        ("OTEL_SERVICE_NAME", "permgate-test".into()),
        // Nothing leaves before shutdown: the export below is the guard's flush.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".into()),
    ]);
    let env = |k: &str| vars.get(k).cloned();
    let guard = permgate::observability::init(&env).expect("subscriber with OTLP export");

    let mock = MockUpstream::new(ADMIN_KEY);
    let mock_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock_addr = mock_listener.local_addr().unwrap();
    let (_mock_stop, mock_stopped) = watch::channel(false);
    tokio::spawn(mock.serve(mock_listener, mock_stopped));
    let (_state, addr, _admin, shutdown, served) =
        support::start_gateway_with_admin(&support::base_config(mock_addr)).await;
    let client = TestClient::new(addr);

    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let get = |id: &'static str, extra: Vec<(&'static str, String)>, cp: &'static str| {
        let client = client.clone();
        async move {
            let mut headers = vec![("x-request-id", id.to_string())];
            headers.extend(extra);
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = client
                .send(Method::GET, &list_path(cp), Some(READER), &headers, None)
                .await;
            assert_eq!(r.status, StatusCode::OK, "{id}");
        }
    };
    // A caller's sampled trace (a cache miss: with an upstream call), one without trace
    // context, one with an unsampled parent, and one with a malformed traceparent.
    get(
        "otel-continued",
        vec![
            ("traceparent", traceparent.clone()),
            ("tracestate", "vendor=opaque".into()),
        ],
        CP,
    )
    .await;
    get("otel-root", vec![], CP2).await;
    get(
        "otel-unsampled",
        vec![("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-00"))],
        CP,
    )
    .await;
    get(
        "otel-malformed",
        vec![("traceparent", "00-not-a-trace-01".into())],
        CP,
    )
    .await;
    assert!(
        exports.lock().unwrap().is_empty(),
        "spans left before the flush at shutdown"
    );

    let _ = shutdown.send(());
    served.await.unwrap();
    // Dropping the guard flushes synchronously; off the runtime, since it blocks.
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .unwrap();
    support::eventually("the receiver got the flushed spans", || {
        let exports = exports.clone();
        async move { !exports.lock().unwrap().is_empty() }
    })
    .await;

    let exports = exports.lock().unwrap();
    let mut spans: Vec<&Span> = Vec::new();
    for export in exports.iter() {
        assert_eq!(export.content_type, "application/x-protobuf");
        // Nothing secret travels: no admin-key piece, no caller token, no header.
        let raw = String::from_utf8_lossy(&export.body);
        support::assert_no_key_piece(&raw, "the OTLP export");
        let lower = raw.to_ascii_lowercase();
        for secret in [READER, "bearer", "authorization"] {
            assert!(!lower.contains(secret), "{secret:?} in the OTLP export");
        }
        for rs in &export.request.resource_spans {
            let resource = rs.resource.as_ref().expect("a resource");
            assert_eq!(
                str_attr(&resource.attributes, "service.name"),
                Some("permgate-test")
            );
            assert_eq!(
                str_attr(&resource.attributes, "service.version"),
                Some(env!("CARGO_PKG_VERSION"))
            );
            assert_eq!(
                str_attr(&resource.attributes, "telemetry.sdk.language"),
                Some("rust")
            );
            for ss in &rs.scope_spans {
                spans.extend(ss.spans.iter());
            }
        }
    }
    let request = |id: &str| {
        let found: Vec<&&Span> = spans
            .iter()
            .filter(|s| s.name == "request" && str_attr(&s.attributes, "request_id") == Some(id))
            .collect();
        assert!(found.len() <= 1, "{id} exported twice");
        found.first().map(|s| **s)
    };
    let children = |of: &Span| -> Vec<&Span> {
        spans
            .iter()
            .copied()
            .filter(|s| s.trace_id == of.trace_id && s.parent_span_id == of.span_id)
            .collect()
    };

    let continued = request("otel-continued").expect("the continued request span");
    assert_eq!(hex::encode(&continued.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&continued.parent_span_id), PARENT_ID);
    assert_eq!(continued.trace_state, "vendor=opaque");
    assert_eq!(str_attr(&continued.attributes, "client"), Some("reader"));
    assert_eq!(
        str_attr(&continued.attributes, "route"),
        Some("list_permissions")
    );
    assert_eq!(str_attr(&continued.attributes, "checkpoint"), Some(CP));
    // tracing-opentelemetry exports unsigned integers (the u16 status) as strings.
    assert_eq!(str_attr(&continued.attributes, "status"), Some("200"));
    assert!(matches!(
        attr(&continued.attributes, "duration_ms"),
        Some(Value::DoubleValue(_))
    ));
    let upstream: Vec<&Span> = children(continued)
        .into_iter()
        .filter(|s| s.name == "upstream")
        .collect();
    assert_eq!(upstream.len(), 1, "one upstream attempt, as a child span");
    assert_eq!(str_attr(&upstream[0].attributes, "status"), Some("200"));

    let root = request("otel-root").expect("the request span without trace context");
    assert!(root.parent_span_id.is_empty(), "a new trace");
    assert_ne!(hex::encode(&root.trace_id), TRACE_ID);
    assert_eq!(
        children(root)
            .iter()
            .filter(|s| s.name == "upstream")
            .count(),
        1
    );

    assert!(
        request("otel-unsampled").is_none(),
        "the caller's unsampled decision is honoured (parentbased_always_on)"
    );

    let malformed = request("otel-malformed").expect("the request span with a bad traceparent");
    assert!(
        malformed.parent_span_id.is_empty(),
        "a bad traceparent starts a new trace"
    );
    assert_ne!(hex::encode(&malformed.trace_id), TRACE_ID);
}
