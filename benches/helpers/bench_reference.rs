//! `bench-reference`: the yardstick of `benches/compare.sh`, a bare hyper 1.x HTTP/1.1 server
//! that answers every request with one prebuilt body from memory (`Content-Type:
//! application/json`), on one tokio thread (current-thread runtime). Nothing is parsed,
//! allocated or logged per request beyond what hyper itself does, so its throughput is the
//! ceiling for any hyper-based server on the same core.
//!
//! The script gives it the exact bytes permgate serves for the page being compared (fetched
//! through permgate), so both write the same body.
//!
//! Usage: `bench-reference --listen 127.0.0.1:PORT --body FILE [--busy-ns N]`
//!
//! `--busy-ns N` spins for N nanoseconds before answering each request: a reference that does
//! more work per request, the control of the hit p99 target in `benches/README.md`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;

mod reference_server;

fn usage() -> ! {
    eprintln!("usage: bench-reference --listen ADDR --body FILE [--busy-ns N]");
    std::process::exit(2)
}

fn main() {
    let (mut listen, mut body) = (None::<SocketAddr>, None::<Bytes>);
    let mut busy = Duration::ZERO;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--listen" => listen = Some(value.parse().unwrap_or_else(|_| usage())),
            "--body" => {
                let bytes = std::fs::read(&value).unwrap_or_else(|e| {
                    eprintln!("bench-reference: reading {value}: {e}");
                    std::process::exit(2)
                });
                body = Some(Bytes::from(bytes));
            }
            "--busy-ns" => busy = Duration::from_nanos(value.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    let (Some(listen), Some(body)) = (listen, body) else {
        usage()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await.expect("bind --listen");
        eprintln!(
            "bench-reference listening on {listen}, {} body bytes",
            body.len()
        );
        reference_server::serve(listener, body, busy).await;
    });
}
