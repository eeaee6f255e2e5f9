//! SPEC "Caching": hits and misses counted at the mock, coalescing, `no-cache`, freshness
//! windows driven by the injected clock, and invalidation that racing fills cannot undo.

use std::time::Duration;

use hyper::Method;
use permgate::cache::Freshness;
use permgate::mock_upstream::Fault;
use permgate::route::{Checkpoint, ListQuery};

use crate::support::*;

#[tokio::test]
async fn second_read_is_a_hit_with_age_and_no_upstream_call() {
    let gw = start().await;
    let path = list_path(CP);
    let miss = gw.client.get(&path, READER).await;
    assert_eq!(miss.status, 200);
    assert_eq!(miss.cache_status(), "permgate; fwd=miss; stored");
    assert!(!miss.headers.contains_key("age"));
    gw.clock().advance(Duration::from_secs(7));
    let hit = gw.client.get(&path, READER).await;
    assert_eq!(hit.cache_status(), "permgate; hit");
    assert_eq!(hit.header("age"), "7");
    assert_eq!(hit.body, miss.body);
    assert_eq!(hit.header("content-type"), "application/json");
    assert_eq!(gw.upstream_gets(), 1);
    // Another client (on another connection) granted the same checkpoint shares the entry.
    let other = TestClient::new(gw.addr).get(&path, WRITER).await;
    assert_eq!(other.cache_status(), "permgate; hit");
    assert_eq!(gw.upstream_gets(), 1);
}

#[tokio::test]
async fn every_get_carries_cache_status_even_when_rejected() {
    let gw = start().await;
    for (path, token) in [
        ("/nope".to_string(), READER),
        (list_path(CP), "bad-token"),
        (format!("{}?limit=0", list_path(CP)), READER),
        (list_path(GLOBEX), READER),
    ] {
        let r = gw.client.get(&path, token).await;
        assert_eq!(r.cache_status(), "permgate; fwd=bypass", "{path}");
    }
}

#[tokio::test]
async fn concurrent_identical_misses_make_one_upstream_call() {
    let gw = start().await;
    let mut held = gw.mock.hold_next();
    let path = format!("{}?limit=7", list_path(CP));
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let client = gw.client.clone();
            let path = path.clone();
            tokio::spawn(async move { client.get(&path, READER).await })
        })
        .collect();
    held.arrived().await;
    // Every request is inside the gateway before the one upstream answer is released.
    eventually("100 requests in flight", || async {
        gw.state.in_flight() == 100
    })
    .await;
    held.release();
    let mut statuses = Vec::new();
    let mut bodies = Vec::new();
    for r in requests {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200);
        statuses.push(r.cache_status().to_string());
        bodies.push(r.body);
    }
    assert_eq!(gw.upstream_gets(), 1);
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(statuses.iter().filter(|s| s.ends_with("stored")).count(), 1);
    // The others waited on that fill (or, arriving just after it, found its page).
    let collapsed_or_hit = statuses
        .iter()
        .filter(|s| *s == "permgate; fwd=miss; collapsed" || *s == "permgate; hit")
        .count();
    assert_eq!(collapsed_or_hit, 99, "{statuses:?}");
}

#[tokio::test]
async fn no_cache_fetches_fresh_and_refreshes_the_entry() {
    let gw = start().await;
    let path = list_path(CP2);
    let before = gw.client.get(&path, WRITER).await;
    assert_eq!(before.ids().len(), 3);
    // Changed behind permgate's back (not through it), so the cache still holds 3.
    gw.mock.seed(CP2, 4);
    assert_eq!(gw.client.get(&path, WRITER).await.ids().len(), 3);
    let fresh = gw
        .client
        .send(
            Method::GET,
            &path,
            Some(WRITER),
            &[("cache-control", "no-cache")],
            None,
        )
        .await;
    assert_eq!(fresh.cache_status(), "permgate; fwd=request; stored");
    assert_eq!(fresh.ids().len(), 4);
    let after = gw.client.get(&path, WRITER).await;
    assert_eq!(after.cache_status(), "permgate; hit");
    assert_eq!(after.ids().len(), 4);
    assert_eq!(gw.upstream_gets(), 2);
}

#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    let gw = start().await;
    let path = list_path(CP2);
    gw.client.get(&path, READER).await;
    gw.mock.seed(CP2, 5);
    gw.clock().advance(Duration::from_secs(61)); // TTL 60, SWR 10
    let mut held = gw.mock.hold_next();
    let stale: Vec<_> = (0..20)
        .map(|_| {
            let client = gw.client.clone();
            let path = path.clone();
            tokio::spawn(async move { client.get(&path, READER).await })
        })
        .collect();
    // All 20 are answered from the stale page while the one refresh is still held upstream.
    for r in stale {
        let r = r.await.unwrap();
        assert_eq!(
            r.cache_status(),
            "permgate; hit; detail=stale-while-revalidate"
        );
        assert_eq!(r.header("age"), "61");
        assert_eq!(r.ids().len(), 3);
    }
    held.arrived().await;
    assert_eq!(gw.upstream_gets(), 2, "exactly one background refresh");
    held.release();
    let key = gw
        .state
        .cache
        .key(Checkpoint::parse(CP2).unwrap(), ListQuery::default());
    eventually("refreshed page stored", || async {
        let page = gw.state.cache.get(&key).await;
        page.is_some_and(|p| gw.state.cache.freshness(&p) == Freshness::Fresh)
    })
    .await;
    let fresh = gw.client.get(&path, READER).await;
    assert_eq!(fresh.cache_status(), "permgate; hit");
    assert_eq!(fresh.ids().len(), 5);
    assert_eq!(gw.upstream_gets(), 2);
}

#[tokio::test]
async fn stale_if_error_serves_the_old_page_when_upstream_fails() {
    let gw = start().await;
    let path = list_path(CP2);
    let original = gw.client.get(&path, READER).await;
    gw.clock().advance(Duration::from_secs(100)); // past TTL + SWR, inside stale-if-error
                                                  // Every request during the outage gets the stale page, not only the first.
    for attempt in 0..3 {
        gw.mock.push_fault(Fault::Status {
            status: 500,
            body: "{}".into(),
            retry_after: None,
        });
        let r = gw.client.get(&path, READER).await;
        assert_eq!(r.status, 200, "attempt {attempt}");
        assert_eq!(
            r.cache_status(),
            "permgate; fwd=stale; detail=stale-if-error"
        );
        assert_eq!(r.header("age"), "100");
        assert_eq!(r.body, original.body);
    }
    assert_eq!(gw.upstream_gets(), 4);
    // Upstream recovers: the next read fetches and stores.
    let r = gw.client.get(&path, READER).await;
    assert_eq!(r.cache_status(), "permgate; fwd=miss; stored");
}

#[tokio::test]
async fn past_stale_if_error_an_upstream_failure_is_a_502() {
    let gw = start().await;
    let path = list_path(CP2);
    gw.client.get(&path, READER).await;
    gw.clock().advance(Duration::from_secs(60 + 301));
    gw.mock.push_fault(Fault::Status {
        status: 500,
        body: "{}".into(),
        retry_after: None,
    });
    let r = gw.client.get(&path, READER).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error().0, "upstream_error");
}

#[tokio::test]
async fn upstream_404s_are_negatively_cached_for_their_short_ttl() {
    let gw = start().await;
    let path = list_path("ft:gpt-4o-mini-2024-07-18:acme:gone:000");
    let first = gw.client.get(&path, READER).await;
    assert_eq!(first.status, 404);
    assert_eq!(
        first.json()["error"]["code"],
        "model_not_found",
        "passed through"
    );
    let second = gw.client.get(&path, READER).await;
    assert_eq!(second.status, 404);
    assert_eq!(second.cache_status(), "permgate; hit");
    assert_eq!(gw.upstream_gets(), 1);
    gw.clock().advance(Duration::from_secs(6)); // negative TTL 5
    let third = gw.client.get(&path, READER).await;
    assert_eq!(third.cache_status(), "permgate; fwd=miss; stored");
    assert_eq!(gw.upstream_gets(), 2);
}

#[tokio::test]
async fn non_200_answers_other_than_404_are_passed_through_and_not_stored() {
    let gw = start().await;
    let path = list_path(CP);
    for _ in 0..2 {
        gw.mock.push_fault(Fault::Status {
            status: 422,
            body: r#"{"error":{"message":"nope","type":"invalid_request_error","param":null,"code":null}}"#.into(),
            retry_after: None,
        });
        let r = gw.client.get(&path, READER).await;
        assert_eq!(r.status, 422);
        assert_eq!(r.json()["error"]["message"], "nope");
        assert_eq!(r.cache_status(), "permgate; fwd=miss");
    }
    assert_eq!(gw.upstream_gets(), 2);
}

#[tokio::test]
async fn a_write_drops_every_cached_query_of_its_checkpoint() {
    let gw = start().await;
    let variants = [
        list_path(CP),
        format!("{}?limit=5", list_path(CP)),
        format!("{}?order=ascending&limit=100", list_path(CP)),
        format!("{}?project_id=proj_0001", list_path(CP)),
        format!("{}?limit=3&project_id=proj_new", list_path(CP)),
    ];
    for v in &variants {
        gw.client.get(v, WRITER).await;
    }
    let other = gw.client.get(&list_path(CP2), WRITER).await;
    for v in &variants {
        assert_eq!(
            gw.client.get(v, WRITER).await.cache_status(),
            "permgate; hit"
        );
    }
    let gets_before = gw.upstream_gets();

    let created = gw
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids": ["proj_new"]}"#)
        .await;
    assert_eq!(created.status, 200);
    let new_id = created.ids()[0].clone();

    for v in &variants {
        let r = gw.client.get(v, WRITER).await;
        assert_eq!(r.cache_status(), "permgate; fwd=miss; stored", "{v}");
    }
    assert_eq!(gw.upstream_gets(), gets_before + variants.len());
    let newest = gw.client.get(&list_path(CP), WRITER).await;
    assert_eq!(newest.ids()[0], new_id, "the write is visible");
    let filtered = gw.client.get(&variants[4], WRITER).await;
    assert_eq!(filtered.ids(), vec![new_id.clone()]);
    // Another checkpoint's pages are untouched.
    let untouched = gw.client.get(&list_path(CP2), WRITER).await;
    assert_eq!(untouched.cache_status(), "permgate; hit");
    assert_eq!(untouched.body, other.body);

    let deleted = gw
        .client
        .delete(&format!("{}/{new_id}", list_path(CP)), WRITER)
        .await;
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.json()["deleted"], true);
    let after = gw.client.get(&list_path(CP), WRITER).await;
    assert_eq!(after.cache_status(), "permgate; fwd=miss; stored");
    assert!(!after.ids().contains(&new_id));
}

#[tokio::test]
async fn a_fill_in_flight_during_a_write_cannot_resurrect_the_old_list() {
    let gw = start().await;
    let path = list_path(CP2);
    // A read reaches upstream and its (pre-write) answer is computed, then held.
    let mut held = gw.mock.hold_next();
    let reader = {
        let client = gw.client.clone();
        let path = path.clone();
        tokio::spawn(async move { client.get(&path, WRITER).await })
    };
    held.arrived().await;
    // The write completes while that read is in flight.
    let created = gw
        .client
        .post(&list_path(CP2), WRITER, r#"{"project_ids": ["proj_race"]}"#)
        .await;
    assert_eq!(created.status, 200);
    let new_id = created.ids()[0].clone();
    // The old answer is delivered to the racing reader...
    held.release();
    let old = reader.await.unwrap();
    assert!(!old.ids().contains(&new_id));
    // ...but never cached: the next read is fresh.
    let next = gw.client.get(&path, WRITER).await;
    assert_eq!(next.cache_status(), "permgate; fwd=miss; stored");
    assert_eq!(next.ids()[0], new_id);
    assert_eq!(gw.upstream_gets(), 2);
}
