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
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
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
    let server = Listener {
        listener,
        handler,
        builder: connection_builder(&limits),
        graceful: GracefulShutdown::new(),
        connections: Arc::new(Semaphore::new(limits.max_connections)),
        header_read_timeout: limits.header_read_timeout,
    };
    server.run(&mut stop).await;
    // Closing the socket refuses new connections while the open ones drain.
    drop(server.listener);
    tokio::select! {
        _ = server.graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.drain_timeout) => {
            let timeout_ms = limits.drain_timeout.as_millis() as u64;
            warn!(timeout_ms, "drain timeout passed; closing remaining connections");
        }
    }
}

/// hyper-util's auto builder (HTTP/1.1 and h2c) with the header size and time limits.
fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
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
    builder
}

/// One listener and what its connections share.
struct Listener<H> {
    listener: TcpListener,
    handler: H,
    builder: auto::Builder<TokioExecutor>,
    /// Tells every open connection to finish when the loop stops.
    graceful: GracefulShutdown,
    /// One permit per open connection (`max_connections` in all).
    connections: Arc<Semaphore>,
    /// Also bounds the wait for a connection's first request (see [`serve_connection`]).
    header_read_timeout: Duration,
}

impl<H, F, B> Listener<H>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Accepts until `stop` changes or its sender is gone. Each connection holds a permit, so
    /// with `max_connections` open the loop stops accepting until one closes.
    async fn run(&self, stop: &mut watch::Receiver<bool>) {
        loop {
            let slot = tokio::select! {
                slot = self.connections.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
                _ = stop.changed() => return,
            };
            let (stream, peer) = tokio::select! {
                accepted = self.accept() => accepted,
                _ = stop.changed() => return,
            };
            self.spawn(stream, peer, slot);
        }
    }

    /// The next connection. A failed accept (EMFILE and friends) is logged and retried after a
    /// pause instead of spinning.
    async fn accept(&self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(pair) => return pair,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Serves `stream` on its own task, watched for graceful shutdown; `slot` is released when
    /// the connection ends.
    fn spawn(&self, stream: TcpStream, peer: SocketAddr, slot: OwnedSemaphorePermit) {
        let _ = stream.set_nodelay(true);
        let handler = self.handler.clone();
        let first_request = Arc::new(Notify::new());
        let arrived = first_request.clone();
        let service = service_fn(move |req| {
            arrived.notify_one();
            // Boxed: the request future is large, and hyper would otherwise move it.
            let response = Box::pin(handler(req));
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = self
            .builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = self.graceful.watch(connection);
        let deadline = self.header_read_timeout;
        tokio::spawn(async move {
            serve_connection(connection, &first_request, deadline, peer).await;
            drop(slot);
        });
    }
}

/// Drives one connection to its end. hyper-util reads the protocol preface with no timeout, and
/// hyper's header timer only starts after it: a peer that never completes a first request
/// within `deadline` is disconnected here.
async fn serve_connection<E: Display>(
    connection: impl Future<Output = Result<(), E>>,
    first_request: &Notify,
    deadline: Duration,
    peer: SocketAddr,
) {
    tokio::pin!(connection);
    let result = tokio::select! {
        biased;
        result = &mut connection => Some(result),
        _ = tokio::time::sleep(deadline) => None,
        _ = first_request.notified() => Some(connection.await),
    };
    match result {
        Some(Err(e)) => debug!(%peer, error = %e, "connection ended with an error"),
        None => debug!(%peer, "no request within the header read timeout; closed"),
        Some(Ok(())) => {}
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
