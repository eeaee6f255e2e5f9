//! SPEC "Hygiene rules": one client cannot take all upstream capacity. Each client holds at
//! most `upstream.max_concurrency_per_client` upstream slots, and concurrent `no-cache` reads
//! of one key share one upstream fetch that started after they arrived. A client's shed is its
//! own: another client's read that waited on its fetch fetches again (here in its own slots;
//! the flood case, where the shed client leads the next fetch too, is in `cache`'s tests).
//! Upstream replies are held at the mock to park requests; nothing here waits on a timer but
//! the shed reads' `queue_timeout_ms`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hyper::Method;
use permgate::cache::PageKey;
use permgate::config::Config;
use permgate::mock_upstream::Held;
use permgate::route::{Checkpoint, ListQuery};
use permgate::secret::AdminKey;

use crate::support::*;

const READS: usize = 70;

#[tokio::test]
async fn a_burst_of_no_cache_reads_shares_fetches_and_a_writer_still_gets_through() {
    // Defaults: 64 upstream slots, 32 per client.
    let gw = start().await;
    let path = list_path(CP);
    let key = gw
        .state
        .cache
        .key(Checkpoint::parse(CP).unwrap(), ListQuery::default());
    // Every upstream request is held, in the order it reaches the mock, until released.
    let mut held: Vec<_> = (0..=READS).map(|_| gw.mock.hold_next()).collect();
    let answered = Arc::new(AtomicUsize::new(0));
    let reads: Vec<_> = (0..READS)
        .map(|_| {
            let (client, path, answered) = (gw.client.clone(), path.clone(), answered.clone());
            tokio::spawn(async move {
                let no_cache = [("cache-control", "no-cache")];
                let r = client
                    .send(Method::GET, &path, Some(READER), &no_cache, None)
                    .await;
                answered.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect();
    held[0].arrived().await;
    eventually("every read is in the gateway (or answered)", || async {
        gw.state.in_flight() + answered.load(Ordering::SeqCst) == READS
    })
    .await;

    // The first read's fetch is held upstream; the others wait for one fetch of their own, so
    // the writer's create is the next request to reach upstream.
    let create = {
        let client = TestClient::new(gw.addr);
        tokio::spawn(async move {
            let body = r#"{"project_ids":["proj_fair"]}"#;
            client.post(&list_path(CP2), WRITER, body).await
        })
    };
    held[1].arrived().await;
    held.remove(1).release();
    let created = create.await.unwrap();
    assert_eq!(
        created.status,
        200,
        "the writer's create during a burst that made {} upstream reads: {:?}",
        gw.upstream_gets(),
        created.body
    );

    eventually("69 reads wait for the next refresh", || async {
        gw.state.cache.refresh_waiters(&key) == READS - 1
    })
    .await;
    assert_eq!(gw.upstream_gets(), 1);
    held.remove(0).release();
    held[0].arrived().await;
    held.remove(0).release();
    drop(held);
    let mut statuses = Vec::new();
    for read in reads {
        let r = read.await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        statuses.push(r.cache_status().to_string());
    }
    assert_eq!(gw.upstream_gets(), 2, "one fetch running, then one shared");
    let stored = statuses
        .iter()
        .filter(|s| *s == "permgate; fwd=request; stored")
        .count();
    let collapsed = statuses
        .iter()
        .filter(|s| *s == "permgate; fwd=request; collapsed")
        .count();
    assert_eq!((stored, collapsed), (2, READS - 2), "{statuses:?}");
}

fn two_slots_per_client(c: &mut String) {
    *c = c.replace(
        "request_timeout_ms = 3000",
        "request_timeout_ms = 3000\nmax_concurrency = 4\nmax_concurrency_per_client = 2\nqueue_timeout_ms = 200",
    );
}

/// The reader's two upstream slots, held by two of its reads (`?limit=1`, `?limit=2`) parked
/// at the mock until [`ParkedReader::release`].
struct ParkedReader {
    held: Vec<Held>,
    reads: Vec<tokio::task::JoinHandle<TestResponse>>,
}

impl ParkedReader {
    async fn holding_both_slots(gw: &Gateway) -> ParkedReader {
        let mut held = vec![gw.mock.hold_next(), gw.mock.hold_next()];
        let reads = (1..=2)
            .map(|limit| {
                let client = TestClient::new(gw.addr);
                let path = format!("{}?limit={limit}", list_path(CP));
                tokio::spawn(async move { client.get(&path, READER).await })
            })
            .collect();
        for h in &mut held {
            h.arrived().await;
        }
        ParkedReader { held, reads }
    }

    /// Lets the parked reads through; each is answered.
    async fn release(self) {
        for h in self.held {
            h.release();
        }
        for r in self.reads {
            assert_eq!(r.await.unwrap().status, 200);
        }
    }
}

/// Two of the reader's reads and one of the writer's, of the same page, in flight.
struct Reads {
    shed: [tokio::task::JoinHandle<TestResponse>; 2],
    joined: tokio::task::JoinHandle<TestResponse>,
}

impl Reads {
    /// The reader's reads get its 503; the writer's gets the page (`cache_status`), fetched
    /// in the writer's slots; `sheds` fetches were shed; upstream saw the two parked reads and
    /// the writer's.
    async fn assert_only_the_reader_shed(self, gw: &Gateway, cache_status: &str, sheds: u32) {
        for shed in self.shed {
            let shed = shed.await.unwrap();
            assert_eq!(
                shed.status, 503,
                "the reader's reads share its 503: {:?}",
                shed.body
            );
            assert_eq!(shed.error().0, "unavailable");
        }
        let joined = self.joined.await.unwrap();
        assert_eq!(joined.status, 200, "{:?}", joined.body);
        assert_eq!(joined.cache_status(), cache_status);
        assert_eq!(gw.upstream_gets(), 3, "two parked reads and the writer's");
        let metrics = gw.state.render_metrics().await;
        let line = format!("permgate_shed_total{{reason=\"client_concurrency\"}} {sheds}");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
}

/// A read of `list_path(CP)?limit=3` (the page of [`limit_3_key`]) on a connection of its own,
/// in the background.
fn read_limit_3(
    gw: &Gateway,
    token: &'static str,
    headers: &'static [(&'static str, &'static str)],
) -> tokio::task::JoinHandle<TestResponse> {
    let client = TestClient::new(gw.addr);
    let path = format!("{}?limit=3", list_path(CP));
    tokio::spawn(async move {
        client
            .send(Method::GET, &path, Some(token), headers, None)
            .await
    })
}

/// The cache key of `list_path(CP)?limit=3`.
fn limit_3_key(gw: &Gateway) -> PageKey {
    let query = ListQuery {
        limit: 3,
        ..ListQuery::default()
    };
    gw.state.cache.key(Checkpoint::parse(CP).unwrap(), query)
}

#[tokio::test]
async fn a_client_holding_its_share_of_upstream_slots_is_shed_and_others_are_not() {
    let gw = start_with(two_slots_per_client).await;
    let parked = ParkedReader::holding_both_slots(&gw).await;
    // Two global slots are free, but the reader holds both of its own.
    let shed = gw
        .client
        .get(&format!("{}?limit=3", list_path(CP)), READER)
        .await;
    assert_eq!(shed.status, 503, "{:?}", shed.body);
    assert_eq!(shed.error().0, "unavailable");
    assert_eq!(shed.header("retry-after"), "1");
    let other = gw
        .client
        .get(&format!("{}?limit=4", list_path(CP)), WRITER)
        .await;
    assert_eq!(other.status, 200, "another client is not held back");

    // A reload rebuilds every client; the reader's slots in flight still count.
    let text = base_config("127.0.0.1:9".parse().unwrap());
    let config = Config::parse(&text, &|_| None).unwrap();
    gw.state
        .apply_reload(&config, AdminKey::new(ADMIN_KEY).unwrap());
    let shed = gw
        .client
        .get(&format!("{}?limit=5", list_path(CP)), READER)
        .await;
    assert_eq!(shed.status, 503, "after a reload: {:?}", shed.body);

    let metrics = gw.state.render_metrics().await;
    assert!(
        metrics.contains("permgate_shed_total{reason=\"client_concurrency\"} 2"),
        "{metrics}"
    );
    assert_eq!(
        gw.upstream_gets(),
        3,
        "the shed reads never reached upstream"
    );
    parked.release().await;
    // Its slots are back.
    let r = gw
        .client
        .get(&format!("{}?limit=3", list_path(CP)), READER)
        .await;
    assert_eq!(r.status, 200);
}

/// Two slots per client, and a wait of 2 s for one: long enough for other reads to join a
/// waiting fetch whatever the machine's load; the parked reads outlast the test.
fn long_waits(c: &mut String) {
    two_slots_per_client(c);
    for (from, to) in [
        ("queue_timeout_ms = 200", "queue_timeout_ms = 2000"),
        ("request_timeout_ms = 3000", "request_timeout_ms = 20000"),
    ] {
        assert!(c.contains(from), "the base config sets {from}");
        *c = c.replace(from, to);
    }
}

#[tokio::test]
async fn a_read_collapsed_into_a_shed_clients_fetch_fetches_in_its_own_clients_slots() {
    let gw = start_with(long_waits).await;
    let parked = ParkedReader::holding_both_slots(&gw).await;
    let key = limit_3_key(&gw);
    let read = |token| read_limit_3(&gw, token, &[]);
    // The reader leads the fetch of `?limit=3` and waits for one of its own slots...
    let shed = read(READER);
    eventually("the reader's fetch is under way", || async {
        gw.state.cache.fill_waiters(&key) == Some(0)
    })
    .await;
    // ...and the writer's read of the same page joins it, then another of the reader's.
    let joined = read(WRITER);
    eventually("the writer's read waits for the reader's fetch", || async {
        gw.state.cache.fill_waiters(&key) == Some(1)
    })
    .await;
    let also_shed = read(READER);
    eventually("a second reader's read waits too", || async {
        gw.state.cache.fill_waiters(&key) == Some(2)
    })
    .await;

    // The reader's limit is the reader's: the writer's read fetches in the writer's slots.
    let reads = Reads {
        shed: [shed, also_shed],
        joined,
    };
    // One fetch shed, shared by the reader's two reads.
    reads
        .assert_only_the_reader_shed(&gw, "permgate; fwd=miss; stored", 1)
        .await;
    parked.release().await;
}

#[tokio::test]
async fn a_no_cache_read_waiting_on_a_shed_clients_refresh_refreshes_in_its_own_clients_slots() {
    let gw = start_with(long_waits).await;
    let parked = ParkedReader::holding_both_slots(&gw).await;
    let key = limit_3_key(&gw);
    let read = |token| read_limit_3(&gw, token, &[("cache-control", "no-cache")]);
    // The reader's first refresh runs (waiting for a slot of its own); its second waits to
    // run next, and the writer's read joins that one. Both of the reader's are shed, one
    // after the other (about 4 s).
    let first = read(READER);
    eventually("the reader's refresh runs", || async {
        gw.state.cache.refresh_running(&key)
    })
    .await;
    let second = read(READER);
    eventually("the reader's next refresh waits", || async {
        gw.state.cache.refresh_waiters(&key) == 1
    })
    .await;
    let joined = read(WRITER);
    eventually(
        "the writer's read joins the reader's next refresh",
        || async { gw.state.cache.refresh_waiters(&key) == 2 },
    )
    .await;

    let reads = Reads {
        shed: [first, second],
        joined,
    };
    reads
        .assert_only_the_reader_shed(&gw, "permgate; fwd=request; stored", 2)
        .await;
    parked.release().await;
}
