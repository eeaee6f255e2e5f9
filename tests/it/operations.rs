//! Operating permgate: metrics on the admin listener, and rotating the admin key or changing
//! the client list without a restart (file change, SIGHUP), with traffic flowing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use permgate::clock::Clock;
use permgate::config::Config;
use permgate::mock_upstream::MockUpstream;
use permgate::proxy::AppState;
use permgate::reload;
use permgate::secret::AdminKey;
use tokio::net::TcpListener;
use tokio::sync::watch;

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
    assert!(metrics.header("content-type").starts_with("text/plain"));
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

async fn serve_mock(mock: &MockUpstream) -> (std::net::SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(mock.clone().serve(listener, stopped));
    (addr, stop)
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
    let env: reload::Env = Arc::new(|_| None);
    let config = Config::load(&files.config, &*env).unwrap();
    let key = AdminKey::load(&config.upstream.admin_key, &*env).unwrap();
    let state = AppState::new(&config, key, Clock::default(), None).unwrap();
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
    let env: reload::Env = Arc::new(|_| None);
    let config = Config::load(&files.config, &*env).unwrap();
    let key = AdminKey::load(&config.upstream.admin_key, &*env).unwrap();
    let state = AppState::new(&config, key, Clock::default(), None).unwrap();
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
