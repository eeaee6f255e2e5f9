//! The one error type of the request path, and the one place that turns it into OpenAI's
//! error shape (SPEC "Responses").
//!
//! Variants carry only safe data: parameter names and fixed messages. Causes (hyper errors,
//! upstream bodies) are logged where they are classified and then dropped, so nothing from
//! upstream, and so no piece of the admin key, can reach a caller through an error.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

pub type Body = Full<Bytes>;

/// An upstream answer the caller receives as is (SPEC "Responses": 2xx, 400, 404, 409, 422):
/// a value, not an error.
#[derive(Debug, Clone)]
pub struct Passthrough {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Passthrough {
    pub fn into_response(self) -> Response<Body> {
        json_response(self.status, self.body)
    }
}

/// Every permgate-made error, one variant per row of the SPEC's error table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// 400: bad path, query or body. `param` names the offending parameter.
    InvalidParameter {
        param: Cow<'static, str>,
        message: Cow<'static, str>,
    },
    /// 400 (`invalid_request`, no `param`): a request head hyper's parser refused, answered by
    /// the framing guard.
    MalformedRequest,
    /// 401: missing or unknown client token.
    InvalidApiKey,
    /// 401 (`invalid_api_key` too): a credential refused for `reason`, a fixed message that
    /// says why (an expired JWT, an unknown signing key...) and never holds the credential.
    Unauthenticated { reason: &'static str },
    /// 403: the token is valid but this checkpoint or method is not granted.
    PermissionDenied,
    /// 404: not a route permgate serves.
    NotFound,
    /// 405: a known path with another method; `allow` lists the methods it takes.
    MethodNotAllowed { allow: &'static str },
    /// 413: request body over `server.max_body_bytes`.
    RequestTooLarge,
    /// 414: request URI over `server.max_uri_bytes`.
    UriTooLong,
    /// 431: a request head still incomplete at `server.max_header_bytes`, or of more than 100
    /// fields (answered by the framing guard).
    HeadersTooLarge,
    /// 429: this client's rate limit; `retry_after`: until a request would be let through.
    RateLimitExceeded { retry_after: Duration },
    /// 502: upstream unreachable, or it failed (a 5xx, an unexpected status, an answer cut
    /// short): another try may succeed.
    UpstreamError,
    /// 502: upstream answered something that is not an answer to pass on (a 2xx of the wrong
    /// shape, a body that is not JSON, a piece of the admin key): the same request would get
    /// the same answer, so callers are told not to retry.
    UpstreamUnusable,
    /// 502: upstream rejected the admin key. Upstream's message is never echoed.
    UpstreamAuthFailed,
    /// 503: not ready, overloaded, or upstream refusing work; `retry_after` when known.
    Unavailable {
        reason: &'static str,
        retry_after: Option<Duration>,
    },
    /// 504: the upstream deadline passed.
    UpstreamTimeout,
}

impl Error {
    pub fn invalid(
        param: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Error::InvalidParameter {
            param: param.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidParameter { .. } | Error::MalformedRequest => StatusCode::BAD_REQUEST,
            Error::InvalidApiKey | Error::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied => StatusCode::FORBIDDEN,
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UriTooLong => StatusCode::URI_TOO_LONG,
            Error::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::RateLimitExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::UpstreamError | Error::UpstreamUnusable | Error::UpstreamAuthFailed => {
                StatusCode::BAD_GATEWAY
            }
            Error::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// OpenAI's `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidParameter { .. } => "invalid_parameter",
            Error::MalformedRequest => "invalid_request",
            Error::InvalidApiKey | Error::Unauthenticated { .. } => "invalid_api_key",
            Error::PermissionDenied => "permission_denied",
            Error::NotFound => "not_found",
            Error::MethodNotAllowed { .. } => "method_not_allowed",
            Error::RequestTooLarge | Error::UriTooLong | Error::HeadersTooLarge => {
                "request_too_large"
            }
            Error::RateLimitExceeded { .. } => "rate_limit_exceeded",
            Error::UpstreamError | Error::UpstreamUnusable => "upstream_error",
            Error::UpstreamAuthFailed => "upstream_auth_failed",
            Error::Unavailable { .. } => "unavailable",
            Error::UpstreamTimeout => "upstream_timeout",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Error::InvalidParameter { .. }
            | Error::MalformedRequest
            | Error::InvalidApiKey
            | Error::Unauthenticated { .. }
            | Error::PermissionDenied
            | Error::NotFound
            | Error::MethodNotAllowed { .. }
            | Error::RequestTooLarge
            | Error::UriTooLong
            | Error::HeadersTooLarge => "invalid_request_error",
            Error::RateLimitExceeded { .. } => "rate_limit_error",
            Error::UpstreamError
            | Error::UpstreamUnusable
            | Error::UpstreamAuthFailed
            | Error::Unavailable { .. }
            | Error::UpstreamTimeout => "server_error",
        }
    }

    fn message(&self) -> Cow<'static, str> {
        let fixed = match self {
            Error::InvalidParameter { message, .. } => return message.clone(),
            Error::MalformedRequest => {
                "The request is not valid HTTP/1.1: its request line or a header line could not be parsed."
            }
            Error::InvalidApiKey => {
                "Missing or unknown permgate client token. Send 'Authorization: Bearer <client token>'."
            }
            Error::Unauthenticated { reason } => reason,
            Error::PermissionDenied => {
                "This client token is not granted this checkpoint or this operation."
            }
            Error::NotFound => "Unknown route. permgate serves only the fine-tuning checkpoint permission endpoints.",
            Error::MethodNotAllowed { .. } => "Method not allowed on this route.",
            Error::RequestTooLarge => "Request body is larger than this gateway accepts.",
            Error::UriTooLong => "Request URI is longer than this gateway accepts.",
            Error::HeadersTooLarge => "Request headers are larger than this gateway accepts.",
            Error::RateLimitExceeded { .. } => "Rate limit exceeded for this client token. Retry after the time in the Retry-After header.",
            Error::UpstreamError => "The upstream API could not be reached or failed.",
            Error::UpstreamUnusable => "The upstream API returned an unusable response.",
            Error::UpstreamAuthFailed => "The upstream API rejected the gateway's credentials. Operators have been told in the gateway logs.",
            Error::Unavailable { reason, .. } => reason,
            Error::UpstreamTimeout => "The upstream API did not answer in time.",
        };
        Cow::Borrowed(fixed)
    }

    fn param(&self) -> Option<&str> {
        match self {
            Error::InvalidParameter { param, .. } => Some(param),
            _ => None,
        }
    }

    /// OpenAI's error JSON for this error.
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "message": self.message(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.code(),
            }
        });
        Bytes::from(serde_json::to_vec(&body).expect("a json! value always serializes"))
    }

    /// The full response: status, JSON body, `Allow` where it applies, and what the OpenAI
    /// SDKs decide retries from: `x-should-retry: false` when a retry cannot help, `true` with
    /// `retry-after-ms` and `Retry-After` (whole seconds, at least 1) when waiting can.
    pub fn into_response(self) -> Response<Body> {
        let mut response = json_response(self.status(), self.body());
        let headers = response.headers_mut();
        if let Error::MethodNotAllowed { allow } = self {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        match self {
            Error::RateLimitExceeded { retry_after } => retry_later(headers, retry_after),
            Error::Unavailable { retry_after, .. } => {
                retry_later(headers, retry_after.unwrap_or(DEFAULT_RETRY_AFTER))
            }
            Error::InvalidParameter { .. }
            | Error::MalformedRequest
            | Error::InvalidApiKey
            | Error::Unauthenticated { .. }
            | Error::PermissionDenied
            | Error::NotFound
            | Error::MethodNotAllowed { .. }
            | Error::RequestTooLarge
            | Error::UriTooLong
            | Error::HeadersTooLarge
            | Error::UpstreamUnusable
            | Error::UpstreamAuthFailed => {
                headers.insert(&X_SHOULD_RETRY, HeaderValue::from_static("false"));
            }
            // Retryable for a read (the SDKs retry 5xx); the request log marks a write's
            // unknown outcome as not retryable.
            Error::UpstreamError | Error::UpstreamTimeout => {}
        }
        response
    }
}

/// The OpenAI SDKs' retry switch: `true`, `false`, or absent (they decide by status).
pub static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
static RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// What a 503 without a better estimate asks callers to wait.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// `x-should-retry: true`, `retry-after-ms` and `Retry-After` (rounded up, at least 1 s).
fn retry_later(headers: &mut hyper::HeaderMap, wait: Duration) {
    // Rounded up: a retry a fraction of a millisecond early would be refused again.
    let millis = u64::try_from(wait.as_micros().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1);
    let seconds = millis.div_ceil(1000);
    headers.insert(&X_SHOULD_RETRY, HeaderValue::from_static("true"));
    headers.insert(&RETRY_AFTER_MS, HeaderValue::from(millis));
    headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
}

/// A JSON response: every body permgate sends is JSON.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(err: &Error) -> serde_json::Value {
        serde_json::from_slice(&err.body()).unwrap()
    }

    #[test]
    fn every_error_has_openai_shape_and_spec_status() {
        let cases = [
            (Error::invalid("limit", "bad"), 400, "invalid_parameter"),
            (Error::InvalidApiKey, 401, "invalid_api_key"),
            (
                Error::Unauthenticated { reason: "why" },
                401,
                "invalid_api_key",
            ),
            (Error::PermissionDenied, 403, "permission_denied"),
            (Error::NotFound, 404, "not_found"),
            (
                Error::MethodNotAllowed { allow: "GET" },
                405,
                "method_not_allowed",
            ),
            (Error::RequestTooLarge, 413, "request_too_large"),
            (Error::UriTooLong, 414, "request_too_large"),
            (Error::HeadersTooLarge, 431, "request_too_large"),
            (Error::MalformedRequest, 400, "invalid_request"),
            (
                Error::RateLimitExceeded {
                    retry_after: Duration::from_secs(2),
                },
                429,
                "rate_limit_exceeded",
            ),
            (Error::UpstreamError, 502, "upstream_error"),
            (Error::UpstreamUnusable, 502, "upstream_error"),
            (Error::UpstreamAuthFailed, 502, "upstream_auth_failed"),
            (
                Error::Unavailable {
                    reason: "draining",
                    retry_after: None,
                },
                503,
                "unavailable",
            ),
            (Error::UpstreamTimeout, 504, "upstream_timeout"),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status().as_u16(), status);
            let v = json(&err);
            let e = &v["error"];
            assert_eq!(e["code"], code);
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(e["type"].is_string());
            assert!(e.as_object().unwrap().contains_key("param"));
        }
        assert_eq!(
            json(&Error::invalid("limit", "bad"))["error"]["param"],
            "limit"
        );
        assert!(json(&Error::NotFound)["error"]["param"].is_null());
    }

    #[test]
    fn retry_after_and_allow_headers() {
        let r = Error::RateLimitExceeded {
            retry_after: Duration::from_secs(3),
        }
        .into_response();
        assert_eq!(r.headers()[RETRY_AFTER], "3");
        let r = Error::MethodNotAllowed { allow: "GET, POST" }.into_response();
        assert_eq!(r.headers()[ALLOW], "GET, POST");
    }

    #[test]
    fn every_error_tells_the_sdks_whether_a_retry_can_help() {
        let wait = |retry_after| Error::Unavailable {
            reason: "circuit open",
            retry_after,
        };
        for (err, should, ms, secs) in [
            (wait(Some(Duration::from_millis(1500))), "true", "1500", "2"),
            (wait(Some(Duration::ZERO)), "true", "1", "1"),
            (wait(None), "true", "1000", "1"),
            (
                Error::RateLimitExceeded {
                    retry_after: Duration::from_millis(250),
                },
                "true",
                "250",
                "1",
            ),
        ] {
            let r = err.into_response();
            assert_eq!(r.headers()["x-should-retry"], should);
            assert_eq!(r.headers()["retry-after-ms"], ms);
            assert_eq!(r.headers()[RETRY_AFTER], secs);
        }
        for err in [
            Error::invalid("limit", "bad"),
            Error::InvalidApiKey,
            Error::Unauthenticated { reason: "why" },
            Error::PermissionDenied,
            Error::NotFound,
            Error::MethodNotAllowed { allow: "GET" },
            Error::RequestTooLarge,
            Error::UriTooLong,
            Error::HeadersTooLarge,
            Error::MalformedRequest,
            Error::UpstreamUnusable,
            Error::UpstreamAuthFailed,
        ] {
            let status = err.status();
            let r = err.into_response();
            assert_eq!(r.headers()["x-should-retry"], "false", "{status}");
            assert!(!r.headers().contains_key(RETRY_AFTER), "{status}");
        }
        for err in [Error::UpstreamError, Error::UpstreamTimeout] {
            assert!(!err.into_response().headers().contains_key("x-should-retry"));
        }
    }
}
