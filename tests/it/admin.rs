//! SPEC "Admin listener": health, readiness, purge — on the admin port only — and the
//! graceful drain that readiness announces.

use hyper::Method;

use crate::support::*;

#[tokio::test]
async fn health_and_readiness_are_on_the_admin_listener_only() {
    let mut gw = start().await;
    let admin = gw.admin();
    let r = admin.send(Method::GET, "/healthz", None, &[], None).await;
    assert_eq!(r.status, 200);
    let r = admin.send(Method::GET, "/readyz", None, &[], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
    for path in ["/healthz", "/readyz", "/cache/purge"] {
        let r = gw
            .client
            .send(Method::GET, path, Some(WRITER), &[], None)
            .await;
        assert_eq!(r.status, 404, "{path} on the data listener");
    }
    let r = gw
        .client
        .send(Method::POST, "/cache/purge", Some(WRITER), &[], None)
        .await;
    assert_eq!(r.status, 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn purge_drops_one_checkpoint_or_everything() {
    let gw = start().await;
    let admin = gw.admin();
    gw.client.get(&list_path(CP), READER).await;
    gw.client.get(&list_path(CP2), READER).await;
    let encoded = CP.replace(':', "%3A");
    let r = admin
        .send(
            Method::POST,
            &format!("/cache/purge?checkpoint={encoded}"),
            None,
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["checkpoint"], CP);
    assert_eq!(
        gw.client.get(&list_path(CP), READER).await.cache_status(),
        "permgate; fwd=miss; stored"
    );
    assert_eq!(
        gw.client.get(&list_path(CP2), READER).await.cache_status(),
        "permgate; hit"
    );
    let r = admin
        .send(Method::POST, "/cache/purge", None, &[], None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        gw.client.get(&list_path(CP), READER).await.cache_status(),
        "permgate; fwd=miss; stored"
    );
    assert_eq!(
        gw.client.get(&list_path(CP2), READER).await.cache_status(),
        "permgate; fwd=miss; stored"
    );
    assert_eq!(gw.upstream_gets(), 5);
    let r = admin
        .send(
            Method::POST,
            "/cache/purge?checkpoint=a%2Fb",
            None,
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 400);
    let r = admin
        .send(Method::GET, "/cache/purge", None, &[], None)
        .await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let mut gw = start().await;
    let mut held = gw.mock.hold_next();
    let in_flight = {
        let client = gw.client.clone();
        tokio::spawn(async move { client.get(&list_path(CP), READER).await })
    };
    held.arrived().await;
    // Start the drain while the request is held upstream, then let upstream answer.
    let state = gw.state.clone();
    let admin = gw.admin();
    let drain = gw.shutdown();
    let release = async {
        eventually("readiness false", || async { state.is_draining() }).await;
        // The admin listener still answers during the drain, with 503.
        let ready = admin.send(Method::GET, "/readyz", None, &[], None).await;
        assert_eq!(ready.status, 503);
        assert!(ready.json()["reason"]
            .as_str()
            .unwrap()
            .contains("draining"));
        held.release();
    };
    tokio::join!(drain, release);
    let r = in_flight.await.unwrap();
    assert_eq!(
        r.status, 200,
        "the in-flight request completed during the drain"
    );
}
