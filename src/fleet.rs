//! Fleet coherence through Redis (`[redis]`): many replicas behave like one gateway.
//!
//! - **Generations in Redis.** Every checkpoint has a generation (`{prefix}gen:{checkpoint}`)
//!   and the fleet an epoch (`{prefix}epoch`, bumped by a purge of everything). Each read learns
//!   both with one `MGET` and puts them in its cache key, so a write through any replica makes
//!   every replica's pages of that checkpoint unreachable before the write's response leaves:
//!   a caller always reads its own writes, whichever replica it reads from.
//! - **Writes are bracketed.** Before calling upstream a write bumps the generation and sets
//!   `{prefix}pending:{checkpoint}` (expiring after the upstream deadline); after, it bumps the
//!   generation again and clears the marker. Fills never store a page while the marker exists,
//!   so a replica that dies mid-write leaves no stale page anywhere: existing pages were killed
//!   by the first bump, and nothing fetched during the write is stored.
//! - **Shared second tier.** On a local miss a replica reads `{prefix}page:…` (the same
//!   normalized key, generation included) before going upstream; a fleet-wide lock
//!   (`SET NX PX`) lets one replica fetch while the others poll for its page, bounded in time.
//! - **Invalidation fan-out.** Writes and purges are also published on `{prefix}invalidate`;
//!   subscribers drop their dead pages at once instead of waiting for eviction.
//! - **Degraded mode.** Every Redis call has `redis.timeout_ms`. On a failure the replica stops
//!   calling Redis, serves from its local cache with pages fresh for at most
//!   `redis.degraded_ttl_seconds`, and reconnects in the background with backoff; once back it
//!   drops its whole local cache (anything may have changed meanwhile). Transitions are logged
//!   and counted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, TlsCertificates};
use tracing::{info, warn};

use crate::cache::{PageCache, View};
use crate::config::RedisConfig;
use crate::env::Env;
use crate::metrics::Metrics;
use crate::route::{Checkpoint, ListQuery};
use crate::secret;

/// A page as stored in Redis: when it was fetched, its status and body.
pub struct SharedPage {
    pub age: Duration,
    pub status: u16,
    pub body: Bytes,
}

pub struct Fleet {
    client: Client,
    metrics: Arc<Metrics>,
    connection: ArcSwapOption<MultiplexedConnection>,
    healthy: AtomicBool,
    prefix: String,
    channel: String,
    timeout: Duration,
    pub degraded_ttl: Duration,
    reconnect_max: Duration,
}

/// The Redis password named by `[redis]`, read from its env var or file.
pub fn password(config: &RedisConfig, env: &Env) -> Result<Option<String>, String> {
    config
        .password
        .as_ref()
        .map(|source| secret::read(source, "redis.password", env).map_err(|e| e.to_string()))
        .transpose()
}

/// The PEM of `redis.ca_file`, with at least one certificate. Never waits on a FIFO at the
/// path (see `secret::read_regular_file`).
fn read_ca_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let at = |e: &dyn std::fmt::Display| format!("redis.ca_file {}: {e}", path.display());
    let pem = secret::read_regular_file(path, MAX_CA_FILE_BYTES).map_err(|e| at(&e))?;
    let mut certificates = 0;
    for certificate in rustls_pemfile::certs(&mut pem.as_slice()) {
        certificate.map_err(|e| at(&e))?;
        certificates += 1;
    }
    if certificates == 0 {
        return Err(at(&"no PEM certificates found"));
    }
    Ok(pem)
}

/// A CA bundle larger than this is surely not one.
const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;

/// Checkpoints travel percent-encoded on the channel, so any id survives the round trip.
fn encoded(checkpoint: &Checkpoint) -> String {
    let mut s = String::new();
    checkpoint.write_encoded(&mut s);
    s
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Fleet {
    /// Prepares the client; connecting happens in the background ([`spawn`]), so a Redis that
    /// is down at startup does not stop the gateway from starting. `password` comes from
    /// [`password`]. With `redis.ca_file` (`rediss://` only), the server's certificate must
    /// chain to that file's certificates, and the public roots are not used; an unreadable file
    /// or one without a certificate stops startup. A Redis whose certificate does not chain
    /// leaves the replica degraded, as if Redis were down.
    pub fn new(
        config: &RedisConfig,
        password: Option<&str>,
        metrics: Arc<Metrics>,
    ) -> Result<Fleet, String> {
        let mut info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(|_| "redis.url is not a valid Redis URL".to_string())?;
        if let Some(password) = password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = match &config.ca_file {
            Some(ca_file) => {
                let root_cert = Some(read_ca_file(ca_file)?);
                Client::build_with_tls(
                    info,
                    TlsCertificates {
                        client_tls: None,
                        root_cert,
                    },
                )
                .map_err(|_| {
                    format!(
                        "redis.ca_file {}: not usable as trusted roots",
                        ca_file.display()
                    )
                })?
            }
            None => Client::open(info).map_err(|_| "redis.url cannot be used".to_string())?,
        };
        Ok(Fleet {
            client,
            metrics,
            connection: ArcSwapOption::empty(),
            healthy: AtomicBool::new(false),
            channel: format!("{}invalidate", config.key_prefix),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            degraded_ttl: config.degraded_ttl,
            reconnect_max: config.reconnect_max,
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    fn connection(&self) -> Option<MultiplexedConnection> {
        if !self.is_healthy() {
            return None;
        }
        self.connection.load_full().map(|c| (*c).clone())
    }

    /// Runs one command within the timeout; any failure switches to degraded mode.
    async fn run<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Option<T> {
        let mut connection = self.connection()?;
        self.guarded(command.query_async::<T>(&mut connection))
            .await
    }

    async fn run_pipeline<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Option<T> {
        let mut connection = self.connection()?;
        self.guarded(pipe.query_async::<T>(&mut connection)).await
    }

    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                self.degrade(&format!("redis error: {:?}", e.kind()));
                None
            }
            Err(_) => {
                self.degrade("redis timed out");
                None
            }
        }
    }

    fn degrade(&self, why: &str) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            self.metrics.fleet_degraded();
            warn!(target: "permgate::fleet", reason = why, degraded_ttl_s = self.degraded_ttl.as_secs(), "redis unavailable: serving from the local cache only");
        }
    }

    fn gen_key(&self, checkpoint: &Checkpoint) -> String {
        format!("{}gen:{}", self.prefix, checkpoint.as_str())
    }

    fn pending_key(&self, checkpoint: &Checkpoint) -> String {
        format!("{}pending:{}", self.prefix, checkpoint.as_str())
    }

    fn page_suffix(
        epoch: u64,
        generation: u64,
        checkpoint: &Checkpoint,
        query: &ListQuery,
    ) -> String {
        let mut s = format!("{epoch}:{generation}:{}?", checkpoint.as_str());
        query.write_canonical(&mut s);
        s
    }

    /// The fleet's view of `checkpoint` for this read.
    pub async fn view(&self, checkpoint: &Checkpoint) -> View {
        if !self.is_healthy() {
            return View::Degraded;
        }
        let mut command = redis::cmd("MGET");
        command
            .arg(format!("{}epoch", self.prefix))
            .arg(self.gen_key(checkpoint));
        match self.run::<(Option<u64>, Option<u64>)>(&command).await {
            Some((epoch, generation)) => View::Shared {
                epoch: epoch.unwrap_or(0),
                generation: generation.unwrap_or(0),
            },
            None => View::Degraded,
        }
    }

    /// True while a write of `checkpoint` is in flight somewhere in the fleet (or Redis is
    /// unreachable): nothing fetched now may be stored.
    pub async fn write_pending(&self, checkpoint: &Checkpoint) -> bool {
        let mut command = redis::cmd("EXISTS");
        command.arg(self.pending_key(checkpoint));
        self.run::<bool>(&command).await.unwrap_or(true)
    }

    /// Before a write goes upstream: kill every replica's pages and hold off stores.
    pub async fn begin_write(&self, checkpoint: &Checkpoint, deadline: Duration) {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .incr(self.gen_key(checkpoint), 1)
            .ignore()
            .cmd("SET")
            .arg(self.pending_key(checkpoint))
            .arg(1)
            .arg("PX")
            .arg(deadline.as_millis() as u64)
            .ignore()
            .publish(&self.channel, encoded(checkpoint))
            .ignore();
        self.run_pipeline::<()>(&pipe).await;
    }

    /// After a write's answer: kill anything stored meanwhile, release the marker, tell everyone.
    pub async fn end_write(&self, checkpoint: &Checkpoint) {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .incr(self.gen_key(checkpoint), 1)
            .ignore()
            .del(self.pending_key(checkpoint))
            .ignore()
            .publish(&self.channel, encoded(checkpoint))
            .ignore();
        self.run_pipeline::<()>(&pipe).await;
    }

    /// Operator purge, fleet-wide: one checkpoint, or everything (`None`).
    pub async fn purge(&self, checkpoint: Option<&Checkpoint>) {
        let mut pipe = redis::pipe();
        match checkpoint {
            Some(cp) => pipe
                .incr(self.gen_key(cp), 1)
                .ignore()
                .publish(&self.channel, encoded(cp))
                .ignore(),
            None => pipe
                .incr(format!("{}epoch", self.prefix), 1)
                .ignore()
                .publish(&self.channel, "*")
                .ignore(),
        };
        self.run_pipeline::<()>(&pipe).await;
    }

    /// The shared page for this key, if another replica stored it.
    pub async fn get_page(
        &self,
        view: View,
        checkpoint: &Checkpoint,
        query: &ListQuery,
    ) -> Option<SharedPage> {
        let View::Shared { epoch, generation } = view else {
            return None;
        };
        let mut command = redis::cmd("GET");
        command.arg(format!(
            "{}page:{}",
            self.prefix,
            Self::page_suffix(epoch, generation, checkpoint, query)
        ));
        let raw: Vec<u8> = self.run::<Option<Vec<u8>>>(&command).await??;
        if raw.len() < 10 {
            return None;
        }
        let fetched = u64::from_be_bytes(raw[..8].try_into().ok()?);
        let status = u16::from_be_bytes(raw[8..10].try_into().ok()?);
        Some(SharedPage {
            age: Duration::from_millis(unix_millis().saturating_sub(fetched)),
            status,
            body: Bytes::copy_from_slice(&raw[10..]),
        })
    }

    /// Shares a freshly fetched page with the fleet for `keep_for`.
    pub async fn put_page(
        &self,
        view: View,
        checkpoint: &Checkpoint,
        query: &ListQuery,
        status: u16,
        body: &[u8],
        keep_for: Duration,
    ) {
        let View::Shared { epoch, generation } = view else {
            return;
        };
        let mut value = BytesMut::with_capacity(10 + body.len());
        value.put_u64(unix_millis());
        value.put_u16(status);
        value.put_slice(body);
        let mut command = redis::cmd("SET");
        command
            .arg(format!(
                "{}page:{}",
                self.prefix,
                Self::page_suffix(epoch, generation, checkpoint, query)
            ))
            .arg(value.as_ref())
            .arg("PX")
            .arg(keep_for.as_millis().max(1) as u64);
        self.run::<()>(&command).await;
    }

    /// Tries to become the one replica that fetches this key: `Some(true)` if it did,
    /// `Some(false)` if another holds it, `None` if Redis failed.
    pub async fn lock(
        &self,
        view: View,
        checkpoint: &Checkpoint,
        query: &ListQuery,
        hold: Duration,
    ) -> Option<bool> {
        let View::Shared { epoch, generation } = view else {
            return None;
        };
        let mut command = redis::cmd("SET");
        command
            .arg(format!(
                "{}lock:{}",
                self.prefix,
                Self::page_suffix(epoch, generation, checkpoint, query)
            ))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(hold.as_millis().max(1) as u64);
        self.run::<Option<String>>(&command)
            .await
            .map(|ok| ok.is_some())
    }

    pub async fn unlock(&self, view: View, checkpoint: &Checkpoint, query: &ListQuery) {
        let View::Shared { epoch, generation } = view else {
            return;
        };
        let mut command = redis::cmd("DEL");
        command.arg(format!(
            "{}lock:{}",
            self.prefix,
            Self::page_suffix(epoch, generation, checkpoint, query)
        ));
        self.run::<()>(&command).await;
    }

    /// A subscription to the invalidation channel, within the timeout.
    async fn subscribe(&self) -> Option<redis::aio::PubSub> {
        let wait = self.timeout.max(Duration::from_millis(500));
        let mut pubsub = tokio::time::timeout(wait, self.client.get_async_pubsub())
            .await
            .ok()?
            .ok()?;
        tokio::time::timeout(wait, pubsub.subscribe(&self.channel))
            .await
            .ok()?
            .ok()?;
        Some(pubsub)
    }

    /// One connection attempt plus a PING, within the timeout.
    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(self.timeout));
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("{:?}", e.kind()))?;
        let pong = tokio::time::timeout(
            self.timeout.max(Duration::from_millis(500)),
            redis::cmd("PING").query_async::<String>(&mut connection),
        )
        .await;
        match pong {
            Ok(Ok(_)) => Ok(connection),
            Ok(Err(e)) => Err(format!("{:?}", e.kind())),
            Err(_) => Err("timed out".into()),
        }
    }
}

/// Connects (one attempt, so that a replica whose Redis is up starts coherent; if it is down
/// the replica starts degraded), then starts the background tasks: health checks and
/// reconnects with backoff, and the invalidation subscriber. Both stop once the gateway has
/// dropped its fleet and cache.
pub async fn start(fleet: &Arc<Fleet>, cache: &Arc<PageCache>) {
    if let Err(why) = fleet.establish(cache).await {
        warn!(target: "permgate::fleet", reason = %why, "redis unreachable at startup: starting degraded");
    }
    let handles = Handles {
        fleet: Arc::downgrade(fleet),
        cache: Arc::downgrade(cache),
    };
    tokio::spawn(health(handles.clone()));
    tokio::spawn(subscriber(handles));
}

/// What the background tasks hold: weak, so they end with the gateway.
#[derive(Clone)]
struct Handles {
    fleet: Weak<Fleet>,
    cache: Weak<PageCache>,
}

impl Handles {
    fn upgrade(&self) -> Option<(Arc<Fleet>, Arc<PageCache>)> {
        Some((self.fleet.upgrade()?, self.cache.upgrade()?))
    }
}

impl Fleet {
    /// Connects, and on success drops the local cache (it may have missed invalidations) and
    /// turns coherence on.
    async fn establish(&self, cache: &PageCache) -> Result<(), String> {
        let connection = self.connect().await?;
        self.connection.store(Some(Arc::new(connection)));
        cache.purge_all();
        self.healthy.store(true, Ordering::Release);
        self.metrics.fleet_connected();
        info!(target: "permgate::fleet", "redis connected: fleet coherence on, local cache dropped");
        Ok(())
    }
}

async fn health(handles: Handles) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some((fleet, cache)) = handles.upgrade() else {
            return;
        };
        let wait = if fleet.is_healthy() {
            let mut command = redis::cmd("PING");
            command.arg("permgate");
            fleet.run::<String>(&command).await;
            Duration::from_secs(1)
        } else {
            match fleet.establish(&cache).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    Duration::from_secs(1)
                }
                Err(why) => {
                    warn!(target: "permgate::fleet", reason = %why, retry_ms = backoff.as_millis() as u64, "redis unreachable");
                    let wait = backoff;
                    backoff = (backoff * 2).min(fleet.reconnect_max);
                    wait
                }
            }
        };
        drop((fleet, cache));
        tokio::time::sleep(wait).await;
    }
}

/// Applies the invalidations other replicas publish, for as long as the subscription lasts.
async fn subscriber(handles: Handles) {
    loop {
        let Some((fleet, _)) = handles.upgrade() else {
            return;
        };
        let subscribed = if fleet.is_healthy() {
            fleet.subscribe().await
        } else {
            None
        };
        drop(fleet);
        let Some(pubsub) = subscribed else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let Some(cache) = handles.cache.upgrade() else {
                return;
            };
            match std::str::from_utf8(message.get_payload_bytes()) {
                Ok("*") => cache.purge_all(),
                Ok(cp) => {
                    if let Ok(checkpoint) = Checkpoint::parse(cp) {
                        cache.invalidate_checkpoint(&checkpoint);
                    }
                }
                Err(_) => {}
            }
        }
        // The subscription ended (Redis went away): the health task notices and reconnects.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
