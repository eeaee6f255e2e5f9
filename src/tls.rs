//! TLS for every client permgate runs (upstream, the OTLP exporter): one rustls config (ring,
//! Mozilla's roots plus an optional CA file) and one HTTPS connector built from it.
//!
//! And TLS on the data listener (SPEC "The front door", `[server.tls]`): [`ServerTls`] holds
//! the acceptor (ALPN `h2` and `http/1.1`, optional client certificates checked against
//! `client_ca_file`) and the certificate and key it presents, which [`watch`] swaps in when
//! their files change or on SIGHUP. A bad new pair keeps the old one. [`identity_of`] turns a
//! verified client certificate into the [`PeerIdentity`] that `server` puts in each request's
//! extensions. Accept loops and handshake deadlines are `server`'s; counting reloads is the
//! caller's (this module knows no metrics).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use sha2::{Digest as _, Sha256};
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::config::ServerTlsConfig;
use crate::secret;

/// A rustls client config trusting Mozilla's roots plus, if given, the PEM certificates in
/// `ca_file`; `what` names the setting in errors.
pub fn client_config(ca_file: Option<&Path>, what: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let at = |e: &dyn std::fmt::Display| format!("{what} {}: {e}", path.display());
        // Never waits on a FIFO at the path (startup and check-config read it).
        let pem = secret::read_regular_file(path, MAX_PEM_BYTES).map_err(|e| at(&e))?;
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
/// listener. Present only when the certificate chained to `server.tls.client_ca_file`. Shared:
/// a request's copy is a reference count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Its URI names, then its DNS names.
    pub names: Arc<[String]>,
    /// How many of `names` are URI names: a URI name never matches a DNS `tls_identity`.
    pub uris: usize,
}

/// A PEM file larger than this holds no certificate chain or key.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// `[server.tls]` at run time: the acceptor every handshake on the data listener uses, and the
/// certificate and key it presents, replaced whole by [`ServerTls::reload`].
pub struct ServerTls {
    acceptor: TlsAcceptor,
    current: Arc<CurrentPair>,
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    /// SHA-256 of both files as last read, so an unchanged pair is not parsed again and a
    /// refused one is not refused (and logged) again at every poll.
    seen: Mutex<[u8; 32]>,
}

/// What one [`ServerTls::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files hold what they held at the last read.
    Unchanged,
    /// New handshakes present the new pair; open connections keep the one they started with.
    Replaced,
    /// A file could not be read; the current pair stays.
    Unreadable(String),
    /// The files hold no usable pair (unparsable, or the key is not the certificate's); the
    /// current pair stays.
    Refused(String),
}

impl ServerTls {
    /// Reads the pair and the client CAs now (blocking: call it at startup). Errors name the
    /// config key, never a path or anything a file holds.
    pub fn load(config: &ServerTlsConfig) -> Result<ServerTls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert_pem, key_pem) = read_pair(&config.cert_file, &config.key_file)?;
        let pair = certified_key(&cert_pem, &key_pem, &provider)?;
        let current = Arc::new(CurrentPair(ArcSwap::from_pointee(pair)));
        let verifier = match &config.client_ca_file {
            Some(ca_file) => Some(client_verifier(
                ca_file,
                config.require_client_cert,
                &provider,
            )?),
            None => None,
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let builder = match verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_cert_resolver(current.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            current,
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            provider,
            seen: Mutex::new(digest(&cert_pem, &key_pem)),
        })
    }

    /// What the accept loop handshakes with; it follows every reload.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Reads both files again, off the runtime (a FIFO or a hung filesystem at a path stalls
    /// nothing), and swaps in the pair they hold if it differs from the last read, or, with
    /// `force` (SIGHUP), whatever it is.
    pub async fn reload(&self, force: bool) -> Reload {
        let (cert_file, key_file) = (self.cert_file.clone(), self.key_file.clone());
        let (cert_pem, key_pem) =
            match secret::off_runtime(move || read_pair(&cert_file, &key_file)).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(why)) => return Reload::Unreadable(why),
                Err(e) => return Reload::Unreadable(format!("server.tls: {e}")),
            };
        let now = digest(&cert_pem, &key_pem);
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == now && !force {
                return Reload::Unchanged;
            }
            *seen = now;
        }
        match certified_key(&cert_pem, &key_pem, &self.provider) {
            Ok(pair) => {
                self.current.0.store(Arc::new(pair));
                Reload::Replaced
            }
            Err(why) => Reload::Refused(why),
        }
    }
}

/// The pair new handshakes present. A handshake takes it once, so a swap changes neither a
/// handshake in progress nor an open connection.
struct CurrentPair(ArcSwap<CertifiedKey>);

impl fmt::Debug for CurrentPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentPair(..)")
    }
}

impl ResolvesServerCert for CurrentPair {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Both files' bytes, or why not (naming the key, not the path).
fn read_pair(cert_file: &Path, key_file: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    let read = |path: &Path, key: &str| {
        secret::read_regular_file(path, MAX_PEM_BYTES)
            .map_err(|e| format!("cannot read server.tls.{key}: {e}"))
    };
    Ok((read(cert_file, "cert_file")?, read(key_file, "key_file")?))
}

fn digest(cert_pem: &[u8], key_pem: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update((cert_pem.len() as u64).to_be_bytes());
    hash.update(cert_pem);
    hash.update(key_pem);
    hash.finalize().into()
}

/// The chain and key in two PEM files, checked to belong together. Errors are fixed
/// sentences: they never quote a file, so no key material reaches a log.
fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "server.tls.cert_file is not valid PEM".to_string())?;
    if chain.is_empty() {
        return Err("server.tls.cert_file holds no PEM certificate".into());
    }
    let key = match rustls_pemfile::private_key(&mut &key_pem[..]) {
        Ok(Some(key)) => key,
        Ok(None) => return Err("server.tls.key_file holds no PEM private key".into()),
        Err(_) => return Err("server.tls.key_file is not valid PEM".into()),
    };
    let key = provider.key_provider.load_private_key(key).map_err(|_| {
        "server.tls.key_file is not a usable private key (RSA, ECDSA P-256/P-384, Ed25519)"
            .to_string()
    })?;
    let pair = CertifiedKey::new(chain, key);
    match pair.keys_match() {
        Ok(()) => Ok(pair),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(
            "server.tls.key_file is not the private key of server.tls.cert_file's certificate"
                .into(),
        ),
        Err(_) => Err(
            "server.tls.cert_file: the first certificate cannot be parsed or compared with the key"
                .into(),
        ),
    }
}

/// Checks client certificates against the CAs in `ca_file`. Not `required`, a client may send
/// none; one it does send must still verify, or the handshake fails.
fn client_verifier(
    ca_file: &Path,
    required: bool,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let pem = secret::read_regular_file(ca_file, MAX_PEM_BYTES)
        .map_err(|e| format!("cannot read server.tls.client_ca_file: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|_| "server.tls.client_ca_file is not valid PEM".to_string())?;
        roots
            .add(cert)
            .map_err(|e| format!("server.tls.client_ca_file: {e}"))?;
    }
    if roots.is_empty() {
        return Err("server.tls.client_ca_file holds no PEM certificate".into());
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder
        .build()
        .map_err(|e| format!("server.tls.client_ca_file: {e}"))
}

/// The identity a client certificate gives its connection: its URI subject-alternative names
/// (a SPIFFE ID is one), then its DNS ones. `None` when it has neither: an unnamed certificate
/// names nobody. Wildcard DNS names, and names with spaces or control characters, are
/// skipped: an identity names one caller, and is written to logs. Call it only on a
/// certificate the verifier accepted (see [`peer_identity`]).
pub fn identity_of(certificate: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let cert = webpki::EndEntityCert::try_from(certificate).ok()?;
    let printable = |name: &&str| !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic());
    let mut names: Vec<String> = cert
        .valid_uri_names()
        .filter(printable)
        .map(str::to_owned)
        .collect();
    let uris = names.len();
    let dns = cert
        .valid_dns_names()
        .filter(printable)
        .filter(|name| !name.starts_with('*'));
    names.extend(dns.map(str::to_owned));
    (!names.is_empty()).then(|| PeerIdentity {
        names: names.into(),
        uris,
    })
}

/// [`identity_of`] the certificate the client of an established TLS connection presented;
/// `None` without one. The handshake only completes with a certificate the verifier accepted
/// (chained to `client_ca_file`, unexpired), and none is asked for without `client_ca_file`.
pub fn peer_identity(connection: &rustls::ServerConnection) -> Option<PeerIdentity> {
    identity_of(connection.peer_certificates()?.first()?)
}

/// Returns a task that runs until dropped: every `poll` it reloads the pair if either file
/// changed, and with `sighup` it reloads on SIGHUP whatever the files hold. Each pair read
/// (swapped in or refused) is reported to `counted` (true: swapped in), for the metrics. A
/// file that cannot be read keeps the current pair and is logged, once per reason while
/// polling; on SIGHUP it also counts as a failure. Call it inside the runtime.
pub fn watch(
    tls: Arc<ServerTls>,
    poll: Duration,
    sighup: bool,
    counted: impl Fn(bool) + Send + 'static,
) -> impl Future<Output = ()> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed now, so a SIGHUP right after startup is not missed.
    let mut hangups = sighup
        .then(|| match signal(SignalKind::hangup()) {
            Ok(hangups) => Some(hangups),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; TLS files reload when they change only");
                None
            }
        })
        .flatten();
    async move {
        // The files were read at `ServerTls::load`: the first look is one period later (a
        // change in between is still seen then, as the digest is the load's).
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_unreadable = None;
        loop {
            let hangup = async {
                let received = match hangups.as_mut() {
                    Some(hangups) => hangups.recv().await,
                    None => None,
                };
                if received.is_none() {
                    std::future::pending::<()>().await;
                }
            };
            let forced = tokio::select! {
                _ = hangup => {
                    info!("SIGHUP: reloading the TLS certificate and key");
                    true
                }
                _ = ticks.tick() => false,
            };
            match tls.reload(forced).await {
                Reload::Unchanged => {}
                Reload::Replaced => {
                    last_unreadable = None;
                    counted(true);
                    info!("server.tls: certificate and key loaded; new connections use them");
                }
                Reload::Refused(why) => {
                    last_unreadable = None;
                    counted(false);
                    error!(reason = %why, "server.tls: new certificate and key refused; keeping the current ones");
                }
                Reload::Unreadable(why) => {
                    if forced {
                        counted(false);
                        error!(reason = %why, "server.tls: reload failed; keeping the current certificate and key");
                    } else if last_unreadable.as_ref() != Some(&why) {
                        warn!(reason = %why, "server.tls: cannot read the certificate or key; keeping the current ones");
                        last_unreadable = Some(why);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn cert_with(sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(name: &str) -> SanType {
        SanType::URI(name.try_into().unwrap())
    }

    fn dns(name: &str) -> SanType {
        SanType::DnsName(name.try_into().unwrap())
    }

    #[test]
    fn identity_is_the_uri_then_dns_names_of_the_certificate() {
        let spiffe = "spiffe://example.org/ns/billing/sa/api";
        let cert = cert_with(vec![
            dns("api.billing.svc.cluster.local"),
            uri(spiffe),
            SanType::IpAddress("10.0.0.7".parse().unwrap()),
            SanType::Rfc822Name("ops@example.org".try_into().unwrap()),
        ]);
        assert_eq!(
            identity_of(&cert),
            Some(PeerIdentity {
                names: [spiffe.into(), "api.billing.svc.cluster.local".into()].into(),
                uris: 1,
            })
        );
    }

    /// A URI name without a scheme stays a URI name (it can never pass for a DNS name).
    #[test]
    fn a_uri_name_without_a_scheme_is_still_a_uri_name() {
        let cert = cert_with(vec![uri("billing.svc.cluster.local")]);
        assert_eq!(
            identity_of(&cert),
            Some(PeerIdentity {
                names: ["billing.svc.cluster.local".into()].into(),
                uris: 1,
            })
        );
    }

    #[test]
    fn a_certificate_without_a_usable_name_gives_no_identity() {
        let ip = SanType::IpAddress("10.0.0.7".parse().unwrap());
        for sans in [
            vec![],
            vec![ip],
            vec![dns("*.billing.svc")],
            vec![uri("spiffe://example.org/with space")],
        ] {
            assert_eq!(identity_of(&cert_with(sans.clone())), None, "{sans:?}");
        }
        assert_eq!(identity_of(&CertificateDer::from(vec![0x30, 0x03])), None);
    }

    struct Pair {
        cert: String,
        key: String,
    }

    fn pair(name: &str) -> Pair {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn check(cert: &str, key: &str) -> Result<CertifiedKey, String> {
        certified_key(
            cert.as_bytes(),
            key.as_bytes(),
            &rustls::crypto::ring::default_provider(),
        )
    }

    #[test]
    fn a_pair_must_parse_and_belong_together_and_errors_never_quote_the_files() {
        let (a, b) = (pair("a.example"), pair("b.example"));
        assert!(check(&a.cert, &a.key).is_ok());
        let body = |pem: &str| pem.lines().nth(1).unwrap().to_string();
        let cases = [
            (check(&a.cert, &b.key), "is not the private key of"),
            (check(&a.key, &a.key), "holds no PEM certificate"),
            (check(&a.cert, &a.cert), "holds no PEM private key"),
            (check("", "sk-admin-PASTED"), "holds no PEM certificate"),
            (
                check(&a.cert, "-----BEGIN PRIVATE KEY-----\nAAAA\n"),
                "key_file is not valid PEM",
            ),
            (
                check(
                    &a.cert,
                    "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                ),
                "not a usable private key",
            ),
        ];
        for (result, expected) in cases {
            let err = result.expect_err(expected);
            assert!(err.contains(expected), "{err}");
            for secret in [body(&a.key), body(&b.key), "sk-admin".into()] {
                assert!(!err.contains(&secret[..16.min(secret.len())]), "{err}");
            }
        }
    }
}
