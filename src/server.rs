//! Accept loops, hyper-util's auto (HTTP/1.1 + h2c, or HTTPS with ALPN) connections,
//! connection limits, and graceful drain.
//!
//! Never binds: callers (the CLI, tests) pass bound listeners, so a test owns its ports and a
//! bound socket already accepts. On shutdown, readiness goes false first, then the listeners
//! stop accepting, then in-flight requests get `server.drain_timeout_ms` to finish.
//!
//! Limits per connection: request headers larger than `server.max_header_bytes` are refused
//! (431) by the framing guard (`framing`); a caller that does not finish sending its headers within
//! `server.header_read_timeout_ms` is disconnected (slow loris), and so is a new connection that
//! starts no request within it. At most `server.max_connections` connections are open at once;
//! past that the listener stops accepting until one closes (the kernel's backlog queues).
//!
//! Idle connections (SPEC "Hygiene rules"): a connection with no request in flight for
//! `server.idle_timeout_ms` is shut down gracefully: an HTTP/2 one gets a GOAWAY, an HTTP/1 one
//! is closed. hyper's HTTP/2 server has no idle timeout (its keep-alive pings only catch dead
//! peers, and a peer that answers them holds its slot forever), so each connection counts its
//! open requests here: the service counts a request from its headers until its response body
//! is sent or dropped. A peer that ignores the GOAWAY is dropped after one more idle period.
//! Authentication plays no part: an unauthenticated connection is held exactly as long as an
//! authenticated one. The header read timeout also runs while an HTTP/1 keep-alive connection
//! waits for its next request, so HTTP/1 closes after the smaller of the two. It is not hyper's
//! `header_read_timeout` (which re-arms a timer per request) but the
//! [`HeadTimer`](crate::head_timer::HeadTimer) in the [`FramingGuard`] below hyper.
//!
//! TLS (`[server.tls]`, SPEC "The front door"): the handshake runs on the connection's own task,
//! holding its slot, and must finish within `server.header_read_timeout_ms` of the accept;
//! the first request must start within what is left of that same period. A failed or late
//! handshake is logged at debug and the connection closed; a drain abandons handshakes in
//! progress. hyper-util's auto builder then serves HTTP/2 or HTTP/1.1 over the TLS stream.
//! When the client presented a verified certificate that names it, its
//! [`PeerIdentity`](crate::tls::PeerIdentity) is put in the extensions of every request on the
//! connection; `tls` owns the certificates, their reload and the identity itself.

use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::admin;
use crate::config::ServerConfig;
use crate::framing::FramingGuard;
use crate::metrics::Metrics;
use crate::proxy;
use crate::state::AppState;
use crate::tls::{self, PeerIdentity};

/// Per-listener connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is shut down (HTTP/2: GOAWAY).
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
}

impl From<&ServerConfig> for Limits {
    fn from(c: &ServerConfig) -> Limits {
        Limits {
            max_connections: c.max_connections,
            max_header_bytes: c.max_header_bytes,
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
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
            idle_timeout: Duration::from_secs(30),
            drain_timeout,
        }
    }
}

/// Runs the gateway on bound listeners until `shutdown` resolves, then drains. Plain HTTP on
/// the data listener; see [`serve_with_tls`].
pub async fn serve(
    data: TcpListener,
    admin: Option<TcpListener>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) {
    serve_with_tls(data, None, admin, state, shutdown, limits).await;
}

/// [`serve`], with HTTPS on the data listener when `tls` is set (`[server.tls]`, see
/// `tls::ServerTls::acceptor`). The admin listener always speaks plain HTTP.
pub async fn serve_with_tls(
    data: TcpListener,
    tls: Option<TlsAcceptor>,
    admin: Option<TcpListener>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) {
    // The admin listener outlives the data drain, so probes see /readyz answer 503 throughout.
    let (stop_data, data_stopped) = watch::channel(false);
    let (stop_admin, admin_stopped) = watch::channel(false);
    let data_state = state.clone();
    let data_loop = tokio::spawn(serve_listener(
        data,
        tls,
        move |req| proxy::handle(data_state.clone(), req),
        data_stopped,
        limits,
        Some(state.metrics.clone()),
    ));
    let admin_loop = admin.map(|listener| {
        let admin_state = state.clone();
        tokio::spawn(serve_http(
            listener,
            move |req| admin::handle(admin_state.clone(), req),
            admin_stopped,
            limits,
            Some(state.metrics.clone()),
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
    // One drain for the process: the admin listener, stopped last, gets what is left of it.
    let drained_by = tokio::time::Instant::now() + limits.drain_timeout;
    maintenance.abort();
    info!("shutdown requested: readiness is now false, draining");
    state.start_draining();
    let _ = stop_data.send(true);
    let _ = data_loop.await;
    // Every data request is answered: writes through other replicas need not wait for this one.
    if let Some(fleet) = &state.fleet {
        fleet.resign().await;
    }
    let _ = stop_admin.send(true);
    if let Some(mut admin_loop) = admin_loop {
        if tokio::time::timeout_at(drained_by, &mut admin_loop)
            .await
            .is_err()
        {
            // Dropping the accept loop closes its connections.
            admin_loop.abort();
            warn!("drain timeout passed; closing the admin listener's connections");
        }
    }
    info!("drained; bye");
}

/// One plain-HTTP accept loop: see [`serve_listener`].
pub async fn serve_http<H, F, B>(
    listener: TcpListener,
    handler: H,
    stop: watch::Receiver<bool>,
    limits: Limits,
    metrics: Option<Arc<Metrics>>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_listener(listener, None, handler, stop, limits, metrics).await;
}

/// One accept loop, over TLS when `tls` is set: serves `handler` on every connection until
/// `stop` turns true, then gives open connections `limits.drain_timeout` to finish their
/// requests and drops the rest. `metrics`, when given, counts the framing guard's refusals.
pub async fn serve_listener<H, F, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
    metrics: Option<Arc<Metrics>>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let server = Listener {
        listener,
        tls,
        handler,
        builder: Arc::new(connection_builder(&limits)),
        drain: watch::channel(()).0,
        connections: Arc::new(Semaphore::new(limits.max_connections)),
        limits,
        metrics,
    };
    server.run(&mut stop).await;
    let Listener {
        listener, drain, ..
    } = server;
    // Closing the socket refuses new connections while the open ones drain.
    drop(listener);
    let _ = drain.send(());
    tokio::select! {
        _ = drain.closed() => {}
        _ = tokio::time::sleep(limits.drain_timeout) => {
            let timeout_ms = limits.drain_timeout.as_millis() as u64;
            warn!(timeout_ms, "drain timeout passed; closing remaining connections");
        }
    }
    // Dropping `drain` here tells every connection still open to close now.
}

/// hyper-util's auto builder (HTTP/1.1 and h2c) with the header size and time limits.
fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // The framing guard times request heads (see `head_timer`); hyper's timer is off.
        .header_read_timeout(None)
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
    /// `[server.tls]`: every connection starts with a handshake.
    tls: Option<TlsAcceptor>,
    handler: H,
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// Sent once when the loop stops (each connection shuts down gracefully), dropped when the
    /// drain timeout passes (each connection still open is closed); `closed()` resolves once
    /// every connection has ended.
    drain: watch::Sender<()>,
    /// One permit per open connection (`max_connections` in all).
    connections: Arc<Semaphore>,
    limits: Limits,
    /// Where the framing guard counts its refusals (none for local tools).
    metrics: Option<Arc<Metrics>>,
}

impl<H, F, B> Listener<H>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
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

    /// Serves `stream` on its own task, after a TLS handshake with `self.tls`; `slot` is
    /// released when the connection ends.
    fn spawn(&self, stream: TcpStream, peer: SocketAddr, slot: OwnedSemaphorePermit) {
        let _ = stream.set_nodelay(true);
        let accepted = Instant::now();
        let tls = self.tls.clone();
        let handler = self.handler.clone();
        let builder = self.builder.clone();
        let mut drain = self.drain.subscribe();
        let limits = self.limits;
        let metrics = self.metrics.clone();
        // As `connection_builder`'s buffer: the guard refuses a head before hyper's fills.
        let head_limit = limits.max_header_bytes.max(8192);
        tokio::spawn(async move {
            let _slot = slot; // Held until the connection ends, handshake included.
            match tls {
                None => {
                    let watched = ConnectionWatch::new(drain, &limits, accepted);
                    let io = TokioIo::new(FramingGuard::new(
                        stream,
                        head_limit,
                        limits.header_read_timeout,
                        metrics,
                    ));
                    serve_io(&builder, io, handler, None, watched, peer).await;
                }
                Some(acceptor) => {
                    let deadline = accepted + limits.header_read_timeout;
                    let Some(stream) =
                        handshake(&acceptor, stream, deadline, &mut drain, peer).await
                    else {
                        return;
                    };
                    let identity = tls::peer_identity(stream.get_ref().1);
                    let watched = ConnectionWatch::new(drain, &limits, accepted);
                    let io = TokioIo::new(FramingGuard::new(
                        stream,
                        head_limit,
                        limits.header_read_timeout,
                        metrics,
                    ));
                    serve_io(&builder, io, handler, identity, watched, peer).await;
                }
            }
        });
    }
}

/// The TLS handshake, given up at `deadline` or when the listener drains. A failure is logged
/// at debug: a port scan or a refused client certificate is not an operator's problem.
async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    deadline: Instant,
    drain: &mut watch::Receiver<()>,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let outcome = tokio::select! {
        outcome = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => outcome,
        _ = drain.changed() => {
            debug!(%peer, "draining: TLS handshake abandoned");
            return None;
        }
    };
    match outcome {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(%peer, "no TLS handshake within the header read timeout");
            None
        }
    }
}

/// Serves one connection's requests with `handler` until it ends (see [`serve_connection`]).
/// `identity`, the client certificate's, goes into every request's extensions.
async fn serve_io<I, H, F, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    handler: H,
    identity: Option<PeerIdentity>,
    (watched, activity): (ConnectionWatch, Arc<Activity>),
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let service = service_fn(move |mut req: Request<Incoming>| {
        if let Some(identity) = &identity {
            req.extensions_mut().insert(identity.clone());
        }
        let open = OpenRequest::start(&activity);
        // Boxed: the request future is large, and hyper would otherwise move it.
        let response = Box::pin(handler(req));
        async move {
            let response = response.await;
            // Open until answered, not until the body is sent: a peer that never takes the
            // body (an HTTP/2 window of 0, an HTTP/1 reader that stops reading) must not hold
            // its connection, and the slot, open.
            drop(open);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = builder.serve_connection(io, service);
    serve_connection(connection, watched, peer).await;
}

/// What a connection's task watches besides the connection itself.
struct ConnectionWatch {
    requests: Requests,
    /// See [`Listener::drain`].
    drain: watch::Receiver<()>,
    /// hyper-util reads the protocol preface with no timeout, and hyper's header timer only
    /// starts after it: a connection that starts no request within this is dropped.
    first_request: Duration,
    idle: Duration,
}

impl ConnectionWatch {
    /// For a connection accepted at `accepted`: its first request must start within
    /// `header_read_timeout` of that, TLS handshake included. The service counts requests in
    /// the returned [`Activity`].
    fn new(
        drain: watch::Receiver<()>,
        limits: &Limits,
        accepted: Instant,
    ) -> (ConnectionWatch, Arc<Activity>) {
        let activity = Arc::new(Activity::new());
        let watched = ConnectionWatch {
            requests: Requests(activity.clone()),
            drain,
            first_request: limits
                .header_read_timeout
                .saturating_sub(accepted.elapsed()),
            idle: limits.idle_timeout,
        };
        (watched, activity)
    }
}

/// Drives one connection to its end: shuts it down gracefully on drain or once idle, and drops
/// it when it never starts a request, when it outlives the drain timeout, or when it is still
/// open (and still idle) one idle period after its graceful shutdown began.
async fn serve_connection<C>(connection: C, mut watched: ConnectionWatch, peer: SocketAddr)
where
    C: GracefulConnection,
    C::Error: Display,
{
    tokio::pin!(connection);
    let mut closing = false;
    let dropped = loop {
        // Polled only when its own timer or the drain wakes it, not on every wake-up of the
        // connection's task (one per request).
        let mut watch = OnWake::new(Box::pin(watched.next_event()));
        let event = tokio::select! {
            biased;
            result = &mut connection => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "connection failed");
                }
                return;
            }
            event = &mut watch => event,
        };
        drop(watch);
        match event {
            Watched::Drain => connection.as_mut().graceful_shutdown(),
            Watched::DrainTimeout => break "still open when the drain timeout passed",
            Watched::Quiet { started: false } => break "no request within the header read timeout",
            Watched::Quiet { .. } if closing => {
                break "still open one idle timeout after its shutdown began"
            }
            Watched::Quiet { .. } => {
                debug!(%peer, "no request in flight for the idle timeout; shutting down");
                connection.as_mut().graceful_shutdown();
                // The peer gets a whole idle period from here to close.
                watched.requests.restart();
                closing = true;
            }
        }
    };
    debug!(%peer, reason = dropped, "connection closed");
}

/// What a connection's watch saw.
enum Watched {
    /// The listener drains: shut down gracefully.
    Drain,
    /// The drain timeout passed.
    DrainTimeout,
    /// No request open for the period; `started`: whether one ever started.
    Quiet { started: bool },
}

impl ConnectionWatch {
    async fn next_event(&mut self) -> Watched {
        tokio::select! {
            changed = self.drain.changed() => match changed {
                Ok(()) => Watched::Drain,
                Err(_) => Watched::DrainTimeout,
            },
            started = self.requests.quiet(self.first_request, self.idle) => Watched::Quiet { started },
        }
    }
}

/// A future polled only after its own waker fired (and once at first): the task that awaits
/// it next to another future is not made to poll it each time the other one wakes the task.
struct OnWake<F> {
    future: F,
    flag: Arc<WakeFlag>,
}

struct WakeFlag {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> OnWake<F> {
    fn new(future: F) -> OnWake<F> {
        let flag = Arc::new(WakeFlag {
            fired: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        OnWake { future, flag }
    }
}

impl<F: Future + Unpin> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a wake in between is not lost.
        this.flag.task.register(cx.waker());
        if !this.flag.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.flag.clone());
        Pin::new(&mut this.future).poll(&mut Context::from_waker(&waker))
    }
}

/// Requests on one connection: how many are open, whether one ever started, and when the last
/// one ended. Plain atomics: a request costs a few atomic operations and wakes nobody; the
/// connection's task looks at them only when its idle timer fires.
#[derive(Debug)]
struct Activity {
    open: AtomicUsize,
    started: AtomicU64,
    /// When the last request ended, in microseconds since `since`.
    last_end: AtomicU64,
    since: Instant,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            open: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            last_end: AtomicU64::new(0),
            since: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// One request, counted open until its handler has answered (or the request is cancelled).
struct OpenRequest(Arc<Activity>);

impl OpenRequest {
    fn start(activity: &Arc<Activity>) -> OpenRequest {
        activity.open.fetch_add(1, Ordering::AcqRel);
        activity.started.fetch_add(1, Ordering::AcqRel);
        OpenRequest(activity.clone())
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        // The end time first: a look that sees the count at 0 also sees when it got there.
        self.0.last_end.fetch_max(self.0.now(), Ordering::AcqRel);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection task's view of its [`Activity`].
struct Requests(Arc<Activity>);

impl Requests {
    /// Starts the idle period anew, as if a request had just ended.
    fn restart(&self) {
        let activity = &self.0;
        activity
            .last_end
            .fetch_max(activity.now(), Ordering::AcqRel);
    }

    /// Resolves once no request has been open for `idle` (for `first_request` while none has
    /// started), with whether one ever started. A request that starts or ends restarts the
    /// wait, even one that starts and ends between two looks (its end time moves).
    async fn quiet(&mut self, first_request: Duration, idle: Duration) -> bool {
        let activity = &self.0;
        loop {
            let started = activity.started.load(Ordering::Acquire) > 0;
            let period = if started { idle } else { first_request };
            let wait = if activity.open.load(Ordering::Acquire) > 0 {
                period
            } else {
                let last_end = activity.last_end.load(Ordering::Acquire);
                let since_end = activity.now().saturating_sub(last_end);
                match period.checked_sub(Duration::from_micros(since_end)) {
                    Some(left) if !left.is_zero() => left,
                    _ => return started,
                }
            };
            // Before the first request, look again at least every idle period: one may start
            // (and end) meanwhile, and then the idle period is the one that counts.
            tokio::time::sleep(if started { wait } else { wait.min(idle) }).await;
        }
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const FIRST: Duration = Duration::from_millis(40);
    const IDLE: Duration = Duration::from_millis(300);

    fn connection() -> (Arc<Activity>, Requests) {
        let activity = Arc::new(Activity::new());
        (activity.clone(), Requests(activity))
    }

    /// The inner future is polled at first and then only after its own waker fired, however
    /// often the task polls the wrapper; a wake of the inner future wakes the task.
    #[test]
    fn on_wake_polls_its_future_only_when_woken() {
        struct Counted {
            polls: Arc<AtomicUsize>,
            waker: Arc<std::sync::Mutex<Option<Waker>>>,
            ready_after: usize,
        }
        impl Future for Counted {
            type Output = usize;
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
                let polls = self.polls.fetch_add(1, Ordering::SeqCst) + 1;
                *self.waker.lock().unwrap() = Some(cx.waker().clone());
                if polls >= self.ready_after {
                    Poll::Ready(polls)
                } else {
                    Poll::Pending
                }
            }
        }
        struct TaskWakes(AtomicUsize);
        impl Wake for TaskWakes {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let (polls, inner_waker) = (Arc::new(AtomicUsize::new(0)), Arc::default());
        let mut future = OnWake::new(Counted {
            polls: polls.clone(),
            waker: Arc::clone(&inner_waker),
            ready_after: 2,
        });
        let task = Arc::new(TaskWakes(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..5 {
            assert!(Pin::new(&mut future).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once, at first");
        let woken = inner_waker.lock().unwrap().take().unwrap();
        woken.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert_eq!(Pin::new(&mut future).poll(&mut cx), Poll::Ready(2));
    }

    #[tokio::test]
    async fn a_connection_without_a_request_is_quiet_after_the_first_request_deadline() {
        let (_activity, mut requests) = connection();
        let started = Instant::now();
        assert!(!requests.quiet(FIRST, Duration::from_secs(60)).await);
        assert!(started.elapsed() >= FIRST);
    }

    #[tokio::test]
    async fn an_open_request_is_never_idle() {
        let (activity, mut requests) = connection();
        let open = OpenRequest::start(&activity);
        let quiet = requests.quiet(FIRST, IDLE);
        tokio::pin!(quiet);
        // Bounded: several idle periods pass with the request open.
        let waited = tokio::time::timeout(2 * IDLE, &mut quiet).await;
        assert!(waited.is_err(), "idle with a request open");
        let closed = Instant::now();
        drop(open);
        assert!(quiet.await, "a request had started");
        assert!(
            closed.elapsed() >= IDLE,
            "a full idle period after it ended"
        );
    }

    #[tokio::test]
    async fn a_short_request_restarts_the_idle_period() {
        let (activity, mut requests) = connection();
        drop(OpenRequest::start(&activity));
        let started = Instant::now();
        let quiet = requests.quiet(FIRST, IDLE);
        tokio::pin!(quiet);
        // A third of the period: a stalled machine still leaves the idle timer far behind.
        assert!(tokio::time::timeout(IDLE / 3, &mut quiet).await.is_err());
        // Starts and ends before the waiting side looks again: still seen as activity.
        drop(OpenRequest::start(&activity));
        assert!(quiet.await);
        assert!(started.elapsed() >= IDLE / 3 + IDLE);
        assert_eq!(activity.open.load(Ordering::Acquire), 0);
        assert_eq!(activity.started.load(Ordering::Acquire), 2);
    }
}
