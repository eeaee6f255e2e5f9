//! Fleet coherence through a real Redis (`redis-server`, started here on a free loopback
//! port) shared by several gateways in front of one mock upstream.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use permgate::clock::Clock;
use permgate::config::Config;
use permgate::mock_upstream::MockUpstream;
use permgate::secret::AdminKey;
use permgate::state::AppState;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::support::*;

struct Redis {
    port: u16,
    child: Option<Child>,
}

/// Installs Debian's redis-server once if this machine lacks it (as `.ci/run` does), so the
/// README's test command works on a fresh machine.
fn ensure_redis_server() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let present = Command::new("sh")
            .args(["-c", "command -v redis-server"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !present {
            let installed = Command::new("sh")
                .args([
                    "-c",
                    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server",
                ])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(installed, "redis-server is missing and could not be installed with apt-get");
        }
    });
}

impl Redis {
    fn start_on(port: u16) -> Redis {
        ensure_redis_server();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server is installed (.ci/run installs it: apt-get install redis-server)",
            );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Redis {
            port,
            child: Some(child),
        }
    }

    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis::start_on(port)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn section(&self, prefix: &str) -> String {
        format!(
            "\n[redis]\nurl = \"redis://127.0.0.1:{}\"\nkey_prefix = \"{prefix}\"\ntimeout_ms = 200\nreconnect_max_ms = 300\n",
            self.port
        )
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Replica {
    state: Arc<AppState>,
    client: TestClient,
    _shutdown: oneshot::Sender<()>,
}

fn config_text(mock: SocketAddr, redis: &Redis, prefix: &str) -> String {
    base_config(mock) + &redis.section(prefix)
}

async fn replica(text: &str) -> Replica {
    init_logs();
    let config = Config::parse(text, &|_| None).unwrap();
    let state = AppState::new(
        &config,
        AdminKey::new(ADMIN_KEY).unwrap(),
        Clock::default(),
        None,
    )
    .unwrap();
    state.start_fleet().await;
    let (addr, shutdown) = serve_state(&state, &config).await;
    let healthy = state.clone();
    eventually("the replica connected to redis", || async {
        healthy.fleet.as_ref().unwrap().is_healthy()
    })
    .await;
    Replica {
        state,
        client: TestClient::new(addr),
        _shutdown: shutdown,
    }
}

async fn fleet_of(n: usize, mock: SocketAddr, redis: &Redis, prefix: &str) -> Vec<Replica> {
    let text = config_text(mock, redis, prefix);
    let mut replicas = Vec::new();
    for _ in 0..n {
        replicas.push(replica(&text).await);
    }
    replicas
}

async fn mock() -> (MockUpstream, SocketAddr, watch::Sender<bool>) {
    let mock = MockUpstream::new(ADMIN_KEY);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(mock.clone().serve(listener, stopped));
    (mock, addr, stop)
}

#[tokio::test]
async fn a_write_through_one_replica_is_seen_at_once_through_the_others() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let fleet = fleet_of(3, addr, &redis, "t1:").await;
    // Every replica has the list cached (the 2nd and 3rd from the shared tier).
    for r in &fleet {
        let first = r.client.get(&list_path(CP), WRITER).await;
        assert_eq!(first.status, 200);
        assert_eq!(
            r.client.get(&list_path(CP), WRITER).await.cache_status(),
            "permgate; hit"
        );
    }
    assert_eq!(
        mock.count(&Method::GET),
        1,
        "one upstream request for the whole fleet"
    );

    let created = fleet[0]
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["proj_fleet"]}"#)
        .await;
    let id = created.ids()[0].clone();
    for (i, r) in fleet.iter().enumerate() {
        let after = r.client.get(&list_path(CP), WRITER).await;
        assert_eq!(after.ids()[0], id, "replica {i} serves the write at once");
    }
    let deleted = fleet[1]
        .client
        .delete(&format!("{}/{id}", list_path(CP)), WRITER)
        .await;
    assert_eq!(deleted.status, 200);
    for (i, r) in fleet.iter().enumerate() {
        assert!(
            !r.client
                .get(&list_path(CP), WRITER)
                .await
                .ids()
                .contains(&id),
            "replica {i}"
        );
    }
}

#[tokio::test]
async fn replicas_times_concurrent_cold_requests_make_one_upstream_request() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let fleet = fleet_of(3, addr, &redis, "t2:").await;
    let mut held = mock.hold_next();
    let path = format!("{}?limit=4", list_path(CP));
    let mut requests = Vec::new();
    for r in &fleet {
        for _ in 0..20 {
            let client = r.client.clone();
            let path = path.clone();
            requests.push(tokio::spawn(async move { client.get(&path, READER).await }));
        }
    }
    held.arrived().await;
    for r in &fleet {
        let state = r.state.clone();
        eventually("20 requests in flight on each replica", || async {
            state.in_flight() == 20
        })
        .await;
    }
    held.release();
    let mut bodies = Vec::new();
    for r in requests {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200);
        bodies.push(r.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        mock.count(&Method::GET),
        1,
        "3 replicas x 20 cold requests: one upstream request"
    );
}

#[tokio::test]
async fn losing_redis_degrades_to_local_serving_and_recovers() {
    let mut redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let fleet = fleet_of(2, addr, &redis, "t3:").await;
    assert_eq!(
        fleet[0].client.get(&list_path(CP), READER).await.status,
        200
    );
    redis.stop();
    // Keep serving: hits, misses, and writes, all without errors.
    for r in &fleet {
        for q in ["", "?limit=3", "?limit=5"] {
            let resp = r.client.get(&format!("{}{q}", list_path(CP)), READER).await;
            assert_eq!(resp.status, 200, "{q}");
        }
    }
    let w = fleet[0]
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["proj_down"]}"#)
        .await;
    assert_eq!(w.status, 200);
    assert!(fleet
        .iter()
        .all(|r| !r.state.fleet.as_ref().unwrap().is_healthy()));
    let metrics = fleet[0].state.render_metrics().await;
    assert!(metrics.contains("permgate_fleet_redis_up 0"), "{metrics}");
    assert!(
        metrics.contains("permgate_fleet_degraded_total 1"),
        "{metrics}"
    );
    assert!(logs().contains("redis unavailable: serving from the local cache only"));

    // Redis returns: the replicas reconnect, drop their local pages, and are coherent again.
    let _redis = Redis::start_on(redis.port);
    for r in &fleet {
        let state = r.state.clone();
        eventually("reconnected", || async {
            state.fleet.as_ref().unwrap().is_healthy()
        })
        .await;
    }
    let before = mock.count(&Method::GET);
    let r = fleet[1].client.get(&list_path(CP), READER).await;
    assert_eq!(
        r.cache_status(),
        "permgate; fwd=miss; stored",
        "local pages were dropped"
    );
    assert!(mock.count(&Method::GET) > before);
    let created = fleet[0]
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["proj_up"]}"#)
        .await;
    let id = created.ids()[0].clone();
    assert_eq!(
        fleet[1].client.get(&list_path(CP), READER).await.ids()[0],
        id
    );
}

#[tokio::test]
async fn a_replica_killed_mid_write_leaves_no_stale_page_anywhere() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let text = config_text(addr, &redis, "t4:");
    let fleet = fleet_of(2, addr, &redis, "t4:").await;
    for r in &fleet {
        r.client.get(&list_path(CP), WRITER).await;
        assert_eq!(
            r.client.get(&list_path(CP), WRITER).await.cache_status(),
            "permgate; hit"
        );
    }
    // A third replica as its own process.
    let dir = std::env::temp_dir().join(format!("permgate-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("permgate.toml");
    std::fs::write(&path, &text).unwrap();
    let (mut doomed, doomed_addr) = spawn_serve(&path, &[("OPENAI_ADMIN_KEY", ADMIN_KEY)]).await;
    let doomed_client = TestClient::new(doomed_addr);
    let mut held = mock.hold_next();
    let write = tokio::spawn(async move {
        doomed_client
            .post(&list_path(CP), WRITER, r#"{"project_ids":["proj_orphan"]}"#)
            .await
    });
    // The create has reached upstream (and is applied there); the replica dies before answering.
    held.arrived().await;
    doomed.0.kill().unwrap();
    doomed.0.wait().unwrap();
    held.release();
    // Whatever the caller saw (the connection died), the fleet must be right.
    let _ = write.await;
    // No replica serves the pre-write list, now or later.
    for round in 0..3 {
        for (i, r) in fleet.iter().enumerate() {
            let resp = r.client.get(&list_path(CP), WRITER).await;
            let projects: Vec<String> = resp.json()["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["project_id"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(
                projects[0],
                "proj_orphan",
                "round {round}, replica {i}: {}",
                resp.cache_status()
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_shared_page_older_than_its_ttl_is_fetched_again_not_served() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let text = config_text(addr, &redis, "t5:");
    let first = replica(&text).await;
    assert_eq!(first.client.get(&list_path(CP), READER).await.status, 200);
    assert_eq!(mock.count(&Method::GET), 1);

    // The fleet's copy now says it was fetched an hour ago (its first 8 bytes: the fetch time
    // in milliseconds since the epoch), far past the 60 s TTL and the stale windows.
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("t5:page:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let hour_ago = (now_ms - 3_600_000).to_be_bytes();
    let _: i64 = redis::cmd("SETRANGE")
        .arg(&keys[0])
        .arg(0)
        .arg(&hour_ago[..])
        .query_async(&mut conn)
        .await
        .unwrap();

    // A replica with nothing cached locally asks upstream instead of serving that copy...
    let second = replica(&text).await;
    let fetched = second.client.get(&list_path(CP), READER).await;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.cache_status(), "permgate; fwd=miss; stored");
    assert_eq!(mock.count(&Method::GET), 2, "the hour-old copy was served");
    // ...and shares what it fetched: the next cold replica takes it without asking upstream.
    let third = replica(&text).await;
    assert_eq!(third.client.get(&list_path(CP), READER).await.status, 200);
    assert_eq!(mock.count(&Method::GET), 2);
}
