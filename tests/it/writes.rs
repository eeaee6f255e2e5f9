//! SPEC "Routes" (create, delete): write permissions, body validation, pass-through of
//! upstream's answer, and the attributed audit trail.

use hyper::Method;
use permgate::mock_upstream::Fault;

use crate::support::*;

#[tokio::test]
async fn only_clients_with_can_write_may_write() {
    let gw = start().await;
    let r = gw
        .client
        .post(&list_path(CP), READER, r#"{"project_ids":["p"]}"#)
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error().0, "permission_denied");
    let r = gw
        .client
        .delete(&format!("{}/cp_abc", list_path(CP)), READER)
        .await;
    assert_eq!(r.status, 403);
    // can_write but no grant for the checkpoint.
    let r = gw
        .client
        .post(&list_path(CP), NOBODY, r#"{"project_ids":["p"]}"#)
        .await;
    assert_eq!(r.status, 403);
    assert!(gw.mock.requests().is_empty());
    let r = gw
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["p1","p2"]}"#)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 2);
    let sent = &gw.mock.requests()[0];
    assert_eq!(sent.method, Method::POST);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&sent.body).unwrap(),
        serde_json::json!({"project_ids":["p1","p2"]})
    );
    assert_eq!(sent.headers["content-type"], "application/json");
    assert_eq!(
        sent.headers["authorization"],
        format!("Bearer {ADMIN_KEY}").as_str()
    );
}

#[tokio::test]
async fn bad_bodies_are_400_or_413_without_upstream() {
    let gw = start_with(|c| {
        *c = c.replace(
            "drain_timeout_ms = 5000",
            "drain_timeout_ms = 5000\nmax_body_bytes = 1024",
        )
    })
    .await;
    for (body, param) in [
        ("not json", "body"),
        ("", "body"),
        ("[1,2]", "body"),
        (r#"{"project_ids":["a"],"extra":true}"#, "body"),
        ("{}", "project_ids"),
        (r#"{"project_ids":[]}"#, "project_ids"),
        (r#"{"project_ids":"proj_1"}"#, "project_ids"),
        (r#"{"project_ids":[42]}"#, "project_ids"),
        (r#"{"project_ids":[""]}"#, "project_ids"),
        // Which of two would count depends on the reader: refused, not guessed.
        (
            r#"{"project_ids":["a"],"project_ids":["b"]}"#,
            "project_ids",
        ),
        (
            r#"{"project_ids":["a"],"project_ids":["a"]}"#,
            "project_ids",
        ),
        (
            r#"{"project_ids":["a"],"project\u005fids":["b"]}"#,
            "project_ids",
        ),
    ] {
        let r = gw.client.post(&list_path(CP), WRITER, body).await;
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(
            r.error(),
            ("invalid_parameter".to_string(), Some(param.to_string())),
            "{body}"
        );
    }
    let huge = format!(r#"{{"project_ids":["{}"]}}"#, "p".repeat(2000));
    let r = gw.client.post(&list_path(CP), WRITER, &huge).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.error().0, "request_too_large");
    let r = gw
        .client
        .post(
            &format!("{}?limit=1", list_path(CP)),
            WRITER,
            r#"{"project_ids":["a"]}"#,
        )
        .await;
    assert_eq!(r.error().1.as_deref(), Some("limit"));
    assert!(gw.mock.requests().is_empty(), "{:?}", gw.mock.requests());
}

#[tokio::test]
async fn upstream_answers_to_writes_pass_through_and_posts_are_not_retried() {
    let gw = start().await;
    let r = gw
        .client
        .delete(&format!("{}/cp_doesnotexist", list_path(CP)), WRITER)
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["message"], "No such permission");
    gw.mock.push_fault(Fault::Status {
        status: 500,
        body: "{}".into(),
        retry_after: None,
    });
    let r = gw
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["p"]}"#)
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(gw.mock.count(&Method::POST), 1);
}

#[tokio::test]
async fn every_write_attempt_is_audited_with_its_client_and_outcome() {
    let dir = std::env::temp_dir().join(format!("permgate-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.jsonl");
    std::fs::write(&path, "{\"pre-existing\":true}\n").unwrap();
    let audit = format!("\n[audit]\npath = \"{}\"\n", path.display());
    let gw = start_with(|c| c.push_str(&audit)).await;

    let created = gw
        .client
        .post(
            &list_path(CP),
            WRITER,
            r#"{"project_ids":["proj_a","proj_b"]}"#,
        )
        .await;
    let id = created.ids()[0].clone();
    let denied = gw
        .client
        .post(&list_path(CP), READER, r#"{"project_ids":["proj_c"]}"#)
        .await;
    let anonymous = gw
        .client
        .send(Method::POST, &list_path(CP), None, &[], Some("{}"))
        .await;
    let deleted = gw
        .client
        .delete(&format!("{}/{id}", list_path(CP)), WRITER)
        .await;
    gw.client.get(&list_path(CP), READER).await; // reads are not audited

    // Each response has left, so each line is already in the file.
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert_eq!(
        lines[0]["pre-existing"], true,
        "the file is appended to, never truncated"
    );
    let (c, d, a, x) = (&lines[1], &lines[2], &lines[3], &lines[4]);
    assert_eq!(c["client"], "writer");
    assert_eq!(c["method"], "POST");
    assert_eq!(c["checkpoint"], CP);
    assert_eq!(c["project_ids"], serde_json::json!(["proj_a", "proj_b"]));
    assert_eq!(c["outcome"], "succeeded");
    assert_eq!(c["upstream_status"], 200);
    assert_eq!(c["request_id"], created.header("x-request-id"));
    assert!(c["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(d["client"], "reader");
    assert_eq!(d["outcome"], "denied");
    assert_eq!(d["status"], 403);
    assert!(d["upstream_status"].is_null());
    assert_eq!(d["request_id"], denied.header("x-request-id"));
    assert!(a["client"].is_null());
    assert_eq!(a["outcome"], "denied");
    assert_eq!(a["status"], 401);
    assert_eq!(a["request_id"], anonymous.header("x-request-id"));
    assert_eq!(x["method"], "DELETE");
    assert_eq!(x["permission_id"], id.as_str());
    assert_eq!(x["outcome"], "succeeded");
    assert_eq!(x["request_id"], deleted.header("x-request-id"));
    for secret in [ADMIN_KEY, READER, WRITER] {
        assert!(!text.contains(secret));
    }
    let logged = logs();
    for request_id in [
        created.header("x-request-id"),
        denied.header("x-request-id"),
    ] {
        assert!(
            logged
                .lines()
                .any(|l| l.contains("permgate::audit") && l.contains(request_id)),
            "audit event for {request_id}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fresh audit file for one test, and the config text that turns it on.
fn audit_file(test: &str) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("permgate-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&path);
    let config = format!("\n[audit]\npath = \"{}\"\n", path.display());
    (path, config)
}

fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_delete_applied_before_the_connection_dropped_lists_both_attempts() {
    let (path, audit) = audit_file("audit-attempts");
    let gw = start_with(|c| {
        c.push_str(&audit);
        *c = c.replace(
            "request_timeout_ms = 3000",
            "request_timeout_ms = 3000\nretry_base_delay_ms = 10\nretry_max_delay_ms = 50",
        );
    })
    .await;
    let id = gw.mock.permission_ids(CP)[0].clone();
    gw.mock.push_fault(Fault::AppliedThenReset);
    let r = gw
        .client
        .delete(&format!("{}/{id}", list_path(CP)), WRITER)
        .await;
    // The first attempt deleted it; the retry finds nothing to delete.
    assert_eq!(r.status, 404);
    assert_eq!(gw.mock.count(&Method::DELETE), 2);
    assert!(!gw.mock.permission_ids(CP).contains(&id));
    let lines = audit_lines(&path);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let record = &lines[0];
    assert_eq!(record["request_id"], r.header("x-request-id"));
    assert_eq!(record["permission_id"], id.as_str());
    assert_eq!(record["upstream_status"], 404);
    assert_eq!(
        record["attempts"],
        serde_json::json!([{"error": "error"}, {"status": 404}]),
        "{record}"
    );
    // A plain write lists its one attempt.
    let created = gw
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["p"]}"#)
        .await;
    assert_eq!(created.status, 200);
    let lines = audit_lines(&path);
    assert_eq!(lines[1]["attempts"], serde_json::json!([{"status": 200}]));
}

#[tokio::test]
async fn a_write_refused_for_its_uri_length_is_audited_without_a_route() {
    let (path, audit) = audit_file("audit-414");
    let gw = start_with(|c| c.push_str(&audit)).await;
    let long = format!("{}?pad={}", list_path(CP), "a".repeat(9 * 1024));
    let r = gw
        .client
        .post(&long, WRITER, r#"{"project_ids":["p"]}"#)
        .await;
    assert_eq!(r.status, 414);
    let r_get = gw.client.get(&long, READER).await;
    assert_eq!(r_get.status, 414, "reads are not audited");
    let long_delete = format!("{}/cp_x?pad={}", list_path(CP), "a".repeat(9 * 1024));
    let deleted = gw.client.delete(&long_delete, WRITER).await;
    assert_eq!(deleted.status, 414);
    assert!(gw.mock.requests().is_empty());
    let lines = audit_lines(&path);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, method, response) in [(&lines[0], "POST", &r), (&lines[1], "DELETE", &deleted)] {
        assert_eq!(line["method"], method);
        assert_eq!(line["request_id"], response.header("x-request-id"));
        assert!(line["route"].is_null(), "{line}");
        assert!(line["client"].is_null() && line["checkpoint"].is_null());
        assert_eq!(line["status"], 414);
        assert_eq!(line["outcome"], "rejected");
        assert_eq!(line["error_code"], "request_too_large");
        assert_eq!(line["attempts"], serde_json::json!([]));
    }
    assert!(!std::fs::read_to_string(&path).unwrap().contains(WRITER));
}

/// A create must be declared JSON: a browser's cross-site POST (`text/plain`, a form, or no
/// type, sent without a preflight, with a client certificate if it holds one) is a 400 that
/// reaches nothing upstream, as are two types. JSON with parameters or in capitals passes.
#[tokio::test]
async fn a_create_not_declared_json_is_400_and_reaches_nothing() {
    let (path, audit) = audit_file("audit-content-type");
    let gw = start_with(|c| c.push_str(&audit)).await;
    let body = r#"{"project_ids":["proj_csrf"]}"#;
    let refused: [&'static [(&str, &str)]; 5] = [
        &[],
        &[("content-type", "text/plain;charset=UTF-8")],
        &[("content-type", "application/x-www-form-urlencoded")],
        &[("content-type", "application/jsonp")],
        &[
            ("content-type", "application/json"),
            ("content-type", "text/plain"),
        ],
    ];
    let list = list_path(CP);
    let create = |headers: &'static [(&'static str, &'static str)]| {
        gw.client
            .send(Method::POST, &list, Some(WRITER), headers, Some(body))
    };
    for headers in refused {
        let r = create(headers).await;
        assert_eq!(r.status, 400, "{headers:?}");
        assert_eq!(
            r.error(),
            ("invalid_parameter".into(), Some("content-type".into()))
        );
    }
    assert!(gw.mock.requests().is_empty());
    assert_eq!(
        audit_lines(&path).len(),
        refused.len(),
        "each attempt is audited"
    );
    let json: [&[(&str, &str)]; 2] = [
        &[("content-type", "application/json; charset=utf-8")],
        &[("content-type", "Application/JSON")],
    ];
    for headers in json {
        assert_eq!(create(headers).await.status, 200, "{headers:?}");
    }
}

/// A POST or DELETE that no route takes (405, 404) is a write attempt too: audited, with no
/// route, and nothing reaches upstream.
#[tokio::test]
async fn a_write_no_route_takes_is_audited_without_a_route() {
    let (path, audit) = audit_file("audit-unrouted");
    let gw = start_with(|c| c.push_str(&audit)).await;
    let attempts = [
        (Method::DELETE, list_path(CP), 405),
        (Method::POST, format!("{}/cp_1", list_path(CP)), 405),
        (Method::DELETE, format!("{}/", list_path(CP)), 404),
        (Method::POST, "/v1/files".to_string(), 404),
    ];
    let mut responses = Vec::new();
    for (method, target, status) in &attempts {
        let r = gw
            .client
            .send(method.clone(), target, Some(WRITER), &[], Some("{}"))
            .await;
        assert_eq!(r.status, *status, "{method} {target}");
        responses.push(r);
    }
    assert_eq!(
        gw.client.get("/v1/files", READER).await.status,
        404,
        "reads are not audited"
    );
    assert!(gw.mock.requests().is_empty());
    let lines = audit_lines(&path);
    assert_eq!(lines.len(), attempts.len(), "{lines:?}");
    for (line, ((method, _, status), r)) in lines.iter().zip(attempts.iter().zip(&responses)) {
        assert_eq!(line["method"], method.as_str());
        assert_eq!(line["request_id"], r.header("x-request-id"));
        assert!(line["route"].is_null(), "{line}");
        assert_eq!(line["status"], *status);
        assert_eq!(line["outcome"], "rejected");
    }
}
