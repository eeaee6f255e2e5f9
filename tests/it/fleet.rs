//! Fleet coherence through a real Redis (`redis-server`, started here on a free loopback
//! port) shared by several gateways in front of one mock upstream.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use permgate::clock::Clock;
use permgate::config::Config;
use permgate::fleet::Lease;
use permgate::mock_upstream::Fault;
use permgate::secret::AdminKey;
use permgate::state::AppState;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
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
        Redis::start_in(port, None, &[])
    }

    /// With `dir`, `SAVE` writes a snapshot there and a restart on `dir` loads it; `options`
    /// are more of redis-server's.
    fn start_in(port: u16, dir: Option<&std::path::Path>, options: &[&str]) -> Redis {
        ensure_redis_server();
        let mut command = Command::new("redis-server");
        command.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        if let Some(dir) = dir {
            command.arg("--dir").arg(dir);
        }
        command.args(options);
        let child = command
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
        Redis::start_with(&[])
    }

    fn start_with(options: &[&str]) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis::start_in(port, None, options)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn section(&self, prefix: &str) -> String {
        format!(
            "\n[redis]\nurl = \"redis://127.0.0.1:{}\"\nkey_prefix = \"{prefix}\"\ntimeout_ms = 100\nreconnect_max_ms = 300\nlease_ms = 600\n",
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
    let replica = starting_replica(text).await;
    until_lease(&replica, Lease::Held).await;
    replica
}

/// Waits (bounded) until the replica's lease is `lease`.
async fn until_lease(replica: &Replica, lease: Lease) {
    let state = replica.state.clone();
    eventually(&format!("the lease is {lease:?}"), || async {
        state.fleet.as_ref().unwrap().lease() == lease
    })
    .await;
}

/// A replica serving, whether or not it has a lease yet.
async fn starting_replica(text: &str) -> Replica {
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

/// The replica holding a key's fetch lock loses its request (the caller went away) mid-fetch:
/// the lock is released then, and another replica's miss fetches at once instead of polling
/// for a page that will not come until the lock runs out (the upstream deadline, 3 s here).
#[tokio::test]
async fn a_cancelled_fetch_releases_the_fleet_fetch_lock() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let fleet = fleet_of(2, addr, &redis, "t19:").await;
    let path = format!("{}?limit=5", list_path(CP));
    let mut held = mock.hold_next();
    let (client, cancelled) = (fleet[0].client.clone(), path.clone());
    let leader = tokio::spawn(async move { client.get(&cancelled, READER).await });
    held.arrived().await;
    leader.abort();
    let state = fleet[0].state.clone();
    eventually("the request is dropped", || async {
        state.in_flight() == 0
    })
    .await;
    held.release();
    let started = Instant::now();
    let read = fleet[1].client.get(&path, READER).await;
    let took = started.elapsed();
    assert_eq!(read.status, 200);
    assert!(
        took < Duration::from_secs(1),
        "waited {took:?} on a lock nobody holds"
    );
    assert_eq!(mock.count(&Method::GET), 2);
}

/// A replica's request is cancelled while its LOOKUP is still on the way to Redis: the call
/// then takes the fetch lock for a fetch that never happens. The replica releases it once the
/// call is through, so another replica's miss fetches at once instead of polling until the
/// lock runs out (the upstream deadline, 3 s here).
#[tokio::test]
async fn a_lookup_cancelled_on_its_way_releases_the_lock_it_takes() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    // Redis may be slow here without the replica giving up on it.
    let text = config_text(addr, &redis, "t23:")
        .replace("timeout_ms = 100", "timeout_ms = 5000")
        .replace("lease_ms = 600", "lease_ms = 30000");
    let relay = Relay::start(([127, 0, 0, 1], redis.port).into()).await;
    let a = replica(&through(&text, &redis, relay.addr)).await;
    let b = replica(&text).await;
    let path = format!("{}?limit=6", list_path(CP));
    relay.stall();
    let (client, cancelled) = (a.client.clone(), path.clone());
    let request = tokio::spawn(async move { client.get(&cancelled, READER).await });
    let state = a.state.clone();
    eventually("the read is in flight", || async { state.in_flight() == 1 }).await;
    // Its LOOKUP is written at once, into the stalled relay.
    tokio::time::sleep(Duration::from_millis(100)).await;
    request.abort();
    eventually("the read is dropped", || async { state.in_flight() == 0 }).await;
    relay.resume();
    // A's calls reach Redis in order: once a later lookup of A's is answered, the cancelled
    // one has taken its lock (and what A sent after it has run).
    let other = format!("{}?limit=7", list_path(CP));
    assert_eq!(a.client.get(&other, READER).await.status, 200);
    let started = Instant::now();
    let read = b.client.get(&path, READER).await;
    let took = started.elapsed();
    assert_eq!(read.status, 200);
    assert!(
        took < Duration::from_secs(1),
        "waited {took:?} on a lock nobody holds"
    );
    assert_eq!(
        mock.count(&Method::GET),
        2,
        "the cancelled read never fetched"
    );
}

/// `Cache-Control: no-cache` asks upstream even when the fleet has a fresh shared copy, and
/// the fresh page replaces it.
#[tokio::test]
async fn a_no_cache_read_asks_upstream_not_the_shared_copy() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let fleet = fleet_of(2, addr, &redis, "t20:").await;
    assert_eq!(
        fleet[0].client.get(&list_path(CP), READER).await.status,
        200
    );
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    // The fleet's copy of the page (one key), as text.
    let shared = || {
        let mut conn = conn.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("t20:page:*")
                .query_async(&mut conn)
                .await
                .unwrap();
            let key = keys.first()?;
            let page: Vec<u8> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .ok()?;
            Some(String::from_utf8_lossy(&page).into_owned())
        }
    };
    eventually("the page is shared", || async { shared().await.is_some() }).await;
    // Upstream changes behind permgate's back.
    mock.seed(CP, 3);
    let fresh = mock.permission_ids(CP);
    let no_cache = [("cache-control", "no-cache")];
    let read = fleet[1]
        .client
        .send(Method::GET, &list_path(CP), Some(READER), &no_cache, None)
        .await;
    assert_eq!(read.status, 200);
    let mut ids = read.ids();
    ids.sort();
    let mut expected = fresh.clone();
    expected.sort();
    assert_eq!(ids, expected, "{}", read.cache_status());
    assert_eq!(mock.count(&Method::GET), 2);
    eventually("the fresh page replaces the fleet's copy", || async {
        shared()
            .await
            .is_some_and(|page| fresh.iter().all(|id| page.contains(id.as_str())))
    })
    .await;
}

#[tokio::test]
async fn redis_killed_and_restarted_reads_go_upstream_writes_are_refused_then_all_recovers() {
    let mut redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let fleet = fleet_of(2, addr, &redis, "t3:").await;
    for r in &fleet {
        lease_up(&r.client).await;
    }
    redis.stop();
    // Without a lease: reads from upstream (never the local cache), writes refused.
    for r in &fleet {
        eventually("reads go upstream without a lease", || async {
            r.client.get(&list_path(CP), READER).await.cache_status() == NO_LEASE
        })
        .await;
    }
    let refused = fleet[0]
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["proj_down"]}"#)
        .await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.error().0, "unavailable");
    assert_eq!(refused.header("x-should-retry"), "true");
    assert_eq!(
        refused.cache_status(),
        "permgate; fwd=bypass; detail=no-lease"
    );
    eventually("the lapse was counted", || async {
        metric(&fleet[0], "permgate_fleet_lease_lapses_total").await == 1.0
    })
    .await;
    let metrics = fleet[0].state.render_metrics().await;
    for needle in [
        "permgate_fleet_redis_up 0",
        "permgate_fleet_lease_up 0",
        "permgate_fleet_writes_refused_total 1",
    ] {
        assert!(metrics.contains(needle), "{needle}: {metrics}");
    }
    assert!(logs().contains("lease lapsed: reads go upstream, writes are refused"));

    // Redis returns empty (a new incarnation): every replica drops its cache and serves hits
    // again; the first write waits out the fence at most.
    let _redis = Redis::start_on(redis.port);
    for r in &fleet {
        until_lease(r, Lease::Held).await;
    }
    let before = mock.count(&Method::GET);
    let r = fleet[1].client.get(&list_path(CP), READER).await;
    assert_eq!(r.cache_status(), "permgate; fwd=miss; stored");
    assert!(mock.count(&Method::GET) > before);
    assert_eq!(
        fleet[1]
            .client
            .get(&list_path(CP), READER)
            .await
            .cache_status(),
        "permgate; hit"
    );
    let started = Instant::now();
    let created = fleet[0]
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["proj_up"]}"#)
        .await;
    assert_eq!(created.status, 200);
    assert!(
        started.elapsed() <= LEASE + MARGIN,
        "{:?}",
        started.elapsed()
    );
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

    // A replica with nothing cached locally asks upstream instead of serving that copy, after
    // one Redis call (LOOKUP finds the copy too old and takes the fetch lock at once)...
    let second = replica(&text).await;
    let scripts_before = mget_calls(&mut conn).await;
    let fetched = second.client.get(&list_path(CP), READER).await;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.cache_status(), "permgate; fwd=miss; stored");
    assert_eq!(mock.count(&Method::GET), 2, "the hour-old copy was served");
    eventually("the page is shared and its lock released", || {
        let mut conn = conn.clone();
        async move {
            let locks: Vec<String> = redis::cmd("KEYS")
                .arg("t5:lock:*")
                .query_async(&mut conn)
                .await
                .unwrap();
            locks.is_empty()
        }
    })
    .await;
    assert_eq!(
        mget_calls(&mut conn).await - scripts_before,
        2,
        "one LOOKUP before upstream, one PUT after"
    );
    // ...and shares what it fetched: the next cold replica takes it without asking upstream.
    let third = replica(&text).await;
    assert_eq!(third.client.get(&list_path(CP), READER).await.status, 200);
    assert_eq!(mock.count(&Method::GET), 2);
}

/// A Redis whose scripts may not call INFO cannot tell a restart from a snapshot, or a
/// failover, from the Redis before: no replica takes a lease from it, and the log says why.
#[tokio::test]
async fn a_redis_that_hides_info_from_scripts_grants_no_lease() {
    let redis = Redis::start_with(&["--rename-command", "INFO", ""]);
    let (_mock, addr, _stop) = mock().await;
    let refused = starting_replica(&config_text(addr, &redis, "t21:")).await;
    tokio::time::sleep(3 * LEASE).await;
    assert_eq!(refused.state.fleet.as_ref().unwrap().lease(), Lease::Lapsed);
    let read = refused.client.get(&list_path(CP), READER).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.cache_status(), NO_LEASE);
    assert!(logs().contains("scripts may not call INFO or it names no run_id"));

    // INFO denied to scripts after the replica connected (an ACL): its lease lapses.
    let redis = Redis::start();
    let leased = replica(&config_text(addr, &redis, "t21:")).await;
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("-info")
        .query_async(&mut conn)
        .await
        .unwrap();
    until_lease(&leased, Lease::Lapsed).await;
}

/// LOOKUP and PUT calls so far: the only scripts that run `MGET` (`INFO commandstats`
/// counts the commands scripts run).
async fn mget_calls(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_mget:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_redis_restored_from_before_a_write_is_not_trusted_for_shared_pages() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    // A long lease: no renewal (every 10 s) runs during the test, as for a replica that reached
    // a failed-over Redis one round trip before its renewal.
    let text = base_config(addr)
        + &redis
            .section("t12:")
            .replace("lease_ms = 600", "lease_ms = 30000");
    let first = replica(&text).await;
    let second = replica(&text).await;
    assert_eq!(first.client.get(&list_path(CP), READER).await.status, 200);
    assert_eq!(mock.count(&Method::GET), 1);
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let shared = |mut conn: redis::aio::MultiplexedConnection| async move {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("t12:page:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.len() == 1
    };
    eventually("the page is shared", || shared(conn.clone())).await;

    // A write applied upstream whose generation increments this Redis lost (it restarted from
    // a snapshot taken before them): the shared page from before the write is still there,
    // and the restored incarnation key names the old process's run_id.
    mock.seed(CP, 1);
    let _: () = redis::cmd("SET")
        .arg("t12:incarnation")
        .arg("0123456789abcdef0123456789abcdef01234567:1")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A local miss on the replica that still holds its lease goes upstream.
    let after = second.client.get(&list_path(CP), READER).await;
    assert_eq!(after.status, 200);
    assert_eq!(
        after.ids(),
        mock.permission_ids(CP),
        "the pre-write page was served: {}",
        after.cache_status()
    );
    assert_eq!(mock.count(&Method::GET), 2);

    // The same process but an incarnation this replica has not renewed with (the key was
    // lost and re-made): not trusted either until its renewal catches up.
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .unwrap();
    let run_id = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap()
        .trim()
        .to_string();
    let _: () = redis::cmd("SET")
        .arg("t12:incarnation")
        .arg(format!("{run_id}:1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let again = second.client.get(&list_path(CP), READER).await;
    assert_eq!(
        again.ids(),
        mock.permission_ids(CP),
        "the pre-write page was served: {}",
        again.cache_status()
    );
    assert_eq!(mock.count(&Method::GET), 3);
}

/// A TCP relay that can move its open connections to another Redis between two commands, as a
/// proxy in front of a failed-over primary does: the client keeps its connection and never
/// sees a reconnect.
struct SwapRelay {
    addr: SocketAddr,
    target: watch::Sender<SocketAddr>,
    /// Connections accepted, and connections moved by a swap.
    open: Arc<AtomicUsize>,
    moved: Arc<AtomicUsize>,
}

impl SwapRelay {
    async fn start(target: SocketAddr) -> SwapRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (target, _) = watch::channel(target);
        let (open, moved) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (targets, counts) = (target.clone(), (open.clone(), moved.clone()));
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut to = targets.subscribe();
                let (open, moved) = (counts.0.clone(), counts.1.clone());
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut up, mut down) = ([0u8; 16384], [0u8; 16384]);
                    loop {
                        let target = *to.borrow_and_update();
                        let Ok(mut server) = TcpStream::connect(target).await else {
                            return;
                        };
                        loop {
                            tokio::select! {
                                read = client.read(&mut up) => match read {
                                    Ok(n @ 1..) if server.write_all(&up[..n]).await.is_ok() => {}
                                    _ => return,
                                },
                                read = server.read(&mut down) => match read {
                                    Ok(n @ 1..) if client.write_all(&down[..n]).await.is_ok() => {}
                                    _ => return,
                                },
                                _ = to.changed() => break,
                            }
                        }
                        moved.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        SwapRelay {
            addr,
            target,
            open,
            moved,
        }
    }

    /// Moves every open connection to `target`; returns once each has its new connection.
    async fn swap(&self, target: SocketAddr) {
        let open = self.open.load(Ordering::SeqCst);
        self.target.send_replace(target);
        eventually("every connection moved", || async {
            self.moved.load(Ordering::SeqCst) >= open
        })
        .await;
    }
}

/// What the incarnation key cannot show: a Redis that is a copy of the one a replica renewed
/// with (a replica promoted by a failover, with the incarnation key it replicated), reached
/// over the same connection. LOOKUP compares Redis' run id with the incarnation's and does not
/// trust the copy's generations, which miss the writes the old primary took after the copy.
#[tokio::test]
async fn a_redis_swapped_behind_an_open_connection_is_not_trusted_for_shared_pages() {
    let (primary, copy) = (Redis::start(), Redis::start());
    let (mock, addr, _stop) = mock().await;
    // A long lease: no renewal (every 10 s) runs during the test, as for a replica that reached
    // the promoted copy one round trip before its renewal.
    let text = base_config(addr)
        + &primary
            .section("t15:")
            .replace("lease_ms = 600", "lease_ms = 30000");
    let relay = SwapRelay::start(format!("127.0.0.1:{}", primary.port).parse().unwrap()).await;
    let first = replica(&text).await;
    let second = replica(&through(&text, &primary, relay.addr)).await;
    assert_eq!(first.client.get(&list_path(CP), READER).await.status, 200);
    assert_eq!(mock.count(&Method::GET), 1);
    let connect = |port: u16| async move {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    };
    let (mut old, mut new) = (connect(primary.port).await, connect(copy.port).await);
    let keys = |mut conn: redis::aio::MultiplexedConnection, pattern: &'static str| async move {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut conn)
            .await
            .unwrap();
        keys
    };
    eventually("the page is shared", || async {
        keys(old.clone(), "t15:page:*").await.len() == 1
    })
    .await;

    // The copy: every key as it stands now, the incarnation key included.
    for key in keys(old.clone(), "t15:*").await {
        let dumped: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut old)
            .await
            .unwrap();
        let Some(dumped) = dumped else { continue };
        let _: () = redis::cmd("RESTORE")
            .arg(&key)
            .arg(0)
            .arg(dumped)
            .arg("REPLACE")
            .query_async(&mut new)
            .await
            .unwrap();
    }
    // A promoted replica lacks the primary's script cache (NOSCRIPT would send this lookup
    // upstream once, and the lease task would load the scripts): load LOOKUP as replicas send
    // it, the same script the primary has cached.
    let lookup = concat!(
        include_str!("../../src/fleet/run.lua"),
        include_str!("../../src/fleet/lookup.lua")
    );
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(lookup)
        .query_async(&mut new)
        .await
        .unwrap();
    let cached: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(&sha)
        .query_async(&mut old)
        .await
        .unwrap();
    assert_eq!(cached, [true], "LOOKUP as the replicas send it");
    // After the copy, a write reaches upstream and moves the checkpoint's generation on the
    // old primary only (what PUBLISH does): the copy still holds the page from before it.
    mock.seed(CP, 1);
    let _: i64 = redis::cmd("INCR")
        .arg(format!("t15:gen:{CP}"))
        .query_async(&mut old)
        .await
        .unwrap();

    relay
        .swap(format!("127.0.0.1:{}", copy.port).parse().unwrap())
        .await;
    let after = second.client.get(&list_path(CP), READER).await;
    assert_eq!(after.status, 200);
    assert_eq!(
        after.ids(),
        mock.permission_ids(CP),
        "the copy's page from before the write was served: {}",
        after.cache_status()
    );
    assert_eq!(mock.count(&Method::GET), 2);
}

#[tokio::test]
async fn a_redis_restarted_from_a_snapshot_is_a_new_incarnation_for_shared_pages() {
    let dir = TempDir::new("fleet-snapshot");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = Redis::start_in(port, Some(&dir.0), &[]);
    let (_mock, addr, _stop) = mock().await;
    let fleet = fleet_of(2, addr, &redis, "t14:").await;
    assert_eq!(
        fleet[0].client.get(&list_path(CP), READER).await.status,
        200
    );
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let shared = |mut conn: redis::aio::MultiplexedConnection| async move {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("t14:page:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.len() == 1
    };
    eventually("the page is shared", || shared(conn.clone())).await;
    // A snapshot with the shared page and the incarnation key, then a write it does not have.
    let _: () = redis::cmd("SAVE")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let created = fleet[0]
        .client
        .post(
            &list_path(CP),
            WRITER,
            r#"{"project_ids":["proj_restored"]}"#,
        )
        .await;
    assert_eq!(created.status, 200);
    let id = created.ids()[0].clone();

    // The same keys in a new process: only its run_id says it is not the Redis the write went
    // through. Each replica sees a new incarnation, and the restored page is not served.
    redis.stop();
    let _redis = Redis::start_in(port, Some(&dir.0), &[]);
    for r in &fleet {
        eventually("the restored Redis is a new incarnation", || async {
            metric(
                r,
                "permgate_fleet_resync_purges_total{reason=\"incarnation\"}",
            )
            .await
                == 1.0
        })
        .await;
    }
    let after = fleet[1].client.get(&list_path(CP), READER).await;
    assert_eq!(after.ids()[0], id, "{}", after.cache_status());
}

#[tokio::test]
async fn nothing_fetched_while_a_write_is_pending_is_stored_here_or_in_redis() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let fleet = fleet_of(1, addr, &redis, "t15:").await;
    // A write of CP began on a replica that died before it ended: its pending token, as
    // PUBLISH adds it, lives on.
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("ZADD")
        .arg(format!("t15:pending:{CP}"))
        .arg(i64::MAX / 2)
        .arg("dead-replica-0")
        .query_async(&mut conn)
        .await
        .unwrap();
    for _ in 0..2 {
        let read = fleet[0].client.get(&list_path(CP), READER).await;
        assert_eq!(read.status, 200);
        assert_ne!(read.cache_status(), "permgate; hit");
    }
    assert_eq!(mock.count(&Method::GET), 2, "both reads went upstream");
    let pages: Vec<String> = redis::cmd("KEYS")
        .arg("t15:page:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pages.is_empty(), "{pages:?}");
}

/// PUBLISH as permgate sends it (the same files, in the same order).
const PUBLISH: &str = concat!(
    include_str!("../../src/fleet/run.lua"),
    include_str!("../../src/fleet/ensure.lua"),
    include_str!("../../src/fleet/publish.lua")
);

/// A write that begins with a shorter deadline (another replica's upstream settings) does not
/// shorten how long a write already pending keeps its checkpoint's pending set alive.
#[tokio::test]
async fn a_shorter_pending_write_does_not_cut_short_a_longer_one() {
    let redis = Redis::start();
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = [
        "inc", "acks", "epoch", "seq", "inv", "leases", "gen", "pending",
    ];
    let begin = |token: &str, pending_ms: u64| {
        let mut command = redis::cmd("EVAL");
        command.arg(PUBLISH).arg(keys.len());
        for key in keys {
            command.arg(format!("t16:{key}"));
        }
        command
            .arg(1000)
            .arg(CP)
            .arg("begin")
            .arg(token)
            .arg(pending_ms)
            .arg(1000);
        command
    };
    let _: redis::Value = begin("long", 60_000).query_async(&mut conn).await.unwrap();
    let _: redis::Value = begin("short", 100).query_async(&mut conn).await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("t16:pending")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        ttl > 59_000,
        "the set must outlive the longer write: {ttl} ms left"
    );
}

#[tokio::test]
async fn a_page_fetched_across_a_write_or_into_a_new_incarnation_is_not_shared() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let fleet = fleet_of(1, addr, &redis, "t16:").await;
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let count = |pattern: &'static str| {
        let mut conn = conn.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut conn)
                .await
                .unwrap();
            keys.len()
        }
    };
    // A page fetched with nothing in between is shared, and its lock released.
    fleet[0].client.get(&list_path(CP2), READER).await;
    eventually("the page is shared", || async {
        count("t16:page:*").await == 1 && count("t16:lock:*").await == 0
    })
    .await;
    assert_eq!(count("t16:staged:*").await, 0);
    // Each of these happens while a fill's upstream request is out (after its lookup): a write
    // of the checkpoint began and ended (its generation moved), a write of it began (its
    // pending token), Redis became another incarnation. None of those pages is shared; each
    // lock is released.
    let changes: [(&str, redis::Cmd); 3] = [
        ("", redis::cmd("INCR").arg(format!("t16:gen:{CP}")).clone()),
        (
            "?limit=5",
            redis::cmd("ZADD")
                .arg(format!("t16:pending:{CP}"))
                .arg(i64::MAX / 2)
                .arg("writer-0")
                .clone(),
        ),
        (
            "CP2?limit=6",
            redis::cmd("SET")
                .arg("t16:incarnation")
                .arg("0123456789abcdef0123456789abcdef01234567:1")
                .clone(),
        ),
    ];
    for (query, change) in changes {
        let mut held = mock.hold_next();
        let reader = fleet[0].client.clone();
        let path = match query.strip_prefix("CP2") {
            Some(query) => format!("{}{query}", list_path(CP2)),
            None => format!("{}{query}", list_path(CP)),
        };
        let read = tokio::spawn(async move { reader.get(&path, READER).await });
        held.arrived().await;
        assert_eq!(count("t16:lock:*").await, 1, "the fill holds the lock");
        let _: redis::Value = change.query_async(&mut conn.clone()).await.unwrap();
        held.release();
        assert_eq!(read.await.unwrap().status, 200);
        // Released by the put, well before it would expire (the upstream deadline, 3 s).
        let released = Instant::now();
        while count("t16:lock:*").await != 0 {
            assert!(
                released.elapsed() < Duration::from_secs(1),
                "after {change:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(count("t16:page:*").await, 1, "after {change:?}");
        assert_eq!(count("t16:staged:*").await, 0, "after {change:?}");
    }
}

#[tokio::test]
async fn pages_fetched_at_once_are_shared_in_batches_and_all_arrive() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let fleet = fleet_of(2, addr, &redis, "t17:").await;
    let path = |n: usize| format!("{}?after=perm_batch{n}", list_path(CP));
    // Their puts queue up behind one another: most go in shared calls.
    let reads: Vec<_> = (0..40)
        .map(|n| {
            let client = fleet[0].client.clone();
            let path = path(n);
            tokio::spawn(async move { client.get(&path, READER).await.status })
        })
        .collect();
    for read in reads {
        assert_eq!(read.await.unwrap(), 200);
    }
    assert_eq!(mock.count(&Method::GET), 40);
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    eventually("every page is shared and every lock released", || {
        let mut conn = conn.clone();
        async move {
            let pages: Vec<String> = redis::cmd("KEYS")
                .arg("t17:page:*")
                .query_async(&mut conn)
                .await
                .unwrap();
            let locks: Vec<String> = redis::cmd("KEYS")
                .arg("t17:lock:*")
                .query_async(&mut conn)
                .await
                .unwrap();
            pages.len() == 40 && locks.is_empty()
        }
    })
    .await;
    for n in 0..40 {
        let shared = fleet[1].client.get(&path(n), READER).await;
        assert_eq!(shared.status, 200);
    }
    assert_eq!(
        mock.count(&Method::GET),
        40,
        "the other replica asked upstream"
    );
}

#[tokio::test]
async fn a_flushed_script_cache_is_loaded_again_without_dropping_the_connection() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let fleet = fleet_of(2, addr, &redis, "t13:").await;
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let flush = || {
        let mut conn = conn.clone();
        async move {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    // Flushed while a fill is upstream: its page is still shared (the put goes in full).
    let mut held = mock.hold_next();
    let reader = fleet[0].client.clone();
    let read = tokio::spawn(async move { reader.get(&list_path(CP2), READER).await });
    held.arrived().await;
    flush().await;
    held.release();
    assert_eq!(read.await.unwrap().status, 200);
    eventually("the page is shared and its lock released", || {
        let mut conn = conn.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("t13:*:*")
                .query_async(&mut conn)
                .await
                .unwrap();
            let kinds = |kind: &str| keys.iter().filter(|k| k.starts_with(kind)).count();
            (kinds("t13:page:"), kinds("t13:lock:"), kinds("t13:staged:")) == (1, 0, 0)
        }
    })
    .await;

    flush().await;

    // A write at once: Redis has none of the scripts its calls name.
    let created = fleet[0]
        .client
        .post(
            &list_path(CP),
            WRITER,
            r#"{"project_ids":["proj_flushed"]}"#,
        )
        .await;
    assert_eq!(created.status, 200);
    let id = created.ids()[0].clone();
    assert_eq!(
        fleet[1].client.get(&list_path(CP), READER).await.ids()[0],
        id
    );
    // The scripts are loaded again: a page one replica fetched is shared with the other.
    let mut n = 0;
    eventually("pages are shared again", || {
        n += 1;
        let path = format!("{}?after=perm_flushed{n}", list_path(CP));
        let (fleet, mock) = (&fleet, &mock);
        async move {
            fleet[0].client.get(&path, READER).await;
            let before = mock.count(&Method::GET);
            let shared = fleet[1].client.get(&path, READER).await;
            shared.status == 200 && mock.count(&Method::GET) == before
        }
    })
    .await;
    for r in &fleet {
        assert_eq!(metric(r, "permgate_fleet_degraded_total").await, 0.0);
    }
}

const LEASE: Duration = Duration::from_millis(600);
/// Round trips, scheduling and a write's own upstream call, on a loaded 2-core CI machine.
const MARGIN: Duration = Duration::from_millis(400);
const NO_LEASE: &str = "permgate; fwd=miss; detail=no-lease";

/// Waits until the replica behind `client` serves hits (it holds a lease).
async fn lease_up(client: &TestClient) {
    eventually("the replica serves hits", || async {
        client.get(&list_path(CP), WRITER).await;
        client.get(&list_path(CP), WRITER).await.cache_status() == "permgate; hit"
    })
    .await;
}

/// A fleet metric's value on an in-process replica (0 when the series has no sample yet).
async fn metric(replica: &Replica, name: &str) -> f64 {
    let text = replica.state.render_metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// `permgate serve` with `text` as its config, as a process (it can be paused).
async fn serve_process(text: &str, name: &str) -> (Process, TestClient, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("permgate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("permgate.toml");
    std::fs::write(&path, text).unwrap();
    let (process, addr) = spawn_serve(&path, &[("OPENAI_ADMIN_KEY", ADMIN_KEY)]).await;
    (process, TestClient::new(addr), dir)
}

/// Replica A in this process and replica B as a process (it can be paused or stopped), B
/// holding its lease, returned once the new Redis' fence is over: past it only B's lease can
/// hold a write through A.
async fn replica_and_process(
    text: &str,
    name: &str,
) -> (Replica, (Process, TestClient, std::path::PathBuf)) {
    let a = replica(text).await;
    // The incarnation began when A took its first lease: its fence is over by then.
    let fence_over = Instant::now() + LEASE + Duration::from_millis(50);
    let b = serve_process(text, name).await;
    lease_up(&b.1).await;
    tokio::time::sleep_until(fence_over.into()).await;
    (a, b)
}

async fn create(client: &TestClient, project: &str) -> (TestResponse, Duration) {
    let started = Instant::now();
    let body = format!(r#"{{"project_ids":["{project}"]}}"#);
    let created = client.post(&list_path(CP), WRITER, &body).await;
    (created, started.elapsed())
}

#[tokio::test]
async fn a_paused_replica_never_serves_the_old_list_after_a_write_elsewhere() {
    let redis = Redis::start();
    let (_mock, addr, _stop) = mock().await;
    let text = config_text(addr, &redis, "t6:");
    let (a, (b, b_client, dir)) = replica_and_process(&text, "paused").await;

    // (a) Paused across the whole write: the write waits for B's lease to run out, no longer.
    signal(&b, "STOP");
    let (created, took) = create(&a.client, "proj_paused").await;
    assert_eq!(created.status, 200);
    assert!(took <= LEASE + MARGIN, "the write took {took:?}");
    let expiry = "permgate_fleet_writes_waited_for_lease_expiry_total";
    assert_eq!(metric(&a, expiry).await, 1.0, "the write waited for B");
    assert_eq!(metric(&a, "permgate_fleet_fence_waits_total").await, 0.0);
    let id = created.ids()[0].clone();
    signal(&b, "CONT");
    for _ in 0..5 {
        let read = b_client.get(&list_path(CP), WRITER).await;
        assert_eq!(
            read.ids()[0],
            id,
            "B after its pause: {}",
            read.cache_status()
        );
    }
    eventually("B resynchronised and serves hits", || async {
        let read = b_client.get(&list_path(CP), WRITER).await;
        read.cache_status() == "permgate; hit" && read.ids()[0] == id
    })
    .await;

    // (b) Paused briefly during a write: the write waits for B's acknowledgement.
    signal(&b, "STOP");
    let writer = a.client.clone();
    let write = tokio::spawn(async move { create(&writer, "proj_short").await });
    // The fault's duration, not synchronisation.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !write.is_finished(),
        "the write did not wait for the paused replica"
    );
    signal(&b, "CONT");
    let (created, took) = write.await.unwrap();
    assert_eq!(created.status, 200);
    assert!(took < LEASE, "acknowledged, not waited out: {took:?}");
    assert_eq!(metric(&a, expiry).await, 1.0);
    assert!(metric(&a, "permgate_fleet_acks_awaited_total").await >= 2.0);
    let id = created.ids()[0].clone();
    assert_eq!(b_client.get(&list_path(CP), WRITER).await.ids()[0], id);
    drop(b);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A replica shut down with SIGTERM leaves the fleet once its drain is over: a write through
/// another replica right after it has exited does not wait for its lease to run out.
#[tokio::test]
async fn a_replica_shut_down_gracefully_does_not_hold_up_writes() {
    let redis = Redis::start();
    let (_mock, addr, _stop) = mock().await;
    let text = config_text(addr, &redis, "t14:");
    let (a, (b, _, dir)) = replica_and_process(&text, "resign").await;

    signal(&b, "TERM");
    let exited = tokio::task::spawn_blocking(move || {
        let mut b = b;
        b.0.wait().unwrap()
    });
    let status = tokio::time::timeout(Duration::from_secs(10), exited)
        .await
        .expect("B exits after its drain")
        .unwrap();
    assert!(status.success(), "{status:?}");
    // B renewed its lease at most a third of a lease before it exited: it would still be live.
    let (created, took) = create(&a.client, "proj_after_b").await;
    assert_eq!(created.status, 200);
    let expiry = "permgate_fleet_writes_waited_for_lease_expiry_total";
    assert_eq!(
        metric(&a, expiry).await,
        0.0,
        "the write waited for the departed replica's lease ({took:?})"
    );
    assert_eq!(
        a.client.get(&list_path(CP), WRITER).await.ids()[0],
        created.ids()[0]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A replica that resigns while Redis has no lease entry for it (its first renewal still on
/// its way, or the entry swept after a long outage) is still marked as having left: a renewal
/// of it arriving after that finds the mark (acknowledged to infinity) and takes no lease, and
/// the ended entry lets the sweep remove the mark later.
#[tokio::test]
async fn a_replica_without_a_lease_entry_still_resigns() {
    let redis = Redis::start();
    let (_mock, addr, _stop) = mock().await;
    // Renewals a lease apart (10 s): none re-adds the entry this test removes.
    let text = config_text(addr, &redis, "t22:").replace("lease_ms = 600", "lease_ms = 30000");
    let replica = replica(&text).await;
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg("t22:leases")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let [id] = &ids[..] else {
        panic!("one replica: {ids:?}")
    };
    let _: i64 = redis::cmd("ZREM")
        .arg("t22:leases")
        .arg(id)
        .query_async(&mut conn)
        .await
        .unwrap();
    replica.state.fleet.as_ref().unwrap().resign().await;
    let mark: Option<String> = redis::cmd("ZSCORE")
        .arg("t22:acks")
        .arg(id)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(mark.as_deref(), Some("inf"), "marked as having left");
    let ended: Option<f64> = redis::cmd("ZSCORE")
        .arg("t22:leases")
        .arg(id)
        .query_async(&mut conn)
        .await
        .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    assert!(
        ended.is_some_and(|t| t <= now_ms),
        "an ended entry: {ended:?}"
    );
}

/// What a [`Relay`] does with Redis traffic.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    /// Forwards nothing and closes nothing: bytes read are held and delivered on resume.
    Stalled,
    /// Connections are closed (held bytes lost) and new ones refused.
    Cut,
}

/// A TCP relay that can go silent (it keeps the connections open but stops passing bytes: no
/// FIN, no RST, like a network that drops packets) or cut every connection.
struct Relay {
    addr: SocketAddr,
    gate: watch::Sender<Gate>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (gate, _) = watch::channel(Gate::Open);
        let gates = gate.clone();
        tokio::spawn(async move {
            // Accepts even while stalled: connecting works, nothing answers.
            while let Ok((client, _)) = listener.accept().await {
                if *gates.borrow() == Gate::Cut {
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
                tokio::spawn(pump(cr, sw, gates.subscribe()));
                tokio::spawn(pump(sr, cw, gates.subscribe()));
            }
        });
        Relay { addr, gate }
    }

    fn stall(&self) {
        self.gate.send_replace(Gate::Stalled);
    }

    fn cut(&self) {
        self.gate.send_replace(Gate::Cut);
    }

    fn resume(&self) {
        self.gate.send_replace(Gate::Open);
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut gate: watch::Receiver<Gate>) {
    let mut buf = vec![0u8; 64 * 1024];
    while unstalled(&mut gate).await {
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            _ = gate.wait_for(|g| *g == Gate::Cut) => return,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // Read just before a stall: held, delivered late (lost if the relay is cut).
        if !unstalled(&mut gate).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits out a stall: whether the relay is open (not cut).
async fn unstalled(gate: &mut watch::Receiver<Gate>) -> bool {
    let open = gate.wait_for(|g| *g != Gate::Stalled).await;
    matches!(open.as_deref(), Ok(Gate::Open))
}

/// `text` with Redis reached through the relay at `relay`.
fn through(text: &str, redis: &Redis, relay: SocketAddr) -> String {
    text.replace(
        &format!("redis://127.0.0.1:{}", redis.port),
        &format!("redis://{relay}"),
    )
}

#[tokio::test]
async fn a_replica_cut_off_silently_never_serves_the_old_list_and_writes_wait_at_most_a_lease() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let text = config_text(addr, &redis, "t7:");
    let relay = Relay::start(([127, 0, 0, 1], redis.port).into()).await;
    let a = replica(&text).await;
    // The incarnation began when A took its first lease: its fence is over by then.
    let fence_over = Instant::now() + LEASE + Duration::from_millis(50);
    let b = replica(&through(&text, &redis, relay.addr)).await;
    lease_up(&b.client).await;
    // A new Redis fences writes for one lease term; past it only B's lease can hold a write.
    tokio::time::sleep_until(fence_over.into()).await;

    relay.stall();
    let (created, took) = create(&a.client, "proj_cut").await;
    assert_eq!(created.status, 200);
    let expiry = "permgate_fleet_writes_waited_for_lease_expiry_total";
    assert_eq!(metric(&a, expiry).await, 1.0, "the write waited for B");
    assert_eq!(metric(&a, "permgate_fleet_fence_waits_total").await, 0.0);
    println!("write with a replica cut off silently took {took:?}");
    assert!(took <= LEASE + MARGIN, "the write took {took:?}");
    let id = created.ids()[0].clone();
    // A could only answer once B's lease was over: B reads from upstream.
    let read = b.client.get(&list_path(CP), WRITER).await;
    assert_eq!(read.ids()[0], id);
    assert_eq!(read.cache_status(), NO_LEASE);

    // Without a lease, identical reads share only fetches that started after they arrived:
    // the first is held upstream, the 19 others share one second fetch.
    let before = mock.count(&Method::GET);
    let mut held = mock.hold_next();
    let path = format!("{}?limit=7", list_path(CP));
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let (client, path) = (b.client.clone(), path.clone());
            tokio::spawn(async move { client.get(&path, WRITER).await })
        })
        .collect();
    held.arrived().await;
    let key = b.state.cache.key(
        permgate::route::Checkpoint::parse(CP).unwrap(),
        permgate::route::ListQuery::parse(Some("limit=7")).unwrap(),
    );
    let state = b.state.clone();
    eventually("19 reads wait for the next fetch", || async {
        state.cache.refresh_waiters(&key) == 19
    })
    .await;
    held.release();
    for read in reads {
        assert_eq!(read.await.unwrap().ids()[0], id);
    }
    assert_eq!(mock.count(&Method::GET) - before, 2);

    let refused = b
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["proj_no"]}"#)
        .await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.error().0, "unavailable");
    assert_eq!(refused.header("x-should-retry"), "true");
    assert_eq!(refused.header("retry-after-ms"), "600", "one lease term");
    assert_eq!(metric(&b, "permgate_fleet_lease_up").await, 0.0);
    assert_eq!(metric(&b, "permgate_fleet_writes_refused_total").await, 1.0);

    relay.resume();
    eventually("B serves hits again, with the write", || async {
        let read = b.client.get(&list_path(CP), WRITER).await;
        read.cache_status() == "permgate; hit" && read.ids()[0] == id
    })
    .await;
    let metrics = b.state.render_metrics().await;
    assert!(
        !metrics.contains("permgate_fleet_resync_purges_total{"),
        "caught up exactly: {metrics}"
    );
}

/// A write whose end never reaches Redis (its replica, and another, lose Redis mid-write,
/// and Redis itself stays up: no new incarnation) leaves nothing stale behind: what the other
/// replica fetched without a lease in the meantime was passed through, not stored, so it is
/// not served as a hit once the lease is back.
#[tokio::test]
async fn a_page_fetched_without_a_lease_is_not_kept_for_after_the_lease() {
    let redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let text = config_text(addr, &redis, "t18:");
    let (to_a, to_b) = (redis_relay(&redis).await, redis_relay(&redis).await);
    let a = replica(&through(&text, &redis, to_a.addr)).await;
    let fence_over = Instant::now() + LEASE + Duration::from_millis(50);
    let b = replica(&through(&text, &redis, to_b.addr)).await;
    tokio::time::sleep_until(fence_over.into()).await;

    // The create reaches upstream (B has dropped its pages), then both lose Redis.
    mock.push_fault(Fault::Delay(Duration::from_secs(2)));
    let writer = a.client.clone();
    let write = tokio::spawn(async move { create(&writer, "proj_lost_end").await });
    let posts = mock.clone();
    eventually("the create is at upstream", || async {
        posts.count(&Method::POST) == 1
    })
    .await;
    to_a.cut();
    to_b.cut();
    until_lease(&b, Lease::Lapsed).await;
    // Upstream has not applied the create yet: the old list.
    let during = b.client.get(&list_path(CP), WRITER).await;
    assert_eq!(during.cache_status(), NO_LEASE);
    let (created, _) = write.await.unwrap();
    assert_eq!(created.status, 200);
    let id = created.ids()[0].clone();
    assert!(!during.ids().contains(&id));

    to_a.resume();
    to_b.resume();
    until_lease(&b, Lease::Held).await;
    let after = b.client.get(&list_path(CP), WRITER).await;
    assert!(
        after.ids().contains(&id),
        "a list from before a completed write, {}",
        after.cache_status()
    );
}

/// A relay in front of `redis`.
async fn redis_relay(redis: &Redis) -> Relay {
    Relay::start(([127, 0, 0, 1], redis.port).into()).await
}

#[tokio::test]
async fn a_write_right_after_a_redis_restart_waits_for_leases_the_old_redis_granted() {
    let mut redis = Redis::start();
    let (_mock, addr, _stop) = mock().await;
    let text = config_text(addr, &redis, "t8:").replace("lease_ms = 600", "lease_ms = 2000");
    let relay = Relay::start(([127, 0, 0, 1], redis.port).into()).await;
    let a = replica(&text).await;
    let b = replica(&through(&text, &redis, relay.addr)).await;
    lease_up(&a.client).await;
    lease_up(&b.client).await;

    relay.stall();
    redis.stop();
    let _redis = Redis::start_on(redis.port);
    let incarnation = "permgate_fleet_resync_purges_total{reason=\"incarnation\"}";
    eventually("A holds a lease from the new Redis", || async {
        metric(&a, incarnation).await == 1.0
    })
    .await;
    let (created, took) = create(&a.client, "proj_fence").await;
    assert_eq!(created.status, 200);
    println!("the first write after the restart took {took:?}");
    assert_eq!(metric(&a, "permgate_fleet_fence_waits_total").await, 1.0);
    let id = created.ids()[0].clone();
    // B never heard of the new Redis; its old lease is over by now.
    let read = b.client.get(&list_path(CP), WRITER).await;
    assert_eq!(read.ids()[0], id);
    assert_eq!(read.cache_status(), NO_LEASE);

    relay.resume();
    eventually("B joined the new incarnation", || async {
        let read = b.client.get(&list_path(CP), WRITER).await;
        read.cache_status() == "permgate; hit" && read.ids()[0] == id
    })
    .await;
    assert_eq!(metric(&b, incarnation).await, 1.0);
}

/// One operation of the randomized history.
#[derive(Debug, Clone)]
enum Op {
    /// A list read that answered 200, with the ids it returned.
    Read(Vec<String>),
    Create(String),
    Delete(String),
    /// A write that did not answer 200: its id's fate is unknown.
    FailedDelete(String),
}

#[derive(Debug, Clone)]
struct Event {
    start: Instant,
    end: Instant,
    replica: usize,
    checkpoint: usize,
    op: Op,
    cache_status: String,
}

/// Read-your-writes over a history: for every read R and id x, a delete of x that answered
/// before R started means x is absent; a create of x that answered before R started, with no
/// delete of x started before R ended, means x is present. Ids of failed deletes are left out.
fn violations(history: &[Event]) -> Vec<String> {
    let uncertain: std::collections::HashSet<&str> = history
        .iter()
        .filter_map(|e| match &e.op {
            Op::FailedDelete(id) => Some(id.as_str()),
            _ => None,
        })
        .collect();
    let mut found = Vec::new();
    for read in history {
        let Op::Read(ids) = &read.op else { continue };
        for write in history.iter().filter(|w| w.checkpoint == read.checkpoint) {
            let (id, deleted) = match &write.op {
                Op::Create(id) => (id, false),
                Op::Delete(id) => (id, true),
                _ => continue,
            };
            if write.end >= read.start || uncertain.contains(id.as_str()) {
                continue;
            }
            let present = ids.contains(id);
            let deleting = history
                .iter()
                .any(|d| matches!(&d.op, Op::Delete(x) if x == id) && d.start < read.end);
            if (deleted && present) || (!deleted && !deleting && !present) {
                found.push(format!(
                    "read on replica {} ({}) missed {:?} of replica {}: {read:?} / {write:?}",
                    read.replica, read.cache_status, write.op, write.replica
                ));
            }
        }
    }
    found
}

#[test]
fn the_history_checker_finds_a_stale_read_and_accepts_a_concurrent_one() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let event = |start, end, op| Event {
        start: at(start),
        end: at(end),
        replica: 0,
        checkpoint: 0,
        op,
        cache_status: String::new(),
    };
    let created = event(0, 10, Op::Create("a".into()));
    // Started after the create answered, without it: a violation.
    let stale = event(20, 30, Op::Read(vec![]));
    assert_eq!(violations(&[created.clone(), stale]).len(), 1);
    // Overlapping the create: either answer is fine.
    let concurrent = event(5, 30, Op::Read(vec![]));
    assert!(violations(&[created.clone(), concurrent]).is_empty());
    // A delete that answered before the read: the id must be gone.
    let deleted = event(40, 50, Op::Delete("a".into()));
    let after = event(60, 70, Op::Read(vec!["a".into()]));
    assert_eq!(violations(&[created, deleted, after]).len(), 1);
}

/// What the history's clients share: the log, and the ids created (and not deleted) per
/// checkpoint.
#[derive(Default)]
struct History {
    events: Vec<Event>,
    live: [Vec<String>; 2],
}

async fn one_operation(
    clients: &[TestClient],
    history: &std::sync::Mutex<History>,
    rng: &mut fastrand::Rng,
) {
    let (replica, checkpoint) = (rng.usize(..clients.len()), rng.usize(..2));
    let path = list_path([CP, CP2][checkpoint]);
    let client = &clients[replica];
    let roll = rng.u8(..100);
    let victim = {
        let h = history.lock().unwrap();
        let live = &h.live[checkpoint];
        let delete = !live.is_empty() && (roll >= 85 || (roll >= 70 && live.len() >= 50));
        delete.then(|| live[rng.usize(..live.len())].clone())
    };
    let start = Instant::now();
    let (op, cache_status) = if roll < 70 {
        let read = client.get(&format!("{path}?limit=100"), WRITER).await;
        if read.status != 200 {
            return;
        }
        (Op::Read(read.ids()), read.cache_status().to_string())
    } else if let Some(id) = victim {
        let deleted = client.delete(&format!("{path}/{id}"), WRITER).await;
        let mut h = history.lock().unwrap();
        h.live[checkpoint].retain(|x| *x != id);
        if deleted.status == 200 {
            (Op::Delete(id), String::new())
        } else {
            (Op::FailedDelete(id), String::new())
        }
    } else {
        let created = client
            .post(&path, WRITER, r#"{"project_ids":["proj_history"]}"#)
            .await;
        if created.status != 200 {
            return;
        }
        let id = created.ids()[0].clone();
        history.lock().unwrap().live[checkpoint].push(id.clone());
        (Op::Create(id), String::new())
    };
    history.lock().unwrap().events.push(Event {
        start,
        end: Instant::now(),
        replica,
        checkpoint,
        op,
        cache_status,
    });
}

#[tokio::test]
async fn randomized_history_never_reads_a_list_older_than_a_completed_write() {
    let seconds: u64 = std::env::var("HISTORY_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("HISTORY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("HISTORY_SEED={seed} HISTORY_SECONDS={seconds}");
    let redis = Redis::start();
    let (_mock, addr, _stop) = mock().await;
    let text = config_text(addr, &redis, "t9:");
    let mut processes = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        // Each replica reaches Redis through its own relay, which can go silent.
        let relay = Relay::start(([127, 0, 0, 1], redis.port).into()).await;
        let text = through(&text, &redis, relay.addr);
        let (process, client, dir) = serve_process(&text, &format!("history{i}")).await;
        lease_up(&client).await;
        processes.push((process, relay, dir));
        clients.push(client);
    }
    let clients = Arc::new(clients);
    let history = Arc::new(std::sync::Mutex::new(History::default()));
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let (clients, history) = (clients.clone(), history.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(task));
            while Instant::now() < until {
                one_operation(&clients, &history, &mut rng).await;
                // Think time: pages live long enough between writes for a stale one to show.
                tokio::time::sleep(Duration::from_millis(rng.u64(10..60))).await;
            }
        }));
    }
    chaos(&processes, until, seed).await;
    for task in tasks {
        task.await.unwrap();
    }
    let history = history.lock().unwrap();
    let reads = history
        .events
        .iter()
        .filter(|e| matches!(e.op, Op::Read(_)))
        .count();
    let writes = history.events.len() - reads;
    println!("{reads} reads, {writes} writes");
    let found = violations(&history.events);
    assert!(found.is_empty(), "seed {seed}:\n{}", found.join("\n"));
    assert!(
        reads >= 200 && writes >= 30,
        "seed {seed}: {reads} reads, {writes} writes"
    );
    for (_, _, dir) in processes {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// One replica at a time paused, or cut off from Redis silently, for less and more than a
/// lease, until `until`.
async fn chaos(processes: &[(Process, Relay, std::path::PathBuf)], until: Instant, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.u64(100..400))).await;
        let (victim, relay, _) = &processes[rng.usize(..processes.len())];
        let pause = rng.bool();
        let lasts = if pause {
            signal(victim, "STOP");
            rng.u64(50..1500)
        } else {
            relay.stall();
            rng.u64(300..1500)
        };
        tokio::time::sleep(Duration::from_millis(lasts)).await;
        if pause {
            signal(victim, "CONT");
        } else {
            relay.resume();
        }
    }
}

#[tokio::test]
async fn with_degraded_ttl_a_replica_without_a_lease_serves_young_pages_by_choice() {
    let mut redis = Redis::start();
    let (mock, addr, _stop) = mock().await;
    let text = config_text(addr, &redis, "t10:") + "degraded_ttl_seconds = 60\n";
    let r = replica(&text).await;
    lease_up(&r.client).await;
    redis.stop();
    until_lease(&r, Lease::Lapsed).await;
    let before = mock.count(&Method::GET);
    let read = r.client.get(&list_path(CP), WRITER).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.cache_status(), "permgate; hit; detail=no-lease");
    assert_eq!(mock.count(&Method::GET), before, "served from the cache");
    let reads = "permgate_fleet_reads_without_lease_total";
    assert_eq!(metric(&r, reads).await, 1.0);
}
