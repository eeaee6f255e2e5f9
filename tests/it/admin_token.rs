//! SPEC "The front door": `server.admin_token_sha256`. With it, `/metrics` and
//! `POST /cache/purge` need `Authorization: Bearer <admin token>` (401 `invalid_api_key`
//! otherwise); `/healthz` and `/readyz` never do. Without it, nothing changes.

use std::io::Write as _;
use std::process::{Command, Stdio};

use hyper::Method;

use crate::support::*;

/// Recognizable, so the log check below cannot miss it.
const ADMIN_TOKEN: &str = "adm1n-T0ken-Q7vX2pL9zR4wK8";
const WRONG_TOKEN: &str = "wr0ng-T0ken-B3nM6cV1xZ5hJ0";

/// What `permgate hash-token` prints for `token`: the value operators put in the config.
fn hash_token(token: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_permgate"))
        .arg("hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{token}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn start_with_admin_token() -> Gateway {
    let digest = hash_token(ADMIN_TOKEN);
    start_with(|text| {
        *text = text.replace(
            "admin_listen = \"127.0.0.1:0\"",
            &format!("admin_listen = \"127.0.0.1:0\"\nadmin_token_sha256 = \"{digest}\""),
        );
    })
    .await
}

fn assert_refused(r: &TestResponse, what: &str) {
    assert_eq!(
        r.status,
        401,
        "{what}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.error(), ("invalid_api_key".to_string(), None), "{what}");
    assert_eq!(r.header("x-should-retry"), "false", "{what}");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("admin token"), "{what}: {message}");
    for token in [ADMIN_TOKEN, WRONG_TOKEN, WRITER] {
        assert!(
            !String::from_utf8_lossy(&r.body).contains(token),
            "{what} echoes a token"
        );
    }
}

/// The endpoints that need the token: method, path, and what a success looks like.
const GUARDED: [(Method, &str); 3] = [
    (Method::GET, "/metrics"),
    (Method::POST, "/cache/purge"),
    (
        Method::POST,
        "/cache/purge?checkpoint=ft%3Agpt-4o-mini-2024-07-18%3Aacme%3Ax%3Ay",
    ),
];

#[tokio::test]
async fn metrics_and_purge_need_the_admin_token() {
    let mut gw = start_with_admin_token().await;
    let admin = gw.admin();
    for (method, path) in GUARDED {
        let none = admin.send(method.clone(), path, None, &[], None).await;
        assert_refused(&none, &format!("{method} {path} without a token"));
        for wrong in [WRONG_TOKEN, WRITER, &ADMIN_TOKEN[1..]] {
            let r = admin
                .send(method.clone(), path, Some(wrong), &[], None)
                .await;
            assert_refused(&r, &format!("{method} {path} with a wrong token"));
        }
        let basic = admin
            .send(
                method.clone(),
                path,
                None,
                &[("authorization", &format!("Basic {ADMIN_TOKEN}"))],
                None,
            )
            .await;
        assert_refused(&basic, &format!("{method} {path} with a Basic scheme"));
        let ok = admin
            .send(method.clone(), path, Some(ADMIN_TOKEN), &[], None)
            .await;
        assert_eq!(ok.status, 200, "{method} {path} with the admin token");
    }
    let scrape = admin
        .send(Method::GET, "/metrics", Some(ADMIN_TOKEN), &[], None)
        .await;
    assert!(String::from_utf8_lossy(&scrape.body).contains("permgate_build_info"));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_refused_purge_drops_nothing() {
    let mut gw = start_with_admin_token().await;
    let admin = gw.admin();
    assert_eq!(gw.client.get(&list_path(CP), READER).await.status, 200);
    let r = admin
        .send(Method::POST, "/cache/purge", Some(WRONG_TOKEN), &[], None)
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        gw.client.get(&list_path(CP), READER).await.cache_status(),
        "permgate; hit",
        "the page survived the refused purge"
    );
    let r = admin
        .send(Method::POST, "/cache/purge", Some(ADMIN_TOKEN), &[], None)
        .await;
    assert_eq!(r.json()["purged"], "all");
    assert_eq!(
        gw.client.get(&list_path(CP), READER).await.cache_status(),
        "permgate; fwd=miss; stored"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn health_and_readiness_never_need_the_admin_token() {
    let mut gw = start_with_admin_token().await;
    let admin = gw.admin();
    for path in ["/healthz", "/readyz"] {
        for token in [None, Some(WRONG_TOKEN), Some(ADMIN_TOKEN)] {
            let r = admin.send(Method::GET, path, token, &[], None).await;
            assert_eq!(r.status, 200, "{path} with {token:?}");
        }
    }
    // Routing comes first: an unknown path or a wrong method needs no token to be told so.
    let r = admin
        .send(Method::GET, "/cache/purge", None, &[], None)
        .await;
    assert_eq!(r.status, 405);
    let r = admin.send(Method::GET, "/nope", None, &[], None).await;
    assert_eq!(r.status, 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn without_an_admin_token_the_admin_listener_is_open_as_before() {
    let mut gw = start().await;
    let admin = gw.admin();
    for (method, path) in GUARDED {
        for token in [None, Some(WRONG_TOKEN)] {
            let r = admin.send(method.clone(), path, token, &[], None).await;
            assert_eq!(r.status, 200, "{method} {path} with {token:?}");
        }
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_tokens_never_reach_the_logs() {
    let mut gw = start_with_admin_token().await;
    let admin = gw.admin();
    for token in [None, Some(WRONG_TOKEN), Some(ADMIN_TOKEN)] {
        admin.send(Method::GET, "/metrics", token, &[], None).await;
        admin
            .send(Method::POST, "/cache/purge", token, &[], None)
            .await;
    }
    gw.shutdown().await;
    let logs = logs();
    assert!(
        logs.contains("admin request refused: missing or wrong admin token"),
        "refusals are logged"
    );
    for token in [ADMIN_TOKEN, WRONG_TOKEN] {
        for i in 0..=token.len() - 6 {
            let piece = &token[i..i + 6];
            assert!(
                !logs.contains(piece),
                "piece {piece:?} of a token in the logs"
            );
        }
    }
}
