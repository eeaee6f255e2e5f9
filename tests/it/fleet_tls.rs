//! SPEC "The front door": `rediss://` with `redis.ca_file`. A real `redis-server` serving TLS
//! only (`--port 0`) under a CA made at test time; gateways trust it through `redis.ca_file`
//! alone, and a gateway without that CA (or with another one) cannot connect and runs degraded.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use permgate::clock::Clock;
use permgate::config::Config;
use permgate::secret::AdminKey;
use permgate::state::AppState;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::sync::oneshot;

use crate::support::*;

/// A CA (as PEM) and a server certificate and key it signed, for 127.0.0.1 and localhost.
struct Pki {
    ca_pem: String,
    server_pem: String,
    server_key_pem: String,
}

fn make_pki(name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, name);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server_pem: leaf_cert.pem(),
        server_key_pem: leaf_key.serialize_pem(),
    }
}

/// `redis-server` with TLS only, killed when dropped.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    fn start(dir: &TempDir, pki: &Pki) -> TlsRedis {
        let cert = dir.write("redis.crt", &pki.server_pem);
        let key = dir.write("redis.key", &pki.server_key_pem);
        let ca = dir.write("redis-ca.pem", &pki.ca_pem);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let arg = |p: &Path| p.to_str().unwrap().to_string();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &arg(&cert), "--tls-key-file", &arg(&key)])
            .args(["--tls-ca-cert-file", &arg(&ca), "--tls-auth-clients", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server: Debian's has TLS)");
        let mut redis = TlsRedis { port, child };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = redis.child.try_wait() {
                panic!("redis-server exited ({status}): is it built with TLS?");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        redis
    }

    /// A `[redis]` table for this server; `ca_file` is the gateway's trust, if any.
    fn section(&self, prefix: &str, ca_file: Option<&Path>) -> String {
        let ca = ca_file.map_or(String::new(), |p| {
            format!("ca_file = \"{}\"\n", p.display())
        });
        format!(
            "\n[redis]\nurl = \"rediss://127.0.0.1:{}\"\n{ca}key_prefix = \"{prefix}\"\ntimeout_ms = 500\nreconnect_max_ms = 300\nlease_ms = 1500\n",
            self.port
        )
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Replica {
    state: Arc<AppState>,
    client: TestClient,
    _shutdown: oneshot::Sender<()>,
}

/// A gateway started as `serve` does: state, one connection attempt to Redis, then listeners.
async fn replica(text: &str) -> Replica {
    init_logs();
    let config = Config::parse(text, &|_| None).unwrap();
    let key = AdminKey::new(ADMIN_KEY).unwrap();
    let state = AppState::new(&config, key, Clock::default(), None).unwrap();
    state.start_fleet().await;
    let (addr, shutdown) = serve_state(&state, &config).await;
    Replica {
        state,
        client: TestClient::new(addr),
        _shutdown: shutdown,
    }
}

fn healthy(replica: &Replica) -> bool {
    replica.state.fleet.as_ref().unwrap().is_healthy()
}

#[tokio::test]
async fn replicas_share_writes_through_a_tls_redis_trusted_by_ca_file() {
    let dir = TempDir::new("fleet-tls");
    let pki = make_pki("permgate test redis CA");
    let redis = TlsRedis::start(&dir, &pki);
    let ca_file = dir.write("gateway-ca.pem", &pki.ca_pem);
    let (mock, addr, _stop) = mock().await;
    let text = base_config(addr) + &redis.section("tls1:", Some(&ca_file));
    let (a, b) = (replica(&text).await, replica(&text).await);
    // One connection attempt each, at startup: both made it, over TLS (no plain port).
    assert!(
        healthy(&a) && healthy(&b),
        "both replicas connected over TLS"
    );
    assert!(a
        .state
        .render_metrics()
        .await
        .contains("permgate_fleet_redis_up 1"));

    assert_eq!(a.client.get(&list_path(CP), WRITER).await.status, 200);
    let shared = b.client.get(&list_path(CP), WRITER).await;
    assert_eq!(shared.status, 200);
    assert_eq!(
        mock.count(&Method::GET),
        1,
        "the second replica took the page from the shared tier"
    );
    assert_eq!(
        b.client.get(&list_path(CP), WRITER).await.cache_status(),
        "permgate; hit"
    );

    let created = a
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["proj_tls"]}"#)
        .await;
    assert_eq!(created.status, 200);
    let id = created.ids()[0].clone();
    let after = b.client.get(&list_path(CP), WRITER).await;
    assert_eq!(
        after.ids()[0],
        id,
        "the other replica serves the write at once"
    );
    assert!(healthy(&a) && healthy(&b));
}

#[tokio::test]
async fn a_gateway_without_the_redis_ca_cannot_connect_and_runs_degraded() {
    let dir = TempDir::new("fleet-tls-untrusted");
    let pki = make_pki("permgate test redis CA");
    let redis = TlsRedis::start(&dir, &pki);
    let good_ca = dir.write("gateway-ca.pem", &pki.ca_pem);
    let wrong_ca = dir.write("wrong-ca.pem", &make_pki("another CA").ca_pem);
    let (_mock, addr, _stop) = mock().await;

    // The control: with the right CA this Redis is reachable right now.
    let trusted = replica(&(base_config(addr) + &redis.section("tls2:", Some(&good_ca)))).await;
    assert!(healthy(&trusted));

    for (what, ca_file) in [
        ("public roots only", None),
        ("another CA", Some(wrong_ca.as_path())),
    ] {
        let text = base_config(addr) + &redis.section("tls2:", ca_file);
        let untrusted = replica(&text).await;
        assert!(
            !healthy(&untrusted),
            "{what}: connected to an untrusted Redis"
        );
        let metrics = untrusted.state.render_metrics().await;
        assert!(
            metrics.contains("permgate_fleet_redis_up 0"),
            "{what}: {metrics}"
        );
        // Degraded, not down: reads are still answered (from upstream).
        let r = untrusted.client.get(&list_path(CP), READER).await;
        assert_eq!(r.status, 200, "{what}");
    }
    assert!(logs().contains("redis unreachable at startup: starting degraded"));
    assert!(healthy(&trusted));
}

#[tokio::test]
async fn an_unusable_redis_ca_file_stops_startup_naming_the_key() {
    let dir = TempDir::new("fleet-tls-bad-ca");
    let empty = dir.write("empty.pem", "not a certificate\n");
    let missing = dir.0.join("missing.pem");
    for path in [&empty, &missing] {
        let text = base_config("127.0.0.1:9".parse().unwrap())
            + &format!(
                "\n[redis]\nurl = \"rediss://127.0.0.1:6380\"\nca_file = \"{}\"\n",
                path.display()
            );
        let config = Config::parse(&text, &|_| None).unwrap();
        let key = AdminKey::new(ADMIN_KEY).unwrap();
        let err = match AppState::new(&config, key, Clock::default(), None) {
            Ok(_) => panic!("{} accepted as redis.ca_file", path.display()),
            Err(e) => e,
        };
        assert!(err.starts_with("redis.ca_file "), "{err}");
    }
}
