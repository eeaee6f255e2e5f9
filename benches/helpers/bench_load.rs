//! `bench-load`: a closed-loop HTTP/1.1 load generator that can present a TLS client
//! certificate, for `benches/compare.sh` (`mtlshit10`). wrk cannot present one, and the tools
//! that can were their own bottleneck on one core (see benches/README.md).
//!
//! Like `wrk -t1 -cN`: one thread (a tokio current-thread runtime), N keep-alive connections,
//! each sending the same GET back to back (the next request leaves when the previous answer
//! has been read in full) until the duration is over. The request is built once; answers are
//! read with `httparse` and framed by `Content-Length`, which is all a cached permgate page or
//! error needs (an answer without one is counted as a socket error and its connection
//! replaced). Latency runs from the request's first write to the answer's last byte.
//!
//! Prints one line, the format of `benches/wrk/report.lua` (latencies in microseconds):
//!
//! ```text
//! RESULT requests=N duration_us=N rps=N p50_us=N p99_us=N max_us=N socket_errors=N status_errors=N
//! ```
//!
//! `requests` counts complete answers, `status_errors` those with a status of 400 or more,
//! `socket_errors` failed connects, handshakes, reads and writes, answers it cannot frame, and
//! connections still waiting for an answer `--timeout` after the end.
//!
//! Usage: `bench-load --url URL [--connections N] [--duration 10s] [--timeout 5s]
//! [--header "Name: value"]... [--cacert FILE] [--cert FILE --key FILE]`
//!
//! `--cacert` is the PEM CA the server's certificate must chain to (https URLs; required with
//! https), `--cert`/`--key` the client certificate chain and key it presents when asked.

use std::io::BufReader;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

struct Options {
    host: String,
    port: u16,
    tls: Option<TlsConnector>,
    request: Vec<u8>,
    connections: usize,
    duration: Duration,
    timeout: Duration,
}

/// What one connection slot measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    socket_errors: u64,
    status_errors: u64,
}

/// Why a connection ended early.
enum Broken {
    /// An I/O or TLS error, or an answer that cannot be framed: replace the connection.
    Socket,
    /// The server said `Connection: close` after a complete answer.
    Closed,
}

fn usage(message: &str) -> ! {
    eprintln!("bench-load: {message}");
    eprintln!(
        "usage: bench-load --url URL [--connections N] [--duration 10s] [--timeout 5s] \
         [--header 'Name: value']... [--cacert FILE] [--cert FILE --key FILE]"
    );
    std::process::exit(2)
}

fn read_pem(path: &str) -> BufReader<std::fs::File> {
    BufReader::new(
        std::fs::File::open(path).unwrap_or_else(|e| usage(&format!("cannot open {path}: {e}"))),
    )
}

fn certificates(path: &str) -> Vec<CertificateDer<'static>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut read_pem(path))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| usage(&format!("{path}: {e}")));
    if certs.is_empty() {
        usage(&format!("{path}: no certificate"));
    }
    certs
}

fn tls_connector(cacert: &str, client: Option<(String, String)>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(cacert) {
        roots
            .add(cert)
            .unwrap_or_else(|e| usage(&format!("{cacert}: {e}")));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => {
            let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut read_pem(&key))
                .unwrap_or_else(|e| usage(&format!("{key}: {e}")))
                .unwrap_or_else(|| usage(&format!("{key}: no private key")));
            builder
                .with_client_auth_cert(certificates(&cert), key)
                .unwrap_or_else(|e| usage(&format!("client certificate: {e}")))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

fn duration(value: &str) -> Duration {
    humantime::parse_duration(value).unwrap_or_else(|e| usage(&format!("{value}: {e}")))
}

fn parse_args() -> Options {
    let (mut url, mut connections, mut run, mut timeout) =
        (None::<String>, 64, "10s".into(), "5s".into());
    let (mut headers, mut cacert, mut cert, mut key) = (Vec::new(), None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--url" => url = Some(value()),
            "--connections" => {
                connections = value()
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| usage("--connections: a positive number"))
            }
            "--duration" => run = value(),
            "--timeout" => timeout = value(),
            "--header" => headers.push(value()),
            "--cacert" => cacert = Some(value()),
            "--cert" => cert = Some(value()),
            "--key" => key = Some(value()),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let url = url.unwrap_or_else(|| usage("--url is required"));
    let uri: hyper::Uri = url
        .parse()
        .unwrap_or_else(|e| usage(&format!("{url}: {e}")));
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => usage("the URL must start with http:// or https://"),
    };
    let host = uri.host().unwrap_or_else(|| usage("the URL has no host"));
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = uri.authority().map_or(host.as_str(), |a| a.as_str());
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => usage("--cert and --key go together"),
    };
    let tls = match (https, cacert) {
        (true, Some(cacert)) => Some(tls_connector(&cacert, client)),
        (true, None) => usage("an https URL needs --cacert"),
        (false, _) if client.is_some() => usage("--cert needs an https URL"),
        (false, _) => None,
    };
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\n");
    for header in headers {
        if !header.contains(':') || header.contains('\r') || header.contains('\n') {
            usage(&format!("bad header {header:?}"));
        }
        request.push_str(&header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    Options {
        host,
        port,
        tls,
        request: request.into_bytes(),
        connections,
        duration: duration(&run),
        timeout: duration(&timeout),
    }
}

/// The length of the body that follows a head, and whether the server closes after it.
fn framing(response: &httparse::Response<'_, '_>) -> Option<(usize, bool)> {
    let mut length = None;
    let mut close = false;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            length = Some(
                std::str::from_utf8(header.value)
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?,
            );
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = header.value.eq_ignore_ascii_case(b"close");
        }
    }
    // A status without a body (1xx, 204, 304) is not expected from the servers measured.
    Some((length?, close))
}

/// Sends the request back to back on one connection until `stop`.
async fn exchange<S>(
    stream: &mut S,
    options: &Options,
    stop: &AtomicBool,
    tally: &mut Tally,
    buffer: &mut Vec<u8>,
) -> Broken
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        if stream.write_all(&options.request).await.is_err() || stream.flush().await.is_err() {
            return Broken::Socket;
        }
        // Read the head, then the rest of the body; no pipelining, so nothing follows it.
        let mut filled = 0;
        let (head, length, close, status) = loop {
            if filled == buffer.len() {
                buffer.resize(buffer.len() * 2, 0);
            }
            match stream.read(&mut buffer[filled..]).await {
                Ok(0) | Err(_) => return Broken::Socket,
                Ok(n) => filled += n,
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&buffer[..filled]) {
                Ok(httparse::Status::Complete(head)) => {
                    let Some((length, close)) = framing(&response) else {
                        return Broken::Socket;
                    };
                    break (head, length, close, response.code.unwrap_or(0));
                }
                Ok(httparse::Status::Partial) => continue,
                Err(_) => return Broken::Socket,
            }
        };
        let total = head + length;
        if buffer.len() < total {
            buffer.resize(total, 0);
        }
        while filled < total {
            match stream.read(&mut buffer[filled..total]).await {
                Ok(0) | Err(_) => return Broken::Socket,
                Ok(n) => filled += n,
            }
        }
        let micros = sent.elapsed().as_micros();
        tally
            .latencies_us
            .push(u32::try_from(micros).unwrap_or(u32::MAX));
        if status >= 400 {
            tally.status_errors += 1;
        }
        if close {
            return Broken::Closed;
        }
    }
    Broken::Closed
}

/// One connection slot: connects (again after an error) and exchanges until `stop`.
async fn slot(options: Arc<Options>, stop: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    let mut buffer = vec![0u8; 16 * 1024];
    let name = ServerName::try_from(options.host.clone()).ok();
    while !stop.load(Ordering::Relaxed) {
        let Ok(tcp) = TcpStream::connect((options.host.as_str(), options.port)).await else {
            tally.socket_errors += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let ended = match (&options.tls, &name) {
            (Some(connector), Some(name)) => match connector.connect(name.clone(), tcp).await {
                Ok(mut tls) => exchange(&mut tls, &options, &stop, &mut tally, &mut buffer).await,
                Err(_) => Broken::Socket,
            },
            (Some(_), None) => usage("the URL's host is not a valid TLS server name"),
            (None, _) => {
                let mut tcp = tcp;
                exchange(&mut tcp, &options, &stop, &mut tally, &mut buffer).await
            }
        };
        if let Broken::Socket = ended {
            tally.socket_errors += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    tally
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let options = Arc::new(parse_args());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (tallies, elapsed, timed_out) = runtime.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let slots: Vec<_> = (0..options.connections)
            .map(|_| tokio::spawn(slot(options.clone(), stop.clone())))
            .collect();
        tokio::time::sleep(options.duration).await;
        stop.store(true, Ordering::Relaxed);
        // Answers in flight at the end are awaited (up to --timeout) and counted.
        let give_up = tokio::time::Instant::now() + options.timeout;
        let mut tallies = Vec::new();
        let mut timed_out = 0u64;
        for slot in slots {
            match tokio::time::timeout_at(give_up, slot).await {
                Ok(Ok(tally)) => tallies.push(tally),
                Ok(Err(_)) | Err(_) => timed_out += 1,
            }
        }
        (tallies, start.elapsed(), timed_out)
    });
    let mut latencies: Vec<u32> = tallies
        .iter()
        .flat_map(|t| t.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let requests = latencies.len();
    let socket_errors = timed_out + tallies.iter().map(|t| t.socket_errors).sum::<u64>();
    let status_errors: u64 = tallies.iter().map(|t| t.status_errors).sum();
    let micros = elapsed.as_micros().max(1);
    println!(
        "RESULT requests={requests} duration_us={micros} rps={:.1} p50_us={} p99_us={} max_us={} \
         socket_errors={socket_errors} status_errors={status_errors}",
        requests as f64 / micros as f64 * 1e6,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(0),
    );
}
