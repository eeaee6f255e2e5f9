//! `AppState`: everything the data and admin listeners share, built once from `Config` by
//! [`AppState::new`]. No globals, so a test can run several gateways in one process.
//!
//! Background tasks never take the whole state: the fleet's take `Arc<Fleet>` and
//! `Arc<PageCache>` (see [`AppState::start_fleet`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::audit::AuditLog;
use crate::auth::Clients;
use crate::cache::PageCache;
use crate::clock::Clock;
use crate::config::Config;
use crate::fleet::{self, Fleet};
use crate::jwt::Verifier;
use crate::metrics::{LeaseSnapshot, Metrics, Snapshot};
use crate::route::Checkpoint;
use crate::secret::AdminKey;
use crate::upstream::Upstream;

/// What an invalidation drops: every page, or one checkpoint's.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    All,
    Checkpoint(&'a Checkpoint),
}

/// Everything a request needs.
pub struct AppState {
    /// Swapped whole on reload (SIGHUP, key file change).
    clients: ArcSwap<Clients>,
    pub cache: Arc<PageCache>,
    pub metrics: Arc<Metrics>,
    pub upstream: Upstream,
    pub audit: Option<AuditLog>,
    /// `[redis]`: coherence with the other replicas.
    pub fleet: Option<Arc<Fleet>>,
    /// `[jwt]`: verifies bearer JWTs. Built once: a reload keeps its keys and the tokens it
    /// remembers (SIGHUP re-reads its JWKS; other `[jwt]` changes apply at the next restart).
    pub jwt: Option<Arc<Verifier>>,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    pub max_uri_bytes: usize,
    pub max_body_bytes: usize,
    /// `upstream.request_timeout_ms`: also how long a client may take to send a body.
    pub upstream_deadline: Duration,
    /// `server.admin_token_sha256`: what `/metrics` and cache purges require (see `admin`).
    /// Applies from startup; a reload does not change it.
    pub admin_token_sha256: Option<[u8; 32]>,
    /// The settings a reload does not apply, as the gateway started with them (see
    /// `reload::reload`, which names those a new file changes).
    pub restart_only: serde_json::Map<String, serde_json::Value>,
}

impl AppState {
    /// `redis_password` is the resolved `[redis]` password (see `fleet::password`). Start the
    /// fleet's background tasks with [`AppState::start_fleet`] once the state exists.
    pub fn new(
        config: &Config,
        key: AdminKey,
        clock: Clock,
        redis_password: Option<&str>,
    ) -> Result<Arc<AppState>, String> {
        let audit = config
            .audit
            .as_ref()
            .map(|a| AuditLog::open(&a.path))
            .transpose()?;
        let metrics = Arc::new(Metrics::build(config.redis.is_some()));
        let fleet = config
            .redis
            .as_ref()
            .map(|r| Fleet::new(r, redis_password, metrics.clone()).map(Arc::new))
            .transpose()?;
        let jwt = config
            .jwt
            .as_ref()
            .map(|j| Verifier::new(j, &config.upstream, metrics.clone()))
            .transpose()?;
        Ok(Arc::new(AppState {
            clients: ArcSwap::from_pointee(Clients::new(&config.clients)),
            upstream: Upstream::new(&config.upstream, key, clock.clone(), metrics.clone())?,
            cache: Arc::new(PageCache::new(
                &config.cache,
                clock,
                metrics.cache_evictions.clone(),
            )),
            metrics,
            audit,
            fleet,
            jwt,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            max_uri_bytes: config.server.max_uri_bytes,
            max_body_bytes: config.server.max_body_bytes,
            upstream_deadline: config.upstream.request_timeout,
            admin_token_sha256: config.server.admin_token_sha256,
            restart_only: config.restart_only(),
        }))
    }

    /// With `[redis]`: connects and starts the fleet's background tasks (see `fleet::start`).
    pub async fn start_fleet(&self) {
        if let Some(fleet) = &self.fleet {
            fleet::start(fleet, &self.cache).await;
        }
    }

    /// The configured clients as of now.
    pub fn clients(&self) -> arc_swap::Guard<Arc<Clients>> {
        self.clients.load()
    }

    /// Applies a reloaded client list and admin key. Requests in flight finish with what they
    /// started with; the next ones use the new ones.
    pub fn apply_reload(&self, config: &Config, key: AdminKey) {
        self.clients.store(Arc::new(Clients::new(&config.clients)));
        self.upstream.set_key(key);
    }

    /// Drops cached pages here and, with `[redis]`, on every replica (each acknowledges, or its
    /// lease runs out, before this returns; if Redis is unreachable only here, and the other
    /// replicas' leases lapse on their own).
    pub async fn invalidate(&self, scope: Scope<'_>) {
        let checkpoint = match scope {
            Scope::All => {
                self.cache.purge_all();
                None
            }
            Scope::Checkpoint(checkpoint) => {
                self.cache.invalidate_checkpoint(checkpoint);
                Some(checkpoint)
            }
        };
        if let Some(fleet) = &self.fleet {
            if !fleet.purge(checkpoint).await {
                tracing::warn!(target: "permgate::fleet", "purged on this replica only: the fleet could not be told");
            }
        }
    }

    /// The Prometheus exposition of this gateway's metrics.
    pub async fn render_metrics(&self) -> String {
        // moka's counts are eventually consistent; settle them for the scrape.
        self.cache.run_pending_tasks().await;
        let circuit = match self.upstream.breaker_state() {
            "closed" => 0,
            "half_open" => 1,
            _ => 2,
        };
        self.metrics.render(Snapshot {
            cache_entries: self.cache.entry_count(),
            cache_bytes: self.cache.weighted_bytes(),
            circuit,
            in_flight: self.in_flight(),
            redis_up: self.fleet.as_ref().map(|f| f.is_healthy()),
            lease: self.fleet.as_ref().map(|f| LeaseSnapshot {
                up: f.lease() == fleet::Lease::Held,
                remaining_seconds: f.lease_remaining(),
                replicas_live: f.replicas_live(),
            }),
        })
    }

    /// Readiness: false once shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Requests on the data listener that have started and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight for as long as the returned guard lives (cancellation
    /// included).
    pub fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }
}

/// See [`AppState::enter`].
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
