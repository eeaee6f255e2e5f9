//! Upstream faults, overload and connection limits: each ends in the SPEC's answer within the
//! deadline, with the number of upstream attempts counted at the mock, and the gateway keeps
//! serving afterwards.

use std::time::{Duration, Instant};

use hyper::Method;
use permgate::mock_upstream::Fault;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const DEADLINE_MS: u64 = 1500;

fn resilient(c: &mut String) {
    *c = c.replace(
        "request_timeout_ms = 3000",
        &format!(
            "request_timeout_ms = {DEADLINE_MS}\nmax_retries = 2\nretry_base_delay_ms = 10\nretry_max_delay_ms = 50\nbreaker_threshold = 0"
        ),
    );
}

fn status(code: u16, retry_after: Option<u64>) -> Fault {
    Fault::Status {
        status: code,
        body: format!("{{\"error\":{{\"message\":\"upstream says {code}\"}}}}"),
        retry_after,
    }
}

#[tokio::test]
async fn fault_matrix() {
    let gw = start_with(resilient).await;
    type MakeFault = fn() -> Fault;
    // (fault, how many requests it hits, caller status, error.code, upstream attempts)
    let matrix: Vec<(&str, MakeFault, usize, u16, &str, usize)> = vec![
        (
            "500 is not retried",
            || status(500, None),
            1,
            502,
            "upstream_error",
            1,
        ),
        (
            "502 retried then given up",
            || status(502, None),
            3,
            502,
            "upstream_error",
            3,
        ),
        (
            "503 retried then given up",
            || status(503, None),
            3,
            502,
            "upstream_error",
            3,
        ),
        (
            "504 retried then given up",
            || status(504, None),
            3,
            502,
            "upstream_error",
            3,
        ),
        (
            "429 retried then 503",
            || status(429, Some(1)),
            3,
            503,
            "unavailable",
            3,
        ),
        (
            "reset mid-response retried",
            || Fault::ResetMidResponse,
            3,
            502,
            "upstream_error",
            3,
        ),
        (
            "truncated body retried",
            || Fault::TruncatedBody,
            3,
            502,
            "upstream_error",
            3,
        ),
        (
            "malformed JSON is not retried",
            || Fault::MalformedJson,
            1,
            502,
            "upstream_error",
            1,
        ),
        (
            "slow past the deadline",
            || Fault::Delay(Duration::from_secs(10)),
            1,
            504,
            "upstream_timeout",
            1,
        ),
        ("one 503 then success", || status(503, None), 1, 200, "", 2),
        (
            "one reset then success",
            || Fault::ResetMidResponse,
            1,
            200,
            "",
            2,
        ),
        (
            "429 then success, Retry-After honoured (capped)",
            || status(429, Some(30)),
            1,
            200,
            "",
            2,
        ),
    ];
    for (i, (name, fault, times, want_status, want_code, want_attempts)) in
        matrix.into_iter().enumerate()
    {
        for _ in 0..times {
            gw.mock.push_fault(fault());
        }
        let before = gw.upstream_gets();
        let started = Instant::now();
        let path = format!("{}?limit={}", list_path(CP), i + 1);
        let r = gw.client.get(&path, READER).await;
        let took = started.elapsed();
        assert_eq!(
            r.status,
            want_status,
            "{name}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        if !want_code.is_empty() {
            assert_eq!(r.error().0, want_code, "{name}");
            assert!(
                !String::from_utf8_lossy(&r.body).contains("upstream says"),
                "{name}: upstream text echoed"
            );
        }
        assert_eq!(
            gw.upstream_gets() - before,
            want_attempts,
            "{name}: upstream attempts"
        );
        assert!(
            took < Duration::from_millis(DEADLINE_MS + 500),
            "{name}: took {took:?}, deadline {DEADLINE_MS} ms"
        );
        if want_status == 503 {
            assert!(r.headers.contains_key("retry-after"), "{name}");
        }
        // The gateway still serves the next request.
        let next = gw
            .client
            .send(
                Method::GET,
                &path,
                Some(READER),
                &[("cache-control", "no-cache")],
                None,
            )
            .await;
        assert_eq!(next.status, 200, "{name}: next request");
    }
}

#[tokio::test]
async fn creates_are_never_retried_and_deletes_are() {
    let gw = start_with(resilient).await;
    gw.mock.push_fault(status(503, None));
    let r = gw
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["p"]}"#)
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(gw.mock.count(&Method::POST), 1);
    gw.mock.push_fault(Fault::ResetMidResponse);
    let r = gw.client.get(&list_path(CP), WRITER).await;
    let id = r.ids()[0].clone();
    let gets = gw.upstream_gets();
    assert_eq!(gets, 2, "the list was retried once");
    gw.mock.push_fault(status(502, None));
    let r = gw
        .client
        .delete(&format!("{}/{id}", list_path(CP)), WRITER)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.mock.count(&Method::DELETE), 2);
}

#[tokio::test]
async fn an_unreachable_upstream_is_retried_within_the_deadline() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = start_with(|c| {
        resilient(c);
        let start = c.find("base_url = ").unwrap();
        let end = start + c[start..].find('\n').unwrap();
        c.replace_range(start..end, &format!("base_url = \"http://{dead}/v1\""));
    })
    .await;
    let started = Instant::now();
    let r = gw.client.get(&list_path(CP), READER).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error().0, "upstream_error");
    assert!(started.elapsed() < Duration::from_millis(DEADLINE_MS + 500));
    assert!(logs().contains("retrying upstream request"));
}

#[tokio::test]
async fn the_circuit_opens_answers_fast_or_stale_and_closes_after_a_probe() {
    let gw = start_with(|c| {
        *c = c.replace(
            "request_timeout_ms = 3000",
            "request_timeout_ms = 3000\nmax_retries = 0\nbreaker_threshold = 3\nbreaker_open_ms = 600000",
        )
    })
    .await;
    // A cached page for stale-if-error while the circuit is open.
    let cached = gw.client.get(&list_path(CP2), READER).await;
    for i in 0..3 {
        gw.mock.push_fault(status(500, None));
        let r = gw
            .client
            .get(&format!("{}?limit={}", list_path(CP), i + 1), READER)
            .await;
        assert_eq!(r.status, 502);
    }
    assert_eq!(gw.state.upstream.breaker_state(), "open");
    let before = gw.upstream_gets();
    let r = gw
        .client
        .get(&format!("{}?limit=50", list_path(CP)), READER)
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.error().0, "unavailable");
    assert_eq!(gw.upstream_gets(), before, "no upstream call while open");
    // Past its TTL and SWR window (and well inside breaker_open_ms), the cached page is served
    // as stale-if-error.
    gw.clock().advance(Duration::from_secs(100));
    let stale = gw.client.get(&list_path(CP2), READER).await;
    assert_eq!(
        stale.cache_status(),
        "permgate; fwd=stale; detail=stale-if-error"
    );
    assert_eq!(stale.body, cached.body);
    assert_eq!(gw.upstream_gets(), before);
    assert!(logs().contains("circuit opened"));
    // After breaker_open_ms one probe goes through; it succeeds and closes the circuit.
    gw.clock().advance(Duration::from_secs(500));
    let r = gw
        .client
        .get(&format!("{}?limit=51", list_path(CP)), READER)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.state.upstream.breaker_state(), "closed");
    assert_eq!(gw.upstream_gets(), before + 1);
}

#[tokio::test]
async fn past_the_upstream_concurrency_cap_requests_are_shed_with_503() {
    let gw = start_with(|c| {
        *c = c.replace(
            "request_timeout_ms = 3000",
            "request_timeout_ms = 3000\nmax_concurrency = 1\nqueue_timeout_ms = 50",
        )
    })
    .await;
    let mut held = gw.mock.hold_next();
    let first = {
        let client = gw.client.clone();
        tokio::spawn(async move { client.get(&list_path(CP), READER).await })
    };
    held.arrived().await;
    let started = Instant::now();
    // Another client: the global cap, not the reader's own share, sheds it.
    let shed = gw.client.get(&list_path(CP2), WRITER).await;
    assert_eq!(shed.status, 503);
    assert_eq!(shed.error().0, "unavailable");
    assert_eq!(shed.header("retry-after"), "1");
    assert!(started.elapsed() < Duration::from_secs(2), "bounded wait");
    assert_eq!(gw.upstream_gets(), 1);
    held.release();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(gw.client.get(&list_path(CP2), READER).await.status, 200);
    assert!(logs().contains("shedding the request"));
}

#[tokio::test]
async fn each_client_has_its_own_rate_limit() {
    let gw = start_with(|c| {
        *c = c.replacen(
            "checkpoints = [\"ft:gpt-4o-mini-2024-07-18:acme:*\"]",
            "checkpoints = [\"ft:gpt-4o-mini-2024-07-18:acme:*\"]\nrate_per_second = 1\nburst = 2",
            1,
        )
    })
    .await;
    assert_eq!(gw.client.get(&list_path(CP), READER).await.status, 200);
    assert_eq!(gw.client.get(&list_path(CP), READER).await.status, 200);
    let limited = gw.client.get(&list_path(CP), READER).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.error().0, "rate_limit_exceeded");
    let retry_after: u64 = limited.header("retry-after").parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    // Writes count too, and other clients are unaffected.
    let r = gw.client.post(&list_path(CP), READER, "{}").await;
    assert_eq!(r.status, 403, "grant is checked before the rate limit");
    assert_eq!(gw.client.get(&list_path(CP), WRITER).await.status, 200);
    assert_eq!(gw.upstream_gets(), 1);
}

async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    (stream, String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A keep-alive GET of the list, as raw HTTP/1.1.
fn list_request() -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READER}\r\n\r\n",
        list_path(CP)
    )
}

/// Waits for the peer to close: read returns 0 or an error.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn limited(c: &mut String) {
    *c = c.replace(
        "drain_timeout_ms = 5000",
        "drain_timeout_ms = 5000\nmax_uri_bytes = 1024\nmax_header_bytes = 8192\nheader_read_timeout_ms = 300\nmax_connections = 2",
    );
}

#[tokio::test]
async fn long_uris_are_414_and_big_headers_431_without_upstream() {
    let gw = start_with(limited).await;
    let r = gw
        .client
        .get(
            &format!("{}?after={}", list_path(CP), "a".repeat(1100)),
            READER,
        )
        .await;
    assert_eq!(r.status, 414);
    assert_eq!(r.error().0, "request_too_large");
    let big = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READER}\r\nX-Big: {}\r\n\r\n",
        list_path(CP),
        "b".repeat(10_000)
    );
    let (_, answer) = raw(gw.addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(gw.mock.requests().is_empty());
}

#[tokio::test]
async fn slow_loris_and_idle_keep_alive_connections_are_closed() {
    let gw = start_with(limited).await;
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /v1/fine_tuning/checkpoints/x/permissions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut slow).await,
        "half-sent headers: disconnected"
    );

    let request = list_request();
    let (mut idle, answer) = raw(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        closed_by_server(&mut idle).await,
        "idle keep-alive: disconnected"
    );
}

/// The header read timeout holds for every head on a keep-alive connection, not only the
/// first: after an answered request, a next head that keeps trickling in (so the connection is
/// never silent) is cut off within `header_read_timeout_ms`, although the idle timeout is long.
#[tokio::test]
async fn a_trickling_head_after_a_keep_alive_request_is_disconnected() {
    let gw = start_with(|c| {
        limited(c);
        *c = c.replace(
            "header_read_timeout_ms = 300",
            "header_read_timeout_ms = 300\nidle_timeout_ms = 60000",
        );
    })
    .await;
    let request = list_request();
    // Before the request: the wait for the next head starts once its answer is written.
    let started = tokio::time::Instant::now();
    let (mut stream, answer) = raw(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let head = b"GET /v1/fine_tuning/checkpoints/x/permissions HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut bytes = head.iter().chain(std::iter::repeat(&b'a'));
    let mut buf = [0u8; 1024];
    let closed_after = loop {
        if started.elapsed() > Duration::from_secs(5) {
            panic!("a head still trickling in after 5 s was not cut off");
        }
        let byte = *bytes.next().unwrap();
        if stream.write_all(&[byte]).await.is_err() {
            break started.elapsed();
        }
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => panic!(
                "answered a partial head: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(_) => {}
        }
    };
    assert!(
        closed_after >= Duration::from_millis(250),
        "cut off before the timeout: {closed_after:?}"
    );
    assert_eq!(
        gw.mock.requests().len(),
        1,
        "only the first request reached upstream"
    );
}

#[tokio::test]
async fn connections_past_max_connections_wait_for_a_free_slot() {
    let gw = start_with(|c| {
        limited(c);
        *c = c.replace(
            "header_read_timeout_ms = 300",
            "header_read_timeout_ms = 10000",
        );
    })
    .await;
    let request = list_request();
    let (first, a) = raw(gw.addr, request.as_bytes()).await;
    let (_second, b) = raw(gw.addr, request.as_bytes()).await;
    assert!(a.starts_with("HTTP/1.1 200") && b.starts_with("HTTP/1.1 200"));
    // A third connection is not served while two are open...
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    third.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf))
            .await
            .is_err(),
        "served past max_connections"
    );
    // ...and is served as soon as one closes.
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}
