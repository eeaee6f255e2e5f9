//! The record of one data-listener request: filled in as the pipeline learns who asked for
//! what and what happened, then [`RequestLog::finish`] turns it into everything that reports
//! on the request, in one place: the error rendering, the `Cache-Status` and `x-request-id`
//! headers, the `request` span's fields, the audit record of a write attempt, the metrics and
//! the access log line.

use std::sync::Arc;
use std::time::Instant;

use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Response, StatusCode};
use tracing::{field, info, info_span, Instrument, Span};

use crate::audit;
use crate::auth::Client;
use crate::cache::CacheStatus;
use crate::error::{Body, Error, X_SHOULD_RETRY};
use crate::metrics::RequestOutcome;
use crate::observability;
use crate::route::{Checkpoint, Operation};
use crate::state::AppState;
use crate::upstream::Attempted;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// What the pipeline learned about a request. Fields stay empty until a step fills them: a
/// request refused early names no client or checkpoint.
pub struct RequestLog {
    started: Instant,
    /// The caller's sane `x-request-id`, or a new one; sent upstream and echoed back.
    pub request_id: HeaderValue,
    method: Method,
    span: Span,
    operation: Option<Operation>,
    client: Option<Arc<Client>>,
    checkpoint: Option<Checkpoint>,
    pub project_ids: Option<Vec<String>>,
    pub permission_id: Option<Box<str>>,
    pub upstream_status: Option<StatusCode>,
    /// What upstream did with each attempt of a write.
    pub attempts: Vec<Attempted>,
    pub cache_status: Option<CacheStatus>,
    /// A POST or DELETE refused before routing (414): audited although it has no route.
    unrouted_write: bool,
}

impl RequestLog {
    /// Takes or makes the request id and opens the `request` span (its fields are recorded
    /// as they become known).
    pub fn start(method: &Method, headers: &HeaderMap) -> RequestLog {
        let started = Instant::now();
        let request_id = observability::request_id(headers.get(&X_REQUEST_ID));
        let span = info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or_default(),
            method = method.as_str(),
            client = field::Empty,
            route = field::Empty,
            checkpoint = field::Empty,
            cache_status = field::Empty,
            status = field::Empty,
            duration_ms = field::Empty,
        );
        #[cfg(feature = "otel")]
        crate::otel::continue_trace(&span, headers);
        RequestLog {
            started,
            request_id,
            method: method.clone(),
            span,
            operation: None,
            client: None,
            checkpoint: None,
            project_ids: None,
            permission_id: None,
            upstream_status: None,
            attempts: Vec::new(),
            cache_status: None,
            unrouted_write: false,
        }
    }

    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The request id as text (it is always visible ASCII).
    pub fn id(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }

    pub fn set_operation(&mut self, operation: Operation) {
        self.span.record("route", operation.as_str());
        self.operation = Some(operation);
    }

    /// The request is refused before it has a route (414, 404, 405). A POST or DELETE is
    /// still a write attempt, so it is audited, with no route.
    pub fn set_unrouted(&mut self) {
        self.unrouted_write = matches!(self.method, Method::POST | Method::DELETE);
    }

    pub fn set_client(&mut self, client: &Arc<Client>) {
        self.span.record("client", &*client.name.0);
        self.client = Some(client.clone());
    }

    pub fn set_checkpoint(&mut self, checkpoint: &Checkpoint) {
        self.span.record("checkpoint", checkpoint.as_str());
        self.checkpoint = Some(checkpoint.clone());
    }

    /// Renders the outcome and reports it: the audit record (before the response leaves), span
    /// fields, metrics and the access line. Call it once, last: it hands the request id to the
    /// response.
    pub async fn finish(
        &mut self,
        state: &AppState,
        result: Result<Response<Body>, Error>,
    ) -> Response<Body> {
        let (mut response, error_code) = match result {
            Ok(response) => (response, None),
            Err(e) => {
                let code = e.code();
                (e.into_response(), Some(code))
            }
        };
        let status = response.status();
        let write = matches!(self.operation, Some(Operation::Create | Operation::Delete));
        advise_retry(&mut response, status, write);
        // GETs always carry one; a write only when the cache decided it (refused: no lease).
        let cache_status = self
            .cache_status
            .or_else(|| (self.method == Method::GET).then_some(CacheStatus::Bypass));
        if let Some(cs) = cache_status {
            response
                .headers_mut()
                .insert(CACHE_STATUS.clone(), HeaderValue::from_static(cs.as_str()));
        }
        if write || self.unrouted_write {
            let span = self.span.clone();
            // Boxed: a read's future does not carry the audit write's state.
            Box::pin(self.audit(state, status, error_code).instrument(span)).await;
        }
        self.report(state, status, cache_status);
        let request_id = std::mem::replace(&mut self.request_id, HeaderValue::from_static(""));
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), request_id);
        response
    }

    async fn audit(&self, state: &AppState, status: StatusCode, error_code: Option<&'static str>) {
        let record = audit::Record {
            time: audit::now_rfc3339(),
            request_id: self.id(),
            client: self.client_name(),
            method: self.method.as_str(),
            route: self.operation.map(Operation::as_str),
            checkpoint: self.checkpoint.as_ref().map(Checkpoint::as_str),
            project_ids: self.project_ids.as_deref(),
            permission_id: self.permission_id.as_deref(),
            outcome: outcome(status),
            status: status.as_u16(),
            upstream_status: self.upstream_status.map(|s| s.as_u16()),
            attempts: &self.attempts,
            error_code,
        };
        audit::record(state.audit.as_ref(), &state.metrics, record).await;
    }

    /// Span fields, metrics and the access line.
    fn report(&self, state: &AppState, status: StatusCode, cache_status: Option<CacheStatus>) {
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.span.record("status", status.as_u16());
        self.span.record("duration_ms", duration_ms);
        if let Some(cs) = cache_status {
            self.span.record("cache_status", cs.name());
        }
        state.metrics.request(
            self.client.as_ref().map(|c| &c.series),
            RequestOutcome {
                route: self.operation,
                status: status.as_u16(),
                cache_status,
            },
            duration_ms / 1000.0,
        );
        // Self-contained (the fmt layer does not render the `request` span, see observability).
        info!(
            target: "permgate::access",
            parent: &self.span,
            request_id = self.id(),
            method = self.method.as_str(),
            client = self.client_name(),
            route = self.operation.map(Operation::as_str),
            checkpoint = self.checkpoint.as_ref().map(Checkpoint::as_str),
            cache_status = cache_status.map(CacheStatus::name),
            status = status.as_u16(),
            duration_ms,
            upstream_status = self.upstream_status.map(|s| s.as_u16()),
            "request"
        );
    }

    fn client_name(&self) -> Option<&str> {
        self.client.as_deref().map(|c| &*c.name.0)
    }
}

/// `x-should-retry: false` where the error itself did not say and a retry cannot help: an
/// upstream 4xx passed through (400, 404, 409, 422: the same request gets the same answer),
/// and a write answered 502/504, whose outcome is unknown (upstream may have applied it, so a
/// retried create could conflict with itself).
fn advise_retry(response: &mut Response<Body>, status: StatusCode, write: bool) {
    let headers = response.headers_mut();
    if headers.contains_key(&X_SHOULD_RETRY) {
        return;
    }
    let futile = match status.as_u16() {
        408 | 429 => false,
        400..=499 => true,
        502 | 504 => write,
        _ => false,
    };
    if futile {
        headers.insert(&X_SHOULD_RETRY, HeaderValue::from_static("false"));
    }
}

/// The audit trail's verdict on a write attempt.
fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "succeeded",
        401 | 403 => "denied",
        400 | 404 | 405 | 413 | 414 | 429 => "rejected",
        _ => "failed",
    }
}
