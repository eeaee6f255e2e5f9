//! Fleet coherence through Redis (`[redis]`): many replicas behave like one gateway (SPEC
//! "Many replicas"; README "Many replicas" has the protocol and its failure cases).
//!
//! - **Leases.** Each replica registers a lease in `{prefix}leases` (a sorted set of Redis-time
//!   deadlines) every `lease_ms / 3`, and serves from its local cache only while that lease is
//!   live by its own clock (`CLOCK_BOOTTIME`, counted from before the renewal was sent, minus a
//!   margin: it ends before Redis' deadline for it). A renewal returns the fleet's invalidation
//!   sequence number; the lease is extended only once every invalidation up to it is applied.
//!   A hit makes no Redis call: [`Fleet::lease`] is one atomic load and one clock read. A
//!   replica shutting down resigns after its drain ([`Fleet::resign`]), so writes elsewhere do
//!   not wait for its lease to run out.
//! - **Acknowledged invalidations.** Writes and purges get a sequence number and go on the
//!   stream `{prefix}inv`; every replica applies the entries in order and acknowledges them in
//!   `{prefix}acks`. A write publishes one before its upstream call and one after, and each time
//!   waits until every other live replica has acknowledged it or its lease has run out in Redis
//!   time (converted once to the writer's clock). So once a write has answered, no replica can
//!   serve a page from before it.
//! - **Incarnations.** A Redis that restarted, failed over or lost its keys is a new
//!   incarnation: every replica drops its cache, and writes wait one lease term (the fence) for
//!   leases the old Redis granted. Scripts tell one Redis process from another by its run id
//!   (`INFO`); a Redis whose scripts cannot see one grants no lease (probed at each connect).
//! - **Shared second tier.** On a local miss a replica reads `{prefix}page:…` (keyed by the
//!   fleet epoch and the checkpoint's generation) before going upstream; a fleet-wide lock lets
//!   one replica fetch while the others poll for its page. Nothing fetched while a write of the
//!   checkpoint is in flight (`{prefix}pending:…`) is stored there. Those scripts trust the
//!   epoch and generations only in the incarnation this replica last renewed with (a restored
//!   or failed-over Redis may have lost their increments): otherwise the miss fetches and
//!   nothing is stored; and no lookup runs on a new connection before its first renewal.
//! - **Without a lease** (Redis unreachable, the replica paused or cut off) the proxy reads
//!   from upstream and refuses writes; this module only says whether the lease is held.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, IntoConnectionInfo, RedisWrite, TlsCertificates};
use tokio::sync::mpsc;
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use crate::cache::PageCache;
use crate::config::RedisConfig;
use crate::env::Env;
use crate::metrics::Metrics;
use crate::route::{Checkpoint, ListQuery};
use crate::secret;

/// A script as sent: by its SHA1 (`EVALSHA`; each connection loads every script first), in full
/// (`EVAL`) only after Redis answered NOSCRIPT (its script cache was flushed).
struct Script {
    body: &'static str,
    sha: String,
}

impl Script {
    fn new(body: &'static str) -> Script {
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, body.as_bytes());
        let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Script { body, sha }
    }

    /// `EVALSHA <sha> <keys>`: the caller appends the keys, then the arguments.
    fn call(&self, keys: usize) -> Cmd {
        let mut command = redis::cmd("EVALSHA");
        command.arg(&self.sha).arg(keys);
        command
    }

    /// The same call as `EVAL` with the script's text (which loads it too).
    fn in_full(&self, call: &Cmd) -> Cmd {
        let mut command = redis::cmd("EVAL");
        command.arg(self.body);
        for arg in call.args_iter().skip(2) {
            if let redis::Arg::Simple(bytes) = arg {
                command.arg(bytes);
            }
        }
        command
    }
}

struct Scripts {
    renew: Script,
    publish: Script,
    ack: Script,
    lookup: Script,
    put: Script,
    resign: Script,
    /// Whether scripts here see a run id (`run.lua`): run at each connect.
    probe: Script,
    unlock: Script,
}

impl Scripts {
    fn all(&self) -> [&Script; 8] {
        [
            &self.renew,
            &self.publish,
            &self.ack,
            &self.lookup,
            &self.put,
            &self.resign,
            &self.probe,
            &self.unlock,
        ]
    }
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    renew: Script::new(concat!(
        include_str!("fleet/run.lua"),
        include_str!("fleet/ensure.lua"),
        include_str!("fleet/renew.lua")
    )),
    publish: Script::new(concat!(
        include_str!("fleet/run.lua"),
        include_str!("fleet/ensure.lua"),
        include_str!("fleet/publish.lua")
    )),
    ack: Script::new(include_str!("fleet/ack.lua")),
    lookup: Script::new(concat!(
        include_str!("fleet/run.lua"),
        include_str!("fleet/lookup.lua")
    )),
    put: Script::new(concat!(
        include_str!("fleet/run.lua"),
        include_str!("fleet/put.lua")
    )),
    resign: Script::new(include_str!("fleet/resign.lua")),
    unlock: Script::new(include_str!("fleet/unlock.lua")),
    probe: Script::new(concat!(
        include_str!("fleet/run.lua"),
        "return run_id() ~= 'norunid' and 1 or 0\n"
    )),
});

/// Whether a script call whose script Redis lacks is sent again in full.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resend {
    Yes,
    /// No: the caller may make one round trip only (a lookup); the lease task reloads the
    /// scripts.
    No,
}

fn no_script(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Entries the invalidation stream keeps (approximately); a replica further behind purges.
const STREAM_MAXLEN: u64 = 10_000;
/// A writer's allowance for clock rate differences (±0.4 % tolerated, see README).
const WRITER_FACTOR: f64 = 1.01;
/// How often a waiting writer looks at the acknowledgements again without a wake-up (acks
/// publish one on `{prefix}acked`; a lost one costs this much).
const ACK_RECHECK: Duration = Duration::from_millis(10);
/// Why a Redis whose scripts see no run id (`INFO` renamed or denied by an ACL, or no `run_id`
/// in it) grants no lease: a script could not tell it, restarted from a snapshot or failed
/// over, from the Redis before, so writes from before it would not be fenced nor pages it
/// cannot vouch for dropped. Checked at each connect (`probe`).
const NO_RUN_ID: &str = "scripts may not call INFO or it names no run_id: without the run id a \
     restart from a snapshot or a failover goes unnoticed, so no lease is taken";
/// Renewals retry this often at most after a failure.
const RENEW_RETRY: Duration = Duration::from_millis(100);
/// Pages waiting to be shared at most (past it a put is a call of its own), and per call.
const PUT_QUEUE: usize = 1024;
const PUT_BATCH: usize = 32;

/// A page as stored in Redis: when it was fetched, its status and body.
pub struct SharedPage {
    pub age: Duration,
    pub status: u16,
    pub body: Bytes,
}

/// Whether this replica may answer reads from its local cache now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Held,
    Lapsed,
}

/// Where this replica stands in the fleet's invalidation sequence.
#[derive(Default)]
struct SyncState {
    /// The Redis incarnation the sequence numbers belong to.
    incarnation: Option<String>,
    /// Every invalidation up to this one is applied here.
    applied: u64,
    /// Bumped on each resynchronisation: a stream read started before it is discarded.
    generation: u64,
}

/// A write in flight: what its END must name.
pub struct Ticket {
    checkpoint: Checkpoint,
    token: String,
}

/// One published invalidation to wait for.
struct Fanout {
    seq: u64,
    /// Other replicas' ids and, on the lease clock, when their leases are over for sure.
    waits: Vec<(String, u64)>,
    /// A new incarnation's fence, on the lease clock: no ack can end it.
    fence: Option<u64>,
    published: u64,
}

pub struct Fleet {
    client: Client,
    metrics: Arc<Metrics>,
    connection: ArcSwapOption<MultiplexedConnection>,
    healthy: AtomicBool,
    /// The incarnation of this replica's last successful renewal on the current connection;
    /// `None` from each (re)connect until then: no lookup runs without it (LOOKUP and PUT
    /// compare it with Redis' own).
    renewed: ArcSwapOption<String>,
    prefix: String,
    timeout: Duration,
    pub degraded_ttl: Duration,
    reconnect_max: Duration,
    lease: Duration,
    id: String,
    /// Lease clock (ns) until which the local cache may be used; 0: no lease. Stored with
    /// Release after the invalidations it vouches for were applied, loaded with Acquire.
    lease_until: AtomicU64,
    sync: Mutex<SyncState>,
    /// (sync generation, applied): where the stream reader reads from.
    position: watch::Sender<(u64, u64)>,
    replicas_live: AtomicU64,
    writes: AtomicU64,
    /// Woken by each acknowledgement published on `{prefix}acked`.
    acked: tokio::sync::Notify,
    /// Connections made so far: the ack listener resubscribes when it moves.
    connections: AtomicU64,
    /// Redis answered NOSCRIPT: the lease task loads the scripts again.
    scripts_lost: AtomicBool,
    /// The put task's queue (from [`start`]).
    puts: OnceLock<mpsc::Sender<Queued>>,
    /// [`Fleet::resign`] ran: no lease is taken again.
    resigned: AtomicBool,
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

/// Checkpoints travel percent-encoded on the stream, so any id survives the round trip.
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

/// The lease clock in nanoseconds: `CLOCK_BOOTTIME`, which keeps counting while the machine or
/// VM is suspended (`Instant` does not) and is never stepped.
pub fn lease_clock() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// The lease end for a renewal sent at `sent` (lease clock, ns): `lease` minus the margin
/// `lease/100 + 2 ms`, which covers clock rates off by up to 0.4 % and Redis' millisecond
/// truncation, so the replica stops before Redis' deadline for it.
fn lease_end(sent: u64, lease: Duration) -> u64 {
    let lease = lease.as_nanos() as u64;
    sent + lease - (lease / 100 + 2_000_000)
}

/// When a writer may stop waiting for a deadline `deadline_ms` (Redis ms) reported at Redis
/// time `now_ms`, the reply having arrived at `arrived` (lease clock, ns): surely after Redis'
/// clock passed it.
fn wait_until(arrived: u64, now_ms: u64, deadline_ms: u64) -> u64 {
    let ahead = deadline_ms.saturating_sub(now_ms) as f64 * WRITER_FACTOR;
    arrived + (ahead * 1_000_000.0) as u64 + 2_000_000
}

/// A lease deadline (Redis ms) as PUBLISH reports it (a sorted-set score). Unparsable (or not
/// finite): as for a lease renewed at `now_ms` (fail closed: the writer waits a whole term for
/// that replica).
fn lease_deadline(raw: &str, now_ms: u64, lease: Duration) -> u64 {
    raw.parse::<f64>()
        .ok()
        .filter(|d| d.is_finite())
        .map_or(now_ms + lease.as_millis() as u64, |d| d as u64)
}

impl Fleet {
    /// Prepares the client; connecting happens in [`start`] and the background, so a Redis that
    /// is down at startup does not stop the gateway from starting. `password` comes from
    /// [`password`]. With `redis.ca_file` (`rediss://` only), the server's certificate must
    /// chain to that file's certificates, and the public roots are not used; an unreadable file
    /// or one without a certificate stops startup. A Redis whose certificate does not chain
    /// leaves the replica without a lease, as if Redis were down.
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
            renewed: ArcSwapOption::empty(),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            degraded_ttl: config.degraded_ttl,
            reconnect_max: config.reconnect_max,
            lease: config.lease,
            id: format!("{}-{:016x}", std::process::id(), fastrand::u64(..)),
            lease_until: AtomicU64::new(0),
            sync: Mutex::new(SyncState::default()),
            position: watch::Sender::new((0, 0)),
            replicas_live: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            acked: tokio::sync::Notify::new(),
            connections: AtomicU64::new(0),
            scripts_lost: AtomicBool::new(false),
            puts: OnceLock::new(),
            resigned: AtomicBool::new(false),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// The hit path's check: one Acquire load and one clock read. Call it *before* taking the
    /// cache key, so the key's generation is read after the invalidations the lease vouches for.
    pub fn lease(&self) -> Lease {
        let until = self.lease_until.load(Ordering::Acquire);
        if until != 0 && lease_clock() < until {
            Lease::Held
        } else {
            Lease::Lapsed
        }
    }

    /// Seconds left on the lease (0 without one), for `/metrics`.
    pub fn lease_remaining(&self) -> f64 {
        let until = self.lease_until.load(Ordering::Acquire);
        until.saturating_sub(lease_clock()) as f64 / 1e9
    }

    /// Live leases in the registry at the last renewal, this one included.
    pub fn replicas_live(&self) -> u64 {
        self.replicas_live.load(Ordering::Relaxed)
    }

    /// How long a refused write's caller should wait before retrying: one lease term.
    pub fn retry_after(&self) -> Duration {
        self.lease
    }

    fn connection(&self) -> Option<MultiplexedConnection> {
        if !self.is_healthy() {
            return None;
        }
        self.connection.load_full().map(|c| (*c).clone())
    }

    /// Runs one command within the timeout; any failure drops the connection (reconnected in
    /// the background).
    async fn run<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Option<T> {
        let mut connection = self.connection()?;
        self.guarded(command.query_async::<T>(&mut connection))
            .await
    }

    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        self.settle(tokio::time::timeout(self.timeout, call).await)
    }

    /// Runs one script call ([`Script::call`]) within the timeout. NOSCRIPT (Redis' script
    /// cache was flushed) does not drop the connection: with [`Resend::Yes`] the call is sent
    /// again in full, else it fails and the lease task reloads the scripts.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        call: &Cmd,
        resend: Resend,
    ) -> Option<T> {
        let mut connection = self.connection()?;
        let answer = tokio::time::timeout(self.timeout, call.query_async::<T>(&mut connection));
        let answer = answer.await;
        self.answered(answer, script, call, &mut connection, resend)
            .await
    }

    /// [`Fleet::eval`] of the last command of `pipe`, sent after the others in one write (their
    /// answers ignored, their errors not).
    async fn eval_after<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        pipe: &redis::Pipeline,
        resend: Resend,
    ) -> Option<T> {
        let mut connection = self.connection()?;
        let call = pipe.cmd_iter().last()?;
        let answer = tokio::time::timeout(self.timeout, pipe.query_async::<(T,)>(&mut connection));
        let answer = answer.await.map(|answer| answer.map(|(value,)| value));
        self.answered(answer, script, call, &mut connection, resend)
            .await
    }

    /// What a script call's answer gives; after NOSCRIPT, the call alone again in full (the
    /// commands sent before it did run).
    async fn answered<T: redis::FromRedisValue>(
        &self,
        answer: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
        script: &Script,
        call: &Cmd,
        connection: &mut MultiplexedConnection,
        resend: Resend,
    ) -> Option<T> {
        match answer {
            Ok(Err(e)) if no_script(&e) => {
                self.scripts_lost.store(true, Ordering::Relaxed);
                if resend == Resend::No {
                    return None;
                }
                self.guarded(script.in_full(call).query_async(connection))
                    .await
            }
            answer => self.settle(answer),
        }
    }

    /// Loads every script on `connection` (one round trip), so that calls can name them.
    async fn load_scripts(connection: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let mut load = redis::pipe();
        for script in SCRIPTS.all() {
            load.cmd("SCRIPT").arg("LOAD").arg(script.body).ignore();
        }
        load.query_async(connection).await
    }

    fn settle<T>(
        &self,
        answer: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        match answer {
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
            warn!(target: "permgate::fleet", reason = why, "redis connection lost: reconnecting");
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A call of `script` with `keys`, then `args`.
    fn script(script: &Script, keys: &[String], args: &[&str]) -> Cmd {
        let mut command = script.call(keys.len());
        command.arg(keys).arg(args);
        command
    }

    /// incarnation, acks, epoch, seq, inv, leases: the keys RENEW and PUBLISH start with.
    fn sequence_keys(&self) -> Vec<String> {
        ["incarnation", "acks", "epoch", "seq", "inv", "leases"]
            .iter()
            .map(|k| self.key(k))
            .collect()
    }

    fn gen_key(&self, checkpoint: &Checkpoint) -> String {
        format!("{}gen:{}", self.prefix, checkpoint.as_str())
    }

    fn pending_key(&self, checkpoint: &Checkpoint) -> String {
        format!("{}pending:{}", self.prefix, checkpoint.as_str())
    }
}

/// The lease: renewal, catching up with the invalidation stream, acknowledgements.
impl Fleet {
    /// Renews the lease. It is extended only after every invalidation up to the sequence number
    /// the renewal returned is applied, and only if the reply came back in time to be of use.
    async fn renew(&self, cache: &PageCache) -> Result<(), ()> {
        if self.resigned() {
            return Err(());
        }
        let sent = lease_clock();
        let (known, applied) = {
            let s = self.sync.lock().await;
            (s.incarnation.clone().unwrap_or_default(), s.applied)
        };
        let lease_ms = self.lease.as_millis().to_string();
        let command = Self::script(
            &SCRIPTS.renew,
            &self.sequence_keys(),
            &[&self.id, &lease_ms, &known, &applied.to_string()],
        );
        let reply = self.eval(&SCRIPTS.renew, &command, Resend::Yes).await;
        let (incarnation, seq, live): (String, u64, u64) = reply.ok_or(())?;
        if incarnation.starts_with("norunid:") {
            // The run id went missing since the connection was made (an ACL took INFO away):
            // reconnect (the probe there fails and says why) rather than trust an incarnation
            // blind to restarts.
            self.healthy.store(false, Ordering::Release);
            return Err(());
        }
        self.replicas_live.store(live, Ordering::Relaxed);
        let mut s = self.sync.lock().await;
        if s.incarnation.as_deref() != Some(incarnation.as_str()) {
            // A new Redis (or the first renewal): nothing cached here can be vouched for.
            cache.purge_all();
            if s.incarnation.is_some() {
                self.metrics.fleet_resync_purge("incarnation");
                info!(target: "permgate::fleet", "new redis incarnation: local cache dropped");
            }
            s.incarnation = Some(incarnation);
            s.applied = seq;
            s.generation += 1;
        } else if seq < s.applied {
            // Cannot happen without a new incarnation; be safe.
            cache.purge_all();
            self.metrics.fleet_resync_purge("rollback");
            s.applied = seq;
            s.generation += 1;
        } else if seq > s.applied {
            let entries = self.entries_after(s.applied, seq).await.ok_or(())?;
            self.apply_locked(cache, &mut s, &entries, Some(seq));
        }
        self.position.send_replace((s.generation, s.applied));
        let until = lease_end(sent, self.lease);
        // Resigned while this renewal was out (`resign` sets it under this lock): the lease
        // stays given up.
        if until <= lease_clock() || self.resigned() {
            return Err(());
        }
        // After the generation bumps above: a reader that sees this lease sees them.
        self.lease_until.fetch_max(until, Ordering::Release);
        let (now_applied, incarnation) = (s.applied, s.incarnation.clone());
        drop(s);
        self.renewed.store(incarnation.clone().map(Arc::new));
        if now_applied > applied {
            self.ack(now_applied, incarnation.as_deref().unwrap_or_default())
                .await;
        }
        Ok(())
    }

    /// `XRANGE inv (after upto`: the entries a replica missed.
    async fn entries_after(&self, after: u64, upto: u64) -> Option<Vec<(u64, String)>> {
        let mut command = redis::cmd("XRANGE");
        command
            .arg(self.key("inv"))
            .arg(format!("({after}-0"))
            .arg(format!("{upto}-0"));
        let raw: Vec<(String, Vec<String>)> = self.run(&command).await?;
        Some(parse_entries(raw))
    }

    /// Applies stream entries in order. A gap (the stream was trimmed past this replica, or it
    /// ends before `upto`) drops the whole local cache instead.
    fn apply_locked(
        &self,
        cache: &PageCache,
        s: &mut SyncState,
        entries: &[(u64, String)],
        upto: Option<u64>,
    ) {
        let last = entries.last().map_or(0, |e| e.0).max(upto.unwrap_or(0));
        for (seq, target) in entries {
            if *seq <= s.applied {
                continue;
            }
            if *seq != s.applied + 1 {
                break;
            }
            match target.as_str() {
                "*" => cache.purge_all(),
                cp => match Checkpoint::parse(cp) {
                    Ok(checkpoint) => cache.invalidate_checkpoint(&checkpoint),
                    Err(_) => cache.purge_all(),
                },
            }
            self.metrics.fleet_invalidation_applied();
            s.applied = *seq;
        }
        if s.applied < last {
            cache.purge_all();
            self.metrics.fleet_resync_purge("gap");
            warn!(target: "permgate::fleet", from = s.applied, to = last, "missed invalidations: local cache dropped");
            s.applied = last;
        }
    }

    /// Leaves the fleet, for a replica whose requests have all been answered (after the drain):
    /// its lease ends here and in Redis, so writes through the other replicas no longer wait
    /// for it to run out (up to `lease_ms` each, once), and those already waiting for its
    /// acknowledgement stop. It serves nothing from its cache afterwards. `false` if Redis did
    /// not answer (the lease then runs out by itself, as after a crash).
    pub async fn resign(&self) -> bool {
        {
            // Under the lock a renewal extends the lease with: one under way cannot extend it
            // after this (see `renew`).
            let _s = self.sync.lock().await;
            self.resigned.store(true, Ordering::Release);
            self.lease_until.store(0, Ordering::Release);
        }
        let keys = [self.key("acks"), self.key("leases")];
        let channel = self.key("acked");
        let args = [self.id.as_str(), &channel];
        let command = Self::script(&SCRIPTS.resign, &keys, &args);
        let left = self
            .eval::<i64>(&SCRIPTS.resign, &command, Resend::Yes)
            .await
            .is_some();
        if left {
            info!(target: "permgate::fleet", "left the fleet: writes elsewhere no longer wait for this replica");
        } else {
            warn!(target: "permgate::fleet", "could not leave the fleet (redis did not answer): writes elsewhere wait for this replica's lease to run out");
        }
        left
    }

    /// Whether [`Fleet::resign`] ran.
    fn resigned(&self) -> bool {
        self.resigned.load(Ordering::Acquire)
    }

    /// Tells writers every invalidation up to `seq` is applied here. A lost ack only makes them
    /// wait longer (the next renewal carries it, or the lease runs out).
    async fn ack(&self, seq: u64, incarnation: &str) {
        let keys = [self.key("incarnation"), self.key("acks")];
        let channel = self.key("acked");
        let args = [self.id.as_str(), &seq.to_string(), incarnation, &channel];
        let command = Self::script(&SCRIPTS.ack, &keys, &args);
        self.eval::<i64>(&SCRIPTS.ack, &command, Resend::Yes).await;
    }

    /// Reads the stream from where this replica stands, on `stream` (a dedicated connection: the
    /// read blocks), applies what arrived and acknowledges it. `Err` drops the connection.
    async fn follow(
        &self,
        cache: &PageCache,
        stream: &mut MultiplexedConnection,
    ) -> Result<(), ()> {
        let (generation, from) = *self.position.borrow();
        let block = self.lease / 3;
        let mut command = redis::cmd("XREAD");
        command
            .arg("COUNT")
            .arg(512)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(self.key("inv"))
            .arg(format!("{from}-0"));
        type Reply = Option<Vec<(String, Vec<(String, Vec<String>)>)>>;
        let read = command.query_async::<Reply>(stream);
        let reply = match tokio::time::timeout(block + self.timeout, read).await {
            Ok(Ok(reply)) => reply,
            _ => return Err(()),
        };
        let Some(raw) = reply.into_iter().flatten().next().map(|(_, e)| e) else {
            return Ok(());
        };
        let entries = parse_entries(raw);
        let mut s = self.sync.lock().await;
        if s.generation != generation {
            return Ok(());
        }
        let before = s.applied;
        self.apply_locked(cache, &mut s, &entries, None);
        self.position.send_replace((s.generation, s.applied));
        let (applied, incarnation) = (s.applied, s.incarnation.clone());
        drop(s);
        if applied > before {
            self.ack(applied, incarnation.as_deref().unwrap_or_default())
                .await;
        }
        Ok(())
    }
}

/// Stream entries as (sequence number, target): ids are `<seq>-0`, the field `c` the target.
fn parse_entries(raw: Vec<(String, Vec<String>)>) -> Vec<(u64, String)> {
    raw.into_iter()
        .filter_map(|(id, fields)| {
            let seq = id.split('-').next()?.parse().ok()?;
            let target = fields.chunks(2).find(|f| f[0] == "c")?.get(1)?.clone();
            Some((seq, target))
        })
        .collect()
}

/// Writes and purges: publish an invalidation, then wait for the fleet to have applied it.
impl Fleet {
    /// Publishes one invalidation (`op` as PUBLISH takes it) and returns what to wait for;
    /// `None` if Redis did not answer.
    async fn publish(
        &self,
        target: Option<&Checkpoint>,
        op: &str,
        token: &str,
        pending_ms: u64,
    ) -> Option<Fanout> {
        let mut keys = self.sequence_keys();
        let encoded_target = target.map_or_else(|| "*".to_string(), encoded);
        keys.push(target.map_or_else(|| self.key("gen:*"), |cp| self.gen_key(cp)));
        keys.push(target.map_or_else(|| self.key("pending:*"), |cp| self.pending_key(cp)));
        let lease_ms = self.lease.as_millis().to_string();
        let pending_ms = pending_ms.to_string();
        let args = [
            lease_ms.as_str(),
            &encoded_target,
            op,
            token,
            &pending_ms,
            &STREAM_MAXLEN.to_string(),
        ];
        let command = Self::script(&SCRIPTS.publish, &keys, &args);
        type Reply = (u64, u64, u64, String, Vec<String>);
        let reply = self.eval(&SCRIPTS.publish, &command, Resend::Yes).await;
        let (seq, now, fence, _incarnation, leases): Reply = reply?;
        let arrived = lease_clock();
        let waits = leases
            .chunks(2)
            .filter(|pair| pair.len() == 2 && pair[0] != self.id)
            .map(|pair| {
                let deadline = lease_deadline(&pair[1], now, self.lease);
                (pair[0].clone(), wait_until(arrived, now, deadline))
            })
            .collect();
        Some(Fanout {
            seq,
            waits,
            fence: (fence > now).then(|| wait_until(arrived, now, fence)),
            published: arrived,
        })
    }

    /// Waits until every replica in the fan-out has acknowledged it or is surely past its lease,
    /// and the incarnation's fence (if any) has passed. Needs no Redis to end: without answers
    /// it waits out the deadlines on this replica's clock.
    async fn await_fanout(&self, mut f: Fanout) {
        let awaited = f.waits.len() as u64;
        let (mut missed, mut fenced) = (0u64, false);
        loop {
            // Armed before looking, so an ack landing in between still wakes this wait.
            let notified = self.acked.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !f.waits.is_empty() {
                let mut command = redis::cmd("ZMSCORE");
                command.arg(self.key("acks"));
                for (id, _) in &f.waits {
                    command.arg(id);
                }
                if let Some(scores) = self.run::<Vec<Option<f64>>>(&command).await {
                    let elapsed = lease_clock().saturating_sub(f.published) as f64 / 1e9;
                    let mut acked = scores.iter().map(|s| s.is_some_and(|s| s >= f.seq as f64));
                    f.waits.retain(|_| {
                        let done = acked.next().unwrap_or(false);
                        if done {
                            self.metrics.fleet_ack_latency(elapsed);
                        }
                        !done
                    });
                }
            }
            let now = lease_clock();
            let before = f.waits.len();
            f.waits.retain(|(_, until)| *until > now);
            missed += (before - f.waits.len()) as u64;
            if f.fence.is_some_and(|until| until <= now) {
                f.fence = None;
            } else if f.fence.is_some() {
                fenced = true;
            }
            let next = f.waits.iter().map(|w| w.1).chain(f.fence).min();
            let Some(next) = next else { break };
            let wait = Duration::from_nanos(next - now).min(ACK_RECHECK);
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        let total = lease_clock().saturating_sub(f.published) as f64 / 1e9;
        self.metrics.fleet_fanout(awaited, missed, fenced, total);
    }

    /// Before a write goes upstream: every replica drops the checkpoint's pages (or its lease
    /// runs out), and the fleet holds off storing pages of it until [`Fleet::end_write`].
    /// `Err`: Redis did not take it; the write must not go upstream.
    pub async fn begin_write(
        &self,
        checkpoint: &Checkpoint,
        deadline: Duration,
    ) -> Result<Ticket, ()> {
        let n = self.writes.fetch_add(1, Ordering::Relaxed);
        let token = format!("{}-{n}", self.id);
        // The marker outlives the BEGIN wait (the reply's way back and one late ack check can
        // each add a Redis timeout to the lease), the upstream call and some slack.
        let lease_ms = self.lease.as_millis() as f64 * WRITER_FACTOR;
        let late_ms = 2 * self.timeout.as_millis() as u64;
        let pending_ms = lease_ms.ceil() as u64 + 2 + late_ms + deadline.as_millis() as u64 + 1000;
        let fanout = self.publish(Some(checkpoint), "begin", &token, pending_ms);
        let fanout = fanout.await.ok_or(())?;
        self.await_fanout(fanout).await;
        Ok(Ticket {
            checkpoint: checkpoint.clone(),
            token,
        })
    }

    /// After the upstream call: every replica drops the checkpoint's pages again (anything
    /// fetched meanwhile) or its lease runs out, before the write answers. `known`: upstream
    /// answered (else the pending marker is left to expire). If Redis stays unreachable, returns
    /// after `deadline`: by then every fill that could have fetched the old list has ended, and
    /// none stored it (the marker).
    pub async fn end_write(&self, ticket: Ticket, known: bool, deadline: Duration) {
        let give_up = tokio::time::Instant::now() + deadline;
        let op = if known { "end" } else { "keep" };
        loop {
            if let Some(f) = self
                .publish(Some(&ticket.checkpoint), op, &ticket.token, 0)
                .await
            {
                self.await_fanout(f).await;
                return;
            }
            if tokio::time::Instant::now() + RENEW_RETRY >= give_up {
                tokio::time::sleep_until(give_up).await;
                warn!(target: "permgate::fleet", "could not tell the fleet a write ended; answered after upstream_deadline");
                return;
            }
            tokio::time::sleep(RENEW_RETRY).await;
        }
    }

    /// Operator purge, fleet-wide: one checkpoint, or everything (`None`). False if the fleet
    /// could not be told.
    pub async fn purge(&self, checkpoint: Option<&Checkpoint>) -> bool {
        match self.publish(checkpoint, "purge", "", 0).await {
            Some(f) => {
                self.await_fanout(f).await;
                true
            }
            None => false,
        }
    }
}

/// What a miss learned in its one Redis call before upstream (`Fleet::lookup`).
pub enum Lookup {
    /// Another replica's copy of the page.
    Page(SharedPage),
    /// This replica holds the fleet's fetch lock for the key: fetch, then share the page
    /// through [`Fleet::fetching`].
    Fetch(Share),
    /// Another replica is fetching it: look again shortly.
    Busy,
    /// A write of the checkpoint is in flight somewhere: fetch, and store nothing.
    Pending,
}

/// Which lookup: the shared page (else the lock), or only the lock (a `no-cache` read; or the
/// copy the lookup found was no longer fresh when it arrived).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupMode {
    Page,
    Lock,
}

/// The right to share one fetched page: where it goes and the lock to release.
pub struct Share {
    checkpoint: Checkpoint,
    suffix: String,
    owner: String,
    epoch: String,
    generation: String,
    incarnation: Arc<String>,
}

/// This replica's fetch of a page whose fleet fetch lock it holds. Sharing the page releases
/// the lock; so does dropping it unshared (its request was cancelled: the caller went away, a
/// drain timed out), so the other replicas stop waiting for a page that will not come rather
/// than polling until the lock runs out (the upstream deadline).
pub struct Fetching<'a> {
    fleet: &'a Fleet,
    share: Option<Share>,
}

impl Fetching<'_> {
    /// Shares the fetched page (`None`: the fetch failed; the lock is only released).
    pub fn share(mut self, page: Option<(u16, Bytes)>, keep_for: Duration) {
        if let Some(share) = self.share.take() {
            self.fleet.share(share, page, keep_for);
        }
    }
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        if let Some(share) = self.share.take() {
            self.fleet.share(share, None, Duration::ZERO);
        }
    }
}

/// The shared second tier.
impl Fleet {
    /// The checkpoint and normalized query as the shared page's and lock's key suffix.
    fn page_suffix(checkpoint: &Checkpoint, query: &ListQuery) -> String {
        let mut s = format!("{}?", checkpoint.as_str());
        query.write_canonical(&mut s);
        s
    }

    /// One script: the fleet's generation, a pending write, the shared page if it is still
    /// fresh (`fresh`: how long a shared 200 and a shared 404 stay fresh after they were
    /// fetched), and otherwise the fleet's fetch lock, all at once. `None`: Redis failed.
    pub async fn lookup(
        &self,
        checkpoint: &Checkpoint,
        query: &ListQuery,
        lock_for: Duration,
        mode: LookupMode,
        fresh: [Duration; 2],
    ) -> Option<Lookup> {
        // Until a renewal on this connection succeeded, Redis may be a new incarnation this
        // replica knows nothing of: no lookup (the miss fetches and stores nothing).
        if !self.is_healthy() {
            return None;
        }
        let incarnation = self.renewed.load_full()?;
        let lock = Unlock {
            checkpoint: checkpoint.clone(),
            suffix: Self::page_suffix(checkpoint, query),
            owner: format!("{}-{:016x}", self.id, fastrand::u64(..)),
        };
        let (suffix, owner) = (&lock.suffix, &lock.owner);
        let (prefix, cp) = (self.prefix.as_str(), checkpoint.as_str());
        let mut call = SCRIPTS.lookup.call(4);
        arg_of(&mut call, &[prefix, "incarnation"]);
        arg_of(&mut call, &[prefix, "epoch"]);
        arg_of(&mut call, &[prefix, "gen:", cp]);
        arg_of(&mut call, &[prefix, "pending:", cp]);
        call.arg(prefix)
            .arg(suffix)
            .arg(owner)
            .arg(lock_for.as_millis().max(1) as u64)
            .arg(match mode {
                LookupMode::Page => "page",
                LookupMode::Lock => "lock",
            })
            .arg(incarnation.as_str());
        let now = unix_millis();
        for fresh_for in fresh {
            call.arg(now.saturating_sub(fresh_for.as_millis() as u64));
        }
        // Until its answer comes, the call may take the fetch lock: released if the answer
        // never reaches this request (cancelled while the call is out, or no answer).
        let mut locking = Locking {
            fleet: self,
            lock: Some(lock),
        };
        type Reply = (String, String, i64, i64, Option<Vec<u8>>);
        let reply = self.eval::<Reply>(&SCRIPTS.lookup, &call, Resend::No);
        let (epoch, generation, pending, locked, page) = reply.await?;
        Some(match (pending, locked, page, locking.lock.take()) {
            (1, ..) => Lookup::Pending,
            (_, _, Some(raw), _) => match SharedPage::decode(&raw) {
                Some(page) => Lookup::Page(page),
                None => Lookup::Busy,
            },
            (
                _,
                1,
                None,
                Some(Unlock {
                    checkpoint,
                    suffix,
                    owner,
                }),
            ) => Lookup::Fetch(Share {
                checkpoint,
                suffix,
                owner,
                epoch,
                generation,
                incarnation,
            }),
            _ => Lookup::Busy,
        })
    }

    /// The fetch that [`Lookup::Fetch`] asked of this replica, holding the fleet's fetch lock
    /// until it shares its page, or until it is dropped unshared (the request was cancelled).
    pub fn fetching(&self, share: Share) -> Fetching<'_> {
        Fetching {
            fleet: self,
            share: Some(share),
        }
    }

    /// In the background, after the answer: stores the fetched page for `keep_for` unless a
    /// write began or ended since the lookup (PUT compares generations and looks for a pending
    /// write), and releases the fetch lock either way (`page: None`: release only). Queued for
    /// the put task, which sends whatever queued meanwhile in one call.
    fn share(&self, share: Share, page: Option<(u16, Bytes)>, keep_for: Duration) {
        self.queue(Queued::Put(Put {
            share,
            page: page.map(|(status, body)| (unix_millis(), status, body)),
            keep_ms: keep_for.as_millis().max(1) as u64,
        }));
    }

    /// For the put task. With the queue full (Redis slower than the misses) nothing is sent,
    /// and that is counted: memory and calls in flight stay bounded, and a fetch lock left
    /// behind runs out by itself (`lock_ms`).
    fn queue(&self, item: Queued) {
        let queued = self
            .puts
            .get()
            .is_some_and(|queue| queue.try_send(item).is_ok());
        if !queued {
            self.metrics.fleet_share_dropped();
        }
    }

    /// PUT for a batch: one call, one incarnation check, however many pages. Each page goes
    /// ahead of it in the same write, to a staged key with a plain `SET`: a value handed to a
    /// script costs Redis a hash of every byte when Lua interns it (~4 µs for a 2.5 KB page),
    /// and PUT only renames the staged key to the shared page's, after its checks.
    /// Releases of the locks of cancelled lookups (UNLOCK) go in the same write, before it.
    async fn put(&self, batch: &[Queued]) {
        let (mut puts, mut unlocks) = (Vec::new(), Vec::new());
        for item in batch {
            match item {
                Queued::Put(put) => puts.push(put),
                Queued::Unlock(unlock) => unlocks.push(unlock),
            }
        }
        let mut pipe = redis::pipe();
        for stage in puts.iter().filter_map(|put| self.stage(put)) {
            pipe.add_command(stage).ignore();
        }
        if !unlocks.is_empty() {
            pipe.add_command(self.unlock_call(&unlocks)).ignore();
        }
        let script = if puts.is_empty() {
            &SCRIPTS.unlock
        } else {
            pipe.add_command(self.put_call(&puts));
            &SCRIPTS.put
        };
        self.eval_after::<i64>(script, &pipe, Resend::Yes).await;
    }

    fn unlock_call(&self, unlocks: &[&Unlock]) -> Cmd {
        let prefix = self.prefix.as_str();
        let mut call = SCRIPTS.unlock.call(1 + unlocks.len());
        arg_of(&mut call, &[prefix, "epoch"]);
        for unlock in unlocks {
            arg_of(&mut call, &[prefix, "gen:", unlock.checkpoint.as_str()]);
        }
        call.arg(prefix);
        for unlock in unlocks {
            call.arg(&unlock.suffix).arg(&unlock.owner);
        }
        call
    }

    /// `SET {prefix}staged:{owner} <page> PX <keep>`: the page where no lookup reads it.
    fn stage(&self, put: &Put) -> Option<Cmd> {
        let (fetched, status, body) = put.page.as_ref()?;
        let mut set = redis::cmd("SET");
        arg_of(&mut set, &[&self.prefix, "staged:", &put.share.owner]);
        {
            // `fetched at (unix ms, 8 bytes) | status (2 bytes) | body` (`SharedPage::decode`).
            let mut value = set.writer_for_next_arg();
            for piece in [&fetched.to_be_bytes()[..], &status.to_be_bytes(), body] {
                let _ = value.write_all(piece);
            }
        }
        set.arg("PX").arg(put.keep_ms);
        Some(set)
    }

    fn put_call(&self, batch: &[&Put]) -> Cmd {
        let prefix = self.prefix.as_str();
        let mut call = SCRIPTS.put.call(2 + 5 * batch.len());
        arg_of(&mut call, &[prefix, "incarnation"]);
        arg_of(&mut call, &[prefix, "epoch"]);
        for put in batch {
            let (s, cp) = (&put.share, put.share.checkpoint.as_str());
            let (epoch, generation, suffix) = (&s.epoch, &s.generation, &s.suffix);
            arg_of(&mut call, &[prefix, "gen:", cp]);
            arg_of(&mut call, &[prefix, "pending:", cp]);
            arg_of(
                &mut call,
                &[prefix, "page:", epoch, ":", generation, ":", suffix],
            );
            arg_of(
                &mut call,
                &[prefix, "lock:", epoch, ":", generation, ":", suffix],
            );
            arg_of(&mut call, &[prefix, "staged:", &s.owner]);
        }
        for put in batch {
            let s = &put.share;
            call.arg(s.incarnation.as_str())
                .arg(&s.epoch)
                .arg(&s.generation)
                .arg(&s.owner)
                .arg(if put.page.is_some() { "1" } else { "0" });
        }
        call
    }
}

/// Appends one argument made of `parts`, written in place.
fn arg_of(call: &mut Cmd, parts: &[&str]) {
    let mut arg = call.writer_for_next_arg();
    for part in parts {
        let _ = arg.write_all(part.as_bytes());
    }
}

/// A fetched page (or only a lock to release) on its way to Redis.
struct Put {
    share: Share,
    /// When it was fetched (unix ms), its status and body; `None`: release the lock only.
    page: Option<(u64, u16, Bytes)>,
    keep_ms: u64,
}

/// What the put task sends to Redis after the answers.
enum Queued {
    Put(Put),
    Unlock(Unlock),
}

/// The fetch lock a LOOKUP may have taken, to release although its answer never came.
struct Unlock {
    checkpoint: Checkpoint,
    suffix: String,
    owner: String,
}

/// A LOOKUP under way. Dropped before its answer reached it (the request was cancelled: the
/// caller went away, a drain timed out) or without one (Redis failed or was late), it queues
/// the release of the lock the call may have taken, so that the other replicas do not poll
/// for a page that will not come until the lock runs out (the upstream deadline).
struct Locking<'a> {
    fleet: &'a Fleet,
    lock: Option<Unlock>,
}

impl Drop for Locking<'_> {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            self.fleet.queue(Queued::Unlock(lock));
        }
    }
}

/// Sends the queued puts and releases: whatever queued while the previous call was out goes in
/// the next one (at most [`PUT_BATCH`]). Ends with the fleet (its queue closes).
async fn put_task(fleet: Weak<Fleet>, mut queue: mpsc::Receiver<Queued>) {
    let mut batch = Vec::with_capacity(PUT_BATCH);
    while queue.recv_many(&mut batch, PUT_BATCH).await > 0 {
        let Some(fleet) = fleet.upgrade() else {
            return;
        };
        fleet.put(&batch).await;
        batch.clear();
    }
}

impl SharedPage {
    /// `fetched at (unix ms, 8 bytes) | status (2 bytes) | body`, as `Fleet::share` writes it.
    fn decode(raw: &[u8]) -> Option<SharedPage> {
        let fetched = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
        let status = u16::from_be_bytes(raw.get(8..10)?.try_into().ok()?);
        Some(SharedPage {
            age: Duration::from_millis(unix_millis().saturating_sub(fetched)),
            status,
            body: Bytes::copy_from_slice(&raw[10..]),
        })
    }
}

/// Connections and the background tasks.
impl Fleet {
    /// One connection attempt plus a PING, within the timeout. The connection sets no deadline
    /// of its own: every command on it runs under one of the caller's (`guarded`, `eval`,
    /// `follow`), one timer each.
    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let wait = self.timeout.max(Duration::from_millis(500));
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(wait))
            .set_response_timeout(None);
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("{:?}", e.kind()))?;
        let pong = tokio::time::timeout(
            wait,
            redis::cmd("PING").query_async::<String>(&mut connection),
        )
        .await;
        match pong {
            Ok(Ok(_)) => Ok(connection),
            Ok(Err(e)) => Err(format!("{:?}", e.kind())),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Connects and turns the connection on. The local cache is kept: the next renewal decides
    /// whether anything was missed (catch-up) or everything must go (new incarnation, gap).
    async fn establish(&self) -> Result<(), String> {
        let mut connection = self.connect().await?;
        let wait = self.timeout.max(Duration::from_millis(500));
        match tokio::time::timeout(wait, Self::load_scripts(&mut connection)).await {
            Ok(Ok(())) => self.scripts_lost.store(false, Ordering::Relaxed),
            Ok(Err(e)) => return Err(format!("loading the scripts: {:?}", e.kind())),
            Err(_) => return Err("loading the scripts timed out".into()),
        }
        let probe = SCRIPTS.probe.call(0);
        match tokio::time::timeout(wait, probe.query_async::<i64>(&mut connection)).await {
            Ok(Ok(1)) => {}
            Ok(Ok(_)) => return Err(NO_RUN_ID.into()),
            Ok(Err(e)) => return Err(format!("probing for the run id: {:?}", e.kind())),
            Err(_) => return Err("probing for the run id timed out".into()),
        }
        self.connection.store(Some(Arc::new(connection)));
        self.connections.fetch_add(1, Ordering::Relaxed);
        // No lookups on the new connection before its first renewal succeeds (`lookup`).
        self.renewed.store(None);
        self.healthy.store(true, Ordering::Release);
        self.metrics.fleet_connected();
        info!(target: "permgate::fleet", "redis connected");
        Ok(())
    }

    /// One turn of the lease task: (re)connect if needed, renew; how long to sleep after.
    async fn lease_turn(&self, cache: &PageCache, backoff: &mut Duration) -> Duration {
        let renew_every = self.lease / 3;
        if !self.is_healthy() {
            if let Err(why) = self.establish().await {
                warn!(target: "permgate::fleet", reason = %why, retry_ms = backoff.as_millis() as u64, "redis unreachable");
                let wait = *backoff;
                *backoff = (*backoff * 2).min(self.reconnect_max);
                return wait;
            }
            *backoff = Duration::from_millis(100);
        }
        if self.scripts_lost.swap(false, Ordering::Relaxed) {
            if let Some(mut connection) = self.connection() {
                self.guarded(Self::load_scripts(&mut connection)).await;
            }
        }
        if self.renew(cache).await.is_ok() {
            renew_every
        } else {
            self.metrics.fleet_renewal_failed();
            renew_every.min(RENEW_RETRY)
        }
    }
}

/// Connects and takes a lease (one attempt, so that a replica whose Redis is up starts able to
/// serve hits; if it is down the replica starts without a lease), then starts the background
/// tasks: the lease's renewals and reconnects, and the stream reader. Both stop once the
/// gateway has dropped its fleet and cache.
pub async fn start(fleet: &Arc<Fleet>, cache: &Arc<PageCache>) {
    match fleet.establish().await {
        Ok(()) => {
            if fleet.renew(cache).await.is_err() {
                warn!(target: "permgate::fleet", "no lease at startup: reads go upstream, writes are refused");
            }
        }
        Err(why) => {
            warn!(target: "permgate::fleet", reason = %why, "redis unreachable at startup: starting degraded (no lease: reads go upstream, writes are refused)");
        }
    }
    let (queue, puts) = mpsc::channel(PUT_QUEUE);
    if fleet.puts.set(queue).is_ok() {
        tokio::spawn(put_task(Arc::downgrade(fleet), puts));
    }
    let handles = Handles {
        fleet: Arc::downgrade(fleet),
        cache: Arc::downgrade(cache),
    };
    tokio::spawn(lease_task(handles.clone()));
    tokio::spawn(stream_task(handles.clone()));
    tokio::spawn(ack_task(handles));
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

async fn lease_task(handles: Handles) {
    let mut backoff = Duration::from_millis(100);
    let mut held = false;
    loop {
        let Some((fleet, cache)) = handles.upgrade() else {
            return;
        };
        if fleet.resigned() {
            return;
        }
        let started = tokio::time::Instant::now();
        let wait = fleet.lease_turn(&cache, &mut backoff).await;
        if fleet.resigned() {
            return;
        }
        let now_held = fleet.lease() == Lease::Held;
        if held && !now_held {
            fleet.metrics.fleet_lease_lapsed();
            warn!(target: "permgate::fleet", "lease lapsed: reads go upstream, writes are refused");
        } else if !held && now_held {
            info!(target: "permgate::fleet", "lease held: serving from the local cache");
        }
        held = now_held;
        // Wake when the lease runs out too, so that a lapse is noted (and counted) on time.
        let remaining = Duration::from_secs_f64(fleet.lease_remaining());
        let wait = if held { wait.min(remaining) } else { wait };
        drop((fleet, cache));
        tokio::time::sleep_until(started + wait).await;
    }
}

/// Follows the invalidation stream on its own connection (a blocking read would stall every
/// other command on a shared one); reconnects after any error or a read that hangs.
async fn stream_task(handles: Handles) {
    let mut stream = None;
    loop {
        let Some((fleet, cache)) = handles.upgrade() else {
            return;
        };
        let synced = fleet.position.borrow().0 > 0;
        if !synced || !fleet.is_healthy() {
            drop((fleet, cache));
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        if stream.is_none() {
            stream = fleet.connect().await.ok();
        }
        let followed = match stream.as_mut() {
            Some(connection) => fleet.follow(&cache, connection).await,
            None => Err(()),
        };
        drop((fleet, cache));
        if followed.is_err() {
            stream = None;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Fleet {
    /// A subscription to `{prefix}acked`, within the timeout.
    async fn subscribe_acks(&self) -> Option<redis::aio::PubSub> {
        let wait = self.timeout.max(Duration::from_millis(500));
        let mut pubsub = tokio::time::timeout(wait, self.client.get_async_pubsub())
            .await
            .ok()?
            .ok()?;
        tokio::time::timeout(wait, pubsub.subscribe(self.key("acked")))
            .await
            .ok()?
            .ok()?;
        Some(pubsub)
    }
}

/// Wakes waiting writers on every acknowledgement. Resubscribes when the command connection
/// was re-made (a subscription that went silent with it is not detected otherwise) or closes.
async fn ack_task(handles: Handles) {
    loop {
        let Some(fleet) = handles.fleet.upgrade() else {
            return;
        };
        let made = fleet.connections.load(Ordering::Relaxed);
        let subscribed = if fleet.is_healthy() {
            fleet.subscribe_acks().await
        } else {
            None
        };
        drop(fleet);
        if let Some(pubsub) = subscribed {
            let mut messages = pubsub.into_on_message();
            loop {
                let next = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
                let Some(fleet) = handles.fleet.upgrade() else {
                    return;
                };
                match next {
                    Ok(Some(_)) => fleet.acked.notify_waiters(),
                    Ok(None) => break,
                    Err(_) if fleet.connections.load(Ordering::Relaxed) != made => break,
                    Err(_) => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::config::CacheConfig;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_lease_ends_a_margin_before_redis_deadline_and_a_writer_waits_past_it() {
        let lease = Duration::from_millis(1000);
        // 1000 ms minus (10 + 2) ms, counted from before the renewal was sent.
        assert_eq!(lease_end(5 * MS, lease), 5 * MS + 988 * MS);
        let short = Duration::from_millis(100);
        assert_eq!(lease_end(0, short), 97 * MS);
        // A deadline 1000 ms ahead in Redis time: 1010 ms + 2 ms on the writer's clock.
        assert_eq!(wait_until(7 * MS, 50_000, 51_000), 7 * MS + 1012 * MS);
        // A deadline already past: only the 2 ms allowance.
        assert_eq!(wait_until(7 * MS, 50_000, 49_000), 9 * MS);
    }

    #[test]
    fn a_script_is_called_by_the_sha1_redis_names_it_by_and_resent_with_the_same_arguments() {
        let script = Script::new("return 1");
        // What `SCRIPT LOAD "return 1"` answers.
        assert_eq!(script.sha, "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
        let mut call = script.call(1);
        call.arg("k").arg(7);
        let args = |c: &Cmd| {
            c.args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => "(not an argument)".into(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(args(&call), ["EVALSHA", &script.sha, "1", "k", "7"]);
        assert_eq!(
            args(&script.in_full(&call)),
            ["EVAL", "return 1", "1", "k", "7"]
        );
    }

    #[test]
    fn an_unparsable_lease_deadline_is_waited_for_a_whole_term() {
        let lease = Duration::from_millis(600);
        assert_eq!(lease_deadline("51000", 50_000, lease), 51_000);
        assert_eq!(lease_deadline("5.1e4", 50_000, lease), 51_000);
        assert_eq!(lease_deadline("", 50_000, lease), 50_600);
        assert_eq!(lease_deadline("nan", 50_000, lease), 50_600);
        assert_eq!(lease_deadline("inf", 50_000, lease), 50_600);
    }

    #[test]
    fn stream_entries_parse_to_sequence_and_target() {
        let raw = vec![
            (
                "7-0".to_string(),
                vec!["c".to_string(), "ft%3Aa".to_string()],
            ),
            ("8-0".to_string(), vec!["x".to_string(), "y".to_string()]),
            ("9-0".to_string(), vec!["c".to_string(), "*".to_string()]),
        ];
        assert_eq!(
            parse_entries(raw),
            vec![(7, "ft%3Aa".to_string()), (9, "*".to_string())]
        );
    }

    fn fleet() -> (Fleet, PageCache) {
        let config = RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            password: None,
            key_prefix: "p:".into(),
            timeout: Duration::from_millis(100),
            degraded_ttl: Duration::ZERO,
            reconnect_max: Duration::from_millis(300),
            lease: Duration::from_millis(600),
            ca_file: None,
        };
        let metrics = Arc::new(Metrics::build(true));
        let cache_config = CacheConfig {
            ttl: Duration::from_secs(60),
            max_bytes: 1 << 20,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            negative_ttl: Duration::ZERO,
        };
        let cache = PageCache::new(&cache_config, Clock::default(), Default::default());
        (Fleet::new(&config, None, metrics).unwrap(), cache)
    }

    #[test]
    fn entries_apply_in_order_skip_duplicates_and_a_gap_drops_everything() {
        let (fleet, cache) = fleet();
        let a = Checkpoint::parse("ft:a").unwrap();
        let mut s = SyncState {
            applied: 4,
            ..SyncState::default()
        };
        let key = |cache: &PageCache| cache.key(a.clone(), ListQuery::default());
        let before = key(&cache);
        // 4 is a duplicate; 5 applies (the checkpoint's pages die).
        fleet.apply_locked(&cache, &mut s, &[(4, "*".into()), (5, encoded(&a))], None);
        assert_eq!(s.applied, 5);
        assert_ne!(key(&cache), before, "the checkpoint's generation moved");
        let render = || {
            fleet.metrics.render(crate::metrics::Snapshot {
                cache_entries: 0,
                cache_bytes: 0,
                circuit: 0,
                in_flight: 0,
                redis_up: None,
                lease: None,
            })
        };
        let metrics = render();
        assert!(metrics.contains("permgate_fleet_invalidations_applied_total 1"));
        assert!(!metrics.contains("reason=\"gap\""));
        // 7 after 5: 6 was trimmed away; everything goes, and the replica moves on to 7.
        let other = Checkpoint::parse("ft:b").unwrap();
        let before = cache.key(other.clone(), ListQuery::default());
        fleet.apply_locked(&cache, &mut s, &[(7, encoded(&a))], None);
        assert_eq!(s.applied, 7);
        assert_ne!(cache.key(other, ListQuery::default()), before);
        // A catch-up that ends short of the renewal's sequence number is a gap too.
        fleet.apply_locked(&cache, &mut s, &[(8, encoded(&a))], Some(10));
        assert_eq!(s.applied, 10);
        let metrics = render();
        assert!(metrics.contains("permgate_fleet_resync_purges_total{reason=\"gap\"} 2"));
    }

    #[test]
    fn no_lease_before_the_first_renewal() {
        let (fleet, _) = fleet();
        assert_eq!(fleet.lease(), Lease::Lapsed);
        fleet
            .lease_until
            .store(lease_end(lease_clock(), fleet.lease), Ordering::Release);
        assert_eq!(fleet.lease(), Lease::Held);
        assert!(fleet.lease_remaining() > 0.5);
    }
}
