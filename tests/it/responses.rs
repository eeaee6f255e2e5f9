//! SPEC "Responses": what upstream receives (and never receives), how upstream faults map to
//! 502/503/504, request ids, and that no piece of the admin key ever leaves permgate.

use std::time::{Duration, Instant};

use hyper::Method;
use permgate::mock_upstream::Fault;

use crate::support::*;

#[tokio::test]
async fn upstream_gets_the_admin_key_and_nothing_of_the_callers_credentials() {
    let gw = start().await;
    let r = gw
        .client
        .send(
            Method::GET,
            &list_path(CP),
            Some(READER),
            &[
                ("cookie", "session=caller-cookie"),
                ("openai-organization", "org-caller"),
                ("openai-project", "proj-caller"),
                ("x-api-key", "caller-api-key"),
                ("proxy-authorization", "Basic caller"),
                ("x-forwarded-for", "10.1.2.3"),
                ("x-request-id", "caller-req-42"),
            ],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), "caller-req-42");
    let sent = &gw.mock.requests()[0];
    assert_eq!(
        sent.headers["authorization"],
        format!("Bearer {ADMIN_KEY}").as_str()
    );
    assert_eq!(sent.headers["x-client-request-id"], "caller-req-42");
    for absent in [
        "cookie",
        "openai-organization",
        "openai-project",
        "x-api-key",
        "proxy-authorization",
        "x-forwarded-for",
        "x-request-id",
    ] {
        assert!(!sent.headers.contains_key(absent), "{absent} was forwarded");
    }
    let all: String = sent
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    assert!(!all.contains(READER), "caller token forwarded: {all}");
}

#[tokio::test]
async fn request_ids_are_made_when_missing_or_insane_and_match_upstream() {
    let gw = start().await;
    let r = gw.client.get(&list_path(CP), READER).await;
    let id = r.header("x-request-id").to_string();
    assert!(id.starts_with("req_") && id.len() > 10, "{id}");
    assert_eq!(
        gw.mock.requests()[0].headers["x-client-request-id"],
        id.as_str()
    );
    let r = gw
        .client
        .send(
            Method::GET,
            &list_path(CP),
            Some(READER),
            &[("x-request-id", "bad id;x")],
            None,
        )
        .await;
    assert_ne!(r.header("x-request-id"), "bad id;x");
    // Errors carry one too.
    let r = gw.client.get("/nope", READER).await;
    assert!(r.header("x-request-id").starts_with("req_"));
    let logged = logs();
    let access = logged
        .lines()
        .find(|l| l.contains("permgate::access") && l.contains(&id))
        .expect("an access event for the request");
    for field in [
        "method=\"GET\"",
        "client=\"reader\"",
        "route=\"list_permissions\"",
        &format!("checkpoint=\"{CP}\""),
        "cache_status=\"miss_stored\"",
        "status=200",
        "duration_ms=",
    ] {
        assert!(
            access.contains(field),
            "{field} missing from the request span: {access}"
        );
    }
}

async fn status_after(gw: &Gateway, fault: Fault) -> TestResponse {
    gw.mock.push_fault(fault);
    gw.client.get(&list_path(CP), READER).await
}

/// Single attempts: how each upstream answer maps (retries are covered in `resilience`).
fn no_retries(c: &mut String) {
    *c = c.replace(
        "request_timeout_ms = 3000",
        "request_timeout_ms = 3000\nmax_retries = 0",
    );
}

#[tokio::test]
async fn upstream_faults_map_to_the_spec_statuses() {
    let gw = start_with(no_retries).await;
    let cases = [
        (
            Fault::Status {
                status: 500,
                body: "{}".into(),
                retry_after: None,
            },
            502,
            "upstream_error",
        ),
        (
            Fault::Status {
                status: 502,
                body: "<html>".into(),
                retry_after: None,
            },
            502,
            "upstream_error",
        ),
        (
            Fault::Status {
                status: 418,
                body: "{}".into(),
                retry_after: None,
            },
            502,
            "upstream_error",
        ),
        (
            Fault::Status {
                status: 429,
                body: "{}".into(),
                retry_after: Some(7),
            },
            503,
            "unavailable",
        ),
        (Fault::MalformedJson, 502, "upstream_error"),
    ];
    for (fault, status, code) in cases {
        let r = status_after(&gw, fault).await;
        let id = r.header("x-request-id").to_string();
        if status == 502 && code == "upstream_error" {
            // The failed attempt is logged with the request id and the attempt number.
            let logged = logs();
            assert!(
                logged
                    .lines()
                    .any(|l| l.contains(&format!("request_id=\"{id}\"")) && l.contains("attempt=1")),
                "no upstream warning for {id}"
            );
        }
        assert_eq!(r.status, status, "{:?}", r.body);
        assert_eq!(r.error().0, code);
        assert_eq!(r.cache_status(), "permgate; fwd=miss");
    }
    // The gateway still serves after every fault.
    let r = gw.client.get(&list_path(CP), READER).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.cache_status(), "permgate; fwd=miss; stored");
}

#[tokio::test]
async fn upstream_429_passes_its_retry_after_on() {
    let gw = start_with(no_retries).await;
    let r = status_after(
        &gw,
        Fault::Status {
            status: 429,
            body: "{}".into(),
            retry_after: Some(7),
        },
    )
    .await;
    assert_eq!(r.header("retry-after"), "7");
}

#[tokio::test]
async fn a_slow_upstream_is_a_504_within_the_deadline() {
    let gw =
        start_with(|c| *c = c.replace("request_timeout_ms = 3000", "request_timeout_ms = 300"))
            .await;
    let started = Instant::now();
    let r = status_after(&gw, Fault::Delay(Duration::from_secs(5))).await;
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.error().0, "upstream_timeout");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502() {
    // Bind and drop a listener: nothing is listening on that port any more.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = start_with(|c| {
        let start = c.find("base_url = ").unwrap();
        let end = start + c[start..].find('\n').unwrap();
        c.replace_range(start..end, &format!("base_url = \"http://{dead}/v1\""));
    })
    .await;
    let r = gw.client.get(&list_path(CP), READER).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error().0, "upstream_error");
}

#[tokio::test]
async fn a_rejected_admin_key_is_502_and_upstreams_message_is_not_echoed() {
    let gw = start().await;
    gw.mock.set_admin_key("sk-admin-the-rotated-one-0000");
    let r = gw.client.get(&list_path(CP), READER).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error().0, "upstream_auth_failed");
    let text = String::from_utf8_lossy(&r.body);
    assert!(!text.contains("Incorrect API key"), "{text}");
    // The mock's 401 really did quote a piece of the key: the gateway dropped it.
    assert!(gw.mock.requests()[0].headers.contains_key("authorization"));
    assert_no_key_piece(&text, "the 502");
}

#[tokio::test]
async fn no_piece_of_the_admin_key_reaches_any_response_or_log_line() {
    let gw =
        start_with(|c| *c = c.replace("request_timeout_ms = 3000", "request_timeout_ms = 300"))
            .await;
    // Drive every path that handles the key or upstream's answers.
    let hit = gw.client.get(&list_path(CP), READER).await;
    gw.client.get(&list_path(CP), READER).await;
    gw.client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["p1"]}"#)
        .await;
    gw.client
        .post(&list_path(CP), READER, r#"{"project_ids":["p1"]}"#)
        .await;
    gw.client.get(&list_path(CP), "wrong").await;
    gw.client
        .get("/v1/fine_tuning/checkpoints/%00/permissions", READER)
        .await;
    gw.mock.push_fault(Fault::Status {
        status: 500,
        body: format!("{{\"leak\":\"{ADMIN_KEY}\"}}"),
        retry_after: None,
    });
    gw.client.get(&list_path(CP2), READER).await;
    gw.mock.push_fault(Fault::Delay(Duration::from_secs(2)));
    gw.client
        .get(&format!("{}?limit=2", list_path(CP2)), READER)
        .await;
    gw.mock.set_admin_key("sk-admin-something-else-entirely");
    gw.client
        .get(&format!("{}?limit=3", list_path(CP2)), READER)
        .await;
    gw.client
        .delete(&format!("{}/cp_x", list_path(CP)), WRITER)
        .await;
    // Also the Debug form of the whole state, as a panic message would print it.
    let debug = format!("{:?}", permgate::secret::AdminKey::new(ADMIN_KEY).unwrap());

    let responses = responses_seen().lock().unwrap().join("\n---\n");
    assert!(!responses.is_empty());
    assert_no_key_piece(&responses, "the responses");
    let logs = logs();
    assert!(
        logs.contains("upstream rejected the admin key"),
        "the 401 was logged"
    );
    let id = hit.header("x-request-id");
    assert!(
        logs.lines()
            .any(|l| l.contains("permgate::access") && l.contains(id)),
        "this test's access events were captured"
    );
    assert_no_key_piece(&logs, "the logs");
    assert_no_key_piece(&debug, "Debug output");
}
