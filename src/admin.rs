//! The admin listener (SPEC "Admin listener"): operators only, never on the data listener.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/healthz` | 200 while the process runs |
//! | GET | `/readyz` | 200 when it can serve; 503 with a reason while draining, or before the first JWKS when every client is a JWT subject |
//! | GET | `/metrics` | Prometheus text format (see `metrics`) |
//! | POST | `/cache/purge` | drop every cached page; `?checkpoint=ID` drops one checkpoint's pages |
//!
//! With `server.admin_token_sha256` set (SPEC "The front door"), `/metrics` and the purge need
//! `Authorization: Bearer <admin token>`, else 401 `invalid_api_key`; the probes never do, so
//! kubelets and load balancers need no secret. Routing comes first (404/405 need no token),
//! as on the data listener. The token is hashed and the digests compared in constant time;
//! neither is ever logged.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::auth;
use crate::error::{self, Body, Error};
use crate::route::Checkpoint;
use crate::state::{AppState, Scope};

pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let result = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => Ok(json_response(StatusCode::OK, json!({"status": "ok"}))),
        (&Method::GET, "/readyz") => Ok(match not_ready(&state) {
            Some(reason) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "not ready", "reason": reason}),
            ),
            None => json_response(StatusCode::OK, json!({"status": "ready"})),
        }),
        (&Method::GET, "/metrics") if !admin_token_ok(&state, &req) => Err(Error::InvalidApiKey),
        (&Method::POST, "/cache/purge") if !admin_token_ok(&state, &req) => {
            Err(Error::InvalidApiKey)
        }
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(Full::new(Bytes::from(state.render_metrics().await)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                // OpenMetrics, which the encoder writes (`_total` series, `# EOF`): Prometheus
                // reads it, and refuses the scrape if told it is the older text format.
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
    result.unwrap_or_else(|e| match e {
        Error::InvalidApiKey => unauthorized(req.uri().path()),
        e => e.into_response(),
    })
}

/// Why this replica should not be sent callers yet, if it should not: it is draining, or every
/// client is known by a JWT subject and its `jwt.jwks_url` has not been fetched yet (every
/// caller would get a 401). With static-token or certificate clients too, it is ready: those
/// it serves, and only JWT callers get 401s until the keys arrive. A replica without a fleet
/// lease is ready: it tried to take one before its listeners opened, it serves reads from
/// upstream and refuses writes by design (SPEC "Many replicas"), and were readiness to follow
/// the lease, losing Redis would take every replica out of service at once.
fn not_ready(state: &AppState) -> Option<&'static str> {
    if state.is_draining() {
        Some("draining: shutdown in progress")
    } else if state.jwt.as_ref().is_some_and(|jwt| !jwt.has_keys()) && state.clients().only_jwt() {
        Some("no JWKS yet: jwt.jwks_url has not been fetched")
    } else {
        None
    }
}

/// True when no admin token is configured, or the request carries it as its bearer token.
fn admin_token_ok(state: &AppState, req: &Request<Incoming>) -> bool {
    let Some(expected) = &state.admin_token_sha256 else {
        return true;
    };
    // Exactly one Authorization field: with two, which one counts would be a guess.
    let token = match auth::Authorization::of(req.headers()) {
        auth::Authorization::One(v) => auth::bearer_token(v.as_bytes()),
        auth::Authorization::None | auth::Authorization::Several => None,
    };
    // A missing token is still hashed and compared, so both refusals take the same path.
    same_digest(&auth::digest(token.unwrap_or_default()), expected) && token.is_some()
}

/// Compares every byte whatever differs first, so the time taken says nothing about how much
/// of a guess's digest was right.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// The 401 of `Error::InvalidApiKey` (status, `x-should-retry: false`), with a message about
/// the admin token rather than a client token. Logged by path only.
fn unauthorized(path: &str) -> Response<Body> {
    tracing::warn!(
        target: "permgate::admin",
        path,
        "admin request refused: missing or wrong admin token"
    );
    let mut response = Error::InvalidApiKey.into_response();
    let body = json!({"error": {
        "message": "Missing or wrong admin token. Send 'Authorization: Bearer <admin token>' (its SHA-256 is server.admin_token_sha256).",
        "type": "invalid_request_error",
        "param": null,
        "code": Error::InvalidApiKey.code(),
    }});
    *response.body_mut() = Full::new(Bytes::from(body.to_string()));
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"permgate admin\""),
    );
    response
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_equal_only_when_every_byte_is() {
        let a = auth::digest(b"admin-token");
        assert!(same_digest(&a, &auth::digest(b"admin-token")));
        for i in [0, 17, 31] {
            let mut b = a;
            b[i] ^= 1;
            assert!(!same_digest(&a, &b), "byte {i}");
        }
    }

    #[test]
    fn only_a_bearer_scheme_carries_the_admin_token() {
        use crate::auth::bearer_token;
        assert_eq!(bearer_token(b"Bearer tok"), Some(&b"tok"[..]));
        assert_eq!(bearer_token(b"bearer  tok "), Some(&b"tok"[..]));
        for bad in [&b""[..], b"Bearer", b"Bearer ", b"Basic tok", b"tok"] {
            assert_eq!(
                bearer_token(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
