//! `bench-upstream`: a fast fake of OpenAI's checkpoint permission *list* and *create*
//! endpoints, for load tests (`benches/compare.sh`). Unlike `permgate mock-upstream` it keeps no
//! state per request, so it can take hundreds of thousands of requests without growing.
//!
//! - `GET /v1/fine_tuning/checkpoints/{checkpoint}/permissions[?limit=N&...]` answers 200 with
//!   a valid list page of `N` items (`limit`, 1..=100, default 10; other parameters are
//!   accepted and ignored). The 100 possible bodies are built once at start-up.
//! - `POST` to the same path (a create) reads the request body and answers 200 with a valid
//!   one-item list, the shape OpenAI answers a create with; nothing is stored, so a list
//!   afterwards does not show it. permgate checks the body before it forwards a create.
//! - Every request but `/__count` must carry `Authorization: Bearer <admin key>` (else 401).
//! - `GET /__count` answers the number of list and create requests answered so far (plain
//!   text), so a script can count upstream calls (coalescing, cache fills, writes).
//! - `--delay-ms N` holds every list and create answer N ms (a distant upstream) without using
//!   CPU.
//!
//! One tokio thread (current-thread runtime), HTTP/1.1 keep-alive.
//!
//! Usage: `bench-upstream --listen 127.0.0.1:PORT --admin-key KEY [--delay-ms N]`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const PREFIX: &str = "/v1/fine_tuning/checkpoints/";
const MAX_LIMIT: usize = 100;

struct Upstream {
    /// `pages[n]`: the body of an `n`-item page (index 0 unused).
    pages: Vec<Bytes>,
    authorization: Vec<u8>,
    delay: Option<Duration>,
    served: AtomicU64,
}

/// A list page of `n` permissions, shaped like OpenAI's.
fn page(n: usize) -> String {
    let item = |i: usize| {
        format!(
            r#"{{"object":"checkpoint.permission","id":"cp_{i:024}","created_at":{},"project_id":"proj_{i:024}"}}"#,
            1_721_764_800 + i
        )
    };
    let data: Vec<String> = (0..n).map(item).collect();
    format!(
        r#"{{"object":"list","data":[{}],"first_id":"cp_{:024}","last_id":"cp_{:024}","has_more":false}}"#,
        data.join(","),
        0,
        n.saturating_sub(1)
    )
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: &str, param: Option<&str>) -> Response<Full<Bytes>> {
    let param = param.map_or("null".to_owned(), |p| format!("\"{p}\""));
    let body = format!(
        r#"{{"error":{{"message":"{message}","type":"invalid_request_error","param":{param},"code":null}}}}"#
    );
    json(status, Bytes::from(body))
}

/// `limit` from a query string: `Ok(None)` when absent, `Err` when malformed or out of range.
fn limit(query: Option<&str>) -> Result<Option<usize>, ()> {
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("limit=") {
            return match value.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(Some(n)),
                _ => Err(()),
            };
        }
    }
    Ok(None)
}

impl Upstream {
    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if path == "/__count" {
            let n = self.served.load(Ordering::Relaxed);
            return Response::new(Full::new(Bytes::from(n.to_string())));
        }
        let authorized = req
            .headers()
            .get(AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == self.authorization.as_slice());
        if !authorized {
            return error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided.",
                None,
            );
        }
        let is_list = path
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(checkpoint, tail)| !checkpoint.is_empty() && tail == "permissions");
        if !is_list {
            return error(StatusCode::NOT_FOUND, "Unknown URL", None);
        }
        let n = if req.method() == Method::POST {
            // Read to the end, so that hyper keeps the connection open for the next request.
            if req.into_body().collect().await.is_err() {
                return error(StatusCode::BAD_REQUEST, "Unreadable body", None);
            }
            1
        } else if req.method() == Method::GET {
            match limit(req.uri().query()) {
                Ok(n) => n.unwrap_or(10),
                Err(()) => return error(StatusCode::BAD_REQUEST, "Invalid limit", Some("limit")),
            }
        } else {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "Only GET and POST are faked",
                None,
            );
        };
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        json(StatusCode::OK, self.pages[n].clone())
    }
}

fn usage() -> ! {
    eprintln!("usage: bench-upstream --listen ADDR --admin-key KEY [--delay-ms N]");
    std::process::exit(2)
}

fn main() {
    let (mut listen, mut key, mut delay_ms) = (None::<SocketAddr>, None::<String>, 0u64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--listen" => listen = Some(value().parse().unwrap_or_else(|_| usage())),
            "--admin-key" => key = Some(value()),
            "--delay-ms" => delay_ms = value().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let (Some(listen), Some(key)) = (listen, key) else {
        usage()
    };
    let upstream = Arc::new(Upstream {
        pages: (0..=MAX_LIMIT).map(|n| Bytes::from(page(n))).collect(),
        authorization: format!("Bearer {key}").into_bytes(),
        delay: (delay_ms > 0).then(|| Duration::from_millis(delay_ms)),
        served: AtomicU64::new(0),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await.expect("bind --listen");
        eprintln!("bench-upstream listening on {listen}, delay {delay_ms} ms");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let upstream = upstream.clone();
                    async move { Ok::<_, Infallible>(upstream.handle(req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
