//! Micro-benchmarks of permgate's cache-hit path, piece by piece, through its public API, so a
//! regression shows up without a load test (`benches/compare.sh` is the load test).
//!
//! ```sh
//! cargo bench --bench hot_path              # ~1 minute after the (fat LTO) build
//! cargo bench --bench hot_path -- --quick   # quicker, coarser
//! cargo bench --bench hot_path -- cache/    # one group
//! ```
//!
//! Groups, in the order a hit goes through them (`src/proxy.rs`, `respond` and `handle_inner`):
//! - `parse/`: `route::match_route` + `Matched::checkpoint` + `ListQuery::parse` (path and
//!   query decoding, validation and normalization);
//! - `auth/`: `Clients::authenticate` (bearer parsing, SHA-256 of the token, table lookup);
//! - `cache/`: `PageCache::key` + `get` (+ `freshness` and `age_seconds`) on a tokio runtime;
//! - `response/`: `observability::request_id` and the response assembly a hit does
//!   (`error::json_response` + `Age`, `x-request-id`, `Cache-Status`);
//! - `full_hit/`: one whole request over a loopback HTTP/1.1 keep-alive connection, client and
//!   server on one current-thread runtime: permgate's `server::serve_http` + `proxy::handle`
//!   against the same client talking to a bare hyper server writing the same body. Their
//!   difference is what permgate adds to a hit. `proxy::handle` itself cannot be called
//!   directly from outside the crate: it takes a `Request<hyper::body::Incoming>`, which only
//!   hyper can make, so the socket is the public way in. Variants: without a tracing
//!   subscriber (spans disabled), with permgate's JSON subscriber and the access log off (as
//!   the comparison runs it), and with the access log on (written to a sink, so the cost is
//!   formatting, not I/O).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body_util::{BodyExt, Empty};
use hyper::header::{HeaderValue, AGE, AUTHORIZATION};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

use permgate::auth::{digest, Clients};
use permgate::cache::{CacheStatus, PageCache};
use permgate::clock::Clock;
use permgate::config::{ClientConfig, Config, Identity};
use permgate::error::json_response;
use permgate::observability;
use permgate::proxy;
use permgate::request_log::{CACHE_STATUS, X_REQUEST_ID};
use permgate::route::{self, Checkpoint, ListQuery};
use permgate::secret::AdminKey;
use permgate::server::{self, Limits};
use permgate::state::AppState;

#[path = "helpers/reference_server.rs"]
mod reference_server;

const CHECKPOINT: &str = "ft:gpt-4o-mini-2024-07-18:acme:weather:B7R9VjQd";
const ENCODED: &str = "ft%3Agpt-4o-mini-2024-07-18%3Aacme%3Aweather%3AB7R9VjQd";
const TOKEN: &str = "bench-client-token-0123456789abcdef";

fn path(checkpoint: &str) -> String {
    format!("/v1/fine_tuning/checkpoints/{checkpoint}/permissions")
}

/// A 10-item list page like OpenAI's (about 1.3 KB).
fn page_body() -> Bytes {
    let items: Vec<String> = (0..10)
        .map(|i| {
            format!(
                r#"{{"object":"checkpoint.permission","id":"cp_{i:024}","created_at":{},"project_id":"proj_{i:024}"}}"#,
                1_721_764_800 + i
            )
        })
        .collect();
    Bytes::from(format!(
        r#"{{"object":"list","data":[{}],"first_id":"cp_{:024}","last_id":"cp_{:024}","has_more":false}}"#,
        items.join(","),
        0,
        9
    ))
}

fn config(listen: &str) -> Config {
    let text = format!(
        r#"
[server]
listen = "{listen}"
worker_threads = 1

[upstream]
base_url = "http://127.0.0.1:9/v1"

[cache]
ttl_seconds = 3600

[[clients]]
name = "bench"
token_sha256 = "{}"
checkpoints = ["*"]
"#,
        hex::encode(digest(TOKEN.as_bytes()))
    );
    Config::parse(&text, &|_| None).expect("bench config")
}

fn clients(n: usize) -> Clients {
    let configs: Vec<ClientConfig> = (0..n)
        .map(|i| {
            let token = if i == n - 1 {
                TOKEN.to_owned()
            } else {
                format!("other-token-{i}")
            };
            ClientConfig {
                name: format!("client-{i}"),
                identity: Identity::TokenSha256(digest(token.as_bytes())),
                checkpoints: vec!["ft:gpt-4o-mini-2024-07-18:acme:*".into()],
                can_write: false,
                rate: None,
            }
        })
        .collect();
    Clients::new(&configs)
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    let cases = [
        ("raw_no_query", path(CHECKPOINT), None),
        (
            "raw_full_query",
            path(CHECKPOINT),
            Some("order=ascending&limit=100&after=cp_zc4Q7MP6XxulcVzj4MZdwsAB&project_id=proj_1"),
        ),
        ("encoded_limit", path(ENCODED), Some("limit=10")),
    ];
    for (name, path, query) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| {
                let matched =
                    route::match_route(&Method::GET, std::hint::black_box(path)).expect("route");
                let checkpoint = matched.checkpoint().expect("checkpoint");
                let query = ListQuery::parse(std::hint::black_box(*query)).expect("query");
                (checkpoint, query)
            })
        });
    }
    group.finish();
}

fn auth(c: &mut Criterion) {
    let mut group = c.benchmark_group("auth");
    let header = HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header");
    let checkpoint = Checkpoint::parse(CHECKPOINT).expect("checkpoint");
    for n in [1, 100] {
        let clients = clients(n);
        group.bench_with_input(BenchmarkId::new("authenticate", n), &n, |b, _| {
            b.iter(|| {
                clients
                    .authenticate(Some(std::hint::black_box(&header)))
                    .is_ok()
            })
        });
        group.bench_with_input(BenchmarkId::new("authenticate_authorize", n), &n, |b, _| {
            b.iter(|| {
                let client = clients
                    .authenticate(Some(std::hint::black_box(&header)))
                    .expect("client");
                client.authorize(&checkpoint, false).is_ok()
            })
        });
    }
    group.finish();
}

fn cache(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("cache");
    for entries in [1usize, 10_000] {
        let cache = PageCache::new(
            &config("127.0.0.1:0").cache,
            Clock::default(),
            Counter::default(),
        );
        let body = page_body();
        rt.block_on(async {
            for i in 0..entries {
                let cp = Checkpoint::parse(&format!("{CHECKPOINT}-{i}")).expect("checkpoint");
                let key = cache.key(cp, ListQuery::default());
                let page = cache.page(StatusCode::OK, &body).expect("page");
                cache.insert(key, page).await;
            }
            cache.run_pending_tasks().await;
        });
        let checkpoint = Checkpoint::parse(&format!("{CHECKPOINT}-0")).expect("checkpoint");
        let query = ListQuery::default();
        let (cache, checkpoint, query) = (&cache, &checkpoint, &query);
        group.bench_with_input(BenchmarkId::new("key_get", entries), &entries, |b, _| {
            b.to_async(&rt).iter(|| async move {
                let key = cache.key(checkpoint.clone(), query.clone());
                cache.get(&key).await.expect("a hit")
            })
        });
        group.bench_with_input(
            BenchmarkId::new("key_get_freshness_age", entries),
            &entries,
            |b, _| {
                b.to_async(&rt).iter(|| async move {
                    let key = cache.key(checkpoint.clone(), query.clone());
                    let page = cache.get(&key).await.expect("a hit");
                    (cache.freshness(&page), cache.age_seconds(&page))
                })
            },
        );
    }
    group.finish();
}

fn response(c: &mut Criterion) {
    let mut group = c.benchmark_group("response");
    let body = page_body();
    group.bench_function("request_id_new", |b| {
        b.iter(|| observability::request_id(None))
    });
    let from_caller = HeaderValue::from_static("req-abc-123");
    group.bench_function("request_id_from_caller", |b| {
        b.iter(|| observability::request_id(Some(std::hint::black_box(&from_caller))))
    });
    group.bench_function("json_response", |b| {
        b.iter(|| json_response(StatusCode::OK, body.clone()))
    });
    group.bench_function("hit_response_assembly", |b| {
        b.iter(|| {
            let request_id = observability::request_id(None);
            let mut response = json_response(StatusCode::OK, body.clone());
            let headers = response.headers_mut();
            headers.insert(AGE, HeaderValue::from(std::hint::black_box(3u64)));
            headers.insert(X_REQUEST_ID.clone(), request_id);
            headers.insert(
                CACHE_STATUS.clone(),
                HeaderValue::from_static(CacheStatus::Hit.as_str()),
            );
            response
        })
    });
    group.finish();
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

static HANDLE_FUTURE_BYTES: AtomicUsize = AtomicUsize::new(0);

async fn connect(addr: std::net::SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}

async fn get(sender: &mut Sender, uri: &str, authorization: &HeaderValue) -> usize {
    let request = Request::get(uri)
        .header(AUTHORIZATION, authorization.clone())
        .body(Empty::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .len()
}

/// permgate's log output exactly as `observability::init` installs it with
/// `PERMGATE_LOG_FORMAT=json`, written to a sink.
fn subscriber(filter: &str) -> impl tracing::Subscriber + Send + Sync {
    use tracing_subscriber::layer::SubscriberExt;
    let layer = observability::log_layer(filter, Some("json"), std::io::sink).expect("log layer");
    tracing_subscriber::registry().with(layer)
}

fn full_hit(c: &mut Criterion) {
    let rt = runtime();
    let body = page_body();
    let authorization = HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header");
    let uri = path(CHECKPOINT);

    let (gateway, reference, _stop) = rt.block_on(async {
        let config = config("127.0.0.1:0");
        let key = AdminKey::new("sk-admin-bench-not-used").expect("key");
        let state = AppState::new(&config, key, Clock::default(), None).expect("state");
        // The hit: the page is in the cache before the first request.
        let cp = Checkpoint::parse(CHECKPOINT).expect("checkpoint");
        let page = state.cache.page(StatusCode::OK, &body).expect("page");
        state
            .cache
            .insert(state.cache.key(cp, ListQuery::default()), page)
            .await;

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gateway = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(server::serve_http(
            listener,
            move |req| {
                let future = proxy::handle(state.clone(), req);
                HANDLE_FUTURE_BYTES.store(std::mem::size_of_val(&future), Ordering::Relaxed);
                future
            },
            stopped,
            Limits::local(Duration::from_secs(1)),
            None,
        ));

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let reference = listener.local_addr().expect("addr");
        tokio::spawn(reference_server::serve(
            listener,
            body.clone(),
            Duration::ZERO,
        ));
        (gateway, reference, stop)
    });

    let mut group = c.benchmark_group("full_hit");
    group.throughput(Throughput::Elements(1));
    let mut run = |name: &str, addr, filter: Option<&str>| {
        let mut sender = rt.block_on(connect(addr));
        let _guard = filter.map(|f| tracing::subscriber::set_default(subscriber(f)));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        get(&mut sender, &uri, &authorization).await;
                    }
                    start.elapsed()
                })
            })
        });
    };
    run("bare_hyper_reference", reference, None);
    run("permgate_no_subscriber", gateway, None);
    // The state machine hyper's service future moves around once per request (see README).
    eprintln!(
        "size of the proxy::handle future: {} bytes",
        HANDLE_FUTURE_BYTES.load(Ordering::Relaxed)
    );
    run(
        "permgate_json_access_log_off",
        gateway,
        Some("info,permgate::access=off"),
    );
    run("permgate_json_access_log_on", gateway, Some("info"));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = parse, auth, cache, response, full_hit
}
criterion_main!(benches);
