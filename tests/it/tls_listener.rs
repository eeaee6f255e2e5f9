//! HTTPS on the data listener (SPEC "The front door"): ALPN h2 and http/1.1, certificate hot
//! reload (file change and SIGHUP), a bad new pair kept out, client certificates (mTLS) and the
//! `PeerIdentity` they give each request. Real TLS end to end, under CAs made at test time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use permgate::clock::Clock;
use permgate::config::Config;
use permgate::mock_upstream::MockUpstream;
use permgate::secret::AdminKey;
use permgate::server::{self, Limits};
use permgate::state::AppState;
use permgate::tls::{self, PeerIdentity, ServerTls};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use crate::support::*;

const SPIFFE: &str = "spiffe://example.org/ns/billing/sa/api";

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, as PEM (for files) and DER (for the test client).
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Leaf {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn issue(&self, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose, expired: bool) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = date_time_ymd(2000, 1, 1);
            params.not_after = date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    /// A server certificate for `localhost`.
    fn server(&self) -> Leaf {
        let localhost = SanType::DnsName("localhost".try_into().unwrap());
        self.issue(vec![localhost], ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    /// A client certificate naming a SPIFFE ID and a DNS name.
    fn client(&self) -> Leaf {
        let sans = vec![
            SanType::URI(SPIFFE.try_into().unwrap()),
            SanType::DnsName("api.billing.svc".try_into().unwrap()),
        ];
        self.issue(sans, ExtendedKeyUsagePurpose::ClientAuth, false)
    }
}

/// A test's directory. The certificate and key sit behind a `live` symlink to a versioned
/// directory, swapped atomically like a Kubernetes Secret volume: a poll never sees a new
/// certificate next to an old key.
struct Files {
    dir: PathBuf,
    version: usize,
}

impl Files {
    fn new(name: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("permgate-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Files { dir, version: 0 }
    }

    fn cert_file(&self) -> PathBuf {
        self.dir.join("live/tls.crt")
    }

    fn key_file(&self) -> PathBuf {
        self.dir.join("live/tls.key")
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn install(&mut self, cert_pem: &str, key_pem: &str) {
        self.install_with(|dir| {
            std::fs::write(dir.join("tls.crt"), cert_pem).unwrap();
            std::fs::write(dir.join("tls.key"), key_pem).unwrap();
        });
    }

    /// `fill` writes tls.crt and tls.key into a new version, which then goes live.
    fn install_with(&mut self, fill: impl FnOnce(&Path)) {
        self.version += 1;
        let version = self.dir.join(format!("v{}", self.version));
        std::fs::create_dir(&version).unwrap();
        fill(&version);
        let staged = self.dir.join("live.new");
        std::os::unix::fs::symlink(&version, &staged).unwrap();
        std::fs::rename(&staged, self.dir.join("live")).unwrap();
    }

    /// The `[server.tls]` table for these files.
    fn table(&self, extra: &str) -> String {
        format!(
            "\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{extra}\n",
            self.cert_file().display(),
            self.key_file().display()
        )
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

/// A gateway with `[server.tls]` in front of the mock, its certificate watcher polling every
/// 100 ms (`upstream.admin_key_poll_ms`, as `permgate serve` does).
struct TlsGateway {
    addr: SocketAddr,
    state: Arc<AppState>,
    mock: MockUpstream,
    tls: Arc<ServerTls>,
    watcher: tokio::task::JoinHandle<()>,
    _shutdown: oneshot::Sender<()>,
    _mock_stop: watch::Sender<bool>,
}

impl Drop for TlsGateway {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// `server_keys` go in `[server]`, `tls_table` is the whole `[server.tls]` table.
async fn start_tls(server_keys: &str, tls_table: &str) -> TlsGateway {
    init_logs();
    let (mock, mock_addr, mock_stop) = mock().await;
    let text = base_config(mock_addr)
        .replace(
            "drain_timeout_ms = 5000",
            &format!("drain_timeout_ms = 5000\n{server_keys}"),
        )
        .replace(
            "request_timeout_ms = 3000",
            "request_timeout_ms = 3000\nadmin_key_poll_ms = 100",
        )
        + tls_table;
    let config = Config::parse(&text, &|_| None).expect("test config is valid");
    let key = AdminKey::new(ADMIN_KEY).unwrap();
    let state = AppState::new(&config, key, Clock::default(), None).unwrap();
    let server_tls = Arc::new(ServerTls::load(config.server.tls.as_ref().unwrap()).unwrap());
    let metrics = state.metrics.clone();
    let watcher = tokio::spawn(tls::watch(
        server_tls.clone(),
        config.upstream.admin_key_poll,
        false,
        move |ok| metrics.tls_reload(ok),
    ));
    let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = data.local_addr().unwrap();
    let (shutdown, stop) = oneshot::channel::<()>();
    tokio::spawn(server::serve_with_tls(
        data,
        Some(server_tls.acceptor()),
        None,
        state.clone(),
        async {
            let _ = stop.await;
        },
        (&config.server).into(),
    ));
    TlsGateway {
        addr,
        state,
        mock,
        tls: server_tls,
        watcher,
        _shutdown: shutdown,
        _mock_stop: mock_stop,
    }
}

impl TlsGateway {
    async fn reloads(&self, result: &str) -> usize {
        let text = self.state.render_metrics().await;
        let prefix = format!("permgate_tls_reloads_total{{result=\"{result}\"}} ");
        let line = text.lines().find_map(|l| l.strip_prefix(&prefix[..]));
        line.expect("the TLS reload counter is exposed")
            .parse()
            .unwrap()
    }

    async fn wait_for_reloads(&self, result: &str, count: usize) {
        eventually(
            &format!("{count} TLS reload(s) with result {result}"),
            || async move { self.reloads(result).await >= count },
        )
        .await;
        assert_eq!(self.reloads(result).await, count);
    }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// A client trusting `ca`, offering `alpn`, presenting `certificate` when asked.
fn client(ca: &Ca, certificate: Option<&Leaf>, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match certificate {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.der.clone()], leaf.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

/// One HTTPS connection, kept open between requests.
struct Conn {
    sender: Sender,
    /// The end-entity certificate the gateway presented in this connection's handshake.
    server_cert: CertificateDer<'static>,
}

struct Answer {
    status: u16,
    version: Version,
    body: Bytes,
}

/// Connects, handshakes and speaks what ALPN chose; `Err` says why not.
async fn open(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Conn, String> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").unwrap();
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let session = stream.get_ref().1;
        let server_cert = session.peer_certificates().unwrap()[0].clone();
        let h2 = session.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(stream);
        let sender = if h2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            Sender::H2(sender)
        } else {
            let (sender, connection) = http1::handshake(io).await.map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            Sender::H1(sender)
        };
        Ok(Conn {
            sender,
            server_cert,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .expect("connected or refused in time")
}

impl Conn {
    async fn get(&mut self, path: &str, token: Option<&str>) -> Result<Answer, String> {
        let uri = match self.sender {
            Sender::H1(_) => path.to_string(),
            Sender::H2(_) => format!("https://localhost{path}"),
        };
        let mut request = Request::get(uri).header("host", "localhost");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(Empty::new()).unwrap();
        let exchange = async {
            let response = match &mut self.sender {
                Sender::H1(s) => s.send_request(request).await,
                Sender::H2(s) => s.send_request(request).await,
            }
            .map_err(|e| format!("request: {e:?}"))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok(Answer {
                status: parts.status.as_u16(),
                version: parts.version,
                body,
            })
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("answered or failed in time")
    }
}

/// A new connection and one GET as READER: the status, or why there was none.
async fn attempt(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<u16, String> {
    let mut conn = open(addr, config).await?;
    Ok(conn.get(&list_path(CP), Some(READER)).await?.status)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn https_serves_http1_and_http2_by_alpn_with_bearer_tokens() {
    let ca = Ca::new("server CA");
    let mut files = Files::new("alpn");
    let leaf = ca.server();
    files.install(&leaf.cert_pem, &leaf.key_pem);
    let gw = start_tls("", &files.table("")).await;

    let mut h1 = open(gw.addr, client(&ca, None, &["http/1.1"]))
        .await
        .unwrap();
    let r = h1.get(&list_path(CP), Some(READER)).await.unwrap();
    assert_eq!((r.status, r.version), (200, Version::HTTP_11));
    assert_eq!(h1.server_cert, leaf.der);
    // Same connection, next request: a cache hit, and no token means 401 as over plain HTTP.
    assert_eq!(h1.get(&list_path(CP), None).await.unwrap().status, 401);

    let mut h2 = open(gw.addr, client(&ca, None, &["h2", "http/1.1"]))
        .await
        .unwrap();
    let r = h2.get(&list_path(CP), Some(READER)).await.unwrap();
    assert_eq!(
        (r.status, r.version),
        (200, Version::HTTP_2),
        "ALPN chose h2"
    );
    let page: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 10);
    let r = h2.get(&list_path(CP), Some(NOBODY)).await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(gw.mock.requests().len(), 1, "one fill; the rest were hits");

    // Without ALPN, the auto builder still tells the versions apart.
    let mut plain = open(gw.addr, client(&ca, None, &[])).await.unwrap();
    assert_eq!(
        plain
            .get(&list_path(CP), Some(READER))
            .await
            .unwrap()
            .status,
        200
    );

    // Plain HTTP to the HTTPS port gets no HTTP answer and reaches nothing.
    let mut raw = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {READER}\r\n\r\n",
        list_path(CP2)
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection was closed");
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    assert_eq!(gw.mock.requests().len(), 1);
}

#[tokio::test]
async fn a_new_certificate_serves_new_connections_while_open_ones_keep_the_old() {
    let ca = Ca::new("server CA");
    let mut files = Files::new("reload");
    let (old, new) = (ca.server(), ca.server());
    files.install(&old.cert_pem, &old.key_pem);
    let gw = start_tls("", &files.table("")).await;

    let mut kept = open(gw.addr, client(&ca, None, &["http/1.1"]))
        .await
        .unwrap();
    assert_eq!(kept.server_cert, old.der);
    assert_eq!(
        kept.get(&list_path(CP), Some(READER)).await.unwrap().status,
        200
    );

    files.install(&new.cert_pem, &new.key_pem);
    gw.wait_for_reloads("success", 1).await;
    assert_eq!(gw.reloads("failure").await, 0);

    let mut fresh = open(gw.addr, client(&ca, None, &["h2"])).await.unwrap();
    assert_eq!(
        fresh.server_cert, new.der,
        "a new handshake gets the new pair"
    );
    assert_eq!(
        fresh
            .get(&list_path(CP), Some(READER))
            .await
            .unwrap()
            .status,
        200
    );
    // The keep-alive connection made before the reload still answers, on its old session.
    let r = kept.get(&list_path(CP2), Some(READER)).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(kept.server_cert, old.der);

    // Unchanged files are not reloaded again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.reloads("success").await, 1);
}

#[tokio::test]
async fn a_bad_new_pair_keeps_the_old_one_and_is_counted() {
    let ca = Ca::new("server CA");
    let mut files = Files::new("bad");
    let (good, other, replacement) = (ca.server(), ca.server(), ca.server());
    files.install(&good.cert_pem, &good.key_pem);
    let gw = start_tls("", &files.table("")).await;

    // A certificate with somebody else's key.
    files.install(&good.cert_pem, &other.key_pem);
    gw.wait_for_reloads("failure", 1).await;
    let mut conn = open(gw.addr, client(&ca, None, &["http/1.1"]))
        .await
        .unwrap();
    assert_eq!(
        conn.server_cert, good.der,
        "the old pair is still presented"
    );
    assert_eq!(
        conn.get(&list_path(CP), Some(READER)).await.unwrap().status,
        200
    );

    // Not PEM at all.
    files.install("not a certificate", &good.key_pem);
    gw.wait_for_reloads("failure", 2).await;
    // A FIFO where the key was: refused at once, logged, and nothing stalls.
    files.install_with(|dir| {
        std::fs::write(dir.join("tls.crt"), &good.cert_pem).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(dir.join("tls.key"))
            .status();
        assert!(made.unwrap().success());
    });
    eventually("the FIFO is logged", || async {
        logs().contains("cannot read server.tls.key_file: not a regular file")
    })
    .await;
    let mut conn = open(gw.addr, client(&ca, None, &["h2"])).await.unwrap();
    assert_eq!(conn.server_cert, good.der);
    assert_eq!(
        conn.get(&list_path(CP), Some(READER)).await.unwrap().status,
        200
    );

    files.install(&replacement.cert_pem, &replacement.key_pem);
    gw.wait_for_reloads("success", 1).await;
    let conn = open(gw.addr, client(&ca, None, &["h2"])).await.unwrap();
    assert_eq!(conn.server_cert, replacement.der);
    assert_eq!(
        gw.reloads("failure").await,
        2,
        "an unreadable file is not a refusal"
    );

    let logged = logs();
    assert!(logged.contains("is not the private key of server.tls.cert_file's certificate"));
    assert!(logged.contains("server.tls.cert_file holds no PEM certificate"));
    for leaf in [&good, &other, &replacement] {
        for line in leaf.key_pem.lines().filter(|l| !l.starts_with("-----")) {
            for piece in line.as_bytes().chunks(16).filter(|p| p.len() == 16) {
                let piece = std::str::from_utf8(piece).unwrap();
                assert!(!logged.contains(piece), "key material in the logs");
            }
        }
    }
}

#[tokio::test]
async fn the_tls_handshake_must_finish_within_the_header_read_timeout_and_holds_a_slot() {
    let ca = Ca::new("server CA");
    let mut files = Files::new("slow");
    let leaf = ca.server();
    files.install(&leaf.cert_pem, &leaf.key_pem);
    let server_keys = "header_read_timeout_ms = 300\nmax_connections = 1";
    let gw = start_tls(server_keys, &files.table("")).await;

    // Connects and never says hello: it holds the only slot until the handshake deadline.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    let status = attempt(gw.addr, client(&ca, None, &["h2"])).await;
    assert_eq!(status, Ok(200));
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "served after the silent connection was dropped, not before ({:?})",
        started.elapsed()
    );
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
}

/// A gateway asking for client certificates from `clients_ca`.
async fn start_mtls(
    name: &str,
    server_ca: &Ca,
    clients_ca: &Ca,
    required: bool,
) -> (TlsGateway, Files) {
    start_mtls_with(name, server_ca, clients_ca, required, "").await
}

/// [`start_mtls`] with `more` after the `[server.tls]` table (clients, say).
async fn start_mtls_with(
    name: &str,
    server_ca: &Ca,
    clients_ca: &Ca,
    required: bool,
    more: &str,
) -> (TlsGateway, Files) {
    let mut files = Files::new(name);
    let leaf = server_ca.server();
    files.install(&leaf.cert_pem, &leaf.key_pem);
    let ca_file = files.write("clients-ca.pem", &clients_ca.cert.pem());
    let extra = format!(
        "client_ca_file = \"{}\"\nrequire_client_cert = {required}",
        ca_file.display()
    );
    (start_tls("", &(files.table(&extra) + more)).await, files)
}

/// A client named by the SPIFFE ID of [`Ca::client`], granted `CP` only.
fn billing_client() -> String {
    format!("\n[[clients]]\nname = \"billing\"\ntls_identity = \"{SPIFFE}\"\ncheckpoints = [\"{CP}\"]\n")
}

#[tokio::test]
async fn required_client_certificates_must_chain_to_the_client_ca() {
    let (server_ca, clients_ca, stranger_ca) =
        (Ca::new("server"), Ca::new("clients"), Ca::new("x"));
    let (gw, _files) = start_mtls("required", &server_ca, &clients_ca, true).await;
    let expired = clients_ca.issue(
        vec![SanType::URI(SPIFFE.try_into().unwrap())],
        ExtendedKeyUsagePurpose::ClientAuth,
        true,
    );
    // The handshake fails with the alert that says why (TLS 1.3: the client learns it when
    // it reads, after sending its request, which goes nowhere).
    let refused = [
        (None, "CertificateRequired"),
        (Some(stranger_ca.client()), "UnknownCA"),
        (Some(expired), "CertificateExpired"),
    ];
    for (certificate, alert) in &refused {
        let config = client(&server_ca, certificate.as_ref(), &["h2", "http/1.1"]);
        let result = attempt(gw.addr, config).await;
        let err = result.expect_err(alert);
        assert!(
            err.contains(&format!("received fatal alert: {alert}")),
            "{err}"
        );
    }
    assert!(gw.mock.requests().is_empty(), "nothing reached upstream");
    let valid = clients_ca.client();
    for alpn in ["h2", "http/1.1"] {
        let config = client(&server_ca, Some(&valid), &[alpn]);
        assert_eq!(attempt(gw.addr, config).await, Ok(200), "{alpn}");
    }
}

#[tokio::test]
async fn optional_client_certificates_still_refuse_an_untrusted_one() {
    let (server_ca, clients_ca, stranger_ca) =
        (Ca::new("server"), Ca::new("clients"), Ca::new("x"));
    let (gw, _files) = start_mtls("optional", &server_ca, &clients_ca, false).await;
    let config = client(&server_ca, None, &["h2"]);
    assert_eq!(attempt(gw.addr, config).await, Ok(200), "no certificate");
    let valid = client(&server_ca, Some(&clients_ca.client()), &["h2"]);
    assert_eq!(
        attempt(gw.addr, valid).await,
        Ok(200),
        "a valid certificate"
    );
    // rustls' WebPkiClientVerifier with allow_unauthenticated() lets a client send none, but
    // still verifies one that is sent: an untrusted certificate fails the handshake.
    let untrusted = client(&server_ca, Some(&stranger_ca.client()), &["h2"]);
    let err = attempt(gw.addr, untrusted).await.unwrap_err();
    assert!(err.contains("received fatal alert: UnknownCA"), "{err}");
    assert_eq!(gw.mock.requests().len(), 1);
}

/// Answers every request with the names of its `PeerIdentity`, or `none`.
async fn identity_echo(tls: &ServerTls) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let handler = |req: Request<Incoming>| async move {
        let names = req
            .extensions()
            .get::<PeerIdentity>()
            .map_or("none".to_string(), |id| id.names.join(" "));
        Response::new(Full::new(Bytes::from(names)))
    };
    let limits = Limits::local(Duration::from_secs(1));
    tokio::spawn(server::serve_listener(
        listener,
        Some(tls.acceptor()),
        handler,
        stopped,
        limits,
        None,
    ));
    (addr, stop)
}

#[tokio::test]
async fn a_verified_client_certificate_names_every_request_on_its_connection() {
    let (server_ca, clients_ca) = (Ca::new("server"), Ca::new("clients"));
    let (gw, _files) = start_mtls("identity", &server_ca, &clients_ca, false).await;
    let (addr, _stop) = identity_echo(&gw.tls).await;
    let named = clients_ca.client();
    let unnamed = clients_ca.issue(vec![], ExtendedKeyUsagePurpose::ClientAuth, false);
    let expected = format!("{SPIFFE} api.billing.svc");
    for alpn in ["h2", "http/1.1"] {
        let mut conn = open(addr, client(&server_ca, Some(&named), &[alpn]))
            .await
            .unwrap();
        for _ in 0..2 {
            let r = conn.get("/whoami", None).await.unwrap();
            assert_eq!(r.body, expected.as_bytes(), "{alpn}");
        }
        for certificate in [None, Some(&unnamed)] {
            let mut conn = open(addr, client(&server_ca, certificate, &[alpn]))
                .await
                .unwrap();
            let r = conn.get("/whoami", None).await.unwrap();
            assert_eq!(
                r.body,
                &b"none"[..],
                "{alpn}: no certificate, or one without a name"
            );
        }
    }
}

#[tokio::test]
async fn sighup_reloads_the_certificate_of_a_running_gateway() {
    let ca = Ca::new("server CA");
    let mut files = Files::new("sighup");
    let (old, new) = (ca.server(), ca.server());
    files.install(&old.cert_pem, &old.key_pem);
    // Polling once an hour: only the signal can bring the new pair in.
    let text = base_config("127.0.0.1:9".parse().unwrap()).replace(
        "request_timeout_ms = 3000",
        "request_timeout_ms = 3000\nadmin_key_poll_ms = 3600000",
    ) + &files.table("");
    let config = files.write("permgate.toml", &text);
    let (child, addr) = spawn_serve(&config, &[("OPENAI_ADMIN_KEY", ADMIN_KEY)]).await;
    let https = client(&ca, None, &["h2"]);
    assert_eq!(
        open(addr, https.clone()).await.unwrap().server_cert,
        old.der
    );

    files.install(&new.cert_pem, &new.key_pem);
    let conn = open(addr, https.clone()).await.unwrap();
    assert_eq!(conn.server_cert, old.der, "no poll yet");
    signal(&child, "HUP");
    eventually("SIGHUP brought the new certificate in", || async {
        open(addr, https.clone()).await.unwrap().server_cert == new.der
    })
    .await;
}

/// SPEC "Who a caller is": a verified client certificate that names a configured
/// `tls_identity` client wins, whatever `Authorization` holds (the SDKs always send one), and
/// the caller gets exactly that client's grants; without a certificate the bearer decides.
#[tokio::test]
async fn a_client_certificate_naming_a_client_wins_over_the_bearer_and_gets_its_grants() {
    let (server_ca, clients_ca) = (Ca::new("server"), Ca::new("clients"));
    let (gw, _files) = start_mtls_with(
        "mtls-identity",
        &server_ca,
        &clients_ca,
        false,
        &billing_client(),
    )
    .await;
    let mut with_cert = open(
        gw.addr,
        client(&server_ca, Some(&clients_ca.client()), &["h2"]),
    )
    .await
    .unwrap();
    // A bearer that names no client, or another client, changes nothing: the certificate
    // decides who this is.
    for token in [Some("not-a-client-token"), Some(NOBODY), None] {
        let r = with_cert.get(&list_path(CP), token).await.unwrap();
        assert_eq!(r.status, 200, "{token:?}");
    }
    // Exactly billing's grants: CP only (not CP2, which the reader token may read).
    let r = with_cert.get(&list_path(CP2), Some(READER)).await.unwrap();
    assert_eq!(r.status, 403);
    let metrics = gw.state.render_metrics().await;
    let billing = |class: &str| {
        metrics.lines().any(|l| {
            l.starts_with("permgate_requests_total{")
                && l.contains(&format!("status_class=\"{class}\""))
                && l.contains("client=\"billing\"")
        })
    };
    assert!(billing("2xx") && billing("4xx"), "{metrics}");
    // Without a certificate, the bearer decides: an unknown token is a 401.
    let mut no_cert = open(gw.addr, client(&server_ca, None, &["h2"]))
        .await
        .unwrap();
    let r = no_cert
        .get(&list_path(CP), Some("not-a-client-token"))
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let r = no_cert.get(&list_path(CP2), Some(READER)).await.unwrap();
    assert_eq!(r.status, 200);
}

/// The official Python SDK, pointed at permgate over HTTPS with a client certificate in its
/// httpx client, gets exactly the grants of the client its certificate names (its `api_key`
/// names nobody).
#[tokio::test]
async fn the_python_sdk_with_a_client_certificate_gets_its_clients_grants() {
    let Some(python) = sdk_python().await else {
        return;
    };
    let (server_ca, clients_ca) = (Ca::new("server"), Ca::new("clients"));
    let (gw, files) =
        start_mtls_with("mtls-sdk", &server_ca, &clients_ca, true, &billing_client()).await;
    let caller = clients_ca.client();
    let server_ca_file = files.write("server-ca.pem", &server_ca.cert.pem());
    let cert_file = files.write("caller.crt", &caller.cert_pem);
    let key_file = files.write("caller.key", &caller.key_pem);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/client_certificate.py"
    );
    let base_url = format!("https://localhost:{}/v1", gw.addr.port());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(&base_url)
            .args([&server_ca_file, &cert_file, &key_file])
            .args([CP, CP2])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the SDK script failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["listed 10", "denied 403 permission_denied"]
    );
    let metrics = gw.state.render_metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("permgate_requests_total{")
                && l.contains("client=\"billing\"")
                && l.contains("status_class=\"2xx\"")),
        "{metrics}"
    );
}
