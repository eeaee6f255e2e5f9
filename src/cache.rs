//! The page cache (SPEC "Caching"): moka, keyed by checkpoint + normalized query, bounded by
//! bytes, with coalesced fills and invalidation that an in-flight fill cannot undo.
//!
//! Three rules, each visible below:
//! - **Generations beat racing fills.** Every key carries the generation of its checkpoint,
//!   read *before* the upstream call. A write bumps the generation, so a fill that started
//!   before the write lands under a key no reader will ever look up again. Generations live in
//!   a fixed array of shards indexed by a hash of the checkpoint: bounded memory, no locks, and
//!   no eviction that could hand an old generation back. Two checkpoints sharing a shard only
//!   cost each other a spurious miss.
//! - **permgate decides freshness** from `stored_at` and an injectable [`Clock`]; moka's
//!   expiry (a 200: fresh + stale windows, a 404: `negative_ttl`) only bounds memory.
//! - **Only what may be stored is stored**: a fill that must not be cached returns `Err`, and
//!   the fill map hands the same `Err` to every coalesced waiter (but a client's own shed to
//!   that client's waiters only: see [`Sheds`]).
//! - **A stale page stays in place while it is refetched**: concurrent fills are coalesced in a
//!   separate map of fills in flight (`fills`), not by removing the page, so when upstream
//!   fails every waiter can still answer with the stale page inside `stale_if_error`.
//! - **A `no-cache` read never gets an answer older than itself**: concurrent refreshes of one
//!   key share one fetch (`refreshes`), but a read joins only a fetch that starts after it
//!   arrived: the next one, or a running one whose start ticket is later than the read's.
//!
//! A key is hashed once, when it is made ([`PageCache::key`]); moka and the fill map reuse that
//! hash. The hasher is foldhash with a per-process random seed: fast, and only authenticated
//! callers can choose keys at all.
//!
//! No hyper types beyond `StatusCode` and `Bytes`; no I/O.

use std::collections::hash_map::{Entry, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::StatusCode;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use moka::Expiry;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::error::{Error, Passthrough};
use crate::route::{Checkpoint, ListQuery};

const GENERATION_SHARDS: usize = 4096;
/// Dead pages are swept from memory at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// What a cached page costs beyond its body and its key's strings, as measured (valgrind
/// massif and resident memory with 100,000 pages, benches/README.md): moka's entry (the key it
/// keeps in an `Arc`, entry info, deque nodes, hash table slot), the page header, the body's
/// shared handle and the allocator's rounding. Resident memory grew by 752 bytes per page
/// beyond its body, the checkpoint string's allocation (~64, weighed as its length) included;
/// this leaves some 30 bytes of headroom. Weighing it keeps `cache.max_bytes` a bound on memory
/// even when pages are small.
const ENTRY_OVERHEAD: usize = 736;

/// A cache key: the checkpoint, its normalized query, and the generation read before the fill.
/// Carries its own hash (of all the other fields), computed once by [`PageCache::key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageKey {
    hash: u64,
    pub checkpoint: Checkpoint,
    pub query: ListQuery,
    shard: u16,
    generation: u64,
}

impl Hash for PageKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The hasher of maps keyed by [`PageKey`]: the key's hash is already mixed, pass it through.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `PageKey` is hashed with this (one `write_u64`); anything else still hashes.
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type ByKeyHash = BuildHasherDefault<KeyHasher>;

/// A stored upstream answer: a 200 list page, or a 404 when negative caching is on.
#[derive(Debug)]
pub struct Page {
    pub status: StatusCode,
    /// A compact copy: never a slice of hyper's receive buffer, so the weighed bytes are the
    /// bytes held.
    pub body: Bytes,
    pub stored_at: Instant,
    fresh_for: Duration,
    keep_for: Duration,
    refreshing: AtomicBool,
}

impl Page {
    /// Claims the single background refresh of this (stale) page. True for exactly one caller
    /// until [`Page::release_refresh`].
    pub fn claim_refresh(&self) -> bool {
        self.refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// How long the page can be of use: a 200 through its stale windows, a 404 its
    /// `negative_ttl` (moka's expiry, and the lifetime of the fleet's shared copy).
    /// How long after it was stored the page counts as fresh.
    pub fn fresh_for(&self) -> Duration {
        self.fresh_for
    }

    pub fn keep_for(&self) -> Duration {
        self.keep_for
    }

    /// Lets a later request try again after a refresh that failed.
    pub fn release_refresh(&self) {
        self.refreshing.store(false, Ordering::Release);
    }
}

/// How usable a stored page is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Past its TTL but inside `stale_while_revalidate`: serve it and refresh in the background.
    StaleWhileRevalidate,
    /// Past both; usable only if upstream fails, while inside `stale_if_error`.
    StaleIfError,
    Expired,
}

/// What the cache did for a GET: one RFC 9211 `Cache-Status` value each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Fresh page from the cache.
    Hit,
    /// Stale page served at once while one background refresh runs.
    StaleHit,
    /// Upstream failed; a stale page inside `stale_if_error` was served instead.
    StaleIfError,
    /// This request's fill fetched and stored the page.
    MissStored,
    /// Fetched, not storable (passed through) or failed.
    Miss,
    /// Waited on another request's fill (or found what it had just stored).
    Collapsed,
    /// `Cache-Control: no-cache`: fetched and stored.
    RefreshStored,
    /// `Cache-Control: no-cache`: fetched, not storable.
    Refresh,
    /// `Cache-Control: no-cache`: shared a refresh that started after this request arrived.
    RefreshCollapsed,
    /// Rejected before the cache was consulted (bad route, token, input).
    Bypass,
    /// No fleet lease: fetched from upstream (a fetch that started after the read arrived).
    NoLease,
    /// No fleet lease: shared such a fetch with other reads.
    NoLeaseCollapsed,
    /// No fleet lease, yet served from the cache (`redis.degraded_ttl_seconds` > 0).
    NoLeaseHit,
    /// A write refused for lack of a fleet lease.
    NoLeaseWrite,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "permgate; hit",
            CacheStatus::StaleHit => "permgate; hit; detail=stale-while-revalidate",
            CacheStatus::StaleIfError => "permgate; fwd=stale; detail=stale-if-error",
            CacheStatus::MissStored => "permgate; fwd=miss; stored",
            CacheStatus::Miss => "permgate; fwd=miss",
            CacheStatus::Collapsed => "permgate; fwd=miss; collapsed",
            CacheStatus::RefreshStored => "permgate; fwd=request; stored",
            CacheStatus::Refresh => "permgate; fwd=request",
            CacheStatus::RefreshCollapsed => "permgate; fwd=request; collapsed",
            CacheStatus::Bypass => "permgate; fwd=bypass",
            CacheStatus::NoLease => "permgate; fwd=miss; detail=no-lease",
            CacheStatus::NoLeaseCollapsed => "permgate; fwd=miss; collapsed; detail=no-lease",
            CacheStatus::NoLeaseHit => "permgate; hit; detail=no-lease",
            CacheStatus::NoLeaseWrite => "permgate; fwd=bypass; detail=no-lease",
        }
    }

    /// The short name used in logs and span fields.
    pub fn name(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::StaleHit => "stale_hit",
            CacheStatus::StaleIfError => "stale_if_error",
            CacheStatus::MissStored => "miss_stored",
            CacheStatus::Miss => "miss",
            CacheStatus::Collapsed => "collapsed",
            CacheStatus::RefreshStored => "refresh_stored",
            CacheStatus::Refresh => "refresh",
            CacheStatus::RefreshCollapsed => "refresh_collapsed",
            CacheStatus::Bypass => "bypass",
            CacheStatus::NoLease => "no_lease",
            CacheStatus::NoLeaseCollapsed => "no_lease_collapsed",
            CacheStatus::NoLeaseHit => "no_lease_hit",
            CacheStatus::NoLeaseWrite => "no_lease_write",
        }
    }
}

/// Why a fill stored nothing. Shared (via `Arc`) by every coalesced waiter.
#[derive(Debug)]
pub enum FillError {
    /// An upstream answer to pass through but not to store (non-200, or 404 without negative
    /// caching).
    Uncacheable(Passthrough),
    Failed(Error),
    /// The 503 of the client whose read led the fetch: that client held all its upstream
    /// slots (`max_concurrency_per_client`). Its own reads share it; another client's reads
    /// are not refused by it (see [`PageCache::fill`]).
    ClientShed {
        client: Arc<str>,
        error: Error,
    },
}

/// One read's view of the fills it waited on that ended in another client's own shed
/// ([`FillError::ClientShed`]). That 503 is its client's, not the page's: the shed client's
/// reads take it, and a read of another client goes on. It never waits again on a fill led by
/// a client shed under it. It waits on any other client's fill until two clients were shed
/// under it, and after that only on its own client's fills and on fills led by reads that
/// went on as it did. A fill it may not wait on it takes over: its fill replaces that one at
/// the key, so the reads that come after join it, and the replaced fill carries on for those
/// already waiting on it. So each client sheds a read at most once, one client's flood never
/// refuses another client's reads, and the reads that go on share one fetch (the first of
/// them takes over; the others, of any client, join it).
struct Sheds<'a> {
    /// The reading client.
    reader: &'a Arc<str>,
    /// The clients whose shed this read inherited.
    by: Vec<Arc<str>>,
}

impl<'a> Sheds<'a> {
    fn of(reader: &'a Arc<str>) -> Sheds<'a> {
        Sheds {
            reader,
            by: Vec::new(),
        }
    }

    /// Whether this read may wait on `fill`.
    fn may_join(&self, fill: &Fill) -> bool {
        let leader = &fill.led_by;
        leader == self.reader
            || (!self.by.contains(leader) && (self.by.len() < 2 || fill.after_shed))
    }

    /// The waited-on fill's outcome as this read's answer, or `None` to go on: its leader was
    /// cancelled, or it ended in another client's own shed (noted).
    fn outcome(&mut self, outcome: Option<FillOutcome>) -> Option<FillOutcome> {
        if let Some(Err(failure)) = &outcome {
            if let FillError::ClientShed { client, .. } = &**failure {
                if client != self.reader {
                    self.by.push(client.clone());
                    return None;
                }
            }
        }
        outcome
    }
}

/// Expires negative (404) pages after their `negative_ttl`; 200s have no per-entry expiry (the
/// cache-wide time-to-live is theirs), so moka keeps no timer for them.
struct NegativeExpiry;

impl NegativeExpiry {
    fn lifetime(page: &Page) -> Option<Duration> {
        (page.status != StatusCode::OK).then_some(page.keep_for)
    }
}

impl Expiry<PageKey, Arc<Page>> for NegativeExpiry {
    fn expire_after_create(&self, _: &PageKey, page: &Arc<Page>, _: Instant) -> Option<Duration> {
        Self::lifetime(page)
    }

    /// A 404 replaced by a 200 (or the reverse) takes the new page's lifetime.
    fn expire_after_update(
        &self,
        _: &PageKey,
        page: &Arc<Page>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Self::lifetime(page)
    }
}

/// One fill in flight: its leader publishes the outcome and wakes the waiters. A leader that
/// goes away without an outcome wakes them too, and one of them leads.
struct Fill {
    outcome: OnceLock<FillOutcome>,
    done: Notify,
    /// The client whose read leads it (whose upstream slots its fetch takes).
    led_by: Arc<str>,
    /// Led by a read that went on after another client's shed (see [`Sheds`]).
    after_shed: bool,
    /// A refresh's ticket from when it started running (see [`PageCache::refresh`]).
    started: AtomicU64,
}

impl Fill {
    /// A fill led by this read (its client and what it saw: see [`Sheds`]).
    fn led_by(read: &Sheds<'_>) -> Arc<Fill> {
        Arc::new(Fill {
            outcome: OnceLock::new(),
            done: Notify::new(),
            led_by: read.reader.clone(),
            after_shed: !read.by.is_empty(),
            started: AtomicU64::new(0),
        })
    }

    /// Marks a refresh as running from now, with the next ticket.
    fn start(&self, tickets: &AtomicU64) {
        let ticket = tickets.fetch_add(1, Ordering::Relaxed);
        self.started.store(ticket, Ordering::Relaxed);
    }

    /// The outcome once the fill is done; `done` must have been made while the fill was still
    /// in its map, so the wake-up cannot be missed. `None`: its leader went away without one.
    async fn outcome_after(&self, done: Notified<'_>) -> Option<FillOutcome> {
        if self.outcome.get().is_none() {
            done.await;
        }
        self.outcome.get().cloned()
    }
}

/// What every caller of one fill gets: the stored page, or why nothing was stored.
pub type FillOutcome = Result<Arc<Page>, Arc<FillError>>;

/// Removes a fill from the map when its leader finishes or is dropped (cancelled), then wakes
/// its waiters.
struct Leading<'a> {
    fills: &'a Mutex<HashMap<PageKey, Arc<Fill>, ByKeyHash>>,
    key: &'a PageKey,
    fill: Arc<Fill>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let mut fills = self.fills.lock().unwrap_or_else(PoisonError::into_inner);
        if fills
            .get(self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
        {
            fills.remove(self.key);
        }
        drop(fills);
        self.fill.done.notify_waiters();
    }
}

impl Leading<'_> {
    /// Hands the outcome to the waiters (on drop, which also clears the map entry).
    fn publish(self, outcome: FillOutcome) {
        let _ = self.fill.outcome.set(outcome);
    }
}

/// A key's `no-cache` refreshes in flight: the one fetching, and the one that starts when it
/// ends. A read joins `next`, or `running` only if it started after the read arrived (by
/// their tickets): otherwise `running` may have asked upstream before the read arrived.
#[derive(Default)]
struct Refreshes {
    running: Option<Arc<Fill>>,
    next: Option<Arc<Fill>>,
}

type RefreshMap = Mutex<HashMap<PageKey, Refreshes, ByKeyHash>>;

/// The leader of one refresh: waiting as `next`, then (after [`Refreshing::start`]) as
/// `running`. Leaves the map when it finishes or is dropped (cancelled), then wakes its
/// waiters, who take over if it left without an outcome.
struct Refreshing<'a> {
    refreshes: &'a RefreshMap,
    key: &'a PageKey,
    fill: Arc<Fill>,
}

impl Refreshing<'_> {
    /// The running refresh has ended: this one is the key's running refresh from now on, and
    /// no later read joins it.
    fn start(&self, tickets: &AtomicU64) {
        let mut refreshes = self
            .refreshes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.fill.start(tickets);
        if let Some(slot) = refreshes.get_mut(self.key) {
            if slot
                .next
                .as_ref()
                .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
            {
                slot.next = None;
            }
            slot.running = Some(self.fill.clone());
        }
    }

    fn publish(self, outcome: FillOutcome) {
        let _ = self.fill.outcome.set(outcome);
    }
}

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        let mut refreshes = self
            .refreshes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = refreshes.get_mut(self.key) {
            let mine =
                |f: &Option<Arc<Fill>>| f.as_ref().is_some_and(|f| Arc::ptr_eq(f, &self.fill));
            if mine(&slot.running) {
                slot.running = None;
            }
            if mine(&slot.next) {
                slot.next = None;
            }
            if slot.running.is_none() && slot.next.is_none() {
                refreshes.remove(self.key);
            }
        }
        drop(refreshes);
        self.fill.done.notify_waiters();
    }
}

pub struct PageCache {
    pages: Cache<PageKey, Arc<Page>, ByKeyHash>,
    /// Fills in flight, for coalescing only (never read as a cache). Bounded by the requests
    /// in flight: an entry lives exactly as long as its leading request's fill.
    fills: Mutex<HashMap<PageKey, Arc<Fill>, ByKeyHash>>,
    /// `no-cache` refreshes in flight, bounded the same way.
    refreshes: RefreshMap,
    /// Orders refresh reads' arrivals and refreshes' starts: a read may join a running refresh
    /// whose ticket is later than its own.
    refresh_tickets: AtomicU64,
    generations: Arc<[AtomicU64]>,
    /// When dead pages were last swept (see [`PageCache::sweep_dead_pages`]).
    last_sweep: Mutex<Option<Instant>>,
    /// A write since then found the last sweep too recent: the next upkeep sweeps.
    unswept: AtomicBool,
    hasher: foldhash::fast::RandomState,
    clock: Clock,
    config: CacheConfig,
}

impl PageCache {
    /// `evictions` counts pages dropped to stay within `cache.max_bytes`.
    pub fn new(config: &CacheConfig, clock: Clock, evictions: Counter) -> PageCache {
        // Every 200 lives the same time, which a cache-wide time-to-live expresses for free; a
        // per-entry expiry would cost each page a timer-wheel node (40 bytes plus the
        // allocator's) and its upkeep on every insert. Only negative 404s, which must go sooner
        // (`NegativeExpiry`), pay for one.
        let stale = config.stale_while_revalidate.max(config.stale_if_error);
        let lifetime = (config.ttl + stale).max(config.negative_ttl);
        let pages = Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|key: &PageKey, page: &Arc<Page>| {
                let bytes = ENTRY_OVERHEAD
                    + key.checkpoint.as_str().len()
                    + key.query.heap_bytes()
                    + page.body.len();
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .time_to_live(lifetime)
            .expire_after(NegativeExpiry)
            // Least recently used out first, and every fetched page stored. moka's default
            // (TinyLFU) may refuse to store a fetched page that is not yet popular, so its next
            // request goes upstream again; it resists a scan better (with LRU, one client paging
            // through many distinct pages can push hot pages out of a full cache). Misses at a
            // full cache measured 4-6 % cheaper with LRU (benches/README.md).
            .eviction_policy(EvictionPolicy::lru())
            .support_invalidation_closures()
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build_with_hasher(ByKeyHash::default());
        PageCache {
            pages,
            fills: Mutex::default(),
            refreshes: Mutex::default(),
            refresh_tickets: AtomicU64::new(1),
            generations: (0..GENERATION_SHARDS).map(|_| AtomicU64::new(0)).collect(),
            last_sweep: Mutex::default(),
            unswept: AtomicBool::new(false),
            hasher: foldhash::fast::RandomState::default(),
            clock,
            config: config.clone(),
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn shard_of(checkpoint_hash: u64) -> u16 {
        (checkpoint_hash % GENERATION_SHARDS as u64) as u16
    }

    fn shard(&self, checkpoint: &Checkpoint) -> u16 {
        Self::shard_of(self.hasher.hash_one(checkpoint.as_str()))
    }

    /// The key for a read, stamped with the checkpoint's current generation. Take it *before*
    /// asking upstream.
    pub fn key(&self, checkpoint: Checkpoint, query: ListQuery) -> PageKey {
        let checkpoint_hash = self.hasher.hash_one(checkpoint.as_str());
        let shard = Self::shard_of(checkpoint_hash);
        let generation = self.generations[shard as usize].load(Ordering::Acquire);
        let hash = self.hasher.hash_one((checkpoint_hash, &query, generation));
        PageKey {
            hash,
            checkpoint,
            query,
            shard,
            generation,
        }
    }

    /// Makes every page of `checkpoint` unreachable at once, including any a fill in flight is
    /// about to store. Call after a write, before answering it. The dead pages are then dropped
    /// from memory in the background (see [`PageCache::sweep_dead_pages`]).
    pub fn invalidate_checkpoint(&self, checkpoint: &Checkpoint) {
        let shard = self.shard(checkpoint);
        self.generations[shard as usize].fetch_add(1, Ordering::AcqRel);
        self.sweep_dead_pages();
    }

    /// Has moka drop, in its background upkeep, every page stored so far whose generation is
    /// no longer its shard's, at most once per [`SWEEP_INTERVAL`]. moka checks each registered
    /// sweep against older entries on every read and in its upkeep until the sweep is done, so
    /// one per write would make reads and writes pay in proportion to the write rate (writes
    /// back to back had a tail of tens of milliseconds). Pages that writes kill meanwhile are
    /// unreachable at once and swept by the next upkeep after the interval
    /// ([`PageCache::run_pending_tasks`], every second).
    fn sweep_dead_pages(&self) {
        let now = self.clock.now();
        let Ok(mut last) = self.last_sweep.try_lock() else {
            self.unswept.store(true, Ordering::Relaxed);
            return;
        };
        if last.is_some_and(|at| now.saturating_duration_since(at) < SWEEP_INTERVAL) {
            self.unswept.store(true, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        self.unswept.store(false, Ordering::Relaxed);
        let generations = self.generations.clone();
        let dead = move |key: &PageKey, _: &Arc<Page>| {
            key.generation < generations[key.shard as usize].load(Ordering::Acquire)
        };
        if let Err(e) = self.pages.invalidate_entries_if(dead) {
            tracing::debug!(error = %e, "could not schedule dropping dead pages; they age out instead");
        }
    }

    /// Drops every page (operator purge). In-flight fills land under dead generations.
    pub fn purge_all(&self) {
        for generation in self.generations.iter() {
            generation.fetch_add(1, Ordering::AcqRel);
        }
        self.pages.invalidate_all();
    }

    pub async fn get(&self, key: &PageKey) -> Option<Arc<Page>> {
        self.pages.get(key).await
    }

    pub fn freshness(&self, page: &Page) -> Freshness {
        self.freshness_at(page, self.age(page))
    }

    /// How long ago the page was stored.
    pub fn age(&self, page: &Page) -> Duration {
        self.clock.now().saturating_duration_since(page.stored_at)
    }

    /// [`PageCache::freshness`] for an age already read with [`PageCache::age`].
    pub fn freshness_at(&self, page: &Page, age: Duration) -> Freshness {
        if age < page.fresh_for {
            Freshness::Fresh
        } else if page.status != StatusCode::OK {
            Freshness::Expired
        } else if age < page.fresh_for + self.config.stale_while_revalidate {
            Freshness::StaleWhileRevalidate
        } else if age < page.fresh_for + self.config.stale_if_error {
            Freshness::StaleIfError
        } else {
            Freshness::Expired
        }
    }

    /// Whole seconds since the page was stored (the `Age` header).
    pub fn age_seconds(&self, page: &Page) -> u64 {
        self.age(page).as_secs()
    }

    /// Wraps an upstream body as a storable page, or `None` if this status is not cached
    /// (only 200, and 404 while `negative_ttl_seconds` > 0).
    pub fn page(&self, status: StatusCode, body: &[u8]) -> Option<Arc<Page>> {
        self.aged_page(status, body, Duration::ZERO)
    }

    /// How long a 200 and a 404 stay fresh after they were fetched (a 404 not cached: zero).
    pub fn fresh_windows(&self) -> [Duration; 2] {
        [self.config.ttl, self.config.negative_ttl]
    }

    /// Like [`PageCache::page`] for a page fetched `age` ago (by another replica).
    pub fn aged_page(&self, status: StatusCode, body: &[u8], age: Duration) -> Option<Arc<Page>> {
        let (fresh_for, keep_for) = match status {
            StatusCode::OK => {
                let stale = self
                    .config
                    .stale_while_revalidate
                    .max(self.config.stale_if_error);
                (self.config.ttl, self.config.ttl + stale)
            }
            StatusCode::NOT_FOUND if !self.config.negative_ttl.is_zero() => {
                (self.config.negative_ttl, self.config.negative_ttl)
            }
            _ => return None,
        };
        let now = self.clock.now();
        Some(Arc::new(Page {
            status,
            body: Bytes::copy_from_slice(body),
            stored_at: now.checked_sub(age).unwrap_or(now),
            fresh_for,
            keep_for,
            refreshing: AtomicBool::new(false),
        }))
    }

    /// Fetches and stores the page for `key`, running `fetch` at most once for all concurrent
    /// callers of the same key, and not at all if a fresh page arrived meanwhile. A stale page
    /// already at `key` stays there until the new one replaces it. The bool is true for the
    /// caller whose `fetch` ran (false: collapsed into another caller's fill, or found what it
    /// had just stored). If the caller running `fetch` is cancelled, a waiter takes over.
    ///
    /// `reader` is the caller's client: see [`Sheds`] for what a read does when the fill it
    /// waited on ends in another client's own shed.
    pub async fn fill<F>(&self, key: &PageKey, reader: &Arc<str>, fetch: F) -> (FillOutcome, bool)
    where
        F: std::future::Future<Output = Result<Arc<Page>, FillError>>,
    {
        let mut sheds = Sheds::of(reader);
        let leading = loop {
            let fill;
            let done;
            {
                let mut fills = self.fills.lock().unwrap_or_else(PoisonError::into_inner);
                match fills.entry(key.clone()) {
                    Entry::Occupied(entry) if sheds.may_join(entry.get()) => {
                        fill = entry.get().clone();
                    }
                    entry => {
                        // Vacant, or taken over: a shed client's fill keeps its own waiters
                        // (they hold it), and its leader, finding another fill at the key,
                        // leaves it there.
                        let fill = Fill::led_by(&sheds);
                        match entry {
                            Entry::Occupied(entry) => *entry.into_mut() = fill.clone(),
                            Entry::Vacant(entry) => {
                                entry.insert(fill.clone());
                            }
                        }
                        break Leading {
                            fills: &self.fills,
                            key,
                            fill,
                        };
                    }
                }
                // Made while the entry is still in the map: its leader takes this lock (to
                // remove it, unless it was taken over) before waking the waiters, so this
                // future cannot miss that wake-up, even from a leader cancelled without one.
                done = fill.done.notified();
            }
            match sheds.outcome(fill.outcome_after(done).await) {
                Some(outcome) => return (outcome, false),
                // No outcome for this read: its leader was cancelled, or shed for its own
                // client; lead, join or take over the next fill.
                None => continue,
            }
        };
        if let Some(page) = self.pages.get(key).await {
            if self.freshness(&page) == Freshness::Fresh {
                leading.publish(Ok(page.clone()));
                return (Ok(page), false);
            }
        }
        let outcome = self.fetch_and_store(key, fetch).await;
        leading.publish(outcome.clone());
        (outcome, true)
    }

    /// Fetches `key` afresh for a `no-cache` read and stores a cacheable answer. Concurrent
    /// refreshes of one key share one fetch that started after each of them arrived: a read
    /// never joins a fetch that was under way when it arrived; it joins (or leads) the next
    /// one, which starts when the running one ends (a read that comes back from a cancelled or
    /// shed refresh may also join a running one that started after it arrived, by their
    /// tickets). So a key has at most one refresh fetching and one waiting,
    /// however many reads arrive, but while a read takes over from a shed client (see
    /// [`Sheds`]) that client's refresh may still be fetching beside it. The bool is true for
    /// the caller whose `fetch` ran. If that caller is cancelled, a waiter takes over.
    pub async fn refresh<F>(
        &self,
        key: &PageKey,
        reader: &Arc<str>,
        fetch: F,
    ) -> (FillOutcome, bool)
    where
        F: std::future::Future<Output = Result<Arc<Page>, FillError>>,
    {
        // A refresh that starts running after this ticket fetches after this read arrived.
        let arrived = self.refresh_tickets.fetch_add(1, Ordering::Relaxed);
        let mut sheds = Sheds::of(reader);
        let leading = loop {
            // The fill to wait for: the one to join, or the running one this leader follows.
            let wait_on;
            let follows: Option<Refreshing<'_>>;
            let done;
            {
                let mut refreshes = self
                    .refreshes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let slot = refreshes.entry(key.clone()).or_default();
                // A running refresh only if it started after this read arrived (the read came
                // back from a refresh that was cancelled or shed on it).
                let running = slot.running.clone().filter(|running| {
                    running.started.load(Ordering::Relaxed) > arrived && sheds.may_join(running)
                });
                let next = slot.next.clone().filter(|next| sheds.may_join(next));
                if let Some(joined) = running.or(next) {
                    wait_on = joined;
                    follows = None;
                } else if let Some(running) = slot.running.clone() {
                    // The next refresh, this read's: a new one, or one taking over from a shed
                    // client's (whose leader and waiters hold it and carry on).
                    let fill = Fill::led_by(&sheds);
                    slot.next = Some(fill.clone());
                    wait_on = running;
                    follows = Some(Refreshing {
                        refreshes: &self.refreshes,
                        key,
                        fill,
                    });
                } else {
                    // Nothing running. A next refresh here is a shed client's, yet to start:
                    // it is left to start beside this one.
                    let fill = Fill::led_by(&sheds);
                    fill.start(&self.refresh_tickets);
                    slot.running = Some(fill.clone());
                    slot.next = None;
                    break Refreshing {
                        refreshes: &self.refreshes,
                        key,
                        fill,
                    };
                }
                // Made under the lock, as in `fill`: the wake-up cannot be missed.
                done = wait_on.done.notified();
            }
            let outcome = wait_on.outcome_after(done).await;
            if let Some(leading) = follows {
                leading.start(&self.refresh_tickets);
                break leading;
            }
            match sheds.outcome(outcome) {
                Some(outcome) => return (outcome, false),
                // Cancelled, or another client's shed: join, lead or take over another (it
                // starts after this read).
                None => continue,
            }
        };
        let outcome = self.fetch_and_store(key, fetch).await;
        leading.publish(outcome.clone());
        (outcome, true)
    }

    /// A leader's fetch: the page it returns is stored at `key`.
    async fn fetch_and_store<F>(&self, key: &PageKey, fetch: F) -> FillOutcome
    where
        F: std::future::Future<Output = Result<Arc<Page>, FillError>>,
    {
        match fetch.await {
            Ok(page) => {
                self.pages.insert(key.clone(), page.clone()).await;
                Ok(page)
            }
            Err(e) => Err(Arc::new(e)),
        }
    }

    /// Whether a fill of `key` is under way and, if so, how many reads wait for it (tests and
    /// debugging): the holders of that fill other than the map and its leader, one each.
    pub fn fill_waiters(&self, key: &PageKey) -> Option<usize> {
        let fills = self.fills.lock().unwrap_or_else(PoisonError::into_inner);
        fills.get(key).map(|fill| Arc::strong_count(fill) - 2)
    }

    /// Whether a refresh of `key` is fetching (tests and debugging).
    pub fn refresh_running(&self, key: &PageKey) -> bool {
        let refreshes = self
            .refreshes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        refreshes
            .get(key)
            .is_some_and(|slot| slot.running.is_some())
    }

    /// How many `no-cache` reads of `key` wait for its next refresh to start (tests and
    /// debugging): the holders of that fill other than the map, one each.
    pub fn refresh_waiters(&self, key: &PageKey) -> usize {
        let refreshes = self
            .refreshes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        refreshes
            .get(key)
            .and_then(|slot| slot.next.as_ref())
            .map_or(0, |next| Arc::strong_count(next) - 1)
    }

    /// Stores a page fetched outside `fill` (a background refresh). The key's
    /// generation was taken before the fetch, so a write in between makes this a dead entry.
    pub async fn insert(&self, key: PageKey, page: Arc<Page>) {
        self.pages.insert(key, page).await;
    }

    /// Removes `page` from `key` unless another request already replaced it.
    pub async fn remove_if_same(&self, key: &PageKey, page: &Arc<Page>) {
        self.pages
            .entry_by_ref(key)
            .and_compute_with(|entry| {
                let same = entry.is_some_and(|e| Arc::ptr_eq(e.value(), page));
                std::future::ready(if same { Op::Remove } else { Op::Nop })
            })
            .await;
    }

    pub fn entry_count(&self) -> u64 {
        self.pages.entry_count()
    }

    pub fn weighted_bytes(&self) -> u64 {
        self.pages.weighted_size()
    }

    /// Applies moka's deferred bookkeeping now (the gateway's upkeep every second, tests and
    /// stats), with a sweep of dead pages if writes left some unswept and it is due.
    pub async fn run_pending_tasks(&self) {
        if self.unswept.load(Ordering::Relaxed) {
            self.sweep_dead_pages();
        }
        self.pages.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client of the reads in these tests.
    fn reader() -> Arc<str> {
        Arc::from("reads")
    }

    fn config() -> CacheConfig {
        CacheConfig {
            ttl: Duration::from_secs(60),
            max_bytes: 1 << 20,
            stale_while_revalidate: Duration::from_secs(10),
            stale_if_error: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(5),
        }
    }

    /// A cache the test's tasks share.
    fn shared_cache() -> Arc<PageCache> {
        Arc::new(PageCache::new(
            &config(),
            Clock::default(),
            Counter::default(),
        ))
    }

    fn cp(s: &str) -> Checkpoint {
        Checkpoint::parse(s).unwrap()
    }

    type Fill = Result<Arc<Page>, FillError>;

    fn uncacheable() -> FillError {
        FillError::Uncacheable(Passthrough {
            status: StatusCode::BAD_REQUEST,
            body: Bytes::from_static(b"{}"),
        })
    }

    #[tokio::test]
    async fn a_write_makes_in_flight_fills_unreachable() {
        let cache = PageCache::new(&config(), Clock::default(), Counter::default());
        let before = cache.key(cp("ft:a"), ListQuery::default());
        cache.invalidate_checkpoint(&cp("ft:a"));
        let page = cache.page(StatusCode::OK, b"old").unwrap();
        let (stored, _) = cache
            .fill(&before, &reader(), async { Fill::Ok(page) })
            .await;
        assert!(stored.is_ok());
        let after = cache.key(cp("ft:a"), ListQuery::default());
        assert_ne!(before, after);
        assert!(cache.get(&after).await.is_none());
    }

    #[tokio::test]
    async fn purge_all_kills_every_generation() {
        let cache = PageCache::new(&config(), Clock::default(), Counter::default());
        let key = cache.key(cp("ft:b"), ListQuery::default());
        cache
            .insert(key.clone(), cache.page(StatusCode::OK, b"x").unwrap())
            .await;
        cache.purge_all();
        assert!(cache.get(&key).await.is_none());
        assert_ne!(cache.key(cp("ft:b"), ListQuery::default()), key);
    }

    #[tokio::test]
    async fn invalidation_frees_dead_pages_and_keeps_others() {
        let cache = PageCache::new(&config(), Clock::default(), Counter::default());
        let a = cache.key(cp("ft:a"), ListQuery::default());
        let b = cache.key(cp("ft:b"), ListQuery::default());
        cache
            .insert(a.clone(), cache.page(StatusCode::OK, b"a").unwrap())
            .await;
        cache
            .insert(b.clone(), cache.page(StatusCode::OK, b"b").unwrap())
            .await;
        cache.invalidate_checkpoint(&cp("ft:a"));
        cache.run_pending_tasks().await;
        assert!(cache.get(&a).await.is_none());
        if a.shard != b.shard {
            assert!(cache.get(&b).await.is_some());
        }
    }

    #[tokio::test]
    async fn dead_pages_a_burst_of_writes_leaves_are_freed_by_the_upkeep_after_the_interval() {
        let clock = Clock::default();
        let cache = PageCache::new(&config(), clock.clone(), Counter::default());
        let store = |name: &'static str| {
            let key = cache.key(cp(name), ListQuery::default());
            let page = cache.page(StatusCode::OK, name.as_bytes()).unwrap();
            (key.clone(), cache.insert(key, page))
        };
        let (a, stored) = store("ft:a");
        stored.await;
        cache.invalidate_checkpoint(&cp("ft:a")); // Swept.
        let (b, stored) = store("ft:b");
        stored.await;
        cache.invalidate_checkpoint(&cp("ft:b")); // Within the interval: not yet.
        cache.run_pending_tasks().await;
        assert!(cache.get(&a).await.is_none());
        let fresh = cache.key(cp("ft:b"), ListQuery::default());
        assert_ne!(fresh, b, "yet no read can reach it");
        clock.advance(SWEEP_INTERVAL);
        cache.run_pending_tasks().await; // The upkeep after the interval, no write needed.
        cache.run_pending_tasks().await;
        assert!(cache.get(&b).await.is_none(), "freed by the upkeep's sweep");
    }

    #[tokio::test]
    async fn a_failed_refetch_leaves_the_stale_page_in_place() {
        let clock = Clock::default();
        let cache = PageCache::new(&config(), clock.clone(), Counter::default());
        let key = cache.key(cp("ft:e"), ListQuery::default());
        let stale = cache.page(StatusCode::OK, b"stale").unwrap();
        cache.insert(key.clone(), stale.clone()).await;
        clock.advance(Duration::from_secs(100));
        let (result, fetched) = cache
            .fill(&key, &reader(), async {
                Fill::Err(FillError::Failed(Error::UpstreamError))
            })
            .await;
        assert!(fetched && result.is_err());
        assert!(cache
            .get(&key)
            .await
            .is_some_and(|p| Arc::ptr_eq(&p, &stale)));
    }

    /// The shed tests' two clients: one flooding the key (shed), one not.
    fn flood_and_other() -> (Arc<str>, Arc<str>) {
        (Arc::from("flood"), Arc::from("others"))
    }

    /// A cache and the key its shed tests read.
    fn one_key() -> (PageCache, PageKey) {
        let cache = PageCache::new(&config(), Clock::default(), Counter::default());
        let key = cache.key(cp("ft:shed"), ListQuery::default());
        (cache, key)
    }

    /// A fetch that its client's own limit refused.
    fn shed_by(client: &str) -> Fill {
        Fill::Err(FillError::ClientShed {
            client: Arc::from(client),
            error: Error::UpstreamError,
        })
    }

    /// Polls `future` once: pending, it has found (or made) its fill and waits on it.
    fn waits<F: std::future::Future + Unpin>(future: &mut F) -> bool {
        use futures_util::FutureExt as _;
        future.now_or_never().is_none()
    }

    /// A fetch that counts itself and answers `page` once `go` turns true.
    fn held_fetch(
        count: &Arc<AtomicU64>,
        go: &tokio::sync::watch::Receiver<bool>,
        page: &Arc<Page>,
    ) -> impl std::future::Future<Output = Fill> {
        let (count, mut go, page) = (count.clone(), go.clone(), page.clone());
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            let _ = go.wait_for(|go| *go).await;
            Fill::Ok(page)
        }
    }

    /// A fill or refresh led by `client`'s read, ending in that client's own shed once
    /// released.
    fn shed_when_released(
        client: &'static str,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        impl std::future::Future<Output = Fill>,
    ) {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        (release, async move {
            let _ = released.await;
            shed_by(client)
        })
    }

    /// Awaits `reads`, each within 5 s: how many fetched, and that each got the page `body`.
    async fn answered<F>(reads: Vec<std::pin::Pin<Box<F>>>, body: &[u8]) -> usize
    where
        F: std::future::Future<Output = (FillOutcome, bool)>,
    {
        let mut fetched = 0;
        for read in reads {
            let (outcome, ran) = tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .expect("no read waits on a fill that never ends");
            assert_eq!(&outcome.unwrap().body[..], body);
            fetched += usize::from(ran);
        }
        fetched
    }

    #[tokio::test]
    async fn another_clients_read_never_waits_twice_on_a_shed_client() {
        let (cache, key) = one_key();
        let (flooder, other) = flood_and_other();
        let (release, fetch) = shed_when_released("flood");
        let mut first = Box::pin(cache.fill(&key, &flooder, fetch));
        assert!(waits(&mut first), "the flooder read leads");
        let mut own = Box::pin(cache.fill(&key, &flooder, async { Fill::Err(uncacheable()) }));
        assert!(waits(&mut own), "its second read waits on it");
        let page = cache.page(StatusCode::OK, b"mine").unwrap();
        let mut read = Box::pin(cache.fill(&key, &other, async { Fill::Ok(page) }));
        assert!(waits(&mut read), "so does another client read");
        release.send(()).unwrap();
        let (outcome, fetched) = first.await;
        assert!(fetched && matches!(*outcome.unwrap_err(), FillError::ClientShed { .. }));
        // The flooder's next read leads the next fill before the other read looks again.
        let (_hold, fetch) = shed_when_released("flood");
        let mut next = Box::pin(cache.fill(&key, &flooder, fetch));
        assert!(waits(&mut next));
        let (outcome, fetched) = own.await;
        assert!(
            !fetched && matches!(*outcome.unwrap_err(), FillError::ClientShed { .. }),
            "the flooder own reads share its 503"
        );
        assert_eq!(
            answered(vec![read], b"mine").await,
            1,
            "it fetched for itself"
        );
    }

    #[tokio::test]
    async fn another_clients_no_cache_read_never_waits_twice_on_a_shed_client() {
        let (cache, key) = one_key();
        let (flooder, other) = flood_and_other();
        let (release_running, fetch) = shed_when_released("flood");
        let mut first = Box::pin(cache.refresh(&key, &flooder, fetch));
        assert!(waits(&mut first), "the flooder refresh runs");
        let (release_next, fetch) = shed_when_released("flood");
        let mut second = Box::pin(cache.refresh(&key, &flooder, fetch));
        assert!(waits(&mut second), "its second waits to run next");
        let page = cache.page(StatusCode::OK, b"mine").unwrap();
        let mut read = Box::pin(cache.refresh(&key, &other, async { Fill::Ok(page) }));
        assert!(waits(&mut read), "another client read joins the next one");
        release_running.send(()).unwrap();
        assert!(first.await.0.is_err());
        assert!(waits(&mut second), "the next refresh runs");
        let (_hold, fetch) = shed_when_released("flood");
        let mut third = Box::pin(cache.refresh(&key, &flooder, fetch));
        assert!(waits(&mut third), "the flooder third waits to run next");
        release_next.send(()).unwrap();
        assert!(second.await.0.is_err());
        assert_eq!(
            answered(vec![read], b"mine").await,
            1,
            "it fetched for itself"
        );
    }

    #[tokio::test]
    async fn reads_taking_over_from_a_shed_client_still_share_one_fetch() {
        let (cache, key) = one_key();
        let (flooder, other) = flood_and_other();
        let (release, fetch) = shed_when_released("flood");
        let mut first = Box::pin(cache.fill(&key, &flooder, fetch));
        assert!(waits(&mut first));
        let page = cache.page(StatusCode::OK, b"shared").unwrap();
        let fetches = Arc::new(AtomicU64::new(0));
        let (go, going) = tokio::sync::watch::channel(false);
        let mut reads: Vec<_> = (0..3)
            .map(|_| Box::pin(cache.fill(&key, &other, held_fetch(&fetches, &going, &page))))
            .collect();
        for read in &mut reads {
            assert!(waits(read));
        }
        assert_eq!(cache.fill_waiters(&key), Some(3));
        release.send(()).unwrap();
        assert!(first.await.0.is_err());
        let (_hold, fetch) = shed_when_released("flood");
        let mut next = Box::pin(cache.fill(&key, &flooder, fetch));
        assert!(waits(&mut next), "the flooder leads its next fill");
        for read in &mut reads {
            assert!(waits(read));
        }
        assert_eq!(
            cache.fill_waiters(&key),
            Some(2),
            "one read took the fill over, the two others wait on it"
        );
        go.send(true).unwrap();
        let fetched = answered(reads, b"shared").await;
        assert_eq!(
            (fetched, fetches.load(Ordering::SeqCst)),
            (1, 1),
            "one fetch"
        );
    }

    #[tokio::test]
    async fn reads_shed_on_by_two_clients_take_the_next_fill_over_and_share_it() {
        let (cache, key) = one_key();
        let [x, z, y, v, w]: [Arc<str>; 5] = ["x", "z", "y", "v", "w"].map(Arc::from);
        let (release_x, fetch) = shed_when_released("x");
        let mut by_x = Box::pin(cache.fill(&key, &x, fetch));
        assert!(waits(&mut by_x));
        let page = cache.page(StatusCode::OK, b"mine").unwrap();
        let fetches = Arc::new(AtomicU64::new(0));
        let (go, going) = tokio::sync::watch::channel(false);
        // Reads of two clients, one after the other.
        let mut reads: Vec<_> = [&y, &v, &y]
            .into_iter()
            .map(|c| Box::pin(cache.fill(&key, c, held_fetch(&fetches, &going, &page))))
            .collect();
        for read in &mut reads {
            assert!(waits(read));
        }
        release_x.send(()).unwrap();
        assert!(by_x.await.0.is_err());
        // Another client leads the next fill; the reads join it, and it is shed too.
        let (release_z, fetch) = shed_when_released("z");
        let mut by_z = Box::pin(cache.fill(&key, &z, fetch));
        assert!(waits(&mut by_z));
        for read in &mut reads {
            assert!(waits(read));
        }
        assert_eq!(cache.fill_waiters(&key), Some(3), "the reads wait on z");
        release_z.send(()).unwrap();
        assert!(by_z.await.0.is_err());
        // A third client leads the next: one read, shed on twice, takes it over, and the
        // others, of its client or the other one, join it.
        let (_hold, held) = tokio::sync::oneshot::channel::<()>();
        let mut by_w = Box::pin(cache.fill(&key, &w, async {
            let _ = held.await;
            Fill::Err(uncacheable())
        }));
        assert!(waits(&mut by_w));
        for read in &mut reads {
            assert!(waits(read));
        }
        assert_eq!(cache.fill_waiters(&key), Some(2));
        go.send(true).unwrap();
        assert_eq!(answered(reads, b"mine").await, 1);
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "one fetch");
    }

    #[tokio::test]
    async fn no_cache_reads_shed_on_by_two_clients_share_one_refresh() {
        let (cache, key) = one_key();
        let [x, z, y, v]: [Arc<str>; 4] = ["x", "z", "y", "v"].map(Arc::from);
        let (release_running, fetch) = shed_when_released("x");
        let mut running = Box::pin(cache.refresh(&key, &x, fetch));
        assert!(waits(&mut running));
        let (release_next, fetch) = shed_when_released("x");
        let mut next = Box::pin(cache.refresh(&key, &x, fetch));
        assert!(waits(&mut next));
        let page = cache.page(StatusCode::OK, b"mine").unwrap();
        let fetches = Arc::new(AtomicU64::new(0));
        let (go, going) = tokio::sync::watch::channel(false);
        let mut reads: Vec<_> = [&y, &v, &y]
            .into_iter()
            .map(|c| Box::pin(cache.refresh(&key, c, held_fetch(&fetches, &going, &page))))
            .collect();
        for read in &mut reads {
            assert!(waits(read), "the reads join x's next refresh");
        }
        release_running.send(()).unwrap();
        assert!(running.await.0.is_err());
        assert!(waits(&mut next), "x's next refresh runs");
        let (release_z, fetch) = shed_when_released("z");
        let mut by_z = Box::pin(cache.refresh(&key, &z, fetch));
        assert!(waits(&mut by_z), "z's refresh waits to run next");
        release_next.send(()).unwrap();
        assert!(next.await.0.is_err());
        for read in &mut reads {
            assert!(waits(read), "the reads join z's refresh");
        }
        assert!(waits(&mut by_z), "z's refresh runs");
        release_z.send(()).unwrap();
        assert!(by_z.await.0.is_err());
        for read in &mut reads {
            assert!(waits(read));
        }
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            1,
            "one read refreshes, the others join it"
        );
        go.send(true).unwrap();
        assert_eq!(answered(reads, b"mine").await, 1);
    }

    #[tokio::test]
    async fn no_cache_reads_taking_over_from_a_shed_client_still_share_one_fetch() {
        let (cache, key) = one_key();
        let (flooder, other) = flood_and_other();
        let (release_running, fetch) = shed_when_released("flood");
        let mut first = Box::pin(cache.refresh(&key, &flooder, fetch));
        assert!(waits(&mut first), "the flooder refresh runs");
        let (release_next, fetch) = shed_when_released("flood");
        let mut second = Box::pin(cache.refresh(&key, &flooder, fetch));
        assert!(waits(&mut second), "its next waits");
        let page = cache.page(StatusCode::OK, b"shared").unwrap();
        let fetches = Arc::new(AtomicU64::new(0));
        let (go, going) = tokio::sync::watch::channel(false);
        let mut reads: Vec<_> = (0..3)
            .map(|_| Box::pin(cache.refresh(&key, &other, held_fetch(&fetches, &going, &page))))
            .collect();
        for read in &mut reads {
            assert!(waits(read));
        }
        assert_eq!(
            cache.refresh_waiters(&key),
            4,
            "the next refresh and three joiners"
        );
        release_running.send(()).unwrap();
        assert!(first.await.0.is_err());
        assert!(waits(&mut second), "the flooder next refresh runs");
        let (_hold, fetch) = shed_when_released("flood");
        let mut third = Box::pin(cache.refresh(&key, &flooder, fetch));
        assert!(waits(&mut third), "and its third waits to run next");
        release_next.send(()).unwrap();
        assert!(second.await.0.is_err());
        for read in &mut reads {
            assert!(waits(read));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "one read's refresh runs");
        go.send(true).unwrap();
        let fetched = answered(reads, b"shared").await;
        assert_eq!(
            (fetched, fetches.load(Ordering::SeqCst)),
            (1, 1),
            "one fetch"
        );
    }

    #[tokio::test]
    async fn a_cancelled_fill_is_taken_over_by_a_waiter() {
        let cache = shared_cache();
        let key = cache.key(cp("ft:f"), ListQuery::default());
        let (started, leading) = tokio::sync::oneshot::channel();
        let leader = tokio::spawn({
            let (cache, key) = (cache.clone(), key.clone());
            async move {
                let fetch = async {
                    let _ = started.send(());
                    std::future::pending::<Fill>().await
                };
                cache.fill(&key, &reader(), fetch).await
            }
        });
        leading.await.unwrap();
        let waiter = tokio::spawn({
            let (cache, key) = (cache.clone(), key.clone());
            async move {
                let page = cache.page(StatusCode::OK, b"new").unwrap();
                cache.fill(&key, &reader(), async { Fill::Ok(page) }).await
            }
        });
        // Let the waiter find the leader's fill and wait on it, then cancel the leader.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        leader.abort();
        let (result, fetched) = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter took over")
            .unwrap();
        assert!(fetched && result.is_ok());
        assert!(cache.get(&key).await.is_some());
        assert!(cache.fills.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn concurrent_fills_of_one_key_fetch_once_and_share_failures() {
        let cache = shared_cache();
        let key = cache.key(cp("ft:g"), ListQuery::default());
        let fetches = Arc::new(AtomicU64::new(0));
        let fills = (0..20).map(|_| {
            let (cache, key, fetches) = (cache.clone(), key.clone(), fetches.clone());
            tokio::spawn(async move {
                let fetch = async {
                    fetches.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Fill::Err(uncacheable())
                };
                cache.fill(&key, &reader(), fetch).await
            })
        });
        let outcomes = futures_util::future::join_all(fills).await;
        assert_eq!(fetches.load(Ordering::Relaxed), 1);
        let fetched = outcomes.iter().filter(|o| o.as_ref().unwrap().1).count();
        assert_eq!(fetched, 1);
        for outcome in outcomes {
            let (result, _) = outcome.unwrap();
            let failure = result.expect_err("shared failure");
            assert!(matches!(*failure, FillError::Uncacheable(_)));
        }
        assert!(cache.fills.lock().unwrap().is_empty());
    }

    /// Yields until `cond` holds (other tasks on this runtime drive it); bounded.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..100_000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened: {what}");
    }

    /// A refresh of `key` whose fetch tells `started` and then waits for `release`.
    fn gated_refresh(
        cache: &Arc<PageCache>,
        key: &PageKey,
        body: &'static [u8],
    ) -> (
        tokio::task::JoinHandle<(FillOutcome, bool)>,
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (cache, key) = (cache.clone(), key.clone());
        let task = tokio::spawn(async move {
            let page = cache.page(StatusCode::OK, body).unwrap();
            let fetch = async {
                let _ = started_tx.send(());
                let _ = released.await;
                Fill::Ok(page)
            };
            cache.refresh(&key, &reader(), fetch).await
        });
        (task, started, release)
    }

    #[tokio::test]
    async fn a_no_cache_refresh_never_joins_a_fetch_already_under_way() {
        let cache = shared_cache();
        let key = cache.key(cp("ft:q"), ListQuery::default());
        let (first, started, release_first) = gated_refresh(&cache, &key, b"before");
        started.await.unwrap();
        // Arriving while the first fetch runs: they share one fetch of their own.
        let fetches = Arc::new(AtomicU64::new(0));
        let later: Vec<_> = (0..5)
            .map(|_| {
                let (cache, key, fetches) = (cache.clone(), key.clone(), fetches.clone());
                tokio::spawn(async move {
                    let page = cache.page(StatusCode::OK, b"second").unwrap();
                    let fetch = async {
                        fetches.fetch_add(1, Ordering::Relaxed);
                        Fill::Ok(page)
                    };
                    cache.refresh(&key, &reader(), fetch).await
                })
            })
            .collect();
        until("five reads wait for the next refresh", || {
            cache.refresh_waiters(&key) == 5
        })
        .await;
        assert_eq!(fetches.load(Ordering::Relaxed), 0, "it waits for the first");
        release_first.send(()).unwrap();
        let (outcome, fetched) = first.await.unwrap();
        assert!(fetched);
        assert_eq!(&outcome.unwrap().body[..], b"before");
        let mut fetched = 0;
        for task in later {
            let (outcome, leader) = task.await.unwrap();
            assert_eq!(&outcome.unwrap().body[..], b"second");
            fetched += usize::from(leader);
        }
        assert_eq!((fetched, fetches.load(Ordering::Relaxed)), (1, 1));
        assert_eq!(&cache.get(&key).await.unwrap().body[..], b"second");
        assert!(cache.refreshes.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_waiting_refresh_is_taken_over_by_a_joiner() {
        let cache = shared_cache();
        let key = cache.key(cp("ft:s"), ListQuery::default());
        let (first, started, release_first) = gated_refresh(&cache, &key, b"first");
        started.await.unwrap();
        // The next refresh's leader, then one read that joins it.
        let (next, _, _release_next) = gated_refresh(&cache, &key, b"unused");
        until("the next refresh is led", || {
            cache.refresh_waiters(&key) == 1
        })
        .await;
        let joiner = tokio::spawn({
            let (cache, key) = (cache.clone(), key.clone());
            async move {
                let page = cache.page(StatusCode::OK, b"joined").unwrap();
                cache
                    .refresh(&key, &reader(), async { Fill::Ok(page) })
                    .await
            }
        });
        until("a read joined it", || cache.refresh_waiters(&key) == 2).await;
        next.abort();
        release_first.send(()).unwrap();
        assert!(first.await.unwrap().1);
        let (outcome, fetched) = joiner.await.unwrap();
        assert!(fetched, "the joiner led once the leader was gone");
        assert_eq!(&outcome.unwrap().body[..], b"joined");
        assert!(cache.refreshes.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn freshness_follows_the_clock_and_status() {
        let clock = Clock::default();
        let cache = PageCache::new(&config(), clock.clone(), Counter::default());
        let ok = cache.page(StatusCode::OK, b"{}").unwrap();
        let missing = cache.page(StatusCode::NOT_FOUND, b"{}").unwrap();
        assert!(cache.page(StatusCode::BAD_REQUEST, b"{}").is_none());
        assert_eq!(cache.freshness(&ok), Freshness::Fresh);
        clock.advance(Duration::from_secs(6));
        assert_eq!(cache.freshness(&missing), Freshness::Expired);
        clock.advance(Duration::from_secs(55));
        assert_eq!(cache.freshness(&ok), Freshness::StaleWhileRevalidate);
        assert_eq!(cache.age_seconds(&ok), 61);
        clock.advance(Duration::from_secs(10));
        assert_eq!(cache.freshness(&ok), Freshness::StaleIfError);
        clock.advance(Duration::from_secs(300));
        assert_eq!(cache.freshness(&ok), Freshness::Expired);
    }

    #[tokio::test]
    async fn only_one_caller_claims_a_refresh() {
        let cache = PageCache::new(&config(), Clock::default(), Counter::default());
        let page = cache.page(StatusCode::OK, b"{}").unwrap();
        assert!(page.claim_refresh());
        assert!(!page.claim_refresh());
        page.release_refresh();
        assert!(page.claim_refresh());
    }

    #[tokio::test]
    async fn stored_bodies_are_weighed_by_their_length() {
        let cache = PageCache::new(&config(), Clock::default(), Counter::default());
        let big = vec![b'x'; 10_000];
        let page = cache.page(StatusCode::OK, &big[..100]).unwrap();
        assert_eq!(page.body.len(), 100);
        let key = cache.key(cp("ft:c"), ListQuery::default());
        cache.insert(key, page).await;
        cache.run_pending_tasks().await;
        assert_eq!(cache.entry_count(), 1);
        let w = cache.weighted_bytes();
        assert!((100..100 + ENTRY_OVERHEAD as u64 + 64).contains(&w), "{w}");
    }

    #[tokio::test]
    async fn a_negative_page_leaves_memory_after_its_negative_ttl_and_a_200_stays() {
        // moka's own clock: let real time pass the 404's lifetime (far below the 200's).
        let config = CacheConfig {
            negative_ttl: Duration::from_millis(50),
            ..config()
        };
        let cache = PageCache::new(&config, Clock::default(), Counter::default());
        let missing = cache.key(cp("ft:gone"), ListQuery::default());
        let present = cache.key(cp("ft:here"), ListQuery::default());
        let not_found = cache.page(StatusCode::NOT_FOUND, b"{}").unwrap();
        cache.insert(missing.clone(), not_found).await;
        cache
            .insert(present.clone(), cache.page(StatusCode::OK, b"[]").unwrap())
            .await;
        assert!(cache.get(&missing).await.is_some());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            cache.get(&missing).await.is_none(),
            "the 404 outlived negative_ttl"
        );
        assert!(cache.get(&present).await.is_some());
        // A 404 replaced by a 200 takes the 200's lifetime.
        let flipped = cache.key(cp("ft:back"), ListQuery::default());
        let not_found = cache.page(StatusCode::NOT_FOUND, b"{}").unwrap();
        cache.insert(flipped.clone(), not_found).await;
        cache
            .insert(flipped.clone(), cache.page(StatusCode::OK, b"[]").unwrap())
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(cache.get(&flipped).await.is_some());
    }

    #[tokio::test]
    async fn remove_if_same_leaves_a_replacement_alone() {
        let cache = PageCache::new(&config(), Clock::default(), Counter::default());
        let key = cache.key(cp("ft:d"), ListQuery::default());
        let old = cache.page(StatusCode::OK, b"old").unwrap();
        let new = cache.page(StatusCode::OK, b"new").unwrap();
        cache.insert(key.clone(), new.clone()).await;
        cache.remove_if_same(&key, &old).await;
        assert!(cache.get(&key).await.is_some_and(|p| Arc::ptr_eq(&p, &new)));
        cache.remove_if_same(&key, &new).await;
        assert!(cache.get(&key).await.is_none());
    }
}
