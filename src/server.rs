//! Accept loops, hyper-util's auto (HTTP/1.1 + h2c) connections, connection limits, and
//! graceful drain.
//!
//! Never binds: callers (the CLI, tests) pass bound listeners, so a test owns its ports and a
//! bound socket already accepts. On shutdown, readiness goes false first, then the listeners
//! stop accepting, then in-flight requests get `server.drain_timeout_ms` to finish.
//!
//! Limits per connection: request headers larger than `server.max_header_bytes` are refused
//! (431) by hyper; a caller that does not finish sending its headers within
//! `server.header_read_timeout_ms` is disconnected (slow loris), and since hyper arms that
//! timer as soon as an HTTP/1 keep-alive connection waits for its next request, it is also the
//! idle keep-alive timeout. At most `server.max_connections` connections are open at once;
//! past that the listener stops accepting until one closes (the kernel's backlog queues).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{debug, info, warn};

use crate::admin;
use crate::config::ServerConfig;
use crate::proxy;
use crate::state::AppState;

/// Per-listener connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub drain_timeout: Duration,
}

impl From<&ServerConfig> for Limits {
    fn from(c: &ServerConfig) -> Limits {
        Limits {
            max_connections: c.max_connections,
            max_header_bytes: c.max_header_bytes,
            header_read_timeout: c.header_read_timeout,
            drain_timeout: c.drain_timeout,
        }
    }
}

impl Limits {
    /// Generous limits for local tools (the mock upstream).
    pub fn local(drain_timeout: Duration) -> Limits {
        Limits {
            max_connections: 4096,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            drain_timeout,
        }
    }
}

/// Runs the gateway on bound listeners until `shutdown` resolves, then drains.
pub async fn serve(
    data: TcpListener,
    admin: Option<TcpListener>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) {
    // The admin listener outlives the data drain, so probes see /readyz answer 503 throughout.
    let (stop_data, data_stopped) = watch::channel(false);
    let (stop_admin, admin_stopped) = watch::channel(false);
    let data_state = state.clone();
    let data_loop = tokio::spawn(serve_http(
        data,
        move |req| proxy::handle(data_state.clone(), req),
        data_stopped,
        limits,
    ));
    let admin_loop = admin.map(|listener| {
        let admin_state = state.clone();
        tokio::spawn(serve_http(
            listener,
            move |req| admin::handle(admin_state.clone(), req),
            admin_stopped,
            limits,
        ))
    });
    // moka defers expiry bookkeeping to the next access; doing it every second keeps a burst
    // after a long idle period from paying for thousands of expirations at once.
    let maintenance = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                state.cache.run_pending_tasks().await;
            }
        })
    };
    shutdown.await;
    maintenance.abort();
    info!("shutdown requested: readiness is now false, draining");
    state.start_draining();
    let _ = stop_data.send(true);
    let _ = data_loop.await;
    let _ = stop_admin.send(true);
    if let Some(admin_loop) = admin_loop {
        let _ = admin_loop.await;
    }
    info!("drained; bye");
}

/// One accept loop: serves `handler` on every connection until `stop` turns true, then gives
/// open connections `limits.drain_timeout` to finish their requests.
pub async fn serve_http<H, F, B>(
    listener: TcpListener,
    handler: H,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let slot = tokio::select! {
            slot = connections.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
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
                        let first_request = Arc::new(Notify::new());
                        let arrived = first_request.clone();
                        let service = service_fn(move |req| {
                    arrived.notify_one();
                    // Boxed: the request future is large, and hyper would otherwise move it.
                    let response = Box::pin(handler(req));
                    async move { Ok::<_, Infallible>(response.await) }
                });
                        let connection = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .into_owned();
                        let connection = graceful.watch(connection);
                        let first_request_deadline = limits.header_read_timeout;
                        tokio::spawn(async move {
                            // hyper-util reads the protocol preface with no timeout, and hyper's header
                            // timer only starts after it: a peer that never completes a first request
                            // is disconnected here.
                            tokio::pin!(connection);
        let result = tokio::select! {
                                biased;
                                result = &mut connection => Some(result),
                                _ = tokio::time::sleep(first_request_deadline) => None,
                                _ = first_request.notified() => Some(connection.await),
                            };
                            match result {
                                Some(Err(e)) => debug!(%peer, error = %e, "connection ended with an error"),
                                None => debug!(%peer, "no request within the header read timeout; closed"),
                                Some(Ok(())) => {}
                            }
                            drop(slot);
                        });
                    }
                    _ = stop.changed() => break,
                }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.drain_timeout) => {
            warn!(timeout_ms = limits.drain_timeout.as_millis() as u64, "drain timeout passed; closing remaining connections");
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
