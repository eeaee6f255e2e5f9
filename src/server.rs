//! Accept loops, hyper-util's auto (HTTP/1.1 + h2c) connections, and graceful drain.
//!
//! Never binds: callers (the CLI, tests) pass bound listeners, so a test owns its ports and a
//! bound socket already accepts. On shutdown, readiness goes false first, then the listeners
//! stop accepting, then in-flight requests get `server.drain_timeout_ms` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::admin;
use crate::error::Body;
use crate::proxy::{self, AppState};

/// How long a caller may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the gateway on bound listeners until `shutdown` resolves, then drains.
pub async fn serve(
    data: TcpListener,
    admin: Option<TcpListener>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let (stop, stopped) = watch::channel(false);
    let data_state = state.clone();
    let data_loop = tokio::spawn(serve_http(
        data,
        move |req| proxy::handle(data_state.clone(), req),
        stopped.clone(),
        drain_timeout,
    ));
    let admin_loop = admin.map(|listener| {
        let admin_state = state.clone();
        tokio::spawn(serve_http(
            listener,
            move |req| admin::handle(admin_state.clone(), req),
            stopped,
            drain_timeout,
        ))
    });
    shutdown.await;
    info!("shutdown requested: readiness is now false, draining");
    state.start_draining();
    let _ = stop.send(true);
    let _ = data_loop.await;
    if let Some(admin_loop) = admin_loop {
        let _ = admin_loop.await;
    }
    info!("drained; bye");
}

/// One accept loop: serves `handler` on every connection until `stop` turns true, then gives
/// open connections `drain_timeout` to finish their requests.
pub async fn serve_http<H, F>(
    listener: TcpListener,
    handler: H,
    mut stop: watch::Receiver<bool>,
    drain_timeout: Duration,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let response = handler(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain_timeout) => {
            warn!(timeout_ms = drain_timeout.as_millis() as u64, "drain timeout passed; closing remaining connections");
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
