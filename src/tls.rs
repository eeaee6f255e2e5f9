//! TLS for every client permgate runs (upstream, the OTLP exporter): one rustls config (ring,
//! Mozilla's roots plus an optional CA file) and one HTTPS connector built from it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

/// A rustls client config trusting Mozilla's roots plus, if given, the PEM certificates in
/// `ca_file`; `what` names the setting in errors.
pub fn client_config(ca_file: Option<&Path>, what: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let at = |e: &dyn std::fmt::Display| format!("{what} {}: {e}", path.display());
        let pem = std::fs::read(path).map_err(|e| at(&e))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.map_err(|e| at(&e))?).map_err(|e| at(&e))?;
            added += 1;
        }
        if added == 0 {
            return Err(at(&"no PEM certificates found"));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Which HTTP versions a connector offers by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    Http1,
    Http1And2,
}

/// HTTPS with `tls`, or plain HTTP for `http://` URLs; TCP_NODELAY, bounded connect time.
pub fn https_connector(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    alpn: Alpn,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    match alpn {
        Alpn::Http1 => builder.wrap_connector(http),
        Alpn::Http1And2 => builder.enable_http2().wrap_connector(http),
    }
}

/// The names a caller's verified client certificate carries (its URI and DNS
/// subject-alternative names, e.g. a SPIFFE ID), put in each request's extensions by the TLS
/// listener. Present only when the certificate chained to `server.tls.client_ca_file`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub names: Vec<String>,
}
