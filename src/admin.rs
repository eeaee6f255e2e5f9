//! The admin listener (SPEC "Admin listener"): operators only, never on the data listener.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/healthz` | 200 while the process runs |
//! | GET | `/readyz` | 200 when it can serve; 503 with a reason while draining |
//! | GET | `/metrics` | Prometheus text format (see `metrics`) |
//! | POST | `/cache/purge` | drop every cached page; `?checkpoint=ID` drops one checkpoint's pages |

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::error::{self, Body, Error};
use crate::route::Checkpoint;
use crate::state::{AppState, Scope};

pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let result = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => Ok(json_response(StatusCode::OK, json!({"status": "ok"}))),
        (&Method::GET, "/readyz") => Ok(if state.is_draining() {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "not ready", "reason": "draining: shutdown in progress"}),
            )
        } else {
            json_response(StatusCode::OK, json!({"status": "ready"}))
        }),
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(Full::new(Bytes::from(state.render_metrics().await)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                // OpenMetrics, which the encoder writes: the older text format has no `info` type,
                // and Prometheus refuses the scrape if told it is that format.
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Ok(response)
        }
        (&Method::POST, "/cache/purge") => purge(&state, req.uri().query()).await,
        (_, "/healthz" | "/readyz" | "/metrics") => Err(Error::MethodNotAllowed { allow: "GET" }),
        (_, "/cache/purge") => Err(Error::MethodNotAllowed { allow: "POST" }),
        _ => Err(Error::NotFound),
    };
    result.unwrap_or_else(Error::into_response)
}

async fn purge(state: &AppState, query: Option<&str>) -> Result<Response<Body>, Error> {
    let query = query.unwrap_or("");
    if query.is_empty() {
        state.invalidate(Scope::All).await;
        tracing::info!(target: "permgate::admin", "purged every cached page");
        return Ok(json_response(StatusCode::OK, json!({"purged": "all"})));
    }
    let raw = query
        .strip_prefix("checkpoint=")
        .filter(|v| !v.contains('&'))
        .ok_or_else(|| Error::invalid("checkpoint", "The only parameter is checkpoint=ID."))?;
    let checkpoint = Checkpoint::parse(raw)?;
    state.invalidate(Scope::Checkpoint(&checkpoint)).await;
    tracing::info!(
        target: "permgate::admin",
        checkpoint = checkpoint.as_str(),
        "purged one checkpoint"
    );
    Ok(json_response(
        StatusCode::OK,
        json!({"purged": "checkpoint", "checkpoint": checkpoint.as_str()}),
    ))
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    error::json_response(status, Bytes::from(body.to_string()))
}
