//! SPEC "The front door": `server.admin_token_sha256`. With it, `/metrics` and
//! `POST /cache/purge` need `Authorization: Bearer <admin token>` (401 `invalid_api_key`
//! otherwise); `/healthz` and `/readyz` never do. Without it, nothing changes.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

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
        let twice = [("authorization", format!("Bearer {WRONG_TOKEN}"))];
        let twice = [(twice[0].0, twice[0].1.as_str())];
        let r = admin
            .send(method.clone(), path, Some(ADMIN_TOKEN), &twice, None)
            .await;
        assert_refused(&r, &format!("{method} {path} with a second Authorization"));
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

/// `prometheus` on PATH; `None` (with a message) when missing outside CI.
fn prometheus_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("prometheus"))
            .find(|p| p.is_file())
    });
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    assert!(
        found.is_some() || !ci,
        "CI is set but `prometheus` is not on PATH (apt-get install prometheus)"
    );
    if found.is_none() {
        eprintln!("skipped: no `prometheus` on PATH (apt-get install prometheus)");
    }
    found
}

/// deploy/prometheus/prometheus.yml as shipped, pointed at `admin` and `token_file`, scraping
/// every second, plus a job without the token.
fn shipped_scrape_config(admin: SocketAddr, token_file: &Path) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let shipped = std::fs::read_to_string(format!("{root}/deploy/prometheus/prometheus.yml"))
        .expect("deploy/prometheus/prometheus.yml");
    let targets = "[\"10.0.0.5:9090\", \"10.0.0.6:9090\"]";
    assert!(shipped.contains(targets), "the example targets moved");
    let text = shipped
        .replace(targets, &format!("[\"{admin}\"]"))
        .replace(
            "/etc/prometheus/secrets/permgate-admin-token",
            token_file.to_str().unwrap(),
        )
        .replace(
            "/etc/prometheus/rules/permgate.rules.yaml",
            &format!("{root}/deploy/prometheus/permgate.rules.yaml"),
        );
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n{text}\n  \
         - job_name: without-token\n    static_configs:\n      - targets: [\"{admin}\"]\n"
    )
}

#[tokio::test]
async fn a_real_prometheus_scrapes_with_the_shipped_token_file_config() {
    let Some(prometheus) = prometheus_binary() else {
        return;
    };
    let mut gw = start_with_admin_token().await;
    let dir = std::env::temp_dir().join(format!("permgate-admin-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _remove = RemoveOnDrop(dir.clone());
    let token_file = dir.join("permgate-admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, shipped_scrape_config(gw.admin_addr, &token_file)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _prometheus = Process(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
    );
    let prom = format!("127.0.0.1:{port}").parse().unwrap();
    let up = until_target(prom, "permgate", |health| health == "up").await;
    assert_eq!(up, "", "scraped with the token file");
    let refused = until_target(prom, "without-token", |health| health == "down").await;
    assert!(refused.contains("401"), "without the token: {refused}");
    gw.shutdown().await;
}

/// Removes a temporary directory when dropped, a failed test's included.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls Prometheus (at most 30 s: its startup and a few 1 s scrapes) until `job`'s target
/// health satisfies `done`; returns its last error.
async fn until_target(prom: SocketAddr, job: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listening = tokio::net::TcpStream::connect(prom).await.is_ok();
        let r = match listening {
            true => Some(
                TestClient::new(prom)
                    .send(Method::GET, "/api/v1/targets", None, &[], None)
                    .await,
            ),
            false => None,
        };
        if let Some(r) = r.filter(|r| r.status == 200) {
            let v = r.json();
            let targets = v["data"]["activeTargets"].as_array().cloned();
            if let Some(t) = targets
                .unwrap_or_default()
                .into_iter()
                .find(|t| t["labels"]["job"] == job)
            {
                let (health, error) = (
                    t["health"].as_str().unwrap_or_default(),
                    t["lastError"].as_str().unwrap_or_default(),
                );
                if done(health) {
                    return error.to_string();
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for Prometheus' {job} target"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
