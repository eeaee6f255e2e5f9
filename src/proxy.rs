//! The request pipeline for the data listener (SPEC "Routes", "Responses", "Caching").
//!
//! [`handle`] never fails: it takes or makes the request id, opens the `request` span, runs
//! [`handle_inner`] (one `?` sequence, the order of checks is the order of its lines), renders
//! any error in the one place that can (`Error::into_response`), stamps `x-request-id` and
//! `Cache-Status`, writes the audit record of a write attempt, and logs one access event.
//! This is the only module that uses all the others.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderName, HeaderValue, AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH,
    TRANSFER_ENCODING,
};
use hyper::{Method, Request, Response, StatusCode};
use tracing::{field, info, info_span, Instrument};

use crate::audit::{self, AuditLog};
use crate::auth::{Client, Clients};
use crate::cache::{CacheStatus, FillError, Freshness, Page, PageCache, PageKey};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{json_response, Body, Error};
use crate::fleet::{Fleet, View};
use crate::metrics::{Metrics, RequestOutcome, Snapshot};
use crate::observability;
use crate::route::{self, Checkpoint, ListQuery, Operation};
use crate::secret::AdminKey;
use crate::upstream::{Passthrough, Target, Upstream};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const MAX_PROJECT_ID_BYTES: usize = 256;
/// How often a replica waiting on another's fetch looks for the shared page.
const SHARED_POLL: Duration = Duration::from_millis(20);

/// Everything a request needs, built once from `Config`. No globals: tests run several.
pub struct AppState {
    /// Swapped whole on reload (SIGHUP, key file change).
    clients: ArcSwap<Clients>,
    pub cache: PageCache,
    pub metrics: Arc<Metrics>,
    pub upstream: Upstream,
    pub audit: Option<AuditLog>,
    /// `[redis]`: coherence with the other replicas.
    pub fleet: Option<Fleet>,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    max_uri_bytes: usize,
    max_body_bytes: usize,
    /// `upstream.request_timeout_ms`: also how long a client may take to send a body.
    upstream_deadline: Duration,
}

impl AppState {
    /// `redis_password` is the resolved `[redis]` password (see `fleet::password`). Start the
    /// fleet's background tasks with `fleet::spawn` once the state exists.
    pub fn new(
        config: &Config,
        key: AdminKey,
        clock: Clock,
        redis_password: Option<&str>,
    ) -> Result<Arc<AppState>, String> {
        let audit = config
            .audit
            .as_ref()
            .map(|a| AuditLog::open(&a.path))
            .transpose()?;
        let metrics = Arc::new(Metrics::new());
        let fleet = config
            .redis
            .as_ref()
            .map(|r| Fleet::new(r, redis_password, metrics.clone()))
            .transpose()?;
        Ok(Arc::new(AppState {
            clients: ArcSwap::from_pointee(Clients::new(&config.clients)),
            upstream: Upstream::new(&config.upstream, key, clock.clone(), metrics.clone())?,
            cache: PageCache::new(&config.cache, clock, metrics.cache_evictions.clone()),
            metrics,
            audit,
            fleet,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            max_uri_bytes: config.server.max_uri_bytes,
            max_body_bytes: config.server.max_body_bytes,
            upstream_deadline: config.upstream.request_timeout,
        }))
    }

    /// Applies a reloaded client list and admin key. Requests in flight finish with what they
    /// started with; the next ones use the new ones.
    pub fn apply_reload(&self, config: &Config, key: AdminKey) {
        self.clients.store(Arc::new(Clients::new(&config.clients)));
        self.upstream.set_key(key);
    }

    /// The Prometheus exposition of this gateway's metrics.
    pub async fn render_metrics(&self) -> String {
        // moka's counts are eventually consistent; settle them for the scrape.
        self.cache.run_pending_tasks().await;
        let circuit = match self.upstream.breaker_state() {
            "closed" => 0,
            "half_open" => 1,
            _ => 2,
        };
        self.metrics.render(Snapshot {
            cache_entries: self.cache.entry_count(),
            cache_bytes: self.cache.weighted_bytes(),
            circuit,
            in_flight: self.in_flight(),
            redis_up: self.fleet.as_ref().map(Fleet::is_healthy),
        })
    }

    /// Readiness: false once shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Requests on the data listener that have started and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts a request in flight for as long as it lives (cancellation included).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the pipeline learned about a request, for the span, the access log and the audit.
#[derive(Default)]
struct Ctx {
    operation: Option<Operation>,
    client: Option<Arc<Client>>,
    checkpoint: Option<Checkpoint>,
    project_ids: Option<Vec<String>>,
    permission_id: Option<Box<str>>,
    upstream_status: Option<StatusCode>,
    cache_status: Option<CacheStatus>,
}

/// Serves one request on the data listener. Never fails.
///
/// A write runs to completion in its own task even if the caller goes away mid-request: once
/// upstream may have applied it, the invalidation and the audit record must happen.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    if matches!(*req.method(), Method::POST | Method::DELETE) {
        return match tokio::spawn(respond(state, req)).await {
            Ok(response) => response,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
    }
    respond(state, req).await
}

async fn respond(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let _in_flight = InFlight::enter(&state.in_flight);
    let request_id = observability::request_id(req.headers().get(&X_REQUEST_ID));
    let method = req.method().clone();
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
    crate::otel::continue_trace(&span, req.headers());
    let mut ctx = Ctx::default();
    let result = handle_inner(&state, req, &request_id, &span, &mut ctx)
        .instrument(span.clone())
        .await;
    let (mut response, error_code) = match result {
        Ok(response) => (response, None),
        Err(e) => {
            let code = e.code();
            (e.into_response(), Some(code))
        }
    };
    let status = response.status();
    let cache_status =
        (method == Method::GET).then(|| ctx.cache_status.unwrap_or(CacheStatus::Bypass));
    if let Some(cs) = cache_status {
        response
            .headers_mut()
            .insert(CACHE_STATUS.clone(), HeaderValue::from_static(cs.as_str()));
    }

    let client = ctx.client.as_deref().map(|c| &*c.name.0);
    let checkpoint = ctx.checkpoint.as_ref().map(Checkpoint::as_str);
    if let Some(op @ (Operation::Create | Operation::Delete)) = ctx.operation {
        let record = audit::Record {
            time: audit::now_rfc3339(),
            request_id: request_id.to_str().unwrap_or_default(),
            client,
            method: method.as_str(),
            route: op.as_str(),
            checkpoint,
            project_ids: ctx.project_ids.as_deref(),
            permission_id: ctx.permission_id.as_deref(),
            outcome: outcome(status),
            status: status.as_u16(),
            upstream_status: ctx.upstream_status.map(|s| s.as_u16()),
            error_code,
        };
        audit::record(state.audit.as_ref(), &state.metrics, record)
            .instrument(span.clone())
            .await;
    }

    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.record("status", status.as_u16());
    span.record("duration_ms", duration_ms);
    if let Some(cs) = cache_status {
        span.record("cache_status", cs.name());
    }
    state.metrics.request(
        ctx.client.as_ref().map(|c| &c.series),
        RequestOutcome {
            route: ctx.operation,
            status: status.as_u16(),
            cache_status,
        },
        duration_ms / 1000.0,
    );
    // Self-contained (the fmt layer does not render the `request` span, see observability).
    info!(
        target: "permgate::access",
        parent: &span,
        request_id = request_id.to_str().unwrap_or_default(),
        method = method.as_str(),
        client,
        route = ctx.operation.map(Operation::as_str),
        checkpoint,
        cache_status = cache_status.map(CacheStatus::name),
        status = status.as_u16(),
        duration_ms,
        upstream_status = ctx.upstream_status.map(|s| s.as_u16()),
        "request"
    );
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id);
    response
}

fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "succeeded",
        401 | 403 => "denied",
        400 | 404 | 405 | 413 | 414 | 429 => "rejected",
        _ => "failed",
    }
}

async fn handle_inner(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    span: &tracing::Span,
    ctx: &mut Ctx,
) -> Result<Response<Body>, Error> {
    let (parts, body) = req.into_parts();
    let uri_bytes = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if uri_bytes > state.max_uri_bytes {
        return Err(Error::UriTooLong);
    }
    let matched = route::match_route(&parts.method, parts.uri.path())?;
    ctx.operation = Some(matched.operation);
    span.record("route", matched.operation.as_str());
    let client = state
        .clients
        .load()
        .authenticate(parts.headers.get(AUTHORIZATION))?
        .clone();
    span.record("client", &*client.name.0);
    ctx.client = Some(client.clone());
    let checkpoint = matched.checkpoint()?;
    span.record("checkpoint", checkpoint.as_str());
    ctx.checkpoint = Some(checkpoint.clone());
    match matched.operation {
        Operation::List => {
            let query = ListQuery::parse(parts.uri.query())?;
            client.authorize(&checkpoint, false)?;
            check_rate(state, &client)?;
            let view = match &state.fleet {
                Some(fleet) => fleet.view(&checkpoint).await,
                None => View::Alone,
            };
            let key = state.cache.key(checkpoint, query, view);
            if wants_no_cache(&parts.headers) {
                Box::pin(refresh(state, key, request_id, ctx)).await
            } else {
                list(state, key, request_id, ctx).await
            }
        }
        Operation::Create => {
            route::reject_query(parts.uri.query())?;
            client.authorize(&checkpoint, true)?;
            check_rate(state, &client)?;
            let body = Box::pin(read_body(state, &parts.headers, body)).await?;
            let project_ids = parse_create(&body)?;
            let forwarded = serde_json::json!({ "project_ids": project_ids }).to_string();
            ctx.project_ids = Some(project_ids);
            Box::pin(write(
                state,
                &checkpoint,
                Target::Create,
                Some(forwarded.into()),
                request_id,
                ctx,
            ))
            .await
        }
        Operation::Delete => {
            route::reject_query(parts.uri.query())?;
            let id = matched.permission_id()?.ok_or(Error::NotFound)?;
            ctx.permission_id = Some(id.clone());
            client.authorize(&checkpoint, true)?;
            check_rate(state, &client)?;
            Box::pin(write(
                state,
                &checkpoint,
                Target::Delete(&id),
                None,
                request_id,
                ctx,
            ))
            .await
        }
    }
}

/// 429 once the client's bucket is empty; counted.
fn check_rate(state: &AppState, client: &Client) -> Result<(), Error> {
    client
        .check_rate()
        .inspect_err(|_| state.metrics.rate_limited(&client.name))
}

/// A cached GET: fresh hit, stale-while-revalidate, or one coalesced fill (with the stale page
/// as the answer of last resort when upstream fails).
async fn list(
    state: &Arc<AppState>,
    key: PageKey,
    request_id: &HeaderValue,
    ctx: &mut Ctx,
) -> Result<Response<Body>, Error> {
    let cache = &state.cache;
    let mut stale = None;
    if let Some(page) = cache.get(&key).await {
        let age = cache.age(&page);
        match cache.freshness_at(&page, age) {
            Freshness::Fresh => {
                ctx.cache_status = Some(CacheStatus::Hit);
                return Ok(page_response(&page, Some(age.as_secs())));
            }
            Freshness::StaleWhileRevalidate => {
                if page.claim_refresh() {
                    spawn_refresh(state, key, page.clone(), request_id.clone());
                }
                ctx.cache_status = Some(CacheStatus::StaleHit);
                return Ok(page_response(&page, Some(age.as_secs())));
            }
            Freshness::StaleIfError => stale = Some(page),
            Freshness::Expired => {}
        }
    }

    let upstream_status = &mut ctx.upstream_status;
    // The miss path is boxed so that a hit's future stays small.
    let (result, fetched) =
        Box::pin(cache.fill(&key, fetch(state, &key, request_id, upstream_status))).await;
    let status = if fetched {
        CacheStatus::MissStored
    } else {
        state.metrics.coalesced_wait();
        CacheStatus::Collapsed
    };
    ctx.cache_status = Some(status);
    match result {
        Ok(page) => Ok(page_response(&page, None)),
        Err(failure) => {
            if fetched {
                ctx.cache_status = Some(CacheStatus::Miss);
            }
            match (&*failure, stale) {
                (FillError::Uncacheable(reply), _) => Ok(passthrough_response(reply.clone())),
                (FillError::Failed(_), Some(page)) => {
                    ctx.cache_status = Some(CacheStatus::StaleIfError);
                    let age = cache.age_seconds(&page);
                    tracing::warn!(
                        request_id = request_id.to_str().unwrap_or_default(),
                        age_s = age,
                        "upstream failed; serving a stale page"
                    );
                    Ok(page_response(&page, Some(age)))
                }
                (FillError::Failed(e), None) => Err(e.clone()),
            }
        }
    }
}

/// `Cache-Control: no-cache`: always ask upstream, store a cacheable answer.
async fn refresh(
    state: &Arc<AppState>,
    key: PageKey,
    request_id: &HeaderValue,
    ctx: &mut Ctx,
) -> Result<Response<Body>, Error> {
    let result = fetch(state, &key, request_id, &mut ctx.upstream_status).await;
    ctx.cache_status = Some(CacheStatus::Refresh);
    match result {
        Ok(page) => {
            state.cache.insert(key, page.clone()).await;
            ctx.cache_status = Some(CacheStatus::RefreshStored);
            Ok(page_response(&page, None))
        }
        Err(FillError::Uncacheable(reply)) => Ok(passthrough_response(reply)),
        Err(FillError::Failed(e)) => Err(e),
    }
}

/// The one background refresh of a page served stale-while-revalidate.
fn spawn_refresh(state: &Arc<AppState>, key: PageKey, stale: Arc<Page>, request_id: HeaderValue) {
    let state = state.clone();
    let span = info_span!(
        "refresh",
        request_id = request_id.to_str().unwrap_or_default()
    );
    tokio::spawn(
        async move {
            let mut status = None;
            match fetch(&state, &key, &request_id, &mut status).await {
                Ok(fresh) => state.cache.insert(key, fresh).await,
                Err(FillError::Uncacheable(_)) => state.cache.remove_if_same(&key, &stale).await,
                Err(FillError::Failed(e)) => {
                    tracing::warn!(
                        request_id = request_id.to_str().unwrap_or_default(),
                        code = e.code(),
                        "background refresh failed"
                    );
                    stale.release_refresh();
                }
            }
        }
        .instrument(span),
    );
}

type Fetched = Result<Arc<Page>, FillError<Passthrough, Error>>;

/// A miss: from the fleet's shared cache if there is one, else from upstream.
async fn fetch(
    state: &AppState,
    key: &PageKey,
    request_id: &HeaderValue,
    upstream_status: &mut Option<StatusCode>,
) -> Fetched {
    match (&state.fleet, key.fleet) {
        (Some(fleet), View::Shared { .. }) => {
            fetch_shared(state, fleet, key, request_id, upstream_status).await
        }
        _ => fetch_upstream(state, key, request_id, upstream_status).await,
    }
}

async fn fetch_upstream(
    state: &AppState,
    key: &PageKey,
    request_id: &HeaderValue,
    upstream_status: &mut Option<StatusCode>,
) -> Fetched {
    let (status, result) = state
        .upstream
        .send(&key.checkpoint, Target::List(&key.query), None, request_id)
        .await;
    *upstream_status = status;
    let reply = result.map_err(FillError::Failed)?;
    let fresh_cap = match (&state.fleet, key.fleet) {
        (Some(fleet), View::Degraded) => Some(fleet.degraded_ttl),
        _ => None,
    };
    state
        .cache
        .aged_page(reply.status, &reply.body, Duration::ZERO, fresh_cap)
        .ok_or(FillError::Uncacheable(reply))
}

/// One replica of the fleet fetches (holding a short Redis lock) while the others poll for the
/// page it shares; nothing fetched while a write of the checkpoint is in flight is stored.
async fn fetch_shared(
    state: &AppState,
    fleet: &Fleet,
    key: &PageKey,
    request_id: &HeaderValue,
    upstream_status: &mut Option<StatusCode>,
) -> Fetched {
    let (view, checkpoint, query) = (key.fleet, &key.checkpoint, &key.query);
    let deadline = tokio::time::Instant::now() + state.upstream_deadline;
    loop {
        if let Some(shared) = fleet.get_page(view, checkpoint, query).await {
            let status = StatusCode::from_u16(shared.status).unwrap_or(StatusCode::OK);
            // Only a copy still fresh by its own age (Redis keeps it through the stale
            // windows); an older one is as good as none: fetch, and share the new page.
            if let Some(page) = state
                .cache
                .aged_page(status, &shared.body, shared.age, None)
                .filter(|page| state.cache.freshness_at(page, shared.age) == Freshness::Fresh)
            {
                state.metrics.fleet_shared_hit();
                return Ok(page);
            }
        }
        match fleet
            .lock(view, checkpoint, query, state.upstream_deadline)
            .await
        {
            Some(true) => {
                let fetched = fetch_upstream(state, key, request_id, upstream_status).await;
                let result = match fetched {
                    Ok(page) if fleet.write_pending(checkpoint).await => {
                        Err(FillError::Uncacheable(Passthrough {
                            status: page.status,
                            body: page.body.clone(),
                        }))
                    }
                    Ok(page) => {
                        fleet
                            .put_page(
                                view,
                                checkpoint,
                                query,
                                page.status.as_u16(),
                                &page.body,
                                page.keep_for(),
                            )
                            .await;
                        Ok(page)
                    }
                    other => other,
                };
                fleet.unlock(view, checkpoint, query).await;
                return result;
            }
            Some(false) if tokio::time::Instant::now() + SHARED_POLL < deadline => {
                tokio::time::sleep(SHARED_POLL).await;
            }
            // Redis failed, or the fetching replica is taking too long: ask upstream ourselves.
            _ => return fetch_upstream(state, key, request_id, upstream_status).await,
        }
    }
}

/// Create or delete. Whatever upstream answered, the checkpoint's pages are dropped before the
/// response is returned (a bump is cheap, and a 404 on a retried delete or a 5xx may still mean
/// the write applied). When the outcome is unknown (timeout, broken connection) upstream may
/// still apply the write after we answered, so the pages are dropped once more when that can no
/// longer happen.
async fn write(
    state: &Arc<AppState>,
    checkpoint: &Checkpoint,
    target: Target<'_>,
    body: Option<Bytes>,
    request_id: &HeaderValue,
    ctx: &mut Ctx,
) -> Result<Response<Body>, Error> {
    if let Some(fleet) = &state.fleet {
        fleet
            .begin_write(checkpoint, state.upstream_deadline + Duration::from_secs(1))
            .await;
    }
    let (status, result) = state
        .upstream
        .send(checkpoint, target, body, request_id)
        .await;
    ctx.upstream_status = status;
    state.cache.invalidate_checkpoint(checkpoint);
    if let Some(fleet) = &state.fleet {
        fleet.end_write(checkpoint).await;
    }
    if status.is_none() {
        let state = state.clone();
        let checkpoint = checkpoint.clone();
        tokio::spawn(async move {
            tokio::time::sleep(state.upstream_deadline).await;
            state.cache.invalidate_checkpoint(&checkpoint);
            if let Some(fleet) = &state.fleet {
                fleet.purge(Some(&checkpoint)).await;
            }
        });
    }
    result.map(passthrough_response)
}

fn wants_no_cache(headers: &hyper::HeaderMap) -> bool {
    headers.get_all(CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
        })
    })
}

/// Reads a create's body: plain (or chunked) JSON only, at most `server.max_body_bytes`, within
/// the upstream deadline. A body in a coding permgate does not decode (`gzip, chunked`,
/// `Content-Encoding: br`, ...) is refused rather than misread.
async fn read_body(
    state: &AppState,
    headers: &hyper::HeaderMap,
    body: Incoming,
) -> Result<Bytes, Error> {
    let plain_transfer = headers.get_all(TRANSFER_ENCODING).iter().all(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .all(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
        })
    });
    let plain_content = headers.get_all(CONTENT_ENCODING).iter().all(|v| {
        v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("identity"))
    });
    if !plain_transfer || !plain_content {
        return Err(Error::invalid(
            "body",
            "Encoded request bodies are not accepted; send plain JSON.",
        ));
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return Err(Error::RequestTooLarge);
    }
    let collected = tokio::time::timeout(
        state.upstream_deadline,
        Limited::new(body, state.max_body_bytes).collect(),
    )
    .await
    .map_err(|_| Error::invalid("body", "The request body did not arrive in time."))?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(Error::RequestTooLarge),
        Err(_) => Err(Error::invalid(
            "body",
            "The request body could not be read.",
        )),
    }
}

/// Validates `{"project_ids": ["proj_...", ...]}` (upstream's schema: no other fields).
fn parse_create(body: &[u8]) -> Result<Vec<String>, Error> {
    let shape = "The body must be JSON like {\"project_ids\": [\"proj_abc\"]}.";
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| Error::invalid("body", shape))?;
    let object = value
        .as_object()
        .ok_or_else(|| Error::invalid("body", shape))?;
    if object.keys().any(|k| k != "project_ids") {
        return Err(Error::invalid(
            "body",
            "Unknown field in the body; only project_ids is accepted.",
        ));
    }
    let ids = object
        .get("project_ids")
        .ok_or_else(|| Error::invalid("project_ids", "project_ids is required."))?
        .as_array()
        .filter(|ids| !ids.is_empty())
        .ok_or_else(|| {
            Error::invalid(
                "project_ids",
                "project_ids must be a non-empty array of strings.",
            )
        })?;
    ids.iter()
        .map(|id| match id.as_str() {
            Some(s)
                if !s.is_empty()
                    && s.len() <= MAX_PROJECT_ID_BYTES
                    && !s.chars().any(char::is_control) =>
            {
                Ok(s.to_owned())
            }
            _ => Err(Error::invalid(
                "project_ids",
                "Each project id must be a non-empty string of at most 256 bytes.",
            )),
        })
        .collect()
}

fn page_response(page: &Page, age: Option<u64>) -> Response<Body> {
    let mut response = json_response(page.status, page.body.clone());
    if let Some(age) = age {
        response.headers_mut().insert(AGE, age_header(age));
    }
    response
}

/// `Age` values without formatting or allocating per hit: the first hour is prebuilt.
fn age_header(age: u64) -> HeaderValue {
    const PREBUILT: u64 = 3600;
    static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..=PREBUILT)
            .map(|n| HeaderValue::from_static(Box::leak(n.to_string().into_boxed_str())))
            .collect()
    });
    match table.get(age as usize) {
        Some(value) => value.clone(),
        None => HeaderValue::from(age),
    }
}

fn passthrough_response(reply: Passthrough) -> Response<Body> {
    json_response(reply.status, reply.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cache_is_found_among_directives() {
        let mut h = hyper::HeaderMap::new();
        assert!(!wants_no_cache(&h));
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("max-age=0, No-Cache"),
        );
        assert!(wants_no_cache(&h));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert!(!wants_no_cache(&h));
    }
}
