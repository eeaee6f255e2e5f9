//! The one error type of the request path, and the one place that turns it into OpenAI's
//! error shape (SPEC "Responses").
//!
//! Variants carry only safe data: parameter names and fixed messages. Causes (hyper errors,
//! upstream bodies) are logged where they are classified and then dropped, so nothing from
//! upstream, and so no piece of the admin key, can reach a caller through an error.

use std::borrow::Cow;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
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
    /// 401: missing or unknown client token.
    InvalidApiKey,
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
    /// 429: this client's rate limit; `retry_after` in whole seconds.
    RateLimitExceeded { retry_after: u64 },
    /// 502: upstream unreachable or its answer unusable.
    UpstreamError,
    /// 502: upstream rejected the admin key. Upstream's message is never echoed.
    UpstreamAuthFailed,
    /// 503: not ready, overloaded, or upstream refusing work; `retry_after` when known.
    Unavailable {
        reason: &'static str,
        retry_after: Option<u64>,
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
            Error::InvalidParameter { .. } => StatusCode::BAD_REQUEST,
            Error::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied => StatusCode::FORBIDDEN,
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UriTooLong => StatusCode::URI_TOO_LONG,
            Error::RateLimitExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::UpstreamError | Error::UpstreamAuthFailed => StatusCode::BAD_GATEWAY,
            Error::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// OpenAI's `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidParameter { .. } => "invalid_parameter",
            Error::InvalidApiKey => "invalid_api_key",
            Error::PermissionDenied => "permission_denied",
            Error::NotFound => "not_found",
            Error::MethodNotAllowed { .. } => "method_not_allowed",
            Error::RequestTooLarge | Error::UriTooLong => "request_too_large",
            Error::RateLimitExceeded { .. } => "rate_limit_exceeded",
            Error::UpstreamError => "upstream_error",
            Error::UpstreamAuthFailed => "upstream_auth_failed",
            Error::Unavailable { .. } => "unavailable",
            Error::UpstreamTimeout => "upstream_timeout",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Error::InvalidParameter { .. }
            | Error::InvalidApiKey
            | Error::PermissionDenied
            | Error::NotFound
            | Error::MethodNotAllowed { .. }
            | Error::RequestTooLarge
            | Error::UriTooLong => "invalid_request_error",
            Error::RateLimitExceeded { .. } => "rate_limit_error",
            Error::UpstreamError
            | Error::UpstreamAuthFailed
            | Error::Unavailable { .. }
            | Error::UpstreamTimeout => "server_error",
        }
    }

    fn message(&self) -> Cow<'static, str> {
        let fixed = match self {
            Error::InvalidParameter { message, .. } => return message.clone(),
            Error::InvalidApiKey => {
                "Missing or unknown permgate client token. Send 'Authorization: Bearer <client token>'."
            }
            Error::PermissionDenied => {
                "This client token is not granted this checkpoint or this operation."
            }
            Error::NotFound => "Unknown route. permgate serves only the fine-tuning checkpoint permission endpoints.",
            Error::MethodNotAllowed { .. } => "Method not allowed on this route.",
            Error::RequestTooLarge => "Request body is larger than this gateway accepts.",
            Error::UriTooLong => "Request URI is longer than this gateway accepts.",
            Error::RateLimitExceeded { .. } => "Rate limit exceeded for this client token. Retry after the time in the Retry-After header.",
            Error::UpstreamError => "The upstream API could not be reached or returned an unusable response.",
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

    /// The full response: status, JSON body, and `Allow` / `Retry-After` where they apply.
    pub fn into_response(self) -> Response<Body> {
        let mut response = json_response(self.status(), self.body());
        let headers = response.headers_mut();
        match self {
            Error::MethodNotAllowed { allow } => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            Error::RateLimitExceeded { retry_after }
            | Error::Unavailable {
                retry_after: Some(retry_after),
                ..
            } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after));
            }
            _ => {}
        }
        response
    }
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
            (Error::PermissionDenied, 403, "permission_denied"),
            (Error::NotFound, 404, "not_found"),
            (
                Error::MethodNotAllowed { allow: "GET" },
                405,
                "method_not_allowed",
            ),
            (Error::RequestTooLarge, 413, "request_too_large"),
            (Error::UriTooLong, 414, "request_too_large"),
            (
                Error::RateLimitExceeded { retry_after: 2 },
                429,
                "rate_limit_exceeded",
            ),
            (Error::UpstreamError, 502, "upstream_error"),
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
        let r = Error::RateLimitExceeded { retry_after: 3 }.into_response();
        assert_eq!(r.headers()[RETRY_AFTER], "3");
        let r = Error::MethodNotAllowed { allow: "GET, POST" }.into_response();
        assert_eq!(r.headers()[ALLOW], "GET, POST");
    }
}
