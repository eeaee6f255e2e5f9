//! The pooled client to OpenAI (or the mock): builds each request from scratch with an
//! allow-list of headers, injects the admin key, enforces the deadline, and classifies the
//! reply (SPEC "Responses").
//!
//! Nothing of the caller's request is copied: upstream sees only `Authorization: Bearer
//! <admin key>`, `X-Client-Request-Id`, `Accept`, `User-Agent` and, for a create,
//! `Content-Type`. Upstream's answer is either a [`Passthrough`] (2xx, 400, 404, 409, 422 with a
//! JSON body) or an [`Error`]; upstream's own error text for anything else is logged at most as
//! a status and never returned, since OpenAI's 401 message quotes part of the key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tracing::{field, warn, Instrument};

use crate::config::UpstreamConfig;
use crate::error::Error;
use crate::route::{Checkpoint, ListQuery};
use crate::secret::AdminKey;

/// Larger upstream bodies are treated as malformed (a 100-item page is about 15 KiB).
const MAX_UPSTREAM_BODY: usize = 4 * 1024 * 1024;
const X_CLIENT_REQUEST_ID: &str = "x-client-request-id";

/// An upstream answer the caller receives as is.
#[derive(Debug, Clone)]
pub struct Passthrough {
    pub status: StatusCode,
    pub body: Bytes,
}

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
    key: AdminKey,
    timeout: Duration,
    user_agent: HeaderValue,
}

impl Upstream {
    /// Builds the client: public roots plus `ca_file`, HTTP/2 by ALPN, pooled connections.
    pub fn new(config: &UpstreamConfig, key: AdminKey) -> Result<Upstream, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
                added += 1;
            }
            if added == 0 {
                return Err(format!(
                    "upstream.ca_file {}: no PEM certificates found",
                    path.display()
                ));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Upstream {
            client,
            base: config.base_url.to_string().trim_end_matches('/').to_owned(),
            key,
            timeout: config.request_timeout,
            user_agent: HeaderValue::from_static(concat!("permgate/", env!("CARGO_PKG_VERSION"))),
        })
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

    /// Sends one request and classifies the answer, within `upstream.request_timeout_ms`.
    /// Also returns upstream's status when one arrived (for the audit trail and logs).
    pub async fn send(
        &self,
        checkpoint: &Checkpoint,
        target: Target<'_>,
        body: Option<Bytes>,
        request_id: &HeaderValue,
    ) -> (Option<StatusCode>, Result<Passthrough, Error>) {
        let method = match target {
            Target::List(_) => Method::GET,
            Target::Create => Method::POST,
            Target::Delete(_) => Method::DELETE,
        };
        let span = tracing::info_span!(
            "upstream",
            method = method.as_str(),
            status = field::Empty,
            duration_ms = field::Empty,
        );
        let mut request = Request::new(Full::new(body.clone().unwrap_or_default()));
        *request.method_mut() = method;
        *request.uri_mut() = match self.uri(checkpoint, &target) {
            Ok(uri) => uri,
            Err(e) => return (None, Err(e)),
        };
        let headers = request.headers_mut();
        headers.insert(AUTHORIZATION, self.key.authorization().clone());
        headers.insert(X_CLIENT_REQUEST_ID, request_id.clone());
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, self.user_agent.clone());
        if body.is_some() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }

        let started = Instant::now();
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                warn!(error = %e, source = ?std::error::Error::source(&e), "upstream unreachable");
                Error::UpstreamError
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_UPSTREAM_BODY)
                .collect()
                .await
                .map_err(|e| {
                    warn!(status = parts.status.as_u16(), error = %e, "upstream body unreadable");
                    Error::UpstreamError
                })?
                .to_bytes();
            Ok::<_, Error>((parts.status, parts.headers, body))
        };
        let outcome = tokio::time::timeout(self.timeout, exchange)
            .instrument(span.clone())
            .await;
        span.record("duration_ms", started.elapsed().as_secs_f64() * 1000.0);
        let (status, headers, body) = match outcome {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return (None, Err(e)),
            Err(_) => {
                warn!(parent: &span, timeout_ms = self.timeout.as_millis() as u64, "upstream deadline passed");
                return (None, Err(Error::UpstreamTimeout));
            }
        };
        span.record("status", status.as_u16());
        (Some(status), classify(status, &headers, body, &span))
    }
}

fn classify(
    status: StatusCode,
    headers: &hyper::HeaderMap,
    body: Bytes,
    span: &tracing::Span,
) -> Result<Passthrough, Error> {
    let passthrough = status.is_success() || matches!(status.as_u16(), 400 | 404 | 409 | 422);
    if passthrough {
        if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            warn!(parent: span, status = status.as_u16(), bytes = body.len(), "upstream sent a body that is not JSON");
            return Err(Error::UpstreamError);
        }
        return Ok(Passthrough { status, body });
    }
    match status.as_u16() {
        401 | 403 => {
            warn!(parent: span, status = status.as_u16(), "upstream rejected the admin key; check upstream.admin_key_env / admin_key_file");
            Err(Error::UpstreamAuthFailed)
        }
        429 => {
            let retry_after = headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            warn!(parent: span, ?retry_after, "upstream rate-limited the admin key");
            Err(Error::Unavailable {
                reason: "The upstream API is rate limiting this gateway. Retry later.",
                retry_after,
            })
        }
        _ => {
            warn!(parent: span, status = status.as_u16(), "upstream failed");
            Err(Error::UpstreamError)
        }
    }
}
