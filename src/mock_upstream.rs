//! A local stand-in for OpenAI's three checkpoint permission endpoints (SPEC "Command line":
//! `mock-upstream`), used by `permgate demo` and the tests over a real socket.
//!
//! Faithful where permgate depends on it: the admin-key check (a 401 whose message quotes a
//! piece of the presented key, as OpenAI's does), 404 for unknown checkpoints and permissions,
//! pagination with `after`/`limit`/`order`, `project_id` filtering, `has_more`,
//! `first_id`/`last_id`, create and delete. The [`MockUpstream`] handle records every request
//! and can inject faults into the next requests, so tests can count and steer upstream.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{HeaderValue, AUTHORIZATION, RETRY_AFTER};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::Full;
use hyper::body::Frame;

use crate::error::json_response;

const PREFIX: &str = "/v1/fine_tuning/checkpoints/";

/// Checkpoints the mock knows from the start, with how many permissions each has.
pub const SEEDED: &[(&str, usize)] = &[
    ("ft:gpt-4o-mini-2024-07-18:acme:weather:B7R9VjQd", 25),
    ("ft:gpt-4o-mini-2024-07-18:acme:support:Q1w2E3r4", 3),
    ("ft:gpt-4o-2024-08-06:globex:legal:Z9y8X7w6", 2),
];

/// One request as the mock saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub version: hyper::Version,
    /// Path and query exactly as received (still percent-encoded).
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A fault applied to one upcoming request (in the order they were pushed).
#[derive(Debug)]
pub enum Fault {
    /// Answer with this status and body instead of the real answer.
    Status {
        status: u16,
        body: String,
        retry_after: Option<u64>,
    },
    /// Answer 200 with a body that is not JSON.
    MalformedJson,
    /// Answer 200 declaring a Content-Length, send part of the body, then drop the connection.
    TruncatedBody,
    /// Answer 200 (chunked), send part of the body, then reset the connection.
    ResetMidResponse,
    /// Wait this long before answering.
    Delay(Duration),
    /// Compute the real answer now, tell `arrived`, then wait for `release` before sending it.
    Hold {
        arrived: oneshot::Sender<()>,
        release: oneshot::Receiver<()>,
    },
    /// Apply the request as usual (a create or delete takes effect), then answer 200, send
    /// part of the body and reset the connection: the caller cannot tell that it applied.
    AppliedThenReset,
}

/// A request held by [`MockUpstream::hold_next`].
pub struct Held {
    arrived: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

impl Held {
    /// Resolves once the held request has reached the mock (its answer is already computed).
    pub async fn arrived(&mut self) {
        let _ = (&mut self.arrived).await;
    }

    /// Lets the held request's answer go.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

#[derive(Debug, Clone)]
struct Permission {
    id: String,
    created_at: u64,
    project_id: String,
}

impl Permission {
    fn to_json(&self) -> Value {
        json!({
            "object": "checkpoint.permission",
            "id": self.id,
            "created_at": self.created_at,
            "project_id": self.project_id,
        })
    }
}

/// The query of a list request, read as OpenAI reads it.
struct ListParams {
    limit: usize,
    descending: bool,
    after: Option<String>,
    project_id: Option<String>,
}

impl ListParams {
    /// OpenAI's defaults (10, descending) for what is absent; unknown parameters are ignored.
    /// A bad `limit` or `order` is an error: its message and the parameter's name.
    fn parse(query: &str) -> Result<ListParams, (&'static str, &'static str)> {
        let mut params = ListParams {
            limit: 10,
            descending: true,
            after: None,
            project_id: None,
        };
        for (k, v) in query.split('&').filter_map(|p| p.split_once('=')) {
            let v = percent_decode_str(v).decode_utf8_lossy().into_owned();
            match k {
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=100).contains(&n) => params.limit = n,
                    _ => return Err(("Invalid limit", "limit")),
                },
                "order" => match v.as_str() {
                    "ascending" => params.descending = false,
                    "descending" => params.descending = true,
                    _ => return Err(("Invalid order", "order")),
                },
                "after" => params.after = Some(v),
                "project_id" => params.project_id = Some(v),
                _ => {}
            }
        }
        Ok(params)
    }

    /// The page of `all` (oldest first) these parameters select, and whether more follow it.
    /// An `after` that names no listed permission gives an empty page.
    fn page<'a>(&self, all: &'a [Permission]) -> (Vec<&'a Permission>, bool) {
        let mut items: Vec<&Permission> = all
            .iter()
            .filter(|p| {
                self.project_id
                    .as_ref()
                    .is_none_or(|id| &p.project_id == id)
            })
            .collect();
        if self.descending {
            items.reverse();
        }
        let start = match &self.after {
            Some(id) => items
                .iter()
                .position(|p| &p.id == id)
                .map_or(items.len(), |i| i + 1),
            None => 0,
        };
        let page: Vec<&Permission> = items.iter().skip(start).take(self.limit).copied().collect();
        let has_more = start + page.len() < items.len();
        (page, has_more)
    }
}

struct Inner {
    /// Keys upstream accepts (more than one while a rotation overlaps).
    admin_keys: Mutex<Vec<String>>,
    /// Permissions per checkpoint, oldest first.
    data: Mutex<BTreeMap<String, Vec<Permission>>>,
    requests: Mutex<Vec<Recorded>>,
    faults: Mutex<VecDeque<Fault>>,
    next_id: AtomicU64,
    /// Off for load tests: only `served` counts then, memory stays flat.
    recording: AtomicBool,
    served: AtomicU64,
}

/// The mock's handle: clone it freely; all clones share one state.
#[derive(Clone)]
pub struct MockUpstream {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MockUpstream {
    /// A mock accepting `admin_key`, seeded with [`SEEDED`].
    pub fn new(admin_key: &str) -> MockUpstream {
        let mock = MockUpstream {
            inner: Arc::new(Inner {
                admin_keys: Mutex::new(vec![admin_key.to_owned()]),
                data: Mutex::new(BTreeMap::new()),
                requests: Mutex::new(Vec::new()),
                faults: Mutex::new(VecDeque::new()),
                next_id: AtomicU64::new(1),
                recording: AtomicBool::new(true),
                served: AtomicU64::new(0),
            }),
        };
        for (checkpoint, count) in SEEDED {
            mock.seed(checkpoint, *count);
        }
        mock
    }

    /// Adds a checkpoint with `count` permissions (`proj_<n>`), one minute apart.
    pub fn seed(&self, checkpoint: &str, count: usize) {
        let permissions = (0..count)
            .map(|i| Permission {
                id: self.new_id(),
                created_at: 1_721_764_800 + 60 * i as u64,
                project_id: format!("proj_{i:04}"),
            })
            .collect();
        lock(&self.inner.data).insert(checkpoint.to_owned(), permissions);
    }

    /// The ids of a checkpoint's permissions, oldest first.
    pub fn permission_ids(&self, checkpoint: &str) -> Vec<String> {
        lock(&self.inner.data)
            .get(checkpoint)
            .map(|list| list.iter().map(|p| p.id.clone()).collect())
            .unwrap_or_default()
    }

    /// Changes the key the mock accepts (key rotation tests).
    pub fn set_admin_key(&self, key: &str) {
        self.set_admin_keys(&[key]);
    }

    /// Accepts any of these keys, as OpenAI does while an old and a new admin key both exist.
    pub fn set_admin_keys(&self, keys: &[&str]) {
        *lock(&self.inner.admin_keys) = keys.iter().map(|k| k.to_string()).collect();
    }

    /// Stops (or resumes) keeping every request; [`MockUpstream::served`] still counts them.
    pub fn set_recording(&self, on: bool) {
        self.inner.recording.store(on, Ordering::Relaxed);
    }

    /// How many requests were received, recorded or not.
    pub fn served(&self) -> u64 {
        self.inner.served.load(Ordering::Relaxed)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.inner.requests).clone()
    }

    /// How many requests with this method were received.
    pub fn count(&self, method: &Method) -> usize {
        lock(&self.inner.requests)
            .iter()
            .filter(|r| r.method == method)
            .count()
    }

    /// Queues a fault for the next request that has no fault yet.
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.inner.faults).push_back(fault);
    }

    /// Holds the next request after computing its answer; see [`Held`].
    pub fn hold_next(&self) -> Held {
        let (arrived_tx, arrived_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        self.push_fault(Fault::Hold {
            arrived: arrived_tx,
            release: release_rx,
        });
        Held {
            arrived: arrived_rx,
            release: release_tx,
        }
    }

    fn new_id(&self) -> String {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Deterministic, OpenAI-looking ids: cp_ + 24 alphanumerics.
        let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5DEE_CE66_D1CE_4E5B;
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut id = String::from("cp_");
        for _ in 0..24 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            id.push(alphabet[(x % alphabet.len() as u64) as usize] as char);
        }
        id
    }

    /// Serves the mock on a bound listener until `stop` turns true.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let limits = crate::server::Limits::local(Duration::from_secs(1));
        let handler = move |req| {
            let mock = self.clone();
            async move { mock.handle(req).await }
        };
        crate::server::serve_http(listener, handler, stop, limits, None).await;
    }

    /// Serves one request (any body type, so tests can run it over TLS too).
    pub async fn handle<B>(&self, req: Request<B>) -> Response<MockBody>
    where
        B: hyper::body::Body,
    {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        self.inner.served.fetch_add(1, Ordering::Relaxed);
        if self.inner.recording.load(Ordering::Relaxed) {
            lock(&self.inner.requests).push(Recorded {
                method: parts.method.clone(),
                version: parts.version,
                path_and_query,
                headers: parts.headers.clone(),
                body: body.clone(),
            });
        }
        let fault = lock(&self.inner.faults).pop_front();
        match fault {
            Some(Fault::Status {
                status,
                body,
                retry_after,
            }) => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut response = json_response(status, Bytes::from(body));
                if let Some(secs) = retry_after {
                    response
                        .headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from(secs));
                }
                return response.map(MockBody::Full);
            }
            Some(Fault::MalformedJson) => {
                let body = Bytes::from_static(b"{\"object\": \"list\", \"data\": [tru");
                return json_response(StatusCode::OK, body).map(MockBody::Full);
            }
            Some(Fault::TruncatedBody) => {
                let piece = Bytes::from_static(b"{\"object\": \"li");
                let mut response = Response::new(MockBody::Broken(Some(piece)));
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(400));
                return response;
            }
            Some(Fault::ResetMidResponse) => {
                let piece = Bytes::from_static(b"{\"object\": \"li");
                return Response::new(MockBody::Broken(Some(piece)));
            }
            Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
            Some(Fault::Hold { .. } | Fault::AppliedThenReset) | None => {}
        }
        let response = self.answer(&parts.method, &parts.uri, &parts.headers, &body);
        if let Some(Fault::AppliedThenReset) = fault {
            let piece = Bytes::from_static(b"{\"object\": \"checkpoint.perm");
            return Response::new(MockBody::Broken(Some(piece)));
        }
        if let Some(Fault::Hold { arrived, release }) = fault {
            let _ = arrived.send(());
            let _ = release.await;
        }
        response.map(MockBody::Full)
    }

    fn answer(
        &self,
        method: &Method,
        uri: &hyper::Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response<Full<Bytes>> {
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !lock(&self.inner.admin_keys).iter().any(|k| k == presented) {
            return incorrect_key(presented);
        }
        let Some(rest) = uri.path().strip_prefix(PREFIX) else {
            return error(StatusCode::NOT_FOUND, "Unknown URL", None, None);
        };
        let segments: Vec<&str> = rest.split('/').collect();
        let checkpoint = match percent_decode_str(segments[0]).decode_utf8() {
            Ok(c) => c.into_owned(),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "Invalid checkpoint",
                    Some("fine_tuned_model_checkpoint"),
                    None,
                )
            }
        };
        match (method, &segments[1..]) {
            (&Method::GET, ["permissions"]) => self.list(&checkpoint, uri.query().unwrap_or("")),
            (&Method::POST, ["permissions"]) => self.create(&checkpoint, body),
            (&Method::DELETE, ["permissions", id]) => self.delete(&checkpoint, id),
            _ => error(StatusCode::NOT_FOUND, "Unknown URL", None, None),
        }
    }

    fn list(&self, checkpoint: &str, query: &str) -> Response<Full<Bytes>> {
        let params = match ListParams::parse(query) {
            Ok(params) => params,
            Err((message, param)) => {
                return error(StatusCode::BAD_REQUEST, message, Some(param), None)
            }
        };
        let data = lock(&self.inner.data);
        let Some(all) = data.get(checkpoint) else {
            return not_found_checkpoint(checkpoint);
        };
        let (page, has_more) = params.page(all);
        list_object(&page, has_more)
    }

    fn create(&self, checkpoint: &str, body: &[u8]) -> Response<Full<Bytes>> {
        let ids: Option<Vec<String>> = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("project_ids").cloned())
            .and_then(|v| serde_json::from_value(v).ok())
            .filter(|ids: &Vec<String>| !ids.is_empty());
        let Some(ids) = ids else {
            return error(
                StatusCode::BAD_REQUEST,
                "project_ids must be a non-empty array of strings",
                Some("project_ids"),
                None,
            );
        };
        let mut data = lock(&self.inner.data);
        let Some(list) = data.get_mut(checkpoint) else {
            return not_found_checkpoint(checkpoint);
        };
        let base = list.last().map_or(1_721_764_800, |p| p.created_at + 1);
        let created: Vec<Permission> = ids
            .into_iter()
            .enumerate()
            .map(|(i, project_id)| Permission {
                id: self.new_id(),
                created_at: base + i as u64,
                project_id,
            })
            .collect();
        list.extend(created.iter().cloned());
        list_object(&created.iter().collect::<Vec<_>>(), false)
    }

    fn delete(&self, checkpoint: &str, id: &str) -> Response<Full<Bytes>> {
        let mut data = lock(&self.inner.data);
        let Some(list) = data.get_mut(checkpoint) else {
            return not_found_checkpoint(checkpoint);
        };
        let Some(at) = list.iter().position(|p| p.id == id) else {
            return error(
                StatusCode::NOT_FOUND,
                "No such permission",
                Some("permission_id"),
                None,
            );
        };
        list.remove(at);
        json_response(
            StatusCode::OK,
            Bytes::from(
                json!({"object": "checkpoint.permission", "id": id, "deleted": true}).to_string(),
            ),
        )
    }
}

fn error(
    status: StatusCode,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response<Full<Bytes>> {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}});
    json_response(status, Bytes::from(body.to_string()))
}

/// OpenAI's list object, the answer to a list and to a create.
fn list_object(page: &[&Permission], has_more: bool) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        Bytes::from(
            json!({
                "object": "list",
                "data": page.iter().map(|p| p.to_json()).collect::<Vec<_>>(),
                "first_id": page.first().map(|p| p.id.clone()),
                "last_id": page.last().map(|p| p.id.clone()),
                "has_more": has_more,
            })
            .to_string(),
        ),
    )
}

fn not_found_checkpoint(checkpoint: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::NOT_FOUND,
        &format!(
            "The model checkpoint '{checkpoint}' does not exist or you do not have access to it."
        ),
        Some("fine_tuned_model_checkpoint"),
        Some("model_not_found"),
    )
}

/// OpenAI's 401 quotes the start and end of the presented key; so does the mock, so that a
/// gateway echoing it would leak a piece of its admin key.
fn incorrect_key(presented: &str) -> Response<Full<Bytes>> {
    let shown = if presented.len() > 12 && presented.is_ascii() {
        format!(
            "{}{}{}",
            &presented[..8],
            "*".repeat(presented.len() - 12),
            &presented[presented.len() - 4..]
        )
    } else {
        presented.to_owned()
    };
    error(
        StatusCode::UNAUTHORIZED,
        &format!("Incorrect API key provided: {shown}. You can find your API key at https://platform.openai.com/account/api-keys."),
        None,
        Some("invalid_api_key"),
    )
}

/// The mock's response body: a whole body, or a broken one that sends its first piece and
/// then fails, which makes hyper abort the connection mid-response.
pub enum MockBody {
    Full(Full<Bytes>),
    Broken(Option<Bytes>),
}

impl hyper::body::Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            MockBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(|never| match never {}))),
            MockBody::Broken(first) => Poll::Ready(Some(match first.take() {
                Some(piece) => Ok(Frame::data(piece)),
                None => Err(std::io::Error::other(
                    "injected fault: connection broken mid-response",
                )),
            })),
        }
    }
}
