//! Test harness: a real mock upstream and a real gateway on ephemeral loopback ports, in this
//! process, plus an HTTP client and a log capture that every test shares.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use permgate::clock::Clock;
use permgate::config::Config;
use permgate::mock_upstream::MockUpstream;
use permgate::secret::AdminKey;
use permgate::server;
use permgate::state::AppState;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

/// A recognizable admin key: no 6-character piece of it may ever reach a caller or a log. Real
/// admin keys start `sk-admin-`; this one avoids that prefix because its windows (`admin-`)
/// occur innocently in paths like `/run/secrets/openai-admin-key`, and the check is meant to
/// catch the secret part.
pub const ADMIN_KEY: &str = "sk-Zq9XvLk2PmW7tR4yB8nC3dF6hJ1wQ5eT";
pub const READER: &str = "reader-token-1";
pub const WRITER: &str = "writer-token-1";
pub const NOBODY: &str = "nobody-token-1";
pub const CP: &str = "ft:gpt-4o-mini-2024-07-18:acme:weather:B7R9VjQd";
pub const CP2: &str = "ft:gpt-4o-mini-2024-07-18:acme:support:Q1w2E3r4";
pub const GLOBEX: &str = "ft:gpt-4o-2024-08-06:globex:legal:Z9y8X7w6";

pub fn list_path(checkpoint: &str) -> String {
    format!("/v1/fine_tuning/checkpoints/{checkpoint}/permissions")
}

fn digest(token: &str) -> String {
    hex::encode(permgate::auth::digest(token.as_bytes()))
}

/// The config every test starts from; `base_url` points at the test's mock.
pub fn base_config(mock: SocketAddr) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
drain_timeout_ms = 5000

[upstream]
base_url = "http://{mock}/v1"
request_timeout_ms = 3000

[cache]
ttl_seconds = 60
stale_while_revalidate_seconds = 10
stale_if_error_seconds = 300
negative_ttl_seconds = 5

[[clients]]
name = "reader"
token_sha256 = "{reader}"
checkpoints = ["ft:gpt-4o-mini-2024-07-18:acme:*"]

[[clients]]
name = "writer"
token_sha256 = "{writer}"
checkpoints = ["*"]
can_write = true

[[clients]]
name = "nobody"
token_sha256 = "{nobody}"
"#,
        reader = digest(READER),
        writer = digest(WRITER),
        nobody = digest(NOBODY),
    )
}

/// A running gateway and its mock upstream.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub mock: MockUpstream,
    pub state: Arc<AppState>,
    pub client: TestClient,
    shutdown: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    _mock_stop: watch::Sender<bool>,
}

pub async fn start() -> Gateway {
    start_with(|_| {}).await
}

/// Starts a mock and a gateway; `edit` may change the config text before it is parsed.
pub async fn start_with(edit: impl FnOnce(&mut String)) -> Gateway {
    init_logs();
    let (mock, mock_addr, mock_stop) = mock().await;
    let mut text = base_config(mock_addr);
    edit(&mut text);
    let (state, addr, admin_addr, shutdown, served) = start_gateway_with_admin(&text).await;
    Gateway {
        addr,
        admin_addr,
        mock,
        state,
        client: TestClient::new(addr),
        shutdown: Some(shutdown),
        served: Some(served),
        _mock_stop: mock_stop,
    }
}

pub type Started = (Arc<AppState>, SocketAddr, oneshot::Sender<()>);

pub type StartedWithAdmin = (
    Arc<AppState>,
    SocketAddr,
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
);

pub async fn start_gateway(text: &str) -> Started {
    let config = Config::parse(text, &|_| None).expect("test config is valid");
    let key = AdminKey::new(ADMIN_KEY).unwrap();
    let state = AppState::new(&config, key, Clock::default(), None).expect("state builds");
    let (addr, shutdown) = serve_state(&state, &config).await;
    (state, addr, shutdown)
}

/// Serves `state` on an ephemeral data port (no admin listener) until the sender is dropped.
pub async fn serve_state(
    state: &Arc<AppState>,
    config: &Config,
) -> (SocketAddr, oneshot::Sender<()>) {
    let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = data.local_addr().unwrap();
    let (shutdown, stop) = oneshot::channel::<()>();
    tokio::spawn(server::serve(
        data,
        None,
        state.clone(),
        async {
            let _ = stop.await;
        },
        (&config.server).into(),
    ));
    (addr, shutdown)
}

/// Like [`start_gateway`], with the admin listener too and the serving task's handle.
pub async fn start_gateway_with_admin(text: &str) -> StartedWithAdmin {
    let config = Config::parse(text, &|_| None).expect("test config is valid");
    let key = AdminKey::new(ADMIN_KEY).unwrap();
    let state = AppState::new(&config, key, Clock::default(), None).expect("state builds");
    let data = TcpListener::bind(config.server.listen).await.unwrap();
    let admin = TcpListener::bind(config.server.admin_listen.unwrap())
        .await
        .unwrap();
    let addr = data.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let (shutdown, stop) = oneshot::channel::<()>();
    let served = tokio::spawn(server::serve(
        data,
        Some(admin),
        state.clone(),
        async {
            let _ = stop.await;
        },
        (&config.server).into(),
    ));
    (state, addr, admin_addr, shutdown, served)
}

/// When a test's gateway goes away, everything logged so far must be free of the key and of
/// every client credential (static token or JWT) any test has sent.
impl Drop for Gateway {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let logs = logs();
            assert_no_key_piece(&logs, "the logs");
            assert_no_credential(&logs, "the logs");
        }
    }
}

/// Pieces of the admin key that a test put in a request path or body itself (guesses at the
/// key): permgate may quote them back and log them, as it does any input, since they tell the
/// caller nothing it did not send.
fn pieces_sent() -> &'static Mutex<std::collections::BTreeSet<&'static str>> {
    static SENT: OnceLock<Mutex<std::collections::BTreeSet<&'static str>>> = OnceLock::new();
    SENT.get_or_init(Default::default)
}

/// Every bearer credential of at least [`CREDENTIAL_MIN`] bytes a test has sent.
fn credentials_sent() -> &'static Mutex<std::collections::BTreeSet<String>> {
    static SENT: OnceLock<Mutex<std::collections::BTreeSet<String>>> = OnceLock::new();
    SENT.get_or_init(Default::default)
}

/// Shorter bearer values (`x`, `nope`) could occur in a log line by chance.
const CREDENTIAL_MIN: usize = 12;

/// SPEC "Hygiene rules": no client credential in a log line (the logs name the client).
pub fn assert_no_credential(text: &str, what: &str) {
    let sent: Vec<String> = credentials_sent().lock().unwrap().iter().cloned().collect();
    if sent.is_empty() {
        return;
    }
    let finder = aho_corasick::AhoCorasick::new(&sent).unwrap();
    if let Some(found) = finder.find(text) {
        panic!(
            "a client credential ({} bytes) is in {what}",
            found.end() - found.start()
        );
    }
}

impl Gateway {
    pub fn clock(&self) -> &Clock {
        self.state.cache.clock()
    }

    pub fn admin(&self) -> TestClient {
        TestClient::new(self.admin_addr)
    }

    pub fn upstream_gets(&self) -> usize {
        self.mock.count(&Method::GET)
    }

    /// Signals shutdown and waits for the drain to finish.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(served) = self.served.take() {
            tokio::time::timeout(Duration::from_secs(10), served)
                .await
                .expect("drain finished in time")
                .unwrap();
        }
    }
}

/// Waits (bounded) for a condition driven by another task; not a timing assumption.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[derive(Clone)]
pub struct TestClient {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    pub fn cache_status(&self) -> &str {
        self.header("cache-status")
    }

    /// `error.code` and `error.param` of an OpenAI-shaped error.
    pub fn error(&self) -> (String, Option<String>) {
        let v = self.json();
        let e = &v["error"];
        assert!(
            e["message"].is_string() && e["type"].is_string(),
            "not OpenAI-shaped: {v}"
        );
        (
            e["code"].as_str().unwrap_or_default().to_string(),
            e["param"].as_str().map(str::to_string),
        )
    }

    pub fn ids(&self) -> Vec<String> {
        self.json()["data"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    }
}

impl TestClient {
    pub fn new(addr: SocketAddr) -> TestClient {
        TestClient {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> TestResponse {
        for piece in key_pieces() {
            if path.contains(piece) || body.is_some_and(|b| b.contains(piece)) {
                pieces_sent().lock().unwrap().insert(piece);
            }
        }
        let mut req = Request::new(Full::new(Bytes::from(body.unwrap_or("").to_owned())));
        *req.method_mut() = method;
        *req.uri_mut() = format!("{}{path}", self.base).parse().expect("test uri");
        if let Some(token) = token {
            if token.len() >= CREDENTIAL_MIN {
                credentials_sent().lock().unwrap().insert(token.to_owned());
            }
            req.headers_mut().insert(
                hyper::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
            );
        }
        for (k, v) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let response = tokio::time::timeout(Duration::from_secs(15), self.client.request(req))
            .await
            .expect("gateway answered in time")
            .expect("request sent");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let response = TestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        };
        record_response(&response);
        response
    }

    pub async fn get(&self, path: &str, token: &str) -> TestResponse {
        self.send(Method::GET, path, Some(token), &[], None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &str) -> TestResponse {
        self.send(
            Method::POST,
            path,
            Some(token),
            &[("content-type", "application/json")],
            Some(body),
        )
        .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> TestResponse {
        self.send(Method::DELETE, path, Some(token), &[], None)
            .await
    }
}

/// Every response any test received, as text (headers and body), for the leak check.
pub fn responses_seen() -> &'static Mutex<Vec<String>> {
    static SEEN: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    SEEN.get_or_init(Default::default)
}

/// Checks every response any test receives for admin-key pieces, then keeps it.
fn record_response(r: &TestResponse) {
    let mut text = format!("{}\n", r.status);
    for (k, v) in &r.headers {
        text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    text.push_str(&String::from_utf8_lossy(&r.body));
    assert_no_key_piece(&text, "a response");
    responses_seen().lock().unwrap().push(text);
}

/// Asserts that `text` holds no piece of the admin key, except pieces a test sent itself (see
/// [`pieces_sent`]).
pub fn assert_no_key_piece(text: &str, what: &str) {
    let sent = pieces_sent().lock().unwrap().clone();
    for piece in key_pieces().into_iter().filter(|p| !sent.contains(p)) {
        assert!(
            !text.contains(piece),
            "admin key piece {piece:?} leaked in {what}:\n{text}"
        );
    }
}

/// Every log line written by any gateway in this test process, at TRACE.
pub fn logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned()
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(Default::default)
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn init_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let buf = log_buffer().clone();
        // Rendered as in production (observability::init), at TRACE.
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || Capture(buf.clone()))
            .with_filter(tracing_subscriber::filter::filter_fn(
                permgate::observability::renders,
            ));
        tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("trace"))
            .with(fmt)
            .init();
    });
}

/// Every 6-character window of the admin key.
pub fn key_pieces() -> Vec<&'static str> {
    (0..=ADMIN_KEY.len() - 6)
        .map(|i| &ADMIN_KEY[i..i + 6])
        .collect()
}

/// A child process that is killed when dropped, so a failing test leaves nothing running.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `permgate serve --config PATH` as a real process; returns it and its data address (read
/// from its startup log line).
pub async fn spawn_serve(config: &std::path::Path, envs: &[(&str, &str)]) -> (Process, SocketAddr) {
    use std::io::BufRead;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_permgate"));
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("PERMGATE_LOG", "info,permgate::access=off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut child = Process(command.spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining stderr for the process's life so it never blocks on a full pipe.
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("permgate serving") {
                if let Some(rest) = line.split("listen=").nth(1) {
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                    let _ = addr_tx.send(addr);
                }
            }
        }
    });
    let addr = tokio::task::spawn_blocking(move || addr_rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the gateway logged its address");
    (child, addr.trim_matches('"').parse().unwrap())
}

/// Sends a signal with the `kill` command (procps).
pub fn signal(child: &Process, name: &str) {
    let sent = std::process::Command::new("kill")
        .args([format!("-{name}"), child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{name}");
}

/// A temporary directory of its own (unique in this run), removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("permgate-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }

    /// Writes `contents` to `name` in the directory; its path.
    pub fn write(&self, name: &str, contents: &str) -> std::path::PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Python of a virtualenv with the official `openai` SDK (kept between runs of this test
/// binary, made once per run if missing), or `None` (with a note) where python3's venv or pip
/// is unavailable; under CI that fails the test instead.
pub async fn sdk_python() -> Option<std::path::PathBuf> {
    static PYTHON: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let python = tokio::task::spawn_blocking(|| PYTHON.get_or_init(make_sdk_venv).clone())
        .await
        .unwrap();
    if python.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs python3 with venv and pip to run the SDK tests"
        );
        eprintln!(
            "skipped: python3 -m venv / pip install openai unavailable (set CI to require it)"
        );
    }
    python
}

fn make_sdk_venv() -> Option<std::path::PathBuf> {
    use std::process::{Command, Stdio};
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv");
    let python = venv.join("bin/python");
    let has_openai = |python: &std::path::Path| {
        Command::new(python)
            .args(["-c", "import openai"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_openai(&python) {
        return Some(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai",
            ])
            .status()
            .is_ok_and(|s| s.success());
    (made && has_openai(&python)).then_some(python)
}

/// Serves `mock` on a loopback port until the returned sender is dropped or sends `true`.
pub async fn serve_mock(mock: &MockUpstream) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(mock.clone().serve(listener, stopped));
    (addr, stop)
}

/// A new mock upstream (holding [`ADMIN_KEY`]) served as [`serve_mock`] does.
pub async fn mock() -> (MockUpstream, SocketAddr, watch::Sender<bool>) {
    let mock = MockUpstream::new(ADMIN_KEY);
    let (addr, stop) = serve_mock(&mock).await;
    (mock, addr, stop)
}

/// An HTTP/1.1 response read off a raw connection (header names in lower case).
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Every HTTP/1.1 response in `bytes`, in order; each must be length-delimited.
pub fn raw_responses(mut rest: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let shown = String::from_utf8_lossy(rest).into_owned();
        let head_end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("incomplete response head: {shown:?}"));
        let head = std::str::from_utf8(&rest[..head_end]).expect("ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line:?}");
        let status = status_line[9..12].parse().expect("status code");
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').expect("header line");
                (k.trim().to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or_else(|| panic!("no content-length: {head}"));
        let body_start = head_end + 4;
        assert!(rest.len() >= body_start + len, "truncated body: {shown:?}");
        out.push(RawResponse {
            status,
            headers,
            body: rest[body_start..body_start + len].to_vec(),
        });
        rest = &rest[body_start + len..];
    }
    out
}

/// How long a raw exchange waits for the server to close.
const RAW_CLOSE_WAIT: Duration = Duration::from_secs(30);

/// Everything the server sends until it closes, and how the read ended: `None` for a clean
/// close (FIN), `Some(kind)` for an error (e.g. a reset).
pub async fn read_to_close(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(RAW_CLOSE_WAIT, reader.read_to_end(&mut buf))
        .await
        .expect("the server closed the connection in time (no hang)");
    (buf, read.err().map(|e| e.kind()))
}

/// Writes `bytes` on a new connection (concurrently with reading, so an early answer-and-close
/// is seen even if the write fails) and reads until the server closes (see [`read_to_close`]).
pub async fn raw_exchange(
    addr: SocketAddr,
    bytes: impl Into<Vec<u8>>,
) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    use tokio::io::AsyncWriteExt;
    let bytes = bytes.into();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let write = tokio::spawn(async move {
        // A write error is expected when the server answers early and closes.
        let _ = writer.write_all(&bytes).await;
        writer
    });
    let received = read_to_close(&mut reader).await;
    let _writer = write.await.unwrap();
    received
}
