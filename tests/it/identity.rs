//! SPEC "Who a caller is": clients identified by a JWT's subject (`jwt_subject`, `[jwt]`),
//! beside static tokens. Keys are made at test time (RSA 2048 by the `openssl` command, P-256
//! by ring) and tokens signed with jsonwebtoken's encoder; every refusal is a 401 that says why
//! and never echoes the token, in the body or in any log line. (A client certificate's
//! `PeerIdentity` is tested in `auth`'s unit tests: this build's listener verifies none.)

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hyper::service::service_fn;
use hyper::Method;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::support::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "permgate";
/// The subjects of the two JWT clients `jwt_config` adds.
const BILLING: &str = "system:serviceaccount:billing:api";
const RELEASE: &str = "system:serviceaccount:release:bot";

/// A signing key with its JWK (public half) under `kid`.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The `n`-th RSA 2048 private key (DER) of this test process, made by `openssl`.
fn rsa_der(n: usize) -> Vec<u8> {
    static KEYS: OnceLock<Mutex<Vec<Vec<u8>>>> = OnceLock::new();
    let mut keys = KEYS.get_or_init(Default::default).lock().unwrap();
    while keys.len() <= n {
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .args(["-outform", "DER"])
            .output()
            .expect("the openssl command makes the test's RSA keys");
        assert!(out.status.success(), "openssl genpkey failed");
        keys.push(out.stdout);
    }
    keys[n].clone()
}

fn rsa_key(n: usize, kid: &str) -> SigningKey {
    permgate::jwt::ring_backend::install();
    let der = rsa_der(n);
    // OpenSSL 3 writes PKCS#1 (RSAPrivateKey) DER here; older ones PKCS#8.
    let pair = ring::signature::RsaKeyPair::from_der(&der)
        .or_else(|_| ring::signature::RsaKeyPair::from_pkcs8(&der))
        .unwrap();
    let public: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
    SigningKey {
        kid: kid.into(),
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_der(&der),
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                    "n": b64(&public.n), "e": b64(&public.e)}),
    }
}

fn ec_key(kid: &str) -> SigningKey {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING as P256};
    permgate::jwt::ring_backend::install();
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&P256, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&P256, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    SigningKey {
        kid: kid.into(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid,
                    "x": b64(&point[1..33]), "y": b64(&point[33..])}),
    }
}

impl SigningKey {
    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        encode(&header, claims, &self.encoding).unwrap()
    }

    /// The same key material under another `kid`.
    fn with_kid(&self, kid: &str) -> SigningKey {
        let mut jwk = self.jwk.clone();
        jwk["kid"] = kid.into();
        SigningKey {
            kid: kid.into(),
            alg: self.alg,
            encoding: self.encoding.clone(),
            jwk,
        }
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Valid claims for `sub`, good for ten minutes; `jti` tells tokens apart.
fn claims(sub: &str) -> Value {
    static JTI: AtomicUsize = AtomicUsize::new(0);
    let now = now();
    json!({"iss": ISSUER, "aud": [AUDIENCE, "other"], "sub": sub, "iat": now, "nbf": now,
           "exp": now + 600, "jti": JTI.fetch_add(1, Ordering::Relaxed).to_string()})
}

/// `claims(sub)` with `changes` applied (`null` removes a claim).
fn claims_with(sub: &str, changes: Value) -> Value {
    let mut claims = claims(sub);
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

/// Replaces a file the way Kubernetes updates a mounted volume: write aside, then rename.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Two JWT clients (billing reads acme's checkpoints; release may also write, everywhere) and
/// a `[jwt]` table whose keys come from `jwks` (`jwks_file = "..."` or `jwks_url = "..."`).
fn jwt_config(jwks: &str, extra_jwt: &str) -> String {
    format!(
        r#"
[[clients]]
name = "billing"
jwt_subject = "{BILLING}"
checkpoints = ["ft:gpt-4o-mini-2024-07-18:acme:*"]

[[clients]]
name = "release"
jwt_subject = "{RELEASE}"
checkpoints = ["*"]
can_write = true

[jwt]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
{jwks}
{extra_jwt}
"#
    )
}

/// A gateway whose JWKS file holds `keys`.
async fn gateway_with_keys(dir: &TempDir, keys: &[&SigningKey], extra_jwt: &str) -> Gateway {
    let file = dir.path("jwks.json");
    std::fs::write(&file, jwks(keys)).unwrap();
    let extra = jwt_config(&format!("jwks_file = \"{}\"", file.display()), extra_jwt);
    start_with(|c| c.push_str(&extra)).await
}

/// The value of one series in the gateway's exposition (0 when absent).
async fn metric(gw: &Gateway, series: &str) -> u64 {
    let text = gw.state.render_metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// No piece of `token` long enough to matter is in `text`.
fn assert_absent(token: &str, text: &str, what: &str) {
    let piece = 16.min(token.len());
    for start in (0..=token.len() - piece).step_by(8) {
        let window = &token[start..start + piece];
        assert!(
            !text.contains(window),
            "a piece of a credential ({window}) is in {what}"
        );
    }
}

#[tokio::test]
async fn jwt_callers_get_exactly_their_clients_grants() {
    let dir = TempDir::new("grants");
    let (rsa, ec) = (rsa_key(0, "rsa-1"), ec_key("ec-1"));
    let gw = gateway_with_keys(&dir, &[&rsa, &ec], "").await;
    let billing = rsa.sign(&claims(BILLING));
    let release = ec.sign(&claims(RELEASE));
    let c = &gw.client;

    let r = c.get(&list_path(CP), &billing).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(c.get(&list_path(GLOBEX), &billing).await.status, 403);
    let create = r#"{"project_ids":["proj_jwt"]}"#;
    assert_eq!(c.post(&list_path(CP), &billing, create).await.status, 403);
    assert_eq!(c.get(&list_path(GLOBEX), &release).await.status, 200);
    assert_eq!(c.post(&list_path(CP), &release, create).await.status, 200);
    // Static tokens keep working beside JWTs, and upstream never sees a caller's credential.
    assert_eq!(c.get(&list_path(CP2), READER).await.status, 200);
    for request in gw.mock.requests() {
        let text = format!("{request:?}");
        assert_absent(&billing, &text, "an upstream request");
        assert_absent(&release, &text, "an upstream request");
    }
    let logs = logs();
    assert!(logs.contains("client=\"billing\"") || logs.contains("client=billing"));
    assert_absent(&billing, &logs, "the logs");
    assert_absent(&release, &logs, "the logs");
}

/// A token with any header, claims and signature bytes.
fn unsigned(header: Value, claims: Value, signature: &[u8]) -> String {
    let header = b64(header.to_string().as_bytes());
    let claims = b64(claims.to_string().as_bytes());
    format!("{header}.{claims}.{}", b64(signature))
}

/// HS256 "signed" with the RSA key's public modulus as the HMAC secret: algorithm confusion.
fn hs256_with_public_key(rsa: &SigningKey) -> String {
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": rsa.kid});
    let header = b64(header.to_string().as_bytes());
    let body = b64(claims(BILLING).to_string().as_bytes());
    let modulus = rsa.jwk["n"].as_str().unwrap();
    let secret = URL_SAFE_NO_PAD.decode(modulus).unwrap();
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let tag = ring::hmac::sign(&hmac, format!("{header}.{body}").as_bytes());
    format!("{header}.{body}.{}", b64(tag.as_ref()))
}

/// A good token of billing's whose claims were swapped for release's.
fn tampered(rsa: &SigningKey) -> String {
    let token = rsa.sign(&claims(BILLING));
    let parts: Vec<&str> = token.split('.').collect();
    let forged = b64(claims(RELEASE).to_string().as_bytes());
    format!("{}.{forged}.{}", parts[0], parts[2])
}

/// Signed by `ec` (ES256) but naming the RSA key's kid.
fn es256_on(rsa: &SigningKey, ec: &SigningKey) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(rsa.kid.clone());
    encode(&header, &claims(BILLING), &ec.encoding).unwrap()
}

type Refusal = (&'static str, String, &'static str);

/// (what, token, what the 401 says) for tokens well signed by `rsa` or `ec` (the gateway's
/// keys) whose claims are refused.
fn claim_refusals(rsa: &SigningKey, ec: &SigningKey) -> Vec<Refusal> {
    let now = now();
    let with = |changes| claims_with(BILLING, changes);
    vec![
        (
            "expired",
            rsa.sign(&with(json!({"exp": now - 120}))),
            "has expired",
        ),
        (
            "nbf ahead",
            rsa.sign(&with(json!({"nbf": now + 3600}))),
            "not valid yet",
        ),
        (
            "wrong iss",
            rsa.sign(&with(json!({"iss": "https://x"}))),
            "issuer (iss)",
        ),
        (
            "wrong aud",
            ec.sign(&with(json!({"aud": ["else"]}))),
            "audience (aud)",
        ),
        (
            "no aud",
            ec.sign(&with(json!({"aud": null}))),
            "lacks a required claim",
        ),
        (
            "no sub",
            ec.sign(&with(json!({"sub": null}))),
            "lacks a required claim",
        ),
        (
            "no exp",
            ec.sign(&with(json!({"exp": null}))),
            "lacks a required claim",
        ),
        (
            "no client",
            rsa.sign(&claims("system:serviceaccount:x:y")),
            "no permgate client",
        ),
    ]
}

/// (what, token, what the 401 says) for tokens whose key, algorithm or form is refused.
fn key_refusals(rsa: &SigningKey, ec: &SigningKey) -> Vec<Refusal> {
    let bad_alg = "algorithm is not accepted";
    let bad_signature = "signature does not verify";
    let none = json!({"alg": "none", "kid": rsa.kid});
    let rs512 = json!({"alg": "RS512", "kid": rsa.kid});
    vec![
        (
            "unknown kid",
            rsa.with_kid("rsa-9").sign(&claims(BILLING)),
            "unknown key",
        ),
        (
            "bad signature",
            rsa_key(1, &rsa.kid).sign(&claims(BILLING)),
            bad_signature,
        ),
        ("tampered claims", tampered(rsa), bad_signature),
        ("alg none", unsigned(none, claims(BILLING), b""), bad_alg),
        (
            "HS256 with the public key",
            hs256_with_public_key(rsa),
            bad_alg,
        ),
        ("ES256 header on an RSA key", es256_on(rsa, ec), bad_alg),
        ("RS512", unsigned(rs512, claims(BILLING), b"x"), bad_alg),
        ("malformed", "eyJub3Qi.anNvbg.c2ln".into(), "malformed"),
        (
            "garbage with two dots",
            "not.a.jwt-at-all".into(),
            "malformed",
        ),
        (
            "unknown static token",
            "static-token-nobody".into(),
            "Missing or unknown permgate",
        ),
    ]
}

#[tokio::test]
async fn every_refused_jwt_is_a_401_that_says_why_and_never_echoes_it() {
    let dir = TempDir::new("refusals");
    let (rsa, ec) = (rsa_key(0, "rsa-1"), ec_key("ec-1"));
    let gw = gateway_with_keys(&dir, &[&rsa, &ec], "leeway_seconds = 30").await;
    let mut cases = claim_refusals(&rsa, &ec);
    cases.extend(key_refusals(&rsa, &ec));
    for (what, token, expected) in &cases {
        let r = gw.client.get(&list_path(CP), token).await;
        assert_eq!(r.status, 401, "{what}");
        assert_eq!(r.error().0, "invalid_api_key", "{what}");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(expected), "{what}: {message}");
        assert_eq!(r.header("x-should-retry"), "false", "{what}");
        assert_absent(token, &String::from_utf8_lossy(&r.body), "a 401 body");
    }
    assert_eq!(gw.upstream_gets(), 0, "nothing refused reached upstream");
    let logs = logs();
    for (_, token, _) in &cases {
        assert_absent(token, &logs, "the logs");
    }
    let expired = r#"permgate_jwt_verifications_total{result="expired"}"#;
    assert_eq!(metric(&gw, expired).await, 1);
    // The same claims, well signed, pass: each case failed for its own reason only.
    let r = gw
        .client
        .get(&list_path(CP), &rsa.sign(&claims(BILLING)))
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_verified_token_is_remembered_until_it_expires() {
    let dir = TempDir::new("remember");
    let rsa = rsa_key(0, "rsa-1");
    let gw = gateway_with_keys(&dir, &[&rsa], "leeway_seconds = 0").await;
    let ok = r#"permgate_jwt_verifications_total{result="ok"}"#;
    let remembered = "permgate_jwt_remembered_total";
    let token = rsa.sign(&claims(BILLING));
    for _ in 0..3 {
        assert_eq!(gw.client.get(&list_path(CP), &token).await.status, 200);
    }
    assert_eq!(metric(&gw, ok).await, 1, "one signature check");
    assert_eq!(metric(&gw, remembered).await, 2, "then answers from memory");

    // Remembered no longer than its exp: wait (wall clock, second granularity) until it passes.
    let short = rsa.sign(&claims_with(BILLING, json!({"exp": now() + 1})));
    assert_eq!(gw.client.get(&list_path(CP), &short).await.status, 200);
    let deadline = now() + 2;
    while now() <= deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = gw.client.get(&list_path(CP), &short).await;
    assert_eq!(r.status, 401);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("has expired"));
}

/// A token whose key arrived with a re-read (its unknown `kid`) is remembered with the keys
/// that verified it: once those keys are gone again, even back to the very set that was there
/// before, it is checked again and refused.
#[tokio::test]
async fn a_token_remembered_with_keys_that_were_withdrawn_is_refused() {
    let dir = TempDir::new("withdrawn");
    let (a, added) = (rsa_key(0, "a"), ec_key("added"));
    let gw = gateway_with_keys(&dir, &[&a], "").await;
    let file = dir.path("jwks.json");
    replace_file(&file, &jwks(&[&a, &added]));
    let token = added.sign(&claims(BILLING));
    assert_eq!(gw.client.get(&list_path(CP), &token).await.status, 200);
    // The issuer withdraws the key: the set is the one permgate started with.
    replace_file(&file, &jwks(&[&a]));
    gw.state.jwt.as_ref().unwrap().reload().await;
    let r = gw.client.get(&list_path(CP), &token).await;
    assert_eq!(r.status, 401);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown key"));
}

#[tokio::test]
async fn jwks_file_rotation_rereads_for_an_unknown_kid_at_most_once_per_10s_and_on_reload() {
    let dir = TempDir::new("rotation");
    let (a, b, c) = (rsa_key(0, "a"), ec_key("b"), rsa_key(1, "c"));
    let gw = gateway_with_keys(&dir, &[&a], "").await;
    let file = dir.path("jwks.json");
    let reloads = r#"permgate_jwks_reloads_total{result="success"}"#;
    let token_a = a.sign(&claims(BILLING));
    assert_eq!(gw.client.get(&list_path(CP), &token_a).await.status, 200);
    assert_eq!(metric(&gw, reloads).await, 1, "loaded at start");

    // The issuer adds key b: the first token signed by it makes permgate re-read the file.
    replace_file(&file, &jwks(&[&a, &b]));
    let token_b = b.sign(&claims(BILLING));
    assert_eq!(gw.client.get(&list_path(CP), &token_b).await.status, 200);
    assert_eq!(metric(&gw, reloads).await, 2);

    // Key c within 10 s of that re-read: no second re-read, however many tokens ask.
    replace_file(&file, &jwks(&[&b, &c]));
    let token_c = c.sign(&claims(BILLING));
    let path = list_path(CP);
    let asks = (0..10).map(|_| gw.client.get(&path, &token_c));
    for r in futures_util::future::join_all(asks).await {
        assert_eq!(r.status, 401);
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown key"));
    }
    assert_eq!(metric(&gw, reloads).await, 2, "rate limited");

    // What SIGHUP runs re-reads at once: c works, and a (withdrawn) no longer does, although
    // its token was remembered.
    gw.state.jwt.as_ref().unwrap().reload().await;
    assert_eq!(metric(&gw, reloads).await, 3);
    assert_eq!(gw.client.get(&list_path(CP), &token_c).await.status, 200);
    assert_eq!(gw.client.get(&list_path(CP), &token_a).await.status, 401);
    // A bad new file keeps the current keys.
    replace_file(
        &file,
        "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}",
    );
    gw.state.jwt.as_ref().unwrap().reload().await;
    let failures = r#"permgate_jwks_reloads_total{result="failure"}"#;
    assert_eq!(metric(&gw, failures).await, 1);
    let token = b.sign(&claims(RELEASE));
    assert_eq!(gw.client.get(&list_path(GLOBEX), &token).await.status, 200);
}

/// A JWKS endpoint that counts its fetches; its keys and status can be changed.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    status: Arc<Mutex<u16>>,
    fetches: Arc<AtomicUsize>,
}

async fn serve_jwks(body: String) -> JwksServer {
    serve_jwks_with(body, None).await
}

/// [`serve_jwks`], over TLS when `tls` is given.
async fn serve_jwks_with(body: String, tls: Option<tokio_rustls::TlsAcceptor>) -> JwksServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = JwksServer {
        addr: listener.local_addr().unwrap(),
        body: Arc::new(Mutex::new(body)),
        status: Arc::new(Mutex::new(200)),
        fetches: Arc::new(AtomicUsize::new(0)),
    };
    let (body, status, fetches) = (
        server.body.clone(),
        server.status.clone(),
        server.fetches.clone(),
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (body, status, fetches) = (body.clone(), status.clone(), fetches.clone());
            let service = service_fn(move |_req| {
                fetches.fetch_add(1, Ordering::SeqCst);
                let mut response = hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(body.lock().unwrap().clone()),
                ));
                *response.status_mut() =
                    hyper::StatusCode::from_u16(*status.lock().unwrap()).unwrap();
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let tls = tls.clone();
            tokio::spawn(async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                let _ = match tls {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(stream) => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                        Err(_) => return,
                    },
                    None => builder.serve_connection(TokioIo::new(tcp), service).await,
                };
            });
        }
    });
    server
}

#[tokio::test]
async fn jwks_url_is_fetched_at_start_then_for_an_unknown_kid_at_most_once_per_10s() {
    let (a, b, c) = (ec_key("a"), rsa_key(0, "b"), ec_key("c"));
    let server = serve_jwks(jwks(&[&a])).await;
    let url = format!("jwks_url = \"http://{}/openid/v1/jwks\"", server.addr);
    let extra = jwt_config(&url, "");
    let gw = start_with(|c| c.push_str(&extra)).await;
    let fetches = || server.fetches.load(Ordering::SeqCst);
    eventually("the JWKS is fetched at start", || async { fetches() == 1 }).await;
    assert_eq!(
        gw.client
            .get(&list_path(CP), &a.sign(&claims(BILLING)))
            .await
            .status,
        200
    );

    *server.body.lock().unwrap() = jwks(&[&a, &b]);
    let token_b = b.sign(&claims(BILLING));
    assert_eq!(gw.client.get(&list_path(CP), &token_b).await.status, 200);
    assert_eq!(fetches(), 2, "one fetch for the unknown kid");

    *server.body.lock().unwrap() = jwks(&[&a, &b, &c]);
    let token_c = c.sign(&claims(BILLING));
    let path = list_path(CP);
    let asks = (0..20).map(|_| gw.client.get(&path, &token_c));
    for r in futures_util::future::join_all(asks).await {
        assert_eq!(r.status, 401);
    }
    assert_eq!(fetches(), 2, "no fetch within 10 s of the last one");

    // SIGHUP's reload fetches at once; a failing endpoint keeps the keys already loaded.
    let jwt = gw.state.jwt.as_ref().unwrap();
    jwt.reload().await;
    assert_eq!(fetches(), 3);
    assert_eq!(gw.client.get(&list_path(CP), &token_c).await.status, 200);
    *server.status.lock().unwrap() = 500;
    jwt.reload().await;
    assert_eq!(fetches(), 4);
    let fresh = b.sign(&claims(RELEASE));
    assert_eq!(gw.client.get(&list_path(GLOBEX), &fresh).await.status, 200);
    assert!(logs().contains("JWKS reload failed; keeping the current keys"));
}

/// Until its `jwks_url` has answered, a replica can verify no JWT: when every client is a JWT
/// subject, `/readyz` keeps callers away; with static-token clients too, it serves them.
#[tokio::test]
async fn readiness_waits_for_the_first_jwks_when_only_jwts_can_call() {
    let key = ec_key("a");
    let server = serve_jwks(jwks(&[&key])).await;
    *server.status.lock().unwrap() = 503;
    let url = format!("jwks_url = \"http://{}/openid/v1/jwks\"", server.addr);
    let extra = jwt_config(&url, "");
    let fetches = || server.fetches.load(Ordering::SeqCst);
    let token = key.sign(&claims(BILLING));
    let readyz = |gw: &Gateway| {
        let admin = gw.admin();
        async move { admin.send(Method::GET, "/readyz", None, &[], None).await }
    };

    // Static-token clients beside the JWT ones: ready, and only JWT callers wait for the keys.
    let mixed = start_with(|c| c.push_str(&extra)).await;
    eventually("the first JWKS fetch", || async { fetches() == 1 }).await;
    assert_eq!(readyz(&mixed).await.status, 200);
    assert_eq!(mixed.client.get(&list_path(CP), &token).await.status, 401);
    assert_eq!(mixed.client.get(&list_path(CP), READER).await.status, 200);

    // JWT clients only: not ready until the keys are loaded.
    let only_jwt = start_with(|c| {
        c.truncate(c.find("[[clients]]").unwrap());
        c.push_str(&extra);
    })
    .await;
    eventually("its first JWKS fetch", || async { fetches() >= 3 }).await;
    let ready = readyz(&only_jwt).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["status"], "not ready");
    assert!(ready.json()["reason"]
        .as_str()
        .unwrap()
        .contains("jwt.jwks_url"));
    assert_eq!(
        only_jwt.client.get(&list_path(CP), &token).await.status,
        401
    );

    *server.status.lock().unwrap() = 200;
    only_jwt.state.jwt.as_ref().unwrap().reload().await;
    assert_eq!(readyz(&only_jwt).await.status, 200);
    assert_eq!(
        only_jwt.client.get(&list_path(CP), &token).await.status,
        200
    );
    // A failed re-read later keeps the keys, and the replica stays ready.
    *server.status.lock().unwrap() = 500;
    only_jwt.state.jwt.as_ref().unwrap().reload().await;
    assert_eq!(readyz(&only_jwt).await.status, 200);
}

/// A TLS acceptor for `localhost` under a CA made now, and that CA's PEM.
fn localhost_tls() -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_cert.pem(),
    )
}

/// `jwks_url` over HTTPS is trusted through the upstream client's settings (`upstream.ca_file`),
/// and an endpoint it does not trust yields no keys.
#[tokio::test]
async fn an_https_jwks_url_is_trusted_through_upstream_ca_file() {
    let dir = TempDir::new("https-jwks");
    let ec = ec_key("ec-1");
    let (acceptor, ca_pem) = localhost_tls();
    let server = serve_jwks_with(jwks(&[&ec]), Some(acceptor)).await;
    let ca_file = dir.path("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let url = format!(
        "jwks_url = \"https://localhost:{}/jwks\"",
        server.addr.port()
    );
    let extra = jwt_config(&url, "");
    let trusted = start_with(|c| {
        *c = c.replace(
            "request_timeout_ms = 3000",
            &format!(
                "request_timeout_ms = 3000\nca_file = \"{}\"",
                ca_file.display()
            ),
        );
        c.push_str(&extra);
    })
    .await;
    let token = ec.sign(&claims(BILLING));
    let r = trusted.client.get(&list_path(CP), &token).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    let untrusted = start_with(|c| c.push_str(&extra)).await;
    let r = untrusted.client.get(&list_path(CP), &token).await;
    assert_eq!(r.status, 401);
    let failures = r#"permgate_jwks_reloads_total{result="failure"}"#;
    assert!(metric(&untrusted, failures).await >= 1);
}

/// The real binary: SIGHUP re-reads the JWKS file even inside the unknown-kid rate limit.
#[tokio::test]
async fn sighup_rereads_the_jwks_file_of_a_running_gateway() {
    let dir = TempDir::new("sighup");
    let (a, b) = (rsa_key(0, "a"), ec_key("b"));
    let (_mock, mock_addr, _stop) = mock().await;
    let file = dir.path("jwks.json");
    std::fs::write(&file, jwks(&[&a])).unwrap();
    let config = dir.path("permgate.toml");
    let text =
        base_config(mock_addr) + &jwt_config(&format!("jwks_file = \"{}\"", file.display()), "");
    std::fs::write(&config, text).unwrap();
    let (child, addr) = spawn_serve(&config, &[(ADMIN_KEY_ENV, ADMIN_KEY)]).await;
    let client = TestClient::new(addr);
    let token_b = b.sign(&claims(BILLING));
    // Unknown: re-read once (b is not there yet), and now the rate limit holds.
    assert_eq!(client.get(&list_path(CP), &token_b).await.status, 401);
    replace_file(&file, &jwks(&[&a, &b]));
    assert_eq!(client.get(&list_path(CP), &token_b).await.status, 401);
    signal(&child, "HUP");
    eventually("the new key is accepted", || async {
        client.get(&list_path(CP), &token_b).await.status == 200
    })
    .await;
    assert_eq!(
        client
            .get(&list_path(CP), &a.sign(&claims(BILLING)))
            .await
            .status,
        200
    );
}

const ADMIN_KEY_ENV: &str = "OPENAI_ADMIN_KEY";

#[tokio::test]
async fn check_config_reports_each_clients_identity_source_and_the_jwks() {
    let dir = TempDir::new("check");
    let (a, b) = (rsa_key(0, "a"), ec_key("b"));
    let file = dir.path("jwks.json");
    std::fs::write(&file, jwks(&[&a, &b])).unwrap();
    let config = dir.path("permgate.toml");
    let text = base_config("127.0.0.1:9".parse().unwrap())
        + &jwt_config(&format!("jwks_file = \"{}\"", file.display()), "");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_permgate"))
        .args(["check-config", "--config"])
        .arg(&config)
        .env(ADMIN_KEY_ENV, ADMIN_KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "# clients[0] reader: token_sha256",
        "# clients[2] nobody: token_sha256",
        "# clients[3] billing: jwt_subject",
        "# clients[4] release: jwt_subject",
        "# jwt.jwks_file holds 2 usable keys (1 RS256, 1 ES256)",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line} missing from:\n{stdout}"
        );
    }
    assert!(!stdout.contains(READER), "a token in:\n{stdout}");
    // A JWKS without a usable key fails the check, naming the setting.
    std::fs::write(&file, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_permgate"))
        .args(["check-config", "--config"])
        .arg(&config)
        .env(ADMIN_KEY_ENV, ADMIN_KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("jwt.jwks_file: the JWKS holds no usable key"),
        "{stderr}"
    );
}

/// The official Python SDK with `api_key` a function reading a token file, as a pod reads its
/// projected service-account token: the file is replaced mid-run by a newly signed JWT
/// (kubelet's rotation), and calls keep succeeding with exactly the client's grants.
#[tokio::test]
async fn the_python_sdk_follows_a_rotated_token_file() {
    let Some(python) = sdk_python().await else {
        return;
    };
    let dir = TempDir::new("sdk");
    let rsa = rsa_key(0, "rsa-1");
    let gw = gateway_with_keys(&dir, &[&rsa], "").await;
    let token_file = dir.path("token");
    let first = rsa.sign(&claims(BILLING));
    let second = rsa.sign(&claims(BILLING));
    std::fs::write(&token_file, &first).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/rotating_token.py");
    let base_url = format!("http://{}/v1", gw.addr);
    let (file, rotated) = (token_file.clone(), second.clone());
    let lines = tokio::task::spawn_blocking(move || {
        let mut child = Process(
            Command::new(python)
                .arg(script)
                .args([&base_url, file.to_str().unwrap(), CP, GLOBEX])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut stdin = child.0.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.0.stdout.take().unwrap());
        let mut lines = Vec::new();
        for line in stdout.lines().map_while(Result::ok) {
            if line == "rotate" {
                replace_file(&file, &rotated);
                writeln!(stdin, "rotated").unwrap();
            }
            lines.push(line);
        }
        let status = child.0.wait().unwrap();
        assert!(status.success(), "the SDK script failed: {lines:?}");
        lines
    })
    .await
    .unwrap();
    assert_eq!(
        lines,
        [
            "listed 10",
            "rotate",
            "listed 10",
            "listed 10",
            "denied 403 permission_denied"
        ]
    );
    // Each token was verified once: the second file was read, then remembered.
    let ok = r#"permgate_jwt_verifications_total{result="ok"}"#;
    assert_eq!(metric(&gw, ok).await, 2);
    assert!(metric(&gw, "permgate_jwt_remembered_total").await >= 2);
    let logs = logs();
    assert_absent(&first, &logs, "the logs");
    assert_absent(&second, &logs, "the logs");
}
