//! The bare hyper server both yardsticks use (`bench-reference` for `compare.sh`, and the
//! `full_hit/bare_hyper_reference` criterion bench): every request answered with one prebuilt
//! body from memory, `Content-Type: application/json`, HTTP/1.1, nothing else (but an optional
//! busy wait per request, the control of the hit p99 target in `benches/README.md`).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves `body` on every connection `listener` accepts, forever. Each request first spins for
/// `busy` (zero: not at all), which models a server doing that much more work per request.
pub async fn serve(listener: TcpListener, body: Bytes, busy: Duration) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req| {
                if !busy.is_zero() {
                    let start = Instant::now();
                    while start.elapsed() < busy {
                        std::hint::spin_loop();
                    }
                }
                let mut response = Response::new(Full::new(body.clone()));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
