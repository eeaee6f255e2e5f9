//! JWT callers (SPEC "Who a caller is": `jwt_subject`, `[jwt]`): verifies a bearer JWT and
//! returns its subject, which `auth` maps to a client.
//!
//! - **Algorithms**: RS256 and ES256 only, each pinned to its key: a key of the JWKS is usable
//!   with one algorithm (its `alg`, or the one its type allows), and a token whose header names
//!   another is refused. `none`, HMAC (HS*) and any algorithm confusion (an HS256 token "signed"
//!   with the RSA public key) never verify; symmetric JWKS keys are ignored. jsonwebtoken does the
//!   claims, with `ring` (already under rustls) as its crypto backend: see [`ring_backend`].
//! - **Claims**: `iss` equal to `jwt.issuer`, `aud` naming one of `jwt.audiences`, `exp` and
//!   `sub` required, `exp` future and `nbf` past within `jwt.leeway_seconds`.
//! - **Keys**: from `jwt.jwks_file` (read off the runtime) or `jwt.jwks_url` (the upstream
//!   client's TLS settings, bounded by [`FETCH_TIMEOUT`]). Re-read on SIGHUP, every
//!   [`MAX_KEY_AGE`], and when a token names an unknown `kid`, that last at most once per
//!   [`UNKNOWN_KID_REFETCH`]. A set that fails to load or holds no usable key keeps the old one.
//! - **Verified tokens** are remembered until their `exp` (at most [`MAX_KEY_AGE`], only while
//!   the keys that verified them are the current ones) in a fixed table (see [`Remembered`]),
//!   so a caller's next request pays a fast hash and a comparison, not a signature check.
//!
//! Nothing here logs or returns a token, nor any part of one (`kid` included): failures carry a
//! fixed [`Rejection`].

use std::hash::BuildHasher as _;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{HeaderValue, ACCEPT, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::config::{JwksSource, JwtConfig, UpstreamConfig};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::secret;
use crate::tls::{self, Alpn};

/// A token naming an unknown `kid` re-reads the JWKS at most this often (SPEC).
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(10);
/// Keys are re-read this long after the last load, so a key the issuer withdrew stops working
/// without a SIGHUP.
pub const MAX_KEY_AGE: Duration = Duration::from_secs(300);
/// The whole JWKS fetch from `jwks_url`, connection included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS larger than this is refused.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Slots of the remembered-token table (a power of two): at most this many tokens are
/// remembered.
const REMEMBERED_SLOTS: usize = 16_384;
/// Longer tokens are verified on every request rather than remembered, which bounds the
/// table's memory: a slot holds a token and its subject (a part of it, so under 3 KiB),
/// 16,384 × 7 KiB = 112 MiB at worst. Kubernetes service-account tokens are about 1 KiB.
const MAX_REMEMBERED_TOKEN: usize = 4096;

/// Why a JWT was refused: the 401's message, the log's and the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    UnsupportedAlgorithm,
    UnknownKey,
    BadSignature,
    MissingClaim,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
}

impl Rejection {
    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::UnsupportedAlgorithm => "unsupported_algorithm",
            Rejection::UnknownKey => "unknown_key",
            Rejection::BadSignature => "bad_signature",
            Rejection::MissingClaim => "missing_claim",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::WrongIssuer => "wrong_issuer",
            Rejection::WrongAudience => "wrong_audience",
        }
    }

    /// What the caller is told.
    pub fn message(self) -> &'static str {
        match self {
            Rejection::Malformed => "The bearer token is a malformed JWT.",
            Rejection::UnsupportedAlgorithm => "The JWT's algorithm is not accepted: RS256 or ES256 only, and the one its signing key is for.",
            Rejection::UnknownKey => "The JWT is signed by an unknown key: its kid is not in the gateway's JWKS.",
            Rejection::BadSignature => "The JWT's signature does not verify.",
            Rejection::MissingClaim => "The JWT lacks a required claim (exp, sub, iss and aud are required).",
            Rejection::Expired => "The JWT has expired. Send a fresh token.",
            Rejection::NotYetValid => "The JWT is not valid yet (its nbf is in the future).",
            Rejection::WrongIssuer => "The JWT's issuer (iss) is not the one this gateway trusts.",
            Rejection::WrongAudience => "The JWT's audience (aud) does not name this gateway.",
        }
    }

    fn from_kind(kind: &jsonwebtoken::errors::ErrorKind) -> Rejection {
        use jsonwebtoken::errors::ErrorKind as K;
        match kind {
            K::InvalidSignature
            | K::InvalidRsaKey(_)
            | K::InvalidEcdsaKey
            | K::InvalidKeyFormat => Rejection::BadSignature,
            K::InvalidAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm => {
                Rejection::UnsupportedAlgorithm
            }
            K::ExpiredSignature => Rejection::Expired,
            K::ImmatureSignature => Rejection::NotYetValid,
            K::InvalidIssuer => Rejection::WrongIssuer,
            K::InvalidAudience => Rejection::WrongAudience,
            K::MissingRequiredClaim(_) => Rejection::MissingClaim,
            _ => Rejection::Malformed,
        }
    }
}

impl From<Rejection> for Error {
    fn from(rejection: Rejection) -> Error {
        Error::Unauthenticated {
            reason: rejection.message(),
        }
    }
}

/// A JWKS key, pinned to the one algorithm it verifies.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    decoding: DecodingKey,
}

/// The usable keys of one JWKS load.
#[derive(Default)]
struct KeySet {
    keys: Vec<Arc<Key>>,
    /// Over every key's id, algorithm and material: equal sets need no cache flush.
    fingerprint: [u8; 32],
    /// When it was loaded (`None`: never, a `jwks_url` not fetched yet).
    loaded: Option<Instant>,
}

impl KeySet {
    /// The key a token names: by `kid`, or, without one, the only key for its algorithm.
    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<Key>> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None => {
                let mut usable = self.keys.iter().filter(|k| k.alg == alg);
                usable.next().filter(|_| usable.next().is_none())
            }
        }
        .cloned()
    }
}

/// A verified token's claims that matter here, and the key set that verified it.
struct Verified {
    subject: Arc<str>,
    exp: u64,
    keys: [u8; 32],
}

/// A key and the fingerprint of the set it was found in.
struct Found {
    key: Arc<Key>,
    keys: [u8; 32],
}

/// A verified token as remembered.
struct Remembrance {
    token: Box<[u8]>,
    subject: Arc<str>,
    /// Unix seconds until which it is taken from memory: its `exp` plus the leeway, and at
    /// most [`MAX_KEY_AGE`] after it was verified (`exp` is the issuer's to choose).
    until: u64,
    /// The fingerprint of the key set that verified it: once the keys change it is not used.
    keys: [u8; 32],
}

/// Verified tokens: a fixed table of [`REMEMBERED_SLOTS`] slots, a token's slot chosen by a
/// hash of its bytes with a per-process random seed. A lookup is that hash, one atomic load
/// and a comparison of the whole token (no digest of it is computed); a token remembered later
/// in the same slot replaces the earlier one, which then only costs its caller a signature
/// check. Only verified tokens are stored, so a caller cannot evict others with junk.
struct Remembered {
    slots: Box<[ArcSwapOption<Remembrance>]>,
    hasher: foldhash::fast::RandomState,
}

impl Remembered {
    fn new() -> Remembered {
        Remembered {
            slots: (0..REMEMBERED_SLOTS)
                .map(|_| ArcSwapOption::empty())
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn slot(&self, token: &[u8]) -> &ArcSwapOption<Remembrance> {
        let hash = self.hasher.hash_one(token) as usize;
        &self.slots[hash & (REMEMBERED_SLOTS - 1)]
    }

    /// The subject of `token` if it was verified with the key set `keys` and is not due.
    fn get(&self, token: &[u8], keys: &[u8; 32], now: u64) -> Option<Arc<str>> {
        let slot = self.slot(token).load();
        let hit = slot.as_deref()?;
        (hit.until >= now && hit.keys == *keys && same_bytes(&hit.token, token))
            .then(|| hit.subject.clone())
    }

    fn put(&self, remembrance: Remembrance) {
        if remembrance.token.len() <= MAX_REMEMBERED_TOKEN {
            self.slot(&remembrance.token)
                .store(Some(Arc::new(remembrance)));
        }
    }
}

/// Equality that reads every byte (no early exit): how far a guess matches a remembered token
/// does not show in the time it takes.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |d, (x, y)| d | (x ^ y)) == 0
}

/// Where the keys come from.
enum Source {
    File(std::path::PathBuf),
    Url { uri: Uri, client: Box<JwksClient> },
}

type JwksClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Verifies bearer JWTs per `[jwt]`. Shared by every request; lives as long as the gateway
/// (a reload of the client list keeps its keys and its remembered tokens).
pub struct Verifier {
    rs256: Validation,
    es256: Validation,
    leeway: u64,
    source: Source,
    keys: ArcSwap<KeySet>,
    /// Held while keys are (re)loaded, so loads never overlap; holds when a token's unknown
    /// `kid` last caused one.
    loading: tokio::sync::Mutex<Option<Instant>>,
    remembered: Remembered,
    metrics: Arc<Metrics>,
}

impl Verifier {
    /// Builds the verifier. A `jwks_file` is read now, and an unreadable one or one without a
    /// usable key is an error (the gateway does not start); a `jwks_url` is fetched in the
    /// background when called inside a runtime (and otherwise at the first JWT).
    pub fn new(
        config: &JwtConfig,
        upstream: &UpstreamConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Verifier>, String> {
        ring_backend::install();
        let source = match &config.jwks {
            JwksSource::File(path) => Source::File(path.clone()),
            JwksSource::Url(uri) => {
                let tls = tls::client_config(upstream.ca_file.as_deref(), "upstream.ca_file")?;
                let connector = tls::https_connector(tls, upstream.connect_timeout, Alpn::Http1);
                Source::Url {
                    uri: uri.clone(),
                    client: Box::new(Client::builder(TokioExecutor::new()).build(connector)),
                }
            }
        };
        let leeway = config.leeway.as_secs();
        let verifier = Arc::new(Verifier {
            rs256: validation(config, Algorithm::RS256, leeway),
            es256: validation(config, Algorithm::ES256, leeway),
            leeway,
            source,
            keys: ArcSwap::from_pointee(KeySet::default()),
            loading: tokio::sync::Mutex::new(None),
            remembered: Remembered::new(),
            metrics,
        });
        if let Source::File(path) = &verifier.source {
            let bytes = secret::read_regular_file(path, MAX_JWKS_BYTES as u64)
                .map_err(|e| format!("cannot read jwt.jwks_file {}: {e}", path.display()))?;
            let set = parse_jwks(&bytes).map_err(|e| format!("jwt.jwks_file: {e}"))?;
            verifier.install(set);
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(keep_fresh(Arc::downgrade(&verifier)));
        }
        Ok(verifier)
    }

    /// The subject of a token verified before (same bytes, same keys, not due), from memory:
    /// what a caller's requests after its first one pay. Otherwise [`Verifier::verify`].
    pub fn remembered(&self, token: &[u8]) -> Option<Arc<str>> {
        let subject = self
            .remembered
            .get(token, &self.keys.load().fingerprint, now())?;
        self.metrics.jwt_remembered();
        Some(subject)
    }

    /// The subject of a valid token, or a 401 that says why; a valid token is remembered.
    pub async fn verify(&self, token: &[u8]) -> Result<Arc<str>, Error> {
        match self.verify_signed(token).await {
            Ok(verified) => {
                self.metrics.jwt_verification("ok");
                // Tagged with the set whose key verified it: used only while that set is the
                // current one, whatever was loaded before or since.
                let now = now();
                let until = verified.exp.saturating_add(self.leeway);
                self.remembered.put(Remembrance {
                    token: token.into(),
                    subject: verified.subject.clone(),
                    until: until.min(now.saturating_add(MAX_KEY_AGE.as_secs())),
                    keys: verified.keys,
                });
                Ok(verified.subject)
            }
            Err(rejection) => {
                self.metrics.jwt_verification(rejection.label());
                debug!(reason = rejection.label(), "JWT refused");
                Err(rejection.into())
            }
        }
    }

    /// The signature and claims check.
    async fn verify_signed(&self, token: &[u8]) -> Result<Verified, Rejection> {
        let header = RawHeader::parse(token)?;
        let (alg, validation) = match header.alg.as_str() {
            "RS256" => (Algorithm::RS256, &self.rs256),
            "ES256" => (Algorithm::ES256, &self.es256),
            _ => return Err(Rejection::UnsupportedAlgorithm),
        };
        let Found { key, keys } = self.key_for(header.kid.as_deref(), alg).await?;
        // Algorithm confusion: the key decides the algorithm, not the token.
        if key.alg != alg {
            return Err(Rejection::UnsupportedAlgorithm);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, validation)
            .map_err(|e| Rejection::from_kind(e.kind()))?
            .claims;
        let (Some(sub), Some(exp)) = (claims.sub, claims.exp) else {
            return Err(Rejection::MissingClaim);
        };
        Ok(Verified {
            subject: sub.into(),
            // Non-negative and finite: jsonwebtoken checked it against the clock.
            exp: exp as u64,
            keys,
        })
    }

    /// The key for `kid`, re-reading the JWKS once if it is unknown and the last such re-read
    /// is [`UNKNOWN_KID_REFETCH`] old.
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<Found, Rejection> {
        if let Some(found) = self.find(kid, alg) {
            return Ok(found);
        }
        let mut last = self.loading.lock().await;
        // Loaded by another request while this one waited?
        if let Some(found) = self.find(kid, alg) {
            return Ok(found);
        }
        if last.is_some_and(|at| at.elapsed() < UNKNOWN_KID_REFETCH) {
            return Err(Rejection::UnknownKey);
        }
        *last = Some(Instant::now());
        self.load_locked("a token named an unknown key").await;
        self.find(kid, alg).ok_or(Rejection::UnknownKey)
    }

    /// The key in the current set, with that set's fingerprint.
    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<Found> {
        let set = self.keys.load();
        let key = set.find(kid, alg)?;
        Some(Found {
            key,
            keys: set.fingerprint,
        })
    }

    /// Re-reads the JWKS now (SIGHUP); a failure keeps the current keys and is logged.
    pub async fn reload(&self) {
        let _loading = self.loading.lock().await;
        self.load_locked("SIGHUP").await;
    }

    /// Loads and installs the JWKS; the caller holds `loading`.
    async fn load_locked(&self, why: &str) {
        let loaded = match &self.source {
            Source::File(path) => secret::read_regular_file_bounded(path, MAX_JWKS_BYTES as u64)
                .await
                .map_err(|e| e.to_string()),
            Source::Url { uri, client } => fetch(client, uri).await,
        }
        .and_then(|bytes| parse_jwks(&bytes));
        match loaded {
            Ok(set) => self.install(set),
            Err(e) => {
                self.metrics.jwks_reload(false);
                warn!(reason = %e, trigger = why, "JWKS reload failed; keeping the current keys");
            }
        }
    }

    /// Swaps in `set` (remembered tokens verified with other keys are no longer used).
    fn install(&self, mut set: KeySet) {
        set.loaded = Some(Instant::now());
        let changed = self.keys.load().fingerprint != set.fingerprint;
        let count = set.keys.len();
        self.keys.store(Arc::new(set));
        self.metrics.jwks_reload(true);
        self.metrics.jwks_keys(count);
        if changed {
            info!(keys = count, "JWKS loaded");
        }
    }

    /// Whether a key set was ever loaded (a `jwks_url` is fetched after startup; until then
    /// no JWT verifies, so `/readyz` waits for it).
    pub fn has_keys(&self) -> bool {
        self.keys.load().loaded.is_some()
    }

    /// Whether the keys are due for a re-read.
    fn stale(&self) -> bool {
        self.keys
            .load()
            .loaded
            .is_none_or(|at| at.elapsed() >= MAX_KEY_AGE)
    }
}

/// Loads the keys at once when there are none (a `jwks_url`), then whenever they are
/// [`MAX_KEY_AGE`] old. Ends with the verifier.
async fn keep_fresh(weak: Weak<Verifier>) {
    let mut pause = Duration::ZERO;
    loop {
        tokio::time::sleep(pause).await;
        let Some(verifier) = weak.upgrade() else {
            return;
        };
        if verifier.stale() {
            let _loading = verifier.loading.lock().await;
            verifier.load_locked("refresh").await;
        }
        // After a failure, try again sooner than a full key age.
        pause = if verifier.stale() {
            UNKNOWN_KID_REFETCH
        } else {
            MAX_KEY_AGE
        };
    }
}

/// GET the JWKS: status 200, at most [`MAX_JWKS_BYTES`], within [`FETCH_TIMEOUT`]. Errors name
/// the setting, not the URL.
async fn fetch(client: &JwksClient, uri: &Uri) -> Result<Vec<u8>, String> {
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = uri.clone();
    let headers = request.headers_mut();
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("permgate/", env!("CARGO_PKG_VERSION"))),
    );
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("jwt.jwks_url could not be fetched: {e}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("jwt.jwks_url answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|_| "jwt.jwks_url: the body is unreadable or over 1 MiB".to_string())?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("jwt.jwks_url took over {} s", FETCH_TIMEOUT.as_secs()))?
}

/// What `check-config` says about a `jwks_file`: how many usable keys it holds, or why it is
/// unusable.
pub fn describe_jwks_file(path: &Path) -> Result<String, String> {
    let bytes = secret::read_regular_file(path, MAX_JWKS_BYTES as u64)
        .map_err(|e| format!("cannot read jwt.jwks_file {}: {e}", path.display()))?;
    let set = parse_jwks(&bytes).map_err(|e| format!("jwt.jwks_file: {e}"))?;
    let count = |alg| set.keys.iter().filter(|k| k.alg == alg).count();
    Ok(format!(
        "jwt.jwks_file holds {} usable keys ({} RS256, {} ES256)",
        set.keys.len(),
        count(Algorithm::RS256),
        count(Algorithm::ES256)
    ))
}

/// The usable keys of a JWKS document. Keys of other types, curves, algorithms or uses are
/// skipped (logged by `kid`, public information); none usable is an error.
fn parse_jwks(bytes: &[u8]) -> Result<KeySet, String> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document = serde_json::from_slice(bytes)
        .map_err(|_| "not a JWKS document (a JSON object with a \"keys\" array)".to_string())?;
    let mut keys: Vec<Arc<Key>> = Vec::new();
    let mut fingerprint = Sha256::new();
    for value in document.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            debug!("JWKS entry skipped: not a JWK");
            continue;
        };
        let kid = jwk.common.key_id.clone();
        let (alg, decoding) = match usable_key(&jwk) {
            Ok(usable) => usable,
            Err(why) => {
                debug!(kid = kid.as_deref(), why, "JWKS key skipped");
                continue;
            }
        };
        if kid.is_some() && keys.iter().any(|k| k.kid == kid) {
            warn!(
                kid = kid.as_deref(),
                "JWKS key skipped: its kid is used twice"
            );
            continue;
        }
        fingerprint.update(format!("{kid:?}/{alg:?}/"));
        match decoding.kind() {
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                fingerprint.update(n);
                fingerprint.update(b"/");
                fingerprint.update(e);
            }
            DecodingKeyKind::SecretOrDer(bytes) => fingerprint.update(bytes),
        }
        fingerprint.update(b"\n");
        keys.push(Arc::new(Key { kid, alg, decoding }));
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable key (RSA for RS256, or EC P-256 for ES256)".into());
    }
    Ok(KeySet {
        keys,
        fingerprint: fingerprint.finalize().into(),
        loaded: None,
    })
}

/// The one algorithm a JWK may verify: RS256 for an RSA key, ES256 for a P-256 key, and only
/// if its own `alg` (when given) says the same.
fn pinned_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        _ => return None,
    };
    let stated = match jwk.common.key_algorithm {
        None => alg,
        Some(KeyAlgorithm::RS256) => Algorithm::RS256,
        Some(KeyAlgorithm::ES256) => Algorithm::ES256,
        Some(_) => return None,
    };
    (stated == alg).then_some(alg)
}

/// A usable JWK's pinned algorithm and decoding key, or why it is skipped.
fn usable_key(jwk: &Jwk) -> Result<(Algorithm, DecodingKey), &'static str> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return Err("not a signing key (use)");
    }
    let alg = pinned_algorithm(jwk).ok_or("not RS256 (RSA) or ES256 (EC P-256)")?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "unreadable key material")?;
    match key.kind() {
        // ring verifies RS256 with 2048 to 8192-bit moduli only.
        DecodingKeyKind::RsaModulusExponent { n, .. }
            if !(256..=1024).contains(&n.iter().skip_while(|&&b| b == 0).count()) =>
        {
            Err("RSA modulus outside 2048 to 8192 bits")
        }
        DecodingKeyKind::SecretOrDer(point) if alg == Algorithm::ES256 && point.len() != 65 => {
            Err("P-256 coordinates are not 32 bytes each")
        }
        _ => Ok((alg, key)),
    }
}

/// The claims permgate reads (jsonwebtoken validates `iss`, `aud`, `exp`, `nbf` itself).
/// Optional here so that a missing one is reported as missing (jsonwebtoken requires both)
/// rather than as unreadable.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
}

/// The JOSE header fields that pick the key, read before anything is trusted.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
}

impl RawHeader {
    fn parse(token: &[u8]) -> Result<RawHeader, Rejection> {
        let encoded = token
            .split(|&b| b == b'.')
            .next()
            .ok_or(Rejection::Malformed)?;
        let json = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| Rejection::Malformed)?;
        serde_json::from_slice(&json).map_err(|_| Rejection::Malformed)
    }
}

/// The checks for tokens signed with `alg`.
fn validation(config: &JwtConfig, alg: Algorithm, leeway: u64) -> Validation {
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[config.issuer.as_str()]);
    validation.set_audience(&config.audiences);
    validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.leeway = leeway;
    validation
}

/// Seconds since the Unix epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// jsonwebtoken's crypto backend on `ring`, the library rustls already builds: RS256 and
/// ES256, verifying and signing (tests sign with jsonwebtoken's encoder), nothing else. Any
/// other algorithm, HMAC above all, is refused here too, whatever a caller of jsonwebtoken
/// asks.
pub mod ring_backend {
    use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
    use jsonwebtoken::errors::{ErrorKind, Result};
    use jsonwebtoken::signature::{self, Signer, Verifier};
    use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, RsaKeyPair, RsaPublicKeyComponents, UnparsedPublicKey,
        ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_2048_8192_SHA256,
        RSA_PKCS1_SHA256,
    };

    static PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory,
        verifier_factory,
        key_utils: KeyUtils::new_unimplemented(),
    };

    /// Makes this backend jsonwebtoken's, once per process (jsonwebtoken keeps one). Nothing
    /// else in permgate installs another.
    pub fn install() {
        let _ = PROVIDER.install_default();
    }

    fn verifier_factory(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
        match (alg, key.family()) {
            (Algorithm::RS256, AlgorithmFamily::Rsa) | (Algorithm::ES256, AlgorithmFamily::Ec) => {
                Ok(Box::new(RingVerifier {
                    alg: *alg,
                    key: key.clone(),
                }))
            }
            _ => Err(ErrorKind::InvalidAlgorithm.into()),
        }
    }

    fn signer_factory(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
        match (alg, key.family()) {
            (Algorithm::RS256, AlgorithmFamily::Rsa) | (Algorithm::ES256, AlgorithmFamily::Ec) => {
                Ok(Box::new(RingSigner {
                    alg: *alg,
                    key: key.clone(),
                }))
            }
            _ => Err(ErrorKind::InvalidAlgorithm.into()),
        }
    }

    struct RingVerifier {
        alg: Algorithm,
        key: DecodingKey,
    }

    impl Verifier<Vec<u8>> for RingVerifier {
        fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> std::result::Result<(), signature::Error> {
            let verified = match (self.alg, self.key.kind()) {
                (Algorithm::RS256, DecodingKeyKind::RsaModulusExponent { n, e }) => {
                    RsaPublicKeyComponents { n, e }.verify(&RSA_PKCS1_2048_8192_SHA256, msg, sig)
                }
                (Algorithm::RS256, DecodingKeyKind::SecretOrDer(der)) => {
                    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der).verify(msg, sig)
                }
                (Algorithm::ES256, DecodingKeyKind::SecretOrDer(point)) => {
                    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(msg, sig)
                }
                _ => return Err(signature::Error::new()),
            };
            verified.map_err(|_| signature::Error::new())
        }
    }

    impl JwtVerifier for RingVerifier {
        fn algorithm(&self) -> Algorithm {
            self.alg
        }
    }

    /// Signs with a PKCS#8 (or, for RSA, PKCS#1) DER private key.
    struct RingSigner {
        alg: Algorithm,
        key: EncodingKey,
    }

    impl Signer<Vec<u8>> for RingSigner {
        fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
            let rng = SystemRandom::new();
            let der = self.key.as_bytes();
            if self.alg == Algorithm::ES256 {
                let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
                    .map_err(fail)?;
                return Ok(pair.sign(&rng, msg).map_err(fail)?.as_ref().to_vec());
            }
            let pair = RsaKeyPair::from_pkcs8(der)
                .or_else(|_| RsaKeyPair::from_der(der))
                .map_err(fail)?;
            let mut signature = vec![0; pair.public().modulus_len()];
            pair.sign(&RSA_PKCS1_SHA256, &rng, msg, &mut signature)
                .map_err(fail)?;
            Ok(signature)
        }
    }

    fn fail<E>(_: E) -> signature::Error {
        signature::Error::new()
    }

    impl JwtSigner for RingSigner {
        fn algorithm(&self) -> Algorithm {
            self.alg
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn remembrance(token: &[u8], until: u64, keys: [u8; 32]) -> Remembrance {
        Remembrance {
            token: token.into(),
            subject: "svc".into(),
            until,
            keys,
        }
    }

    #[test]
    fn a_remembered_token_needs_the_same_bytes_the_same_keys_and_time_left() {
        let table = Remembered::new();
        let (token, keys) = (b"h.c.sig".as_slice(), [7; 32]);
        table.put(remembrance(token, 100, keys));
        assert_eq!(table.get(token, &keys, 100).as_deref(), Some("svc"));
        assert_eq!(table.get(token, &keys, 101), None, "due");
        assert_eq!(table.get(token, &[8; 32], 50), None, "other keys");
        assert_eq!(table.get(b"h.c.sih", &keys, 50), None, "other bytes");
        assert_eq!(table.get(b"h.c.si", &keys, 50), None, "a prefix");
        let long = vec![b'a'; MAX_REMEMBERED_TOKEN + 1];
        table.put(remembrance(&long, 100, keys));
        assert_eq!(table.get(&long, &keys, 50), None, "too long to remember");
    }

    #[test]
    fn a_token_remembered_in_the_same_slot_replaces_the_earlier_one() {
        let table = Remembered::new();
        let keys = [1; 32];
        let first = b"a.b.first".as_slice();
        let index = |t: &[u8]| table.hasher.hash_one(t) as usize & (REMEMBERED_SLOTS - 1);
        let other = (0u32..)
            .map(|i| format!("a.b.{i}").into_bytes())
            .find(|t| index(t) == index(first))
            .unwrap();
        table.put(remembrance(first, 100, keys));
        table.put(remembrance(&other, 100, keys));
        assert_eq!(table.get(first, &keys, 50), None);
        assert_eq!(table.get(&other, &keys, 50).as_deref(), Some("svc"));
    }

    #[test]
    fn same_bytes_is_equality() {
        assert!(same_bytes(b"", b""));
        assert!(same_bytes(b"abc", b"abc"));
        assert!(!same_bytes(b"abc", b"abd"));
        assert!(!same_bytes(b"abc", b"ab"));
    }

    /// A base64url run of `len` bytes, the first one non-zero (an RSA modulus of that size).
    fn modulus(len: usize) -> String {
        let mut n = vec![0x5a; len];
        n[0] = 0xc3;
        URL_SAFE_NO_PAD.encode(n)
    }

    fn coordinate() -> String {
        URL_SAFE_NO_PAD.encode([7u8; 32])
    }

    #[test]
    fn only_rs256_and_es256_signing_keys_are_kept_each_pinned_to_its_algorithm() {
        let (n, c) = (modulus(256), coordinate());
        let document = json!({"keys": [
            {"kty": "RSA", "kid": "rsa", "n": n, "e": "AQAB"},
            {"kty": "EC", "crv": "P-256", "kid": "ec", "alg": "ES256", "x": c, "y": c},
            {"kty": "RSA", "kid": "rs512", "alg": "RS512", "n": n, "e": "AQAB"},
            {"kty": "RSA", "kid": "ps256", "alg": "PS256", "n": n, "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": n, "e": "AQAB"},
            {"kty": "RSA", "kid": "rsa1024", "n": modulus(128), "e": "AQAB"},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": c, "y": c},
            {"kty": "EC", "crv": "P-256", "kid": "ec-as-rsa", "alg": "RS256", "x": c, "y": c},
            {"kty": "oct", "kid": "hmac", "alg": "HS256", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": c},
            {"kty": "RSA", "kid": "rsa", "n": modulus(300), "e": "AQAB"},
            {"kid": "no-type"},
            "not even an object",
        ]});
        let set = parse_jwks(document.to_string().as_bytes()).unwrap();
        let kept: Vec<_> = set
            .keys
            .iter()
            .map(|k| (k.kid.clone().unwrap(), k.alg))
            .collect();
        assert_eq!(
            kept,
            [
                ("rsa".to_string(), Algorithm::RS256),
                ("ec".to_string(), Algorithm::ES256)
            ]
        );
        // By kid whatever the token's algorithm (the caller compares); without a kid, only the
        // single key of that algorithm.
        assert!(set.find(Some("rsa"), Algorithm::ES256).is_some());
        assert!(set.find(Some("hmac"), Algorithm::RS256).is_none());
        assert_eq!(
            set.find(None, Algorithm::ES256).unwrap().kid.as_deref(),
            Some("ec")
        );
    }

    #[test]
    fn a_kid_less_token_needs_exactly_one_key_of_its_algorithm() {
        let n = modulus(256);
        let two = json!({"keys": [
            {"kty": "RSA", "kid": "a", "n": n, "e": "AQAB"},
            {"kty": "RSA", "kid": "b", "n": n, "e": "AQAB"},
        ]});
        let set = parse_jwks(two.to_string().as_bytes()).unwrap();
        assert!(set.find(None, Algorithm::RS256).is_none());
        assert!(set.find(None, Algorithm::ES256).is_none());
    }

    #[test]
    fn a_jwks_without_usable_keys_is_refused_and_changes_show_in_the_fingerprint() {
        for bad in [
            "",
            "[]",
            "{\"keys\": 1}",
            "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}",
        ] {
            assert!(parse_jwks(bad.as_bytes()).is_err(), "{bad}");
        }
        let set = |n: usize, kid: &str| {
            let doc = json!({"keys": [{"kty": "RSA", "kid": kid, "n": modulus(n), "e": "AQAB"}]});
            parse_jwks(doc.to_string().as_bytes()).unwrap().fingerprint
        };
        assert_eq!(set(256, "a"), set(256, "a"));
        assert_ne!(set(256, "a"), set(256, "b"));
        assert_ne!(set(256, "a"), set(257, "a"));
    }

    #[test]
    fn every_rejection_has_its_own_label_and_message() {
        use Rejection::*;
        let all = [
            Malformed,
            UnsupportedAlgorithm,
            UnknownKey,
            BadSignature,
            MissingClaim,
            Expired,
            NotYetValid,
            WrongIssuer,
            WrongAudience,
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(|r| r.label()).collect();
        let messages: std::collections::HashSet<_> = all.iter().map(|r| r.message()).collect();
        assert_eq!((labels.len(), messages.len()), (all.len(), all.len()));
        let error: Error = Expired.into();
        assert_eq!(error.status(), 401);
        assert_eq!(error.code(), "invalid_api_key");
    }

    #[test]
    fn the_ring_backend_refuses_every_other_algorithm() {
        ring_backend::install();
        let key = DecodingKey::from_rsa_components(&modulus(256), "AQAB").unwrap();
        let hmac = DecodingKey::from_secret(b"the public key, pasted").unwrap();
        let token = "eyJhbGciOiJIUzI1NiJ9.e30.c2ln";
        for (alg, key) in [
            (Algorithm::HS256, &hmac),
            (Algorithm::RS512, &key),
            (Algorithm::PS256, &key),
            (Algorithm::ES256, &key),
        ] {
            let validation = Validation::new(alg);
            assert!(jsonwebtoken::decode::<serde_json::Value>(token, key, &validation).is_err());
        }
    }
}
