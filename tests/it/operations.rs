//! Operating permgate: metrics on the admin listener, and rotating the admin key or changing
//! the client list without a restart (file change, SIGHUP), with traffic flowing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use permgate::clock::Clock;
use permgate::config::Config;
use permgate::env::SharedEnv;
use permgate::mock_upstream::MockUpstream;
use permgate::reload;
use permgate::secret::AdminKey;
use permgate::state::AppState;

use crate::support::*;

#[tokio::test]
async fn metrics_describe_traffic_cache_and_upstream() {
    let gw = start().await;
    gw.client.get(&list_path(CP), READER).await;
    gw.client.get(&list_path(CP), READER).await;
    gw.client.get(&list_path(CP), "nope").await;
    let metrics = gw
        .admin()
        .send(Method::GET, "/metrics", None, &[], None)
        .await;
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .starts_with("application/openmetrics-text; version=1.0.0"));
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for needle in [
        r#"permgate_requests_total{route="list_permissions",status_class="2xx",cache_status="miss_stored",client="reader"} 1"#,
        r#"permgate_requests_total{route="list_permissions",status_class="2xx",cache_status="hit",client="reader"} 1"#,
        r#"permgate_requests_total{route="list_permissions",status_class="4xx",cache_status="bypass",client="-"} 1"#,
        r#"permgate_upstream_requests_total{status="200",attempt="1"} 1"#,
        "permgate_request_duration_seconds_bucket",
        "permgate_upstream_duration_seconds_count 1",
        "permgate_cache_entries 1",
        "permgate_upstream_circuit_state 0",
        "permgate_build_info{version=",
        "# TYPE permgate_cache_bytes gauge",
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
    // Metrics are for operators only.
    let r = gw.client.get("/metrics", READER).await;
    assert_eq!(r.status, 404);
}

struct Files {
    dir: PathBuf,
    config: PathBuf,
    key: PathBuf,
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A config file using `admin_key_file`, with the mock's address.
fn files(name: &str, mock: std::net::SocketAddr, extra_clients: &str) -> Files {
    let dir = std::env::temp_dir().join(format!("permgate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("admin-key");
    std::fs::write(&key, format!("{ADMIN_KEY}\n")).unwrap();
    let config = dir.join("permgate.toml");
    write_config(&config, mock, &key, extra_clients);
    Files { dir, config, key }
}

fn write_config(path: &Path, mock: std::net::SocketAddr, key: &Path, extra_clients: &str) {
    let text = base_config(mock).replace(
        "request_timeout_ms = 3000",
        &format!(
            "request_timeout_ms = 3000\nadmin_key_file = \"{}\"\nadmin_key_poll_ms = 100",
            key.display()
        ),
    ) + extra_clients;
    // Write then rename, as Kubernetes and config managers do, so no reader sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The gateway's state from `files`, with an environment that sets nothing.
fn load_state(files: &Files) -> (SharedEnv, Config, Arc<AppState>) {
    // The tests read what reloads log, whichever test runs first.
    init_logs();
    let env: SharedEnv = Arc::new(|_| None);
    let config = Config::load(&files.config, &*env).unwrap();
    let key = AdminKey::load(&config.upstream.admin_key, &*env).unwrap();
    let state = AppState::new(&config, key, Clock::default(), None).unwrap();
    (env, config, state)
}

async fn reloads(state: &AppState, result: &str) -> bool {
    state.render_metrics().await.contains(&format!(
        "permgate_admin_key_reloads_total{{result=\"{result}\"}} 1"
    ))
}

#[tokio::test]
async fn rotating_the_key_file_keeps_traffic_flowing_with_no_5xx() {
    let mock = MockUpstream::new(ADMIN_KEY);
    let (mock_addr, _stop) = serve_mock(&mock).await;
    let files = files("rotate", mock_addr, "");
    let (env, config, state) = load_state(&files);
    let (addr, _shutdown) = serve_state(&state, &config).await;
    let watcher = tokio::spawn(reload::watch(
        state.clone(),
        files.config.clone(),
        env,
        config.upstream.admin_key_poll,
        false,
    ));

    // Steady traffic that always reaches upstream (no-cache), counting anything not 200.
    let running = Arc::new(AtomicBool::new(true));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (running, sent, failed) = (running.clone(), sent.clone(), failed.clone());
        let client = TestClient::new(addr);
        tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                let r = client
                    .send(
                        Method::GET,
                        &list_path(CP),
                        Some(READER),
                        &[("cache-control", "no-cache")],
                        None,
                    )
                    .await;
                sent.fetch_add(1, Ordering::Relaxed);
                if r.status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let new_key = "sk-admin-ROTATED-9f8e7d6c5b4a39281706";
    // 1. Upstream accepts both keys (a new admin key was created in OpenAI).
    mock.set_admin_keys(&[ADMIN_KEY, new_key]);
    // 2. The operator updates the mounted key file.
    let tmp = files.key.with_extension("tmp");
    std::fs::write(&tmp, format!("{new_key}\n")).unwrap();
    std::fs::rename(&tmp, &files.key).unwrap();
    eventually("the key file change was picked up", || async {
        reloads(&state, "success").await
    })
    .await;
    // Requests already in flight finish with the key they started with; revoke only once
    // traffic (one request at a time here) has moved to the new key, as an operator would.
    let new_bearer = format!("Bearer {new_key}");
    eventually("traffic uses the new key", || async {
        mock.requests()
            .last()
            .is_some_and(|r| r.headers["authorization"] == new_bearer.as_str())
    })
    .await;
    let at_switch = mock.requests().len();
    // 3. The old key is revoked upstream.
    mock.set_admin_key(new_key);
    eventually("traffic continued after revocation", || async {
        mock.requests().len() > at_switch + 20
    })
    .await;
    running.store(false, Ordering::Relaxed);
    traffic.await.unwrap();
    watcher.abort();

    assert!(sent.load(Ordering::Relaxed) > 20);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed during the rotation"
    );
    let last = mock.requests().pop().unwrap();
    assert_eq!(
        last.headers["authorization"],
        format!("Bearer {new_key}").as_str()
    );
}

#[tokio::test]
async fn a_bad_new_key_file_keeps_the_old_key_and_counts_a_failure() {
    let mock = MockUpstream::new(ADMIN_KEY);
    let (mock_addr, _stop) = serve_mock(&mock).await;
    let files = files("badkey", mock_addr, "");
    let (env, config, state) = load_state(&files);
    std::fs::write(&files.key, "   \n").unwrap();
    assert!(reload::reload(&state, &files.config, &env).is_err());
    assert!(reloads(&state, "failure").await);
    std::fs::write(&files.config, "[server]\nlisten = \"nonsense\"\n").unwrap();
    assert!(reload::reload(&state, &files.config, &env).is_err());
    // Still serving with the old key and clients.
    let (addr, _shutdown) = serve_state(&state, &config).await;
    let r = TestClient::new(addr).get(&list_path(CP), READER).await;
    assert_eq!(r.status, 200);
    assert!(logs().contains("reload failed; keeping the previous admin key and clients"));
}

/// A reload applies the client list and the key; a new file that also changes settings only
/// a restart applies is reloaded all the same, and the reload names those tables and warns.
#[tokio::test]
async fn a_reload_names_the_settings_only_a_restart_applies() {
    init_logs();
    let mock = MockUpstream::new(ADMIN_KEY);
    let (mock_addr, _stop) = serve_mock(&mock).await;
    let files = files("restartonly", mock_addr, "");
    let (env, config, state) = load_state(&files);
    let digest = hex::encode(permgate::auth::digest(b"newcomer-token"));
    let newcomer = format!(
        "\n[[clients]]\nname = \"newcomer\"\ntoken_sha256 = \"{digest}\"\ncheckpoints = [\"*\"]\n"
    );
    write_config(&files.config, mock_addr, &files.key, &newcomer);
    let changed = reload::reload(&state, &files.config, &env).unwrap();
    assert!(changed.is_empty(), "only clients changed: {changed:?}");

    let text = std::fs::read_to_string(&files.config).unwrap();
    let text = text
        .replace("ttl_seconds = 60", "ttl_seconds = 5")
        .replace("drain_timeout_ms = 5000", "drain_timeout_ms = 100");
    std::fs::write(&files.config, text).unwrap();
    let changed = reload::reload(&state, &files.config, &env).unwrap();
    assert_eq!(changed, ["cache", "server"]);
    assert!(logs().contains("the config file changes settings a reload does not apply"));
    let (addr, _shutdown) = serve_state(&state, &config).await;
    let r = TestClient::new(addr)
        .get(&list_path(CP), "newcomer-token")
        .await;
    assert_eq!(r.status, 200, "the client list was applied all the same");
}

#[tokio::test]
async fn sighup_adds_a_client_to_a_running_gateway() {
    let mock = MockUpstream::new(ADMIN_KEY);
    let (mock_addr, _stop) = serve_mock(&mock).await;
    let files = files("sighup", mock_addr, "");
    let (child, addr) = spawn_serve(&files.config, &[]).await;
    let client = TestClient::new(addr);
    let newcomer = "newcomer-token-1";
    assert_eq!(client.get(&list_path(CP), newcomer).await.status, 401);

    let digest = hex::encode(permgate::auth::digest(newcomer.as_bytes()));
    let extra = format!(
        "\n[[clients]]\nname = \"newcomer\"\ntoken_sha256 = \"{digest}\"\ncheckpoints = [\"*\"]\n"
    );
    write_config(&files.config, mock_addr, &files.key, &extra);
    signal(&child, "HUP");
    let mut attempts = 0;
    loop {
        let r = client.get(&list_path(CP), newcomer).await;
        if r.status == 200 {
            break;
        }
        attempts += 1;
        assert!(attempts < 500, "the new client was never accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The existing client kept working.
    assert_eq!(client.get(&list_path(CP), READER).await.status, 200);
    signal(&child, "TERM");
    let mut child = child;
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");
}

/// The access log as a log collector reads it: the real binary with `PERMGATE_LOG_FORMAT=json`
/// writes one JSON object per request with tracing-subscriber's shape, strings escaped, absent
/// optional fields left out, and every line is out by the time the process has exited.
#[tokio::test]
async fn json_access_lines_carry_the_request_fields_and_are_all_written_by_exit() {
    let mock = MockUpstream::new(ADMIN_KEY);
    let (mock_addr, _stop) = serve_mock(&mock).await;
    let name = "svc \"quoted\" \\ é✓\ttab";
    let token = "json-log-token-1";
    let digest = hex::encode(permgate::auth::digest(token.as_bytes()));
    // A JSON string is also a TOML basic string.
    let extra = format!(
        "\n[[clients]]\nname = {}\ntoken_sha256 = \"{digest}\"\ncheckpoints = [\"*\"]\n",
        serde_json::to_string(name).unwrap()
    );
    let files = files("jsonlog", mock_addr, &extra);
    let mut child = Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_permgate"))
            .args(["serve", "--config"])
            .arg(&files.config)
            .env("PERMGATE_LOG", "info")
            .env("PERMGATE_LOG_FORMAT", "json")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let event: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            if let Some(addr) = event["fields"]["listen"].as_str() {
                let _ = addr_tx.send(addr.to_string());
            }
            lines.push(event);
        }
        lines
    });
    let addr = tokio::task::spawn_blocking(move || addr_rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the gateway logged its address");
    let client = TestClient::new(addr.parse().unwrap());
    let miss = client
        .send(
            Method::GET,
            &list_path(CP),
            Some(token),
            &[("x-request-id", "caller-id.1")],
            None,
        )
        .await;
    assert_eq!(miss.status, 200);
    let hit = client.get(&list_path(CP), token).await;
    assert_eq!(hit.cache_status(), "permgate; hit");
    let denied = client.get(&list_path(CP), "not-a-client").await;
    assert_eq!(denied.status, 401);
    signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");
    let lines = reader.join().unwrap();
    assert_eq!(
        lines.last().unwrap()["fields"]["message"],
        "drained; bye",
        "the last line is written before exit"
    );

    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "permgate::access")
        .collect();
    assert_eq!(access.len(), 3, "{lines:#?}");
    for line in &access {
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys, ["fields", "level", "target", "timestamp"]);
        assert_eq!(line["level"], "INFO");
        let time = line["timestamp"].as_str().unwrap();
        assert_eq!(time.len(), "2025-01-31T12:34:56.789012Z".len(), "{time}");
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
        let fields = &line["fields"];
        assert_eq!(fields["message"], "request");
        assert_eq!(fields["method"], "GET");
        assert_eq!(fields["route"], "list_permissions");
        assert!(fields["duration_ms"].as_f64().unwrap() >= 0.0);
    }
    let (miss_line, hit_line, denied_line) = (
        &access[0]["fields"],
        &access[1]["fields"],
        &access[2]["fields"],
    );
    assert_eq!(miss_line["request_id"], "caller-id.1");
    assert_eq!(miss_line["client"], name);
    assert_eq!(miss_line["checkpoint"], CP);
    assert_eq!(miss_line["cache_status"], "miss_stored");
    assert_eq!(miss_line["status"], 200);
    assert_eq!(miss_line["upstream_status"], 200);
    assert_eq!(hit_line["request_id"], hit.header("x-request-id"));
    assert_eq!(hit_line["client"], name);
    assert_eq!(hit_line["cache_status"], "hit");
    assert!(hit_line.get("upstream_status").is_none(), "{hit_line}");
    assert_eq!(denied_line["status"], 401);
    // Refused before the checkpoint is read: neither client nor checkpoint.
    assert!(denied_line.get("client").is_none(), "{denied_line}");
    assert!(denied_line.get("checkpoint").is_none(), "{denied_line}");
    assert_eq!(denied_line["cache_status"], "bypass");
}

/// SPEC "Hygiene rules": a FIFO at the admin key file's path (or anything else that is not a
/// regular file) stalls nothing: the key poll and a SIGHUP reload refuse it, keep the key in
/// use and log why, requests keep being answered, and SIGTERM still exits within the drain
/// timeout. One worker thread, so a blocked runtime thread would stall everything.
#[tokio::test]
async fn a_fifo_at_the_key_file_path_stalls_nothing() {
    let mock = MockUpstream::new(ADMIN_KEY);
    let (mock_addr, _stop) = serve_mock(&mock).await;
    let files = files("fifo", mock_addr, "");
    let text = std::fs::read_to_string(&files.config).unwrap();
    std::fs::write(
        &files.config,
        text.replace("[server]\n", "[server]\nworker_threads = 1\n"),
    )
    .unwrap();
    let (child, addr) = spawn_serve(&files.config, &[]).await;
    let client = TestClient::new(addr);
    assert_eq!(client.get(&list_path(CP), READER).await.status, 200);

    std::fs::remove_file(&files.key).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&files.key)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    // The key file is polled every 100 ms: give the poll several chances to hit the FIFO,
    // then reload on SIGHUP too. Every request must still be answered promptly.
    signal(&child, "HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
    while tokio::time::Instant::now() < deadline {
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            client.get(&format!("{}?limit=2", list_path(CP)), READER),
        )
        .await
        .expect("a request was answered within 2 s while the key file is a FIFO");
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(&child, "TERM");
    let mut child = child;
    let exited = tokio::time::timeout(
        Duration::from_secs(8),
        tokio::task::spawn_blocking(move || child.0.wait().unwrap()),
    )
    .await
    .expect("serve exits within the drain timeout on SIGTERM")
    .unwrap();
    assert!(exited.success(), "{exited:?}");
}

/// SPEC "Hygiene rules": on SIGHUP the audit file is reopened, so log rotation (`mv`, then
/// SIGHUP) loses no record and leaves none in the moved file.
#[tokio::test]
async fn sighup_reopens_the_audit_file_after_rotation() {
    let mock = MockUpstream::new(ADMIN_KEY);
    let (mock_addr, _stop) = serve_mock(&mock).await;
    let files = files("rotate-audit", mock_addr, "");
    let audit = files.dir.join("audit.jsonl");
    let rotated = files.dir.join("audit.jsonl.1");
    let text = std::fs::read_to_string(&files.config).unwrap();
    std::fs::write(
        &files.config,
        format!("{text}\n[audit]\npath = \"{}\"\n", audit.display()),
    )
    .unwrap();
    let (child, addr) = spawn_serve(&files.config, &[]).await;
    let client = TestClient::new(addr);
    let create = |body: &'static str| {
        let (client, path) = (&client, list_path(CP));
        async move { client.post(&path, WRITER, body).await.status }
    };
    assert_eq!(create(r#"{"project_ids":["proj_before"]}"#).await, 200);
    std::fs::rename(&audit, &rotated).unwrap();
    signal(&child, "HUP");
    eventually("the audit file is reopened", || async { audit.exists() }).await;
    assert_eq!(create(r#"{"project_ids":["proj_after"]}"#).await, 200);
    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&audit).unwrap();
    assert!(
        old.contains("proj_before") && !old.contains("proj_after"),
        "{old}"
    );
    assert!(
        new.contains("proj_after") && !new.contains("proj_before"),
        "{new}"
    );
}
