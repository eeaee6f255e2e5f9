//! The pooled client to OpenAI (or the mock): builds each request from scratch with an
//! allow-list of headers, injects the admin key, and turns upstream's behaviour into one
//! answer within one deadline (SPEC "Responses").
//!
//! - **Allow-list**: upstream sees only `Authorization: Bearer <admin key>`,
//!   `X-Client-Request-Id`, `Accept`, `User-Agent` and, for a create, `Content-Type`.
//! - **Deadline**: every attempt, wait and backoff fits inside `upstream.request_timeout_ms`
//!   from the first attempt; past it the caller gets a 504.
//! - **Retries**: idempotent requests (list, delete; never a create) are retried on transport
//!   errors, 502, 503, 504 and 429, with exponential backoff and full jitter, honouring
//!   `Retry-After` up to `retry_max_delay_ms`, at most `max_retries` times.
//! - **Concurrency cap**: at most `max_concurrency` requests in flight, and at most
//!   `max_concurrency_per_client` of them for one client, so one client cannot take every slot
//!   (SPEC "Hygiene rules"). A request waits at most `queue_timeout_ms` for its client's slot
//!   and then a global one, or is shed with a 503. A background refresh (stale-while-
//!   revalidate) serves the page, not a client: it takes only a global slot.
//! - **Circuit breaker** (see `breaker`): fail fast while upstream is down.
//! - **Classification**: a [`Passthrough`] (2xx, 400, 404, 409, 422 with a JSON body) or an
//!   [`Error`]. Upstream's own text for anything else is never returned, since OpenAI's 401
//!   message quotes part of the key; only its status is logged. A body that would be passed
//!   on but holds any 6-character piece of the admin key (a 404 quoting the masked key, say)
//!   is a 502 instead, and so is a 2xx that is not the shape the endpoint answers (a permission
//!   list, or a deletion result): what is never passed on is never stored either.
//! - **Attempts**: a write's answer lists what upstream did with each attempt, for the audit
//!   trail; a read collects none and allocates nothing for it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use hyper::{HeaderMap, Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio::time::error::Elapsed;
use tokio::time::Instant;
use tracing::{field, info, warn, Instrument};

use crate::breaker::{Breaker, Permit};
use crate::clock::Clock;
use crate::config::UpstreamConfig;
use crate::error::{Error, Passthrough};
use crate::metrics::{ClientLabel, Metrics, Shed};
use crate::route::{Checkpoint, ListQuery};
use crate::secret::{self, AdminKey};
use crate::tls::{self, Alpn};

/// Larger upstream bodies are treated as malformed (a 100-item page is about 15 KiB).
const MAX_UPSTREAM_BODY: usize = 4 * 1024 * 1024;
const X_CLIENT_REQUEST_ID: &str = "x-client-request-id";

/// Which endpoint to call.
pub enum Target<'a> {
    List(&'a ListQuery),
    Create,
    Delete(&'a str),
}

pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `scheme://authority/base-path`, without a trailing slash.
    base: String,
    /// Swapped whole on reload; each request keeps the key it started with.
    key: ArcSwap<AdminKey>,
    timeout: Duration,
    max_retries: u32,
    retry_base_delay: Duration,
    retry_max_delay: Duration,
    slots: Semaphore,
    max_concurrency: usize,
    /// One semaphore of `max_per_client` permits per client name, made on its first upstream
    /// request. Keyed by name, so a reload (which rebuilds every `Client`) keeps a client's
    /// permits in flight counted; one small entry per name ever configured.
    client_slots: Mutex<HashMap<ClientLabel, Arc<Semaphore>, foldhash::fast::RandomState>>,
    max_per_client: usize,
    queue_timeout: Duration,
    breaker: Breaker,
    metrics: Arc<Metrics>,
    user_agent: HeaderValue,
}

/// One request to upstream, fixed for all its attempts.
struct Call<'a> {
    /// The key the request started with; a reload does not change it between attempts.
    key: Arc<AdminKey>,
    method: Method,
    uri: Uri,
    /// `Some` for a create (sent as JSON), `None` otherwise.
    body: Option<Bytes>,
    request_id: &'a HeaderValue,
    /// Whose slots it takes; `None` (a background refresh): only a global slot.
    client: Option<&'a ClientLabel>,
    /// Every attempt, wait and backoff ends by this instant.
    deadline: Instant,
}

/// What upstream did with one attempt that was sent: answered with a status, failed in
/// transport (refused, reset, unreadable body), or was still going at the deadline. An
/// attempt shed before reaching upstream is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempted {
    Status(StatusCode),
    Error,
    Timeout,
}

/// The audit trail's form: `{"status": 200}`, `{"error": "error"}` or `{"error": "timeout"}`.
impl serde::Serialize for Attempted {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(1))?;
        match self {
            Attempted::Status(status) => map.serialize_entry("status", &status.as_u16())?,
            Attempted::Error => map.serialize_entry("error", "error")?,
            Attempted::Timeout => map.serialize_entry("error", "timeout")?,
        }
        map.end()
    }
}

/// The answer to [`Upstream::send`].
#[derive(Debug)]
pub struct Sent {
    /// Upstream's last status, when one arrived (for the audit trail and logs).
    pub status: Option<StatusCode>,
    pub result: Result<Passthrough, Error>,
    /// Each attempt that reached upstream, in order: filled for a create or delete (the audit
    /// trail), empty for a list.
    pub attempts: Vec<Attempted>,
    /// The 503 is the calling client's own: it held all its upstream slots for the whole wait
    /// (`max_concurrency_per_client`). Another client asking the same is not refused by it.
    pub client_shed: bool,
}

/// The slots one attempt holds while it talks to upstream.
struct Admitted<'a> {
    breaker: Permit<'a>,
    slot: SemaphorePermit<'a>,
    client_slot: Option<OwnedSemaphorePermit>,
}

impl Call<'_> {
    /// The request id as log text (empty if it is not visible ASCII).
    fn id(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }
}

/// Upstream's reply to one attempt, its body read in full.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// How an attempt's exchange ended: a reply, a transport failure (already logged), or the
/// deadline passing.
type Exchanged = Result<Result<Reply, ()>, Elapsed>;

/// One attempt's result, and whether another attempt may help.
struct Attempt {
    /// `None` when the attempt never reached upstream (shed).
    sent: Option<Attempted>,
    status: Option<StatusCode>,
    result: Result<Passthrough, Error>,
    /// `Some` when the failure is transient; the delay upstream asked for, if any.
    retry: Option<Option<Duration>>,
    /// See [`Sent::client_shed`].
    client_shed: bool,
}

impl Attempt {
    /// A failure that another attempt would not help.
    fn fatal(error: Error) -> Attempt {
        Attempt {
            sent: None,
            status: None,
            result: Err(error),
            retry: None,
            client_shed: false,
        }
    }
}

impl Upstream {
    /// Builds the client: public roots plus `ca_file`, HTTP/2 by ALPN, pooled connections.
    pub fn new(
        config: &UpstreamConfig,
        key: AdminKey,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Result<Upstream, String> {
        let tls = tls::client_config(config.ca_file.as_deref(), "upstream.ca_file")?;
        let connector = tls::https_connector(tls, config.connect_timeout, Alpn::Http1And2);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Upstream {
            client,
            base: config.base_url.to_string().trim_end_matches('/').to_owned(),
            key: ArcSwap::from_pointee(key),
            timeout: config.request_timeout,
            max_retries: config.max_retries,
            retry_base_delay: config.retry_base_delay,
            retry_max_delay: config.retry_max_delay,
            slots: Semaphore::new(config.max_concurrency),
            max_concurrency: config.max_concurrency,
            client_slots: Mutex::default(),
            max_per_client: config.max_concurrency_per_client,
            queue_timeout: config.queue_timeout,
            breaker: Breaker::new(config.breaker_threshold, config.breaker_open, clock),
            metrics,
            user_agent: HeaderValue::from_static(concat!("permgate/", env!("CARGO_PKG_VERSION"))),
        })
    }

    /// "closed", "open" or "half_open".
    pub fn breaker_state(&self) -> &'static str {
        self.breaker.state_name()
    }

    /// Uses `key` for every request that starts from now on.
    pub fn set_key(&self, key: AdminKey) {
        self.key.store(Arc::new(key));
    }

    fn uri(&self, checkpoint: &Checkpoint, target: &Target<'_>) -> Result<Uri, Error> {
        let mut uri = String::with_capacity(self.base.len() + 128);
        uri.push_str(&self.base);
        uri.push_str("/fine_tuning/checkpoints/");
        checkpoint.write_encoded(&mut uri);
        uri.push_str("/permissions");
        match target {
            Target::List(query) => {
                uri.push('?');
                query.write_canonical(&mut uri);
            }
            Target::Create => {}
            Target::Delete(id) => {
                uri.push('/');
                uri.push_str(id);
            }
        }
        // Every piece was validated and encoded, so this cannot fail; map it anyway.
        Uri::try_from(uri).map_err(|_| Error::UpstreamError)
    }

    /// Sends the request (retrying where that is safe) and classifies the final answer.
    /// `client` is whose upstream slots it takes; `None` (a background refresh) takes only a
    /// global slot.
    pub async fn send(
        &self,
        checkpoint: &Checkpoint,
        target: Target<'_>,
        body: Option<Bytes>,
        request_id: &HeaderValue,
        client: Option<&ClientLabel>,
    ) -> Sent {
        let deadline = Instant::now() + self.timeout;
        let (method, idempotent) = match target {
            Target::List(_) => (Method::GET, true),
            Target::Create => (Method::POST, false),
            Target::Delete(_) => (Method::DELETE, true),
        };
        let mut sent = Sent {
            status: None,
            result: Err(Error::UpstreamError),
            attempts: Vec::new(),
            client_shed: false,
        };
        let uri = match self.uri(checkpoint, &target) {
            Ok(uri) => uri,
            Err(e) => {
                sent.result = Err(e);
                return sent;
            }
        };
        let call = Call {
            key: self.key.load_full(),
            method,
            uri,
            body,
            request_id,
            client,
            deadline,
        };
        let audited = !matches!(target, Target::List(_));
        let mut attempt = 1;
        loop {
            let span = tracing::info_span!(
                "upstream",
                request_id = call.id(),
                method = call.method.as_str(),
                attempt,
                status = field::Empty,
                duration_ms = field::Empty,
            );
            let outcome = self.attempt(&call, attempt).instrument(span).await;
            if let Some(attempted) = outcome.sent.filter(|_| audited) {
                sent.attempts.push(attempted);
            }
            sent.status = outcome.status;
            sent.result = outcome.result;
            sent.client_shed = outcome.client_shed;
            let Some(asked) = outcome
                .retry
                .filter(|_| idempotent && attempt <= self.max_retries)
            else {
                return sent;
            };
            let delay = self.backoff(attempt, asked);
            if Instant::now() + delay >= deadline {
                return sent;
            }
            info!(
                request_id = call.id(),
                attempt,
                delay_ms = delay.as_millis() as u64,
                status = sent.status.map(|s| s.as_u16()),
                "retrying upstream request"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]; a `Retry-After` replaces it,
    /// capped at `retry_max_delay`.
    fn backoff(&self, attempt: u32, asked: Option<Duration>) -> Duration {
        if let Some(asked) = asked {
            return asked.min(self.retry_max_delay);
        }
        let ceiling = self
            .retry_base_delay
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(self.retry_max_delay);
        ceiling.mul_f64(fastrand::f64())
    }

    /// One attempt, run inside its `upstream` span (which it fills with status and duration).
    async fn attempt(&self, call: &Call<'_>, attempt: u32) -> Attempt {
        let admitted = match self.admit(call, attempt).await {
            Ok(admitted) => admitted,
            Err(shed) => return shed,
        };
        let request = self.request(call);
        let started = Instant::now();
        let exchange = self.exchange(request, call, attempt);
        let outcome = tokio::time::timeout_at(call.deadline, exchange).await;
        let Admitted {
            breaker,
            slot,
            client_slot,
        } = admitted;
        drop((slot, client_slot));
        self.record(&outcome, attempt, started);
        self.judge(outcome, breaker, call, attempt)
    }

    /// The breaker's leave, then the client's slot and a global one, each within
    /// `queue_timeout` (and the deadline); otherwise the 503 that sheds the attempt without
    /// calling upstream. The client's slot comes first, so a client past its share waits
    /// without holding a global slot that another client could use.
    async fn admit(&self, call: &Call<'_>, attempt: u32) -> Result<Admitted<'_>, Attempt> {
        let Some(breaker) = self.breaker.try_acquire() else {
            warn!(
                request_id = call.id(),
                attempt, "circuit open: answering without calling upstream"
            );
            self.metrics.shed(Shed::CircuitOpen);
            return Err(Attempt::fatal(Error::Unavailable {
                reason: "The upstream API is failing; the gateway is not calling it for a moment.",
                retry_after: self.breaker.open_remaining(),
            }));
        };
        let wait_until = call.deadline.min(Instant::now() + self.queue_timeout);
        // Shedding drops the breaker's leave without a verdict: a shed probe lets the next
        // request probe instead.
        let client_slot = match call.client {
            Some(client) => {
                let slots = self.client_slots(client);
                match tokio::time::timeout_at(wait_until, slots.acquire_owned()).await {
                    Ok(Ok(slot)) => Some(slot),
                    _ => return Err(self.shed_client(call, client, attempt)),
                }
            }
            None => None,
        };
        match tokio::time::timeout_at(wait_until, self.slots.acquire()).await {
            Ok(Ok(slot)) => Ok(Admitted {
                breaker,
                slot,
                client_slot,
            }),
            _ => {
                warn!(
                    request_id = call.id(),
                    attempt,
                    limit = self.max_concurrency,
                    "upstream concurrency limit reached; shedding the request"
                );
                self.metrics.shed(Shed::QueueFull);
                Err(Attempt::fatal(Error::Unavailable {
                    reason: "Too many requests are waiting for the upstream API. Retry shortly.",
                    retry_after: Some(self.queue_timeout),
                }))
            }
        }
    }

    /// `client`'s semaphore, made on its first upstream request.
    fn client_slots(&self, client: &ClientLabel) -> Arc<Semaphore> {
        let mut slots = self
            .client_slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match slots.get(client) {
            Some(semaphore) => semaphore.clone(),
            None => {
                let semaphore = Arc::new(Semaphore::new(self.max_per_client));
                slots.insert(client.clone(), semaphore.clone());
                semaphore
            }
        }
    }

    /// The 503 for a client that held all its upstream slots for the whole wait.
    fn shed_client(&self, call: &Call<'_>, client: &ClientLabel, attempt: u32) -> Attempt {
        warn!(
            request_id = call.id(),
            attempt,
            client = &*client.0,
            limit = self.max_per_client,
            "client's upstream concurrency limit reached; shedding the request"
        );
        self.metrics.shed(Shed::ClientConcurrency);
        Attempt {
            client_shed: true,
            ..Attempt::fatal(Error::Unavailable {
                reason:
                    "This client has too many requests waiting for the upstream API. Retry shortly.",
                retry_after: Some(self.queue_timeout),
            })
        }
    }

    /// Built from scratch: upstream sees only the allow-listed headers, never the caller's.
    fn request(&self, call: &Call<'_>) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(call.body.clone().unwrap_or_default()));
        *request.method_mut() = call.method.clone();
        *request.uri_mut() = call.uri.clone();
        let headers = request.headers_mut();
        headers.insert(AUTHORIZATION, call.key.authorization().clone());
        headers.insert(X_CLIENT_REQUEST_ID, call.request_id.clone());
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, self.user_agent.clone());
        if call.body.is_some() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        request
    }

    /// Sends `request` and reads the whole reply. `Err` is a transport or body failure, logged
    /// here where its cause is known.
    async fn exchange(
        &self,
        request: Request<Full<Bytes>>,
        call: &Call<'_>,
        attempt: u32,
    ) -> Result<Reply, ()> {
        let id = call.id();
        let response = self.client.request(request).await.map_err(|e| {
            let source = std::error::Error::source(&e);
            warn!(request_id = id, attempt, error = %e, ?source, "upstream unreachable");
        })?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_UPSTREAM_BODY)
            .collect()
            .await
            .map_err(|e| {
                let status = parts.status.as_u16();
                warn!(request_id = id, attempt, status, error = %e, "upstream body unreadable");
            })?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// The attempt's duration in its span, and its status (or `error` / `timeout`) in metrics.
    fn record(&self, outcome: &Exchanged, attempt: u32, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        tracing::Span::current().record("duration_ms", seconds * 1000.0);
        let status = match outcome {
            Ok(Ok(reply)) => Some(reply.status.as_u16()),
            _ => None,
        };
        self.metrics
            .upstream_attempt(status, outcome.is_err(), attempt, seconds);
    }

    /// Gives the breaker its verdict and classifies the answer. Transport errors and transient
    /// statuses may be retried; a passed deadline may not.
    fn judge(
        &self,
        outcome: Exchanged,
        permit: Permit<'_>,
        call: &Call<'_>,
        attempt: u32,
    ) -> Attempt {
        let reply = match outcome {
            Ok(Ok(reply)) => reply,
            Ok(Err(())) => {
                permit.failure();
                return Attempt {
                    sent: Some(Attempted::Error),
                    retry: Some(None),
                    ..Attempt::fatal(Error::UpstreamError)
                };
            }
            Err(_) => {
                warn!(
                    request_id = call.id(),
                    attempt,
                    timeout_ms = self.timeout.as_millis() as u64,
                    "upstream deadline passed"
                );
                permit.failure();
                return Attempt {
                    sent: Some(Attempted::Timeout),
                    ..Attempt::fatal(Error::UpstreamTimeout)
                };
            }
        };
        let status = reply.status;
        tracing::Span::current().record("status", status.as_u16());
        let transient = matches!(status.as_u16(), 429 | 502 | 503 | 504);
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            permit.failure();
        } else {
            permit.success();
        }
        Attempt {
            sent: Some(Attempted::Status(status)),
            status: Some(status),
            retry: transient.then(|| retry_after(&reply.headers)),
            result: classify(
                status,
                &reply.headers,
                reply.body,
                &call.check(),
                call.id(),
                attempt,
            ),
            client_shed: false,
        }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by OpenAI).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// What an answer to one request is checked against.
struct Check<'a> {
    /// What a 2xx must look like.
    shape: Shape,
    /// The admin key the request was sent with.
    key: &'a AdminKey,
    /// The request's path and query as sent, and its body: what upstream may quote back.
    target: &'a str,
    body: &'a [u8],
}

impl Check<'_> {
    /// Whether `answer` holds a piece of the admin key the request did not carry (in its path
    /// and query, as sent or percent-decoded, or its body): see [`AdminKey::leaks_in`]. A JSON
    /// answer is read as its reader would read it too: with `\uXXXX` escapes a key can be
    /// written so that no byte run of it matches, so when the answer has one, every string in
    /// it (names and values) is checked once unescaped.
    fn leaks_in(&self, answer: &[u8]) -> bool {
        let escaped = memchr::memmem::find(answer, b"\\u").is_some();
        let raw = self.key.appears_in(answer);
        if !escaped && !raw {
            return false;
        }
        let decoded: Cow<'_, [u8]> = percent_encoding::percent_decode_str(self.target).into();
        let sent = [self.target.as_bytes(), &decoded, self.body];
        (raw && self.key.leaks_in(answer, &sent))
            || (escaped
                && serde_json::from_slice::<serde_json::Value>(answer).is_ok_and(|json| {
                    secret::any_json_text(&json, &mut |_, text| {
                        let text = text.as_bytes();
                        self.key.appears_in(text) && self.key.leaks_in(text, &sent)
                    })
                }))
    }
}

impl Call<'_> {
    fn check(&self) -> Check<'_> {
        Check {
            shape: Shape::of(&self.method),
            key: &self.key,
            target: self.uri.path_and_query().map_or("", |p| p.as_str()),
            body: self.body.as_deref().unwrap_or_default(),
        }
    }
}

/// Turns upstream's final answer into what the caller gets. A passthrough never holds a piece
/// of the admin key that the caller did not send itself (SPEC "Hygiene rules"; see
/// [`AdminKey::leaks_in`]); bodies are never logged, only their status and size.
fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
    check: &Check<'_>,
    request_id: &str,
    attempt: u32,
) -> Result<Passthrough, Error> {
    let passthrough = status.is_success() || matches!(status.as_u16(), 400 | 404 | 409 | 422);
    if passthrough {
        // One JSON pass: a 2xx is parsed as the endpoint's shape, anything else only as JSON.
        let refused = if check.leaks_in(&body) {
            Some("upstream's answer contains a piece of the admin key; answering 502 instead")
        } else if status.is_success() {
            (!check.shape.matches(&body)).then(|| check.shape.mismatch())
        } else if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            Some("upstream sent a body that is not JSON")
        } else {
            None
        };
        if let Some(why) = refused {
            warn!(
                request_id,
                attempt,
                status = status.as_u16(),
                bytes = body.len(),
                "{why}"
            );
            return Err(Error::UpstreamUnusable);
        }
        return Ok(Passthrough { status, body });
    }
    match status.as_u16() {
        401 | 403 => {
            warn!(
                request_id,
                attempt,
                status = status.as_u16(),
                "upstream rejected the admin key; check upstream.admin_key_env / admin_key_file"
            );
            Err(Error::UpstreamAuthFailed)
        }
        429 => {
            let retry_after = retry_after(headers);
            warn!(
                request_id,
                attempt,
                ?retry_after,
                "upstream rate-limited the admin key"
            );
            Err(Error::Unavailable {
                reason: "The upstream API is rate limiting this gateway. Retry later.",
                retry_after,
            })
        }
        code => {
            warn!(request_id, attempt, status = code, "upstream failed");
            // A 5xx or a 408 may pass; any other status (410, 418, a redirect...) would be
            // the answer again.
            Err(match code {
                408 | 500..=599 => Error::UpstreamError,
                _ => Error::UpstreamUnusable,
            })
        }
    }
}

/// The body a 2xx must have (openai-checkpoint-permissions.openapi.yaml). Anything else is not
/// a page to cache or an answer to pass on, whatever its status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `ListFineTuningCheckpointPermissionResponse`: the answer to a list, and to a create.
    List,
    /// `DeleteFineTuningCheckpointPermissionResponse`.
    Deleted,
}

impl Shape {
    /// Which endpoint was called, from the method: `send` picks the method from the `Target`.
    fn of(method: &Method) -> Shape {
        if method == Method::DELETE {
            Shape::Deleted
        } else {
            Shape::List
        }
    }

    fn matches(self, body: &[u8]) -> bool {
        match self {
            Shape::List => serde_json::from_slice::<PermissionList>(body).is_ok(),
            Shape::Deleted => serde_json::from_slice::<Deletion>(body).is_ok(),
        }
    }

    fn mismatch(self) -> &'static str {
        match self {
            Shape::List => "upstream answered 2xx with a body that is not a permission list",
            Shape::Deleted => "upstream answered 2xx with a body that is not a deletion result",
        }
    }
}

/// `"object": "list"`.
#[derive(Deserialize)]
enum ListTag {
    #[serde(rename = "list")]
    List,
}

/// `"object": "checkpoint.permission"`.
#[derive(Deserialize)]
enum PermissionTag {
    #[serde(rename = "checkpoint.permission")]
    Permission,
}

// The fields below are read by serde only: deserializing is the check. Unknown fields are
// allowed, as OpenAI adds fields without notice. Strings are checked as strings, not copied
// (`StrValue`): a page's worth of them is no allocation.

#[derive(Deserialize)]
#[allow(dead_code)]
struct PermissionList {
    object: ListTag,
    data: Vec<Permission>,
    has_more: bool,
    #[serde(default)]
    first_id: Option<StrValue>,
    #[serde(default)]
    last_id: Option<StrValue>,
}

/// A JSON string, checked and not kept.
struct StrValue;

impl<'de> Deserialize<'de> for StrValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = StrValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<StrValue, E> {
                Ok(StrValue)
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Permission {
    object: PermissionTag,
    id: StrValue,
    created_at: u64,
    project_id: StrValue,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Deletion {
    object: PermissionTag,
    id: StrValue,
    deleted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-Zq9XvLk2PmW7tR4yB8nC3dF6hJ1wQ5eT";
    const LIST: &str = r#"{"object":"list","data":[{"object":"checkpoint.permission","id":"cp_1","created_at":1721764867,"project_id":"proj_1"}],"first_id":"cp_1","last_id":"cp_1","has_more":false}"#;
    const DELETED: &str = r#"{"object":"checkpoint.permission","id":"cp_1","deleted":true}"#;

    fn classified(status: u16, method: Method, body: &str) -> Result<Passthrough, Error> {
        classified_after(status, method, body, "")
    }

    /// `classified` for an answer to a request that carried `sent`.
    fn classified_after(
        status: u16,
        method: Method,
        body: &str,
        sent: &str,
    ) -> Result<Passthrough, Error> {
        let key = AdminKey::new(KEY).unwrap();
        let check = Check {
            shape: Shape::of(&method),
            key: &key,
            target: sent,
            body: b"",
        };
        classify(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            Bytes::from(body.to_owned()),
            &check,
            "test",
            1,
        )
    }

    #[test]
    fn answers_holding_a_piece_of_the_key_are_never_passed_on() {
        let masked = format!("{}{}{}", &KEY[..8], "*".repeat(21), &KEY[KEY.len() - 6..]);
        let not_found = format!(
            r#"{{"error":{{"message":"No checkpoint for key {masked}","type":"invalid_request_error","param":null,"code":null}}}}"#
        );
        let list = LIST.replace("proj_1", KEY);
        for (status, method, body) in [
            (404, Method::GET, not_found.as_str()),
            (400, Method::POST, not_found.as_str()),
            (200, Method::GET, list.as_str()),
            (200, Method::POST, list.as_str()),
            (200, Method::DELETE, &DELETED.replace("cp_1", &KEY[4..14])),
        ] {
            let result = classified(status, method, body);
            assert!(
                matches!(result, Err(Error::UpstreamUnusable)),
                "{status} {body}"
            );
        }
        let clean_404 = not_found.replace(&masked, "sk-...");
        assert_eq!(
            classified(404, Method::GET, &clean_404).unwrap().status,
            404
        );
    }

    /// Upstream quoting the caller's own checkpoint id back, with a piece of the key in it: the
    /// same answer as for any other id (else the status would tell the caller its guess is a
    /// piece of the key). A piece upstream adds itself is still refused.
    #[test]
    fn a_piece_of_the_key_the_caller_sent_is_quoted_back_as_any_other_text() {
        let id = format!("ft:acme:guess-{}", &KEY[10..16]);
        let path = format!("/v1/fine_tuning/checkpoints/{id}/permissions");
        let quoted = format!(
            r#"{{"error":{{"message":"The model checkpoint '{id}' does not exist","type":"invalid_request_error","param":null,"code":null}}}}"#
        );
        let passed = classified_after(404, Method::GET, &quoted, &path);
        assert_eq!(passed.unwrap().status, 404);
        let with_more = quoted.replace("does not", &format!("{} does not", &KEY[20..26]));
        let refused = classified_after(404, Method::GET, &with_more, &path);
        assert!(matches!(refused, Err(Error::UpstreamUnusable)));
    }

    #[test]
    fn a_2xx_must_have_the_endpoints_shape() {
        for (method, body, ok) in [
            (Method::GET, LIST, true),
            (Method::POST, LIST, true),
            (Method::DELETE, DELETED, true),
            (
                Method::GET,
                r#"{"object":"list","data":[],"has_more":false}"#,
                true,
            ),
            (
                Method::GET,
                r#"{"object":"list","data":[],"has_more":false,"new":1}"#,
                true,
            ),
            (Method::GET, DELETED, false),
            (Method::DELETE, LIST, false),
            (Method::POST, DELETED, false),
            (Method::GET, "{}", false),
            (Method::GET, "[]", false),
            (Method::GET, r#"{"object":"list","data":[]}"#, false),
            (
                Method::GET,
                r#"{"object":"page","data":[],"has_more":false}"#,
                false,
            ),
            (
                Method::GET,
                r#"{"object":"list","data":[{"id":"cp_1"}],"has_more":false}"#,
                false,
            ),
            (
                Method::DELETE,
                r#"{"object":"checkpoint.permission","id":"cp_1"}"#,
                false,
            ),
        ] {
            let result = classified(200, method.clone(), body);
            assert_eq!(result.is_ok(), ok, "{method} {body}");
            if !ok {
                assert!(matches!(result, Err(Error::UpstreamUnusable)));
            }
        }
        // Error statuses passed through are not held to a 2xx shape.
        assert!(classified(409, Method::POST, r#"{"error":{}}"#).is_ok());
    }

    #[test]
    fn a_rejected_key_stays_an_auth_failure_and_is_never_echoed() {
        let body = format!(r#"{{"error":{{"message":"Incorrect API key provided: {KEY}"}}}}"#);
        let result = classified(401, Method::GET, &body);
        assert!(matches!(result, Err(Error::UpstreamAuthFailed)));
    }
}
