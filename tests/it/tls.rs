//! HTTPS to upstream end to end: the mock served over TLS (with ALPN h2) under a CA made at
//! test time and trusted only through `upstream.ca_file`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use permgate::mock_upstream::MockUpstream;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

use crate::support::*;

struct Pki {
    ca_pem: String,
    server_cert: rustls::pki_types::CertificateDer<'static>,
    server_key: PrivateKeyDer<'static>,
}

fn make_pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "permgate test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server_cert: leaf_cert.der().clone(),
        server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    }
}

/// Serves the mock over TLS; the counter counts completed TLS handshakes.
async fn serve_mock_over_tls(
    mock: MockUpstream,
    pki: &Pki,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pki.server_cert.clone()], pki.server_key.clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counter = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let mock = mock.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let service = service_fn(move |req| {
                    let mock = mock.clone();
                    async move { Ok::<_, std::convert::Infallible>(mock.handle(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, handshakes)
}

#[tokio::test]
async fn https_upstream_with_a_private_ca_works_over_h2() {
    let pki = make_pki();
    let dir = std::env::temp_dir().join(format!("permgate-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem).unwrap();

    let mock = MockUpstream::new(ADMIN_KEY);
    let (tls_addr, handshakes) = serve_mock_over_tls(mock.clone(), &pki).await;
    let text = base_config("127.0.0.1:9".parse().unwrap()).replace(
        "base_url = \"http://127.0.0.1:9/v1\"",
        &format!(
            "base_url = \"https://localhost:{}/v1\"\nca_file = \"{}\"",
            tls_addr.port(),
            ca_path.display()
        ),
    );
    let (_state, addr, _shutdown) = start_gateway(&text).await;
    let client = TestClient::new(addr);
    let r = client.get(&list_path(CP), READER).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.ids().len(), 10);
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, hyper::Version::HTTP_2, "ALPN chose h2");
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {ADMIN_KEY}").as_str()
    );
    // A second miss reuses the pooled connection: one TLS handshake for both.
    let r = client
        .get(&format!("{}?limit=2", list_path(CP)), READER)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(mock.requests().len(), 2);
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn https_upstream_with_an_untrusted_certificate_is_a_502() {
    let pki = make_pki();
    let mock = MockUpstream::new(ADMIN_KEY);
    let (tls_addr, _) = serve_mock_over_tls(mock.clone(), &pki).await;
    let text = base_config("127.0.0.1:9".parse().unwrap()).replace(
        "base_url = \"http://127.0.0.1:9/v1\"",
        &format!("base_url = \"https://localhost:{}/v1\"", tls_addr.port()),
    );
    let (_state, addr, _shutdown) = start_gateway(&text).await;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        TestClient::new(addr).get(&list_path(CP), READER),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502);
    assert!(
        mock.requests().is_empty(),
        "no request over an untrusted connection"
    );
}
