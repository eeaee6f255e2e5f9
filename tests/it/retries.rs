//! What every answer tells the OpenAI SDKs about retrying (`x-should-retry`,
//! `retry-after-ms`, `Retry-After`): the SDKs retry 408, 409, 429, 5xx and connection errors
//! by default, deciding first from `x-should-retry`. permgate says `false` where a retry
//! cannot help and `true` with a wait where waiting can.

use std::time::Duration;

use hyper::Method;
use permgate::mock_upstream::Fault;

use crate::support::*;

const CREATE: &str = r#"{"project_ids":["proj_retry"]}"#;

fn fault(code: u16) -> Fault {
    Fault::Status {
        status: code,
        body: format!("{{\"error\":{{\"message\":\"upstream says {code}\"}}}}"),
        retry_after: None,
    }
}

fn advice(r: &TestResponse) -> (Option<&str>, Option<u64>, Option<u64>) {
    let get = |name: &str| r.headers.get(name).map(|v| v.to_str().unwrap());
    let number = |name: &str| get(name).map(|v| v.parse::<u64>().unwrap());
    (
        get("x-should-retry"),
        number("retry-after-ms"),
        number("retry-after"),
    )
}

#[tokio::test]
async fn answers_a_retry_cannot_fix_say_so() {
    let gw = start_with(|c| {
        *c = c.replace(
            "drain_timeout_ms = 5000",
            "drain_timeout_ms = 5000\nmax_body_bytes = 64\nmax_uri_bytes = 512",
        )
    })
    .await;
    let list = list_path(CP);
    let long = format!("{list}?after={}", "a".repeat(600));
    // (what, method, path, token, body, status)
    type Case<'a> = (
        &'a str,
        Method,
        String,
        Option<&'a str>,
        Option<&'a str>,
        u16,
    );
    let cases: Vec<Case> = vec![
        (
            "400",
            Method::GET,
            format!("{list}?limit=0"),
            Some(READER),
            None,
            400,
        ),
        ("401", Method::GET, list.clone(), Some("nope"), None, 401),
        (
            "403",
            Method::POST,
            list.clone(),
            Some(READER),
            Some(CREATE),
            403,
        ),
        (
            "404",
            Method::GET,
            "/v1/models".into(),
            Some(READER),
            None,
            404,
        ),
        ("405", Method::PUT, list.clone(), Some(READER), None, 405),
        (
            "413",
            Method::POST,
            list.clone(),
            Some(WRITER),
            Some(
                r#"{"project_ids":["proj_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]}"#,
            ),
            413,
        ),
        ("414", Method::POST, long, Some(WRITER), Some(CREATE), 414),
    ];
    for (what, method, path, token, body, status) in cases {
        let r = gw.client.send(method, &path, token, &[], body).await;
        assert_eq!(r.status, status, "{what}");
        assert_eq!(advice(&r), (Some("false"), None, None), "{what}");
    }
    // Upstream's own 4xx, passed through: the same request would get the same answer.
    for code in [400, 404, 409, 422] {
        gw.mock.push_fault(fault(code));
        let r = gw.client.post(&list, WRITER, CREATE).await;
        assert_eq!(r.status, code);
        assert_eq!(advice(&r).0, Some("false"), "passed-through {code}");
    }
    // Upstream answered, but nothing to pass on (not JSON, a 2xx of the wrong shape, a status
    // the endpoints do not have): asking again gets the same answer.
    for unusable in [
        Fault::MalformedJson,
        fault(418),
        Fault::Status {
            status: 200,
            body: r#"{"object":"list"}"#.into(),
            retry_after: None,
        },
    ] {
        gw.mock.push_fault(unusable);
        let r = gw.client.get(&list, READER).await;
        assert_eq!(r.status, 502);
        assert_eq!(r.error().0, "upstream_error");
        assert_eq!(advice(&r), (Some("false"), None, None), "{:?}", r.body);
    }
    // Success says nothing.
    let r = gw.client.get(&list, READER).await;
    assert_eq!((r.status.as_u16(), advice(&r)), (200, (None, None, None)));
}

#[tokio::test]
async fn a_write_whose_outcome_is_unknown_is_not_retried_and_a_read_may_be() {
    let gw = start_with(|c| {
        *c = c.replace(
            "request_timeout_ms = 3000",
            "request_timeout_ms = 300\nmax_retries = 0\nbreaker_threshold = 0",
        )
    })
    .await;
    let list = list_path(CP);
    // Upstream did not answer in time: it may still apply the create.
    gw.mock.push_fault(Fault::Delay(Duration::from_millis(800)));
    let r = gw.client.post(&list, WRITER, CREATE).await;
    assert_eq!(r.status, 504);
    assert_eq!(advice(&r).0, Some("false"));
    // Upstream failed after receiving the delete.
    gw.mock.push_fault(fault(500));
    let r = gw.client.delete(&format!("{list}/cp_x"), WRITER).await;
    assert_eq!(r.status, 502);
    assert_eq!(advice(&r).0, Some("false"));
    // A read changes nothing upstream: the SDK's own retry of a 5xx is welcome.
    gw.mock.push_fault(fault(500));
    let r = gw.client.get(&list, READER).await;
    assert_eq!(r.status, 502);
    assert_eq!(advice(&r), (None, None, None));
}

#[tokio::test]
async fn a_rate_limited_client_is_told_how_long_to_wait() {
    let gw = start_with(|c| {
        *c = c.replace(
            "name = \"reader\"",
            "name = \"reader\"\nrate_per_second = 2\nburst = 1",
        )
    })
    .await;
    let list = list_path(CP);
    assert_eq!(gw.client.get(&list, READER).await.status, 200);
    let r = gw.client.get(&list, READER).await;
    assert_eq!(r.status, 429);
    let (should, ms, secs) = advice(&r);
    assert_eq!(should, Some("true"));
    // One token every 500 ms.
    assert!(ms.is_some_and(|ms| (1..=500).contains(&ms)), "{ms:?}");
    assert_eq!(secs, Some(1));
}

#[tokio::test]
async fn an_open_circuit_says_when_upstream_will_be_tried_again() {
    let gw = start_with(|c| {
        *c = c.replace(
            "request_timeout_ms = 3000",
            "request_timeout_ms = 3000\nmax_retries = 0\nbreaker_threshold = 1\nbreaker_open_ms = 4000",
        )
    })
    .await;
    gw.mock.push_fault(fault(500));
    assert_eq!(gw.client.get(&list_path(CP), READER).await.status, 502);
    gw.clock().advance(Duration::from_millis(1500));
    for r in [
        gw.client
            .get(&format!("{}?limit=2", list_path(CP)), READER)
            .await,
        gw.client.post(&list_path(CP), WRITER, CREATE).await,
    ] {
        assert_eq!(r.status, 503);
        // 4 s open, 1.5 s (and a few real milliseconds) of it gone: the rest, in milliseconds
        // and in rounded-up seconds.
        let (should, ms, secs) = advice(&r);
        assert_eq!((should, secs), (Some("true"), Some(3)));
        assert!(ms.is_some_and(|ms| (2000..=2500).contains(&ms)), "{ms:?}");
    }
}

#[tokio::test]
async fn a_full_upstream_queue_says_to_retry_after_the_queue_wait() {
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
    // Another client: the global queue, not the reader's own share, is what is full.
    let r = gw
        .client
        .get(&format!("{}?limit=3", list_path(CP)), WRITER)
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(advice(&r), (Some("true"), Some(50), Some(1)));
    held.release();
    assert_eq!(first.await.unwrap().status, 200);
}
