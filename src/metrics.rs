//! Prometheus metrics (SPEC "Admin listener": `GET /metrics`), with the official client.
//!
//! Every metric is registered once here and rendered in the text format by [`Metrics::render`].
//! Names follow Prometheus conventions: counters end in `_total`, durations are `_seconds`
//! histograms, sizes `_bytes`. Label values come from small closed sets (routes, status
//! classes, cache statuses, configured client names), never from caller input, so series
//! cannot explode. Gauges that mirror other state (cache size, circuit, in-flight) are set at
//! scrape time rather than on the request path.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use crate::cache::CacheStatus;
use crate::route::Operation;

/// A configured client's name as a label value (shared, so labelling allocates nothing).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientLabel(pub Arc<str>);

impl EncodeLabelValue for ClientLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status_class: &'static str,
    cache_status: &'static str,
    client: ClientLabel,
}

/// Route (3 + unmatched) x status class (5) x cache status (10 + none).
const REQUEST_SLOTS: usize = 4 * 5 * CACHE_SLOTS;
const CACHE_SLOTS: usize = 15;

/// One client's `permgate_requests_total` series, each resolved from the family the first
/// time it is used: after that a request costs an index and an atomic add, not a hash lookup
/// under the family's lock.
pub struct ClientSeries {
    label: ClientLabel,
    counters: Box<[OnceLock<Counter>]>,
}

impl std::fmt::Debug for ClientSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ClientSeries").field(&self.label).finish()
    }
}

impl ClientSeries {
    pub fn new(label: ClientLabel) -> ClientSeries {
        ClientSeries {
            label,
            counters: (0..REQUEST_SLOTS).map(|_| OnceLock::new()).collect(),
        }
    }
}

/// What a finished request is counted under.
#[derive(Debug, Clone, Copy)]
pub struct RequestOutcome {
    /// `None`: the path matched no route.
    pub route: Option<Operation>,
    pub status: u16,
    /// `None` for methods other than GET.
    pub cache_status: Option<CacheStatus>,
}

impl RequestOutcome {
    /// The series' place in a client's table. Exhaustive matches: a new route or cache status
    /// does not compile until it has its own place.
    fn slot(self) -> usize {
        let route = self.route_index();
        let class = usize::from(self.status / 100).clamp(1, 5) - 1;
        let cache = match self.cache_status {
            None => 0,
            Some(CacheStatus::Hit) => 1,
            Some(CacheStatus::StaleHit) => 2,
            Some(CacheStatus::StaleIfError) => 3,
            Some(CacheStatus::MissStored) => 4,
            Some(CacheStatus::Miss) => 5,
            Some(CacheStatus::Collapsed) => 6,
            Some(CacheStatus::RefreshStored) => 7,
            Some(CacheStatus::Refresh) => 8,
            Some(CacheStatus::Bypass) => 9,
            Some(CacheStatus::RefreshCollapsed) => 10,
            Some(CacheStatus::NoLease) => 11,
            Some(CacheStatus::NoLeaseCollapsed) => 12,
            Some(CacheStatus::NoLeaseHit) => 13,
            Some(CacheStatus::NoLeaseWrite) => 14,
        };
        (route * 5 + class) * CACHE_SLOTS + cache
    }

    fn route_index(self) -> usize {
        match self.route {
            None => 0,
            Some(Operation::List) => 1,
            Some(Operation::Create) => 2,
            Some(Operation::Delete) => 3,
        }
    }

    fn labels(self, client: &ClientLabel) -> RequestLabels {
        RequestLabels {
            route: self.route.map_or("unmatched", Operation::as_str),
            status_class: status_class(self.status),
            cache_status: self.cache_status.map_or("none", CacheStatus::name),
            client: client.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamLabels {
    status: &'static str,
    attempt: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClientOnly {
    client: ClientLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Why a request was shed before reaching upstream.
#[derive(Debug, Clone, Copy)]
pub enum Shed {
    QueueFull,
    CircuitOpen,
    /// The client already held `max_concurrency_per_client` upstream slots.
    ClientConcurrency,
}

impl Shed {
    /// The `reason` label.
    fn reason(self) -> &'static str {
        match self {
            Shed::QueueFull => "upstream_queue_full",
            Shed::CircuitOpen => "circuit_open",
            Shed::ClientConcurrency => "client_concurrency",
        }
    }
}

/// The `reason`s of `permgate_framing_refusals_total`, each exposed from the start (at 0).
pub const FRAMING_REFUSALS: [&str; 6] = [
    "length_and_encoding",
    "not_exactly_chunked",
    "encoding_on_http10",
    "bad_content_length",
    "head_too_large",
    "malformed",
];

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabel, Histogram>,
    /// `request_duration`'s series by route (numbered by `RequestOutcome::route_index`).
    durations: [OnceLock<Histogram>; 4],
    /// Requests that presented no valid token.
    anonymous: ClientSeries,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_duration: Histogram,
    pub cache_evictions: Counter,
    coalesced_waits: Counter,
    cache_entries: Gauge,
    cache_bytes: Gauge,
    rate_limited: Family<ClientOnly, Counter>,
    shed: Family<Reason, Counter>,
    framing_refusals: Family<Reason, Counter>,
    circuit_open: Gauge,
    in_flight: Gauge,
    key_reloads: Family<Outcome, Counter>,
    audit_failures: Counter,
    fleet_up: Gauge,
    fleet_degraded: Counter,
    fleet_connects: Counter,
    fleet_shared_hits: Counter,
    fleet_shares_dropped: Counter,
    fleet: FleetMetrics,
    tls_reloads: Family<Outcome, Counter>,
    jwt_verifications: Family<Outcome, Counter>,
    jwt_remembered: Counter,
    jwks_reloads: Family<Outcome, Counter>,
    jwks_keys: Gauge,
}

/// The lease protocol's series (README "Many replicas"), exposed only with `[redis]`.
struct FleetMetrics {
    lease_up: Gauge,
    lease_remaining: Gauge<f64, std::sync::atomic::AtomicU64>,
    lease_lapses: Counter,
    renewal_failures: Counter,
    resync_purges: Family<Reason, Counter>,
    invalidations_applied: Counter,
    replicas_live: Gauge,
    acks_awaited: Counter,
    ack_latency: Histogram,
    ack_wait: Histogram,
    acks_missed: Counter,
    lease_expiry_waits: Counter,
    fence_waits: Counter,
    writes_refused: Counter,
    reads_without_lease: Counter,
}

fn ack_buckets() -> Histogram {
    // 100 µs .. ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

const LEASE_UP: Desc = (
    "permgate_fleet_lease_up",
    "1 while this replica holds a live lease (serves hits, accepts writes)",
);
const LEASE_REMAINING: Desc = (
    "permgate_fleet_lease_remaining_seconds",
    "Time left on this replica's lease; 0 without one",
);
const LEASE_LAPSES: Desc = (
    "permgate_fleet_lease_lapses",
    "Times this replica's lease ran out (reads go upstream, writes are refused until renewed)",
);
const RENEWAL_FAILURES: Desc = (
    "permgate_fleet_lease_renewal_failures",
    "Lease renewals that failed or came back too late to use",
);
const RESYNC_PURGES: Desc = (
    "permgate_fleet_resync_purges",
    "Whole local cache drops on resynchronisation (gap, incarnation, rollback)",
);
const INVALIDATIONS_APPLIED: Desc = (
    "permgate_fleet_invalidations_applied",
    "Fleet invalidations (stream entries) applied here",
);
const REPLICAS_LIVE: Desc = (
    "permgate_fleet_replicas_live",
    "Live leases in the registry at the last renewal, this one included",
);
const ACKS_AWAITED: Desc = (
    "permgate_fleet_acks_awaited",
    "Other replicas' acknowledgements that writes and purges waited for",
);
const ACK_LATENCY: Desc = (
    "permgate_fleet_ack_latency_seconds",
    "Publish to acknowledgement seen, per acknowledging replica",
);
const ACK_WAIT: Desc = (
    "permgate_fleet_ack_wait_seconds",
    "Publish to end of the wait, per fan-out, whatever ended it",
);
const ACKS_MISSED: Desc = (
    "permgate_fleet_acks_missed",
    "Replicas a fan-out stopped waiting for because their lease ran out instead",
);
const LEASE_EXPIRY_WAITS: Desc = (
    "permgate_fleet_writes_waited_for_lease_expiry",
    "Fan-outs in which at least one replica's lease had to run out",
);
const FENCE_WAITS: Desc = (
    "permgate_fleet_fence_waits",
    "Fan-outs that waited for a new Redis incarnation's fence",
);
const WRITES_REFUSED: Desc = (
    "permgate_fleet_writes_refused",
    "Writes answered 503 because this replica held no lease",
);
const READS_WITHOUT_LEASE: Desc = (
    "permgate_fleet_reads_without_lease",
    "List reads answered without a lease (from upstream, or degraded_ttl_seconds pages)",
);

impl FleetMetrics {
    fn build(exposed: bool, r: &mut Registry) -> FleetMetrics {
        FleetMetrics {
            lease_up: register_if(exposed, r, LEASE_UP, Gauge::default()),
            lease_remaining: register_if(exposed, r, LEASE_REMAINING, Gauge::default()),
            lease_lapses: register_if(exposed, r, LEASE_LAPSES, Counter::default()),
            renewal_failures: register_if(exposed, r, RENEWAL_FAILURES, Counter::default()),
            resync_purges: register_if(exposed, r, RESYNC_PURGES, Family::default()),
            invalidations_applied: register_if(
                exposed,
                r,
                INVALIDATIONS_APPLIED,
                Counter::default(),
            ),
            replicas_live: register_if(exposed, r, REPLICAS_LIVE, Gauge::default()),
            acks_awaited: register_if(exposed, r, ACKS_AWAITED, Counter::default()),
            ack_latency: register_if(exposed, r, ACK_LATENCY, ack_buckets()),
            ack_wait: register_if(exposed, r, ACK_WAIT, ack_buckets()),
            acks_missed: register_if(exposed, r, ACKS_MISSED, Counter::default()),
            lease_expiry_waits: register_if(exposed, r, LEASE_EXPIRY_WAITS, Counter::default()),
            fence_waits: register_if(exposed, r, FENCE_WAITS, Counter::default()),
            writes_refused: register_if(exposed, r, WRITES_REFUSED, Counter::default()),
            reads_without_lease: register_if(exposed, r, READS_WITHOUT_LEASE, Counter::default()),
        }
    }
}

/// Values read from elsewhere when `/metrics` is scraped.
pub struct Snapshot {
    pub cache_entries: u64,
    pub cache_bytes: u64,
    /// 0 closed, 1 half-open, 2 open.
    pub circuit: i64,
    pub in_flight: usize,
    /// `None` without `[redis]`.
    pub redis_up: Option<bool>,
    /// `None` without `[redis]`.
    pub lease: Option<LeaseSnapshot>,
}

/// The lease as seen at a scrape.
pub struct LeaseSnapshot {
    pub up: bool,
    pub remaining_seconds: f64,
    pub replicas_live: u64,
}

fn latency_buckets() -> Histogram {
    // 100 µs .. ~26 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A registered metric's name and help text. Dashboards and tests depend on the names; a
/// counter is exposed with `_total` appended.
type Desc = (&'static str, &'static str);

const REQUESTS: Desc = (
    "permgate_requests",
    "Requests on the data listener by route, status class, cache status and client",
);
const REQUEST_DURATION: Desc = (
    "permgate_request_duration_seconds",
    "Time to answer a request on the data listener",
);
const UPSTREAM_REQUESTS: Desc = (
    "permgate_upstream_requests",
    "Upstream attempts by status (or error kind) and attempt number",
);
const UPSTREAM_DURATION: Desc = (
    "permgate_upstream_duration_seconds",
    "Time of one upstream attempt",
);
const CACHE_EVICTIONS: Desc = (
    "permgate_cache_evictions",
    "Pages evicted from the cache to stay within cache.max_bytes",
);
const COALESCED_WAITS: Desc = (
    "permgate_cache_coalesced_waits",
    "Requests that waited on another request's identical upstream fetch (a miss, or a no-cache refresh)",
);
const CACHE_ENTRIES: Desc = (
    "permgate_cache_entries",
    "Pages in the cache (including dead generations not yet dropped)",
);
const CACHE_BYTES: Desc = (
    "permgate_cache_bytes",
    "Weighed bytes of the cached pages (bounded by cache.max_bytes)",
);
const RATE_LIMITED: Desc = (
    "permgate_rate_limited",
    "Requests refused with 429 by a client's rate limit",
);
const FRAMING_REFUSALS_DESC: Desc = (
    "permgate_framing_refusals",
    "Request heads refused at the front door (400, 414 or 431 with permgate's JSON error, connection closed): ambiguous length, a Transfer-Encoding other than exactly chunked, a Content-Length that is not one number, a head too large, a head hyper could not parse",
);
const SHED: Desc = (
    "permgate_shed",
    "Requests answered 503 without calling upstream (queue full, client over its share, circuit open)",
);
const CIRCUIT_STATE: Desc = (
    "permgate_upstream_circuit_state",
    "Upstream circuit breaker: 0 closed, 1 half-open, 2 open",
);
const IN_FLIGHT: Desc = (
    "permgate_in_flight_requests",
    "Requests on the data listener being answered now",
);
const KEY_RELOADS: Desc = (
    "permgate_admin_key_reloads",
    "Reloads of the admin key and client list, by result",
);
const AUDIT_FAILURES: Desc = (
    "permgate_audit_write_failures",
    "Audit records that could not be written to audit.path",
);
const FLEET_REDIS_UP: Desc = (
    "permgate_fleet_redis_up",
    "1 while the connection to Redis works ([redis] only)",
);
const FLEET_DEGRADED: Desc = (
    "permgate_fleet_degraded",
    "Times the connection to Redis was lost (the lease then lapses unless it comes back in time)",
);
const FLEET_CONNECTS: Desc = (
    "permgate_fleet_connects",
    "Connections (and reconnections) to Redis",
);
const FLEET_SHARED_HITS: Desc = (
    "permgate_fleet_shared_hits",
    "Local misses answered from the fleet's shared cache in Redis",
);
const FLEET_SHARES_DROPPED: Desc = (
    "permgate_fleet_shares_dropped",
    "Fetched pages not shared (or fetch locks not released) through Redis: the queue for Redis was full",
);
const TLS_RELOADS: Desc = (
    "permgate_tls_reloads",
    "Reloads of the data listener's certificate and key ([server.tls]), by result",
);
const JWT_VERIFICATIONS: Desc = (
    "permgate_jwt_verifications",
    "JWT signature and claim checks, by result (ok, or why the token was refused)",
);
const JWT_REMEMBERED: Desc = (
    "permgate_jwt_remembered",
    "JWTs accepted from memory: verified before, keys unchanged, not expired",
);
const JWKS_RELOADS: Desc = (
    "permgate_jwks_reloads",
    "Loads of the JWKS ([jwt] jwks_file or jwks_url), by result",
);
const JWKS_KEYS: Desc = (
    "permgate_jwks_keys",
    "Usable keys (RS256, ES256) in the JWKS last loaded",
);
const BUILD: Desc = (
    "permgate_build_info",
    "Build information: 1, with the version as a label",
);

/// Registers `metric` under a name and help text and returns it: a clone shares the registered
/// series.
fn register<M: Metric + Clone>(registry: &mut Registry, (name, help): Desc, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// [`register`] when `exposed`; otherwise the metric still counts, unseen.
fn register_if<M: Metric + Clone>(
    exposed: bool,
    registry: &mut Registry,
    desc: Desc,
    metric: M,
) -> M {
    if exposed {
        register(registry, desc, metric)
    } else {
        metric
    }
}

impl Metrics {
    /// A gateway's metrics, without the fleet's.
    pub fn new() -> Metrics {
        Self::build(false)
    }

    /// With `fleet`, the `permgate_fleet_*` series are exposed too (a gateway with `[redis]`);
    /// without, they are not, so no dashboard or alert reads a Redis that is not there.
    pub fn build(fleet: bool) -> Metrics {
        let mut registry = Registry::default();
        let r = &mut registry;
        // Fields are evaluated in the order written, which is the order of exposition. The
        // build info comes last, then the filled registry replaces this placeholder.
        let m = Metrics {
            requests: register(r, REQUESTS, Family::default()),
            request_duration: register(
                r,
                REQUEST_DURATION,
                Family::new_with_constructor(latency_buckets),
            ),
            durations: Default::default(),
            anonymous: ClientSeries::new(ClientLabel(Arc::from("-"))),
            upstream_requests: register(r, UPSTREAM_REQUESTS, Family::default()),
            upstream_duration: register(r, UPSTREAM_DURATION, latency_buckets()),
            cache_evictions: register(r, CACHE_EVICTIONS, Counter::default()),
            coalesced_waits: register(r, COALESCED_WAITS, Counter::default()),
            cache_entries: register(r, CACHE_ENTRIES, Gauge::default()),
            cache_bytes: register(r, CACHE_BYTES, Gauge::default()),
            rate_limited: register(r, RATE_LIMITED, Family::default()),
            shed: register(r, SHED, Family::default()),
            framing_refusals: register(r, FRAMING_REFUSALS_DESC, Family::default()),
            circuit_open: register(r, CIRCUIT_STATE, Gauge::default()),
            in_flight: register(r, IN_FLIGHT, Gauge::default()),
            key_reloads: register(r, KEY_RELOADS, Family::default()),
            audit_failures: register(r, AUDIT_FAILURES, Counter::default()),
            fleet_up: register_if(fleet, r, FLEET_REDIS_UP, Gauge::default()),
            fleet_degraded: register_if(fleet, r, FLEET_DEGRADED, Counter::default()),
            fleet_connects: register_if(fleet, r, FLEET_CONNECTS, Counter::default()),
            fleet_shared_hits: register_if(fleet, r, FLEET_SHARED_HITS, Counter::default()),
            fleet_shares_dropped: register_if(fleet, r, FLEET_SHARES_DROPPED, Counter::default()),
            fleet: FleetMetrics::build(fleet, r),
            tls_reloads: register(r, TLS_RELOADS, Family::default()),
            jwt_verifications: register(r, JWT_VERIFICATIONS, Family::default()),
            jwt_remembered: register(r, JWT_REMEMBERED, Counter::default()),
            jwks_reloads: register(r, JWKS_RELOADS, Family::default()),
            jwks_keys: register(r, JWKS_KEYS, Gauge::default()),
            registry: Registry::default(),
        };
        // A gauge at 1, not OpenMetrics' `info` type: the older text format's tools (promtool
        // check metrics, other scrapers) know no `info`, and the series is the same.
        let build: Family<BuildLabels, Gauge> = register(&mut registry, BUILD, Family::default());
        let version = env!("CARGO_PKG_VERSION");
        build.get_or_create(&BuildLabels { version }).set(1);
        // Series that alerts watch for their first increment exist from the start, at 0.
        for result in ["success", "failure"] {
            drop(m.key_reloads.get_or_create(&Outcome { result }));
            drop(m.tls_reloads.get_or_create(&Outcome { result }));
        }
        for why in [Shed::QueueFull, Shed::CircuitOpen, Shed::ClientConcurrency] {
            drop(m.shed.get_or_create(&Reason {
                reason: why.reason(),
            }));
        }
        for reason in FRAMING_REFUSALS {
            drop(m.framing_refusals.get_or_create(&Reason { reason }));
        }
        Metrics { registry, ..m }
    }

    /// Counts a finished request of `client` (`None`: unauthenticated) and its duration.
    pub fn request(&self, client: Option<&ClientSeries>, outcome: RequestOutcome, seconds: f64) {
        let series = client.unwrap_or(&self.anonymous);
        let slot = outcome.slot();
        let counter = series.counters[slot].get_or_init(|| {
            self.requests
                .get_or_create(&outcome.labels(&series.label))
                .clone()
        });
        counter.inc();
        self.durations[outcome.route_index()]
            .get_or_init(|| {
                let route = outcome.route.map_or("unmatched", Operation::as_str);
                self.request_duration
                    .get_or_create(&RouteLabel { route })
                    .clone()
            })
            .observe(seconds);
    }

    /// One upstream attempt: its HTTP status, or `error` / `timeout`.
    pub fn upstream_attempt(
        &self,
        status: Option<u16>,
        timed_out: bool,
        attempt: u32,
        seconds: f64,
    ) {
        let status = match (status, timed_out) {
            (Some(code), _) => status_label(code),
            (None, true) => "timeout",
            (None, false) => "error",
        };
        let attempt = match attempt {
            1 => "1",
            2 => "2",
            3 => "3",
            _ => "4+",
        };
        self.upstream_requests
            .get_or_create(&UpstreamLabels { status, attempt })
            .inc();
        self.upstream_duration.observe(seconds);
    }

    pub fn coalesced_wait(&self) {
        self.coalesced_waits.inc();
    }

    pub fn rate_limited(&self, client: &ClientLabel) {
        self.rate_limited
            .get_or_create(&ClientOnly {
                client: client.clone(),
            })
            .inc();
    }

    /// A request head the framing guard refused; `reason` is one of [`FRAMING_REFUSALS`].
    pub fn framing_refused(&self, reason: &'static str) {
        self.framing_refusals
            .get_or_create(&Reason { reason })
            .inc();
    }

    pub fn shed(&self, why: Shed) {
        let reason = why.reason();
        self.shed.get_or_create(&Reason { reason }).inc();
    }

    pub fn key_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.key_reloads.get_or_create(&Outcome { result }).inc();
    }

    pub fn audit_failure(&self) {
        self.audit_failures.inc();
    }

    pub fn fleet_degraded(&self) {
        self.fleet_degraded.inc();
    }

    pub fn fleet_connected(&self) {
        self.fleet_connects.inc();
    }

    pub fn fleet_shared_hit(&self) {
        self.fleet_shared_hits.inc();
    }

    pub fn fleet_share_dropped(&self) {
        self.fleet_shares_dropped.inc();
    }

    pub fn fleet_lease_lapsed(&self) {
        self.fleet.lease_lapses.inc();
    }

    pub fn fleet_renewal_failed(&self) {
        self.fleet.renewal_failures.inc();
    }

    /// `reason`: `gap`, `incarnation` or `rollback`.
    pub fn fleet_resync_purge(&self, reason: &'static str) {
        self.fleet
            .resync_purges
            .get_or_create(&Reason { reason })
            .inc();
    }

    pub fn fleet_invalidation_applied(&self) {
        self.fleet.invalidations_applied.inc();
    }

    pub fn fleet_ack_latency(&self, seconds: f64) {
        self.fleet.ack_latency.observe(seconds);
    }

    /// One fan-out's wait: `awaited` other replicas, `missed` of them by lease expiry instead of
    /// an ack, whether it waited for a fence, and how long it took in all.
    pub fn fleet_fanout(&self, awaited: u64, missed: u64, fenced: bool, seconds: f64) {
        let f = &self.fleet;
        f.acks_awaited.inc_by(awaited);
        f.acks_missed.inc_by(missed);
        if missed > 0 {
            f.lease_expiry_waits.inc();
        }
        if fenced {
            f.fence_waits.inc();
        }
        f.ack_wait.observe(seconds);
    }

    pub fn fleet_write_refused(&self) {
        self.fleet.writes_refused.inc();
    }

    pub fn fleet_read_without_lease(&self) {
        self.fleet.reads_without_lease.inc();
    }

    /// A certificate and key read by `tls::watch`: swapped in (`ok`) or refused.
    pub fn tls_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.tls_reloads.get_or_create(&Outcome { result }).inc();
    }

    /// One JWT checked: `result` is `ok` or a `jwt::Rejection` label (a closed set).
    pub fn jwt_verification(&self, result: &'static str) {
        self.jwt_verifications
            .get_or_create(&Outcome { result })
            .inc();
    }

    pub fn jwt_remembered(&self) {
        self.jwt_remembered.inc();
    }

    pub fn jwks_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.jwks_reloads.get_or_create(&Outcome { result }).inc();
    }

    pub fn jwks_keys(&self, count: usize) {
        self.jwks_keys.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition, with scrape-time gauges set from `snapshot`.
    pub fn render(&self, snapshot: Snapshot) -> String {
        self.cache_entries
            .set(i64::try_from(snapshot.cache_entries).unwrap_or(i64::MAX));
        self.cache_bytes
            .set(i64::try_from(snapshot.cache_bytes).unwrap_or(i64::MAX));
        self.circuit_open.set(snapshot.circuit);
        self.in_flight
            .set(i64::try_from(snapshot.in_flight).unwrap_or(i64::MAX));
        if let Some(up) = snapshot.redis_up {
            self.fleet_up.set(i64::from(up));
        }
        if let Some(lease) = snapshot.lease {
            self.fleet.lease_up.set(i64::from(lease.up));
            self.fleet.lease_remaining.set(lease.remaining_seconds);
            self.fleet
                .replicas_live
                .set(i64::try_from(lease.replicas_live).unwrap_or(i64::MAX));
        }
        let mut out = String::with_capacity(8 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# encoding failed");
        }
        out
    }
}

/// Status codes as static label values: the common ones exactly, the rest by class.
fn status_label(code: u16) -> &'static str {
    match code {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => status_class(code),
    }
}

/// `1xx` .. `5xx`.
fn status_class(code: u16) -> &'static str {
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_names() {
        let m = Metrics::new();
        let client = ClientLabel("billing".into());
        let series = ClientSeries::new(client.clone());
        let hit = RequestOutcome {
            route: Some(Operation::List),
            status: 200,
            cache_status: Some(CacheStatus::Hit),
        };
        m.request(Some(&series), hit, 0.001);
        m.request(Some(&series), hit, 0.002);
        let unmatched = RequestOutcome {
            route: None,
            status: 404,
            cache_status: Some(CacheStatus::Bypass),
        };
        m.request(None, unmatched, 0.001);
        m.upstream_attempt(Some(200), false, 1, 0.01);
        m.rate_limited(&client);
        m.key_reload(false);
        let text = m.render(Snapshot {
            cache_entries: 3,
            cache_bytes: 900,
            circuit: 0,
            in_flight: 1,
            redis_up: None,
            lease: None,
        });
        for needle in [
            "permgate_requests_total{route=\"list_permissions\",status_class=\"2xx\",cache_status=\"hit\",client=\"billing\"} 2",
            "permgate_requests_total{route=\"unmatched\",status_class=\"4xx\",cache_status=\"bypass\",client=\"-\"} 1",
            "permgate_request_duration_seconds_count{route=\"list_permissions\"} 2",
            "permgate_request_duration_seconds_count{route=\"unmatched\"} 1",
            "permgate_upstream_requests_total{status=\"200\",attempt=\"1\"} 1",
            "permgate_cache_entries 3",
            "permgate_cache_bytes 900",
            "permgate_rate_limited_total{client=\"billing\"} 1",
            "permgate_admin_key_reloads_total{result=\"failure\"} 1",
            "permgate_build_info{version=",
            "permgate_upstream_circuit_state 0",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
        assert!(
            !text.contains("permgate_fleet_"),
            "fleet series without [redis]"
        );
        assert!(text.contains("permgate_shed_total{reason=\"circuit_open\"} 0"));
        assert!(text.contains("permgate_admin_key_reloads_total{result=\"success\"} 0"));
        let snapshot = Snapshot {
            cache_entries: 0,
            cache_bytes: 0,
            circuit: 0,
            in_flight: 0,
            redis_up: Some(false),
            lease: Some(LeaseSnapshot {
                up: false,
                remaining_seconds: 0.0,
                replicas_live: 2,
            }),
        };
        let fleet = Metrics::build(true).render(snapshot);
        assert!(fleet.contains("permgate_fleet_redis_up 0"), "{fleet}");
        assert!(fleet.contains("permgate_fleet_lease_up 0"), "{fleet}");
        assert!(fleet.contains("permgate_fleet_replicas_live 2"), "{fleet}");
        assert!(
            fleet.contains("permgate_fleet_writes_refused_total 0"),
            "{fleet}"
        );
    }
}
