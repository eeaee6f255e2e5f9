//! Tracing setup (`PERMGATE_LOG`, `PERMGATE_LOG_FORMAT`) and request ids (SPEC "Responses":
//! `x-request-id`).
//!
//! Spans: `request` (request_id, client, method, route, checkpoint, cache_status, status,
//! duration_ms) with a child `upstream` span per upstream attempt (request_id, method,
//! attempt, status, duration_ms). One event per request on target `permgate::access` is the
//! access log, carrying the request span's fields itself; `permgate::audit` carries write
//! attempts. The log output renders events only, each with its `request_id` (see [`renders`]).

use std::hash::{BuildHasher, RandomState};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::env::Env;

use hyper::header::HeaderValue;
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

const MAX_REQUEST_ID: usize = 128;

/// Installs the global subscriber, writing to stderr (stdout is for command output), plus,
/// with the `otel` feature, OTLP span export when the `OTEL_*` environment asks for it (see
/// `otel`). Keep the returned guard for the life of the command: dropping it flushes the
/// spans still queued.
pub fn init(env: &Env) -> Result<Guard, String> {
    let directives = env("PERMGATE_LOG").unwrap_or_else(|| "info".into());
    // A background thread does the writing, so no request waits on a write(2) to stderr. The
    // queue is bounded; when it is full, writers wait rather than lines being lost. The thread
    // writes everything queued into a buffer, then flushes it: a burst of lines leaves in a few
    // write(2) calls, and no line waits once the queue is empty (dropping the guard flushes).
    let (writer, flush) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let format = env("PERMGATE_LOG_FORMAT");
    let fmt = log_layer(&directives, format.as_deref(), writer)?;
    let registry = tracing_subscriber::registry().with(fmt);
    // No layer at all rather than an empty one: an empty (`None`) layer counts as wanting
    // every callsite.
    #[cfg(feature = "otel")]
    let (installed, export) = match crate::otel::layer(env)? {
        (Some(otel), guard) => {
            let filter = env_filter(&directives)?;
            (registry.with(otel.with_filter(filter)).try_init(), guard)
        }
        (None, guard) => (registry.try_init(), guard),
    };
    #[cfg(not(feature = "otel"))]
    let (installed, export) = (registry.try_init(), ());
    installed.map_err(|e| format!("logging: {e}"))?;
    Ok(Guard {
        _export: export,
        _logs: flush,
    })
}

/// The log output as `init` installs it (`PERMGATE_LOG` directives, `PERMGATE_LOG_FORMAT`),
/// writing to `writer`; public so the benchmarks measure exactly this. It filters for itself
/// (there is no global filter): a callsite no layer wants, like the `request` span when
/// nothing exports spans, is then disabled at the callsite and costs nothing per request.
pub fn log_layer<S, W>(
    directives: &str,
    format: Option<&str>,
    writer: W,
) -> Result<Box<dyn Layer<S> + Send + Sync>, String>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = env_filter(directives)?;
    // Colour only for a person at a terminal, never into files or log collectors.
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let fmt = match format {
        // Unset: one line per event, for people; "pretty": tracing's multi-line layout.
        None => fmt.boxed(),
        Some("pretty") => fmt.pretty().boxed(),
        // The access event's line is written by a faster formatter of the same shape.
        Some("json") => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .map_event_format(crate::access_log::AccessJson::new)
            .boxed(),
        Some(other) => {
            return Err(format!(
                "PERMGATE_LOG_FORMAT: '{other}' is not json or pretty"
            ))
        }
    };
    Ok(fmt.with_filter(filter.and(filter_fn(renders))).boxed())
}

/// `PERMGATE_LOG` as a filter. Each layer gets its own, so a span no layer renders is never
/// seen by the log output's filter: directives scoped to permgate's spans (`[upstream]=debug`)
/// match nothing.
fn env_filter(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(directives).map_err(|e| format!("PERMGATE_LOG: {e}"))
}

/// What the log output renders: events, not permgate's per-request spans (`request`,
/// `upstream`, `refresh`). Rendering a span means formatting its fields when it opens and again
/// on every `record`, which cost more CPU than the rest of a cache hit, for nothing: a hit logs
/// no event inside it. Every event of a request carries `request_id` itself (the access event
/// carries all of the `request` span's fields), and the spans still exist for other layers
/// (OpenTelemetry export); with none installed, no layer wants them, so tracing disables them
/// at their callsites.
pub fn renders(meta: &tracing::Metadata<'_>) -> bool {
    !(meta.is_span() && meta.target().starts_with("permgate"))
}

/// Keep it for the life of the command: dropping it flushes the log lines still queued and,
/// with the `otel` feature, the spans still to be exported.
#[must_use]
pub struct Guard {
    #[cfg(feature = "otel")]
    _export: crate::otel::Guard,
    #[cfg(not(feature = "otel"))]
    _export: (),
    _logs: tracing_appender::non_blocking::WorkerGuard,
}

/// The caller's `x-request-id` if it is sane (1 to 128 of `A-Z a-z 0-9 - _ . :`), else a
/// new process-unique one.
pub fn request_id(from_caller: Option<&HeaderValue>) -> HeaderValue {
    if let Some(v) = from_caller {
        let b = v.as_bytes();
        let sane = !b.is_empty()
            && b.len() <= MAX_REQUEST_ID
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'));
        if sane {
            return v.clone();
        }
    }
    new_request_id()
}

fn new_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 4 + 32];
    buf[..4].copy_from_slice(b"req_");
    hex::encode_to_slice(prefix.to_be_bytes(), &mut buf[4..20]).expect("16 hex digits fit");
    hex::encode_to_slice(n.to_be_bytes(), &mut buf[20..]).expect("16 hex digits fit");
    HeaderValue::from_bytes(&buf).expect("ascii hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sane_caller_ids_are_kept_and_others_replaced() {
        let keep = HeaderValue::from_static("abc-123_x.y:z");
        assert_eq!(request_id(Some(&keep)), keep);
        for bad in ["", "has space", "semi;colon", &"x".repeat(129)] {
            let v = HeaderValue::from_str(bad).unwrap();
            let id = request_id(Some(&v));
            assert_ne!(id, v);
            assert!(id.to_str().unwrap().starts_with("req_"));
        }
        let a = request_id(None);
        let b = request_id(None);
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
    }
}
