//! Caller authentication and authorization (SPEC "Who a caller is", "Routes": checkpoint
//! globs, `can_write`).
//!
//! A caller is identified, in this order, by a verified client certificate that names a
//! `tls_identity` client (whatever `Authorization` holds), else by its bearer token: a JWT
//! (exactly two dots, with `[jwt]` configured) is handed back for `jwt` to verify, then looked
//! up by subject; anything else is a static token, hashed and looked up. Static tokens are
//! never stored: the config holds their SHA-256. Pure: no I/O. Client names are safe to log;
//! tokens never are, nor is any message here built from one.

use std::collections::HashMap;
use std::sync::Arc;

use glob::{MatchOptions, Pattern};
use hyper::header::HeaderValue;
use sha2::{Digest, Sha256};

use crate::config::{ClientConfig, Identity};
use crate::error::Error;
use crate::metrics::{ClientLabel, ClientSeries};
use crate::ratelimit::RateLimit;
use crate::route::Checkpoint;
use crate::tls::PeerIdentity;

/// A configured caller.
#[derive(Debug)]
pub struct Client {
    /// Safe to log and to use as a metrics label.
    pub name: ClientLabel,
    /// This client's request counters.
    pub series: ClientSeries,
    grants: Vec<Grant>,
    pub can_write: bool,
    /// This client's token bucket, if it has a rate limit.
    pub rate: Option<RateLimit>,
}

/// A checkpoint pattern, classified once so the common shapes skip the glob matcher.
#[derive(Debug)]
enum Grant {
    /// `*`
    All,
    /// `ft:...:acme:*`: a literal prefix then one trailing `*`.
    Prefix(Box<str>),
    /// No wildcard at all.
    Exact(Box<str>),
    Glob(Pattern),
}

impl Grant {
    fn new(pattern: &str) -> Option<Grant> {
        let special = |c: char| matches!(c, '*' | '?' | '[' | ']');
        if pattern == "*" {
            return Some(Grant::All);
        }
        if let Some(prefix) = pattern.strip_suffix('*') {
            if !prefix.contains(special) {
                return Some(Grant::Prefix(prefix.into()));
            }
        }
        if !pattern.contains(special) {
            return Some(Grant::Exact(pattern.into()));
        }
        Pattern::new(pattern).ok().map(Grant::Glob)
    }

    fn matches(&self, checkpoint: &str) -> bool {
        match self {
            Grant::All => true,
            Grant::Prefix(prefix) => checkpoint.starts_with(&**prefix),
            Grant::Exact(exact) => checkpoint == &**exact,
            Grant::Glob(pattern) => pattern.matches_with(checkpoint, MATCH),
        }
    }
}

/// Checkpoint ids are not paths: `require_literal_separator` only concerns `/`, which they never
/// contain, so `*` (any run of characters) and `?` (any one) also match `:`. A `*` is not
/// confined to one `:`-separated field: `ft:*:acme:*` matches `ft:m:other:acme:x`, a checkpoint
/// of organisation `other` whose suffix is `acme`. `Config::warnings` flags patterns whose
/// wildcards reach the organisation field.
const MATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: false,
    require_literal_leading_dot: false,
};

impl Client {
    /// 429 (with the seconds to wait) once this client's token bucket is empty.
    pub fn check_rate(&self) -> Result<(), Error> {
        self.rate.as_ref().map_or(Ok(()), RateLimit::check)
    }

    /// 403 unless the checkpoint matches one of the client's globs and, for a write, the client
    /// may write.
    pub fn authorize(&self, checkpoint: &Checkpoint, write: bool) -> Result<(), Error> {
        let granted = self.grants.iter().any(|g| g.matches(checkpoint.as_str()));
        if granted && (self.can_write || !write) {
            Ok(())
        } else {
            Err(Error::PermissionDenied)
        }
    }
}

/// All configured clients, by identity.
#[derive(Debug, Default)]
pub struct Clients {
    /// Keyed by SHA-256 digests: foldhash (seeded) rather than SipHash, on every request.
    by_digest: Table<[u8; 32]>,
    /// `tls_identity`: URIs as written, DNS names in lower case.
    by_tls_identity: Table<Box<str>>,
    by_subject: Table<Box<str>>,
}

type Table<K> = HashMap<K, Arc<Client>, foldhash::fast::RandomState>;

/// Who the caller says it is, before anything needs I/O.
#[derive(Debug)]
pub enum Credential<'c, 'h> {
    /// A verified client certificate or a static token named this client.
    Client(&'c Arc<Client>),
    /// A bearer JWT, still unverified (see `jwt::Verifier`), then [`Clients::by_subject`].
    Jwt(&'h [u8]),
}

/// 401 for a verified client certificate whose names name two clients.
const CERTIFICATE_NAMES_TWO_CLIENTS: &str =
    "The client certificate names more than one permgate client; it must name exactly one.";

/// 401 for a request with more than one `Authorization` field: which one counts would be a
/// guess, and a proxy in front may have checked the other.
const SEVERAL_AUTHORIZATIONS: &str =
    "The request has more than one Authorization header; send exactly one.";

/// A request's `Authorization` fields, as [`Clients::identify`] reads them.
#[derive(Debug, Clone, Copy)]
pub enum Authorization<'h> {
    None,
    One(&'h HeaderValue),
    Several,
}

impl<'h> Authorization<'h> {
    pub fn of(headers: &'h hyper::HeaderMap) -> Authorization<'h> {
        let mut fields = headers.get_all(hyper::header::AUTHORIZATION).iter();
        match (fields.next(), fields.next()) {
            (None, _) => Authorization::None,
            (Some(header), None) => Authorization::One(header),
            (Some(_), Some(_)) => Authorization::Several,
        }
    }
}

impl<'h> From<Option<&'h HeaderValue>> for Authorization<'h> {
    fn from(header: Option<&'h HeaderValue>) -> Authorization<'h> {
        header.map_or(Authorization::None, Authorization::One)
    }
}

/// 401 for a verified JWT whose `sub` no client has.
pub const NO_CLIENT_FOR_SUBJECT: &str =
    "The JWT is valid, but no permgate client is configured for its subject (sub).";

impl Clients {
    /// Whether every client is known by a JWT subject: then no caller can be served before
    /// the JWKS is loaded.
    pub fn only_jwt(&self) -> bool {
        self.by_digest.is_empty() && self.by_tls_identity.is_empty()
    }

    /// Builds the table from validated config (globs and identities were checked by `config`).
    pub fn new(configs: &[ClientConfig]) -> Clients {
        let mut clients = Clients::default();
        for c in configs {
            let grants = c.checkpoints.iter().filter_map(|p| Grant::new(p)).collect();
            let name = ClientLabel(c.name.as_str().into());
            let client = Arc::new(Client {
                series: ClientSeries::new(name.clone()),
                name,
                grants,
                can_write: c.can_write,
                rate: c
                    .rate
                    .map(|(per_second, burst)| RateLimit::new(per_second, burst)),
            });
            match &c.identity {
                Identity::TokenSha256(digest) => clients.by_digest.insert(*digest, client),
                Identity::TlsIdentity(name) => {
                    clients.by_tls_identity.insert(name.as_str().into(), client)
                }
                Identity::JwtSubject(sub) => clients.by_subject.insert(sub.as_str().into(), client),
            };
        }
        clients
    }

    /// SPEC resolution order: a verified client certificate that names a client wins; else the
    /// bearer token is a JWT (exactly two dots, when `jwt` is configured) or a static token.
    /// 401 when no certificate names a client and there is no bearer token, or an unknown
    /// static one.
    pub fn identify<'c, 'h>(
        &'c self,
        peer: Option<&PeerIdentity>,
        authorization: Authorization<'h>,
        jwt: bool,
    ) -> Result<Credential<'c, 'h>, Error> {
        if let Some(client) = peer.map(|p| self.by_certificate(p)).transpose()?.flatten() {
            return Ok(Credential::Client(client));
        }
        let header = match authorization {
            Authorization::Several => {
                return Err(Error::Unauthenticated {
                    reason: SEVERAL_AUTHORIZATIONS,
                })
            }
            Authorization::One(header) => Some(header),
            Authorization::None => None,
        };
        let token = header
            .and_then(|v| bearer_token(v.as_bytes()))
            .ok_or(Error::InvalidApiKey)?;
        if jwt && is_jwt_shaped(token) {
            return Ok(Credential::Jwt(token));
        }
        self.by_token(token).map(Credential::Client)
    }

    /// 401 unless the header is `Bearer <token>` for a configured static token.
    pub fn authenticate(&self, authorization: Option<&HeaderValue>) -> Result<&Arc<Client>, Error> {
        let token = authorization
            .and_then(|v| bearer_token(v.as_bytes()))
            .ok_or(Error::InvalidApiKey)?;
        self.by_token(token)
    }

    /// The client of a verified JWT's `sub`; 401 when there is none.
    pub fn by_subject(&self, subject: &str) -> Result<&Arc<Client>, Error> {
        self.by_subject.get(subject).ok_or(Error::Unauthenticated {
            reason: NO_CLIENT_FOR_SUBJECT,
        })
    }

    fn by_token(&self, token: &[u8]) -> Result<&Arc<Client>, Error> {
        self.by_digest
            .get(&digest(token))
            .ok_or(Error::InvalidApiKey)
    }

    /// The client the certificate's names name: a URI name matches a URI `tls_identity`
    /// exactly (one without a scheme matches nothing: it is not a DNS name), a DNS name a DNS
    /// one without regard to case. 401 when its names name two clients: which one it is would
    /// otherwise depend on the order of its names.
    fn by_certificate(&self, peer: &PeerIdentity) -> Result<Option<&Arc<Client>>, Error> {
        if self.by_tls_identity.is_empty() {
            return Ok(None);
        }
        let mut named: Option<&Arc<Client>> = None;
        for (i, name) in peer.names.iter().enumerate() {
            let client = if i < peer.uris {
                // A configured URI always has one (`config::tls_identity`).
                name.contains("://")
                    .then(|| self.by_tls_identity.get(name.as_str()))
                    .flatten()
            } else {
                self.by_tls_identity.get(name.as_str()).or_else(|| {
                    name.bytes()
                        .any(|b| b.is_ascii_uppercase())
                        .then(|| self.by_tls_identity.get(name.to_ascii_lowercase().as_str()))
                        .flatten()
                })
            };
            match (named, client) {
                (Some(a), Some(b)) if !Arc::ptr_eq(a, b) => {
                    return Err(Error::Unauthenticated {
                        reason: CERTIFICATE_NAMES_TWO_CLIENTS,
                    })
                }
                (None, Some(b)) => named = Some(b),
                _ => {}
            }
        }
        Ok(named)
    }
}

/// A compact JWS: exactly two dots (`header.claims.signature`).
fn is_jwt_shaped(token: &[u8]) -> bool {
    memchr::memchr_iter(b'.', token).take(3).count() == 2
}

/// `Bearer <token>` (scheme case-insensitive, surrounding spaces trimmed): the token, if any.
/// The data and admin listeners read their tokens the same way.
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The SHA-256 of a token: what `token_sha256` holds and what `hash-token` prints.
pub fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(
        name: &str,
        identity: Identity,
        checkpoints: &[&str],
        can_write: bool,
    ) -> ClientConfig {
        ClientConfig {
            name: name.into(),
            identity,
            checkpoints: checkpoints.iter().map(|s| s.to_string()).collect(),
            can_write,
            rate: None,
        }
    }

    fn clients() -> Clients {
        let config = |name: &str, token: &str, checkpoints: &[&str], can_write| {
            client(
                name,
                Identity::TokenSha256(digest(token.as_bytes())),
                checkpoints,
                can_write,
            )
        };
        Clients::new(&[
            config(
                "reader",
                "tok-r",
                &["ft:gpt-4o-mini-2024-07-18:acme:*"],
                false,
            ),
            config("writer", "tok-w", &["*"], true),
            config("nothing", "tok-n", &[], true),
        ])
    }

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn bearer_tokens_authenticate() {
        let c = clients();
        assert_eq!(
            &*c.authenticate(Some(&header("Bearer tok-r")))
                .unwrap()
                .name
                .0,
            "reader"
        );
        assert_eq!(
            &*c.authenticate(Some(&header("bearer  tok-w ")))
                .unwrap()
                .name
                .0,
            "writer"
        );
        for bad in [
            "",
            "Bearer",
            "Bearer ",
            "Basic tok-r",
            "tok-r",
            "Bearer tok-x",
            "Bearer tok-r2",
        ] {
            assert_eq!(
                c.authenticate(Some(&header(bad))).unwrap_err(),
                Error::InvalidApiKey,
                "{bad}"
            );
        }
        assert_eq!(c.authenticate(None).unwrap_err(), Error::InvalidApiKey);
    }

    /// Static tokens, a `tls_identity` client for a SPIFFE ID and one for a DNS name, and a
    /// `jwt_subject` client.
    fn identities() -> Clients {
        let token = |t: &str| Identity::TokenSha256(digest(t.as_bytes()));
        Clients::new(&[
            client("static", token("tok-s"), &["*"], false),
            client("dotted", token("a.b.c"), &["*"], false),
            client(
                "spiffe",
                Identity::TlsIdentity("spiffe://cluster.local/ns/billing/sa/api".into()),
                &["*"],
                false,
            ),
            client(
                "dns",
                Identity::TlsIdentity("billing.svc.cluster.local".into()),
                &["*"],
                false,
            ),
            client(
                "workload",
                Identity::JwtSubject("system:serviceaccount:billing:api".into()),
                &["*"],
                false,
            ),
        ])
    }

    fn peer(uris: &[&str], dns: &[&str]) -> PeerIdentity {
        PeerIdentity {
            names: uris.iter().chain(dns).map(|n| n.to_string()).collect(),
            uris: uris.len(),
        }
    }

    fn name_of(credential: Result<Credential<'_, '_>, Error>) -> String {
        match credential {
            Ok(Credential::Client(client)) => client.name.0.to_string(),
            Ok(Credential::Jwt(token)) => format!("jwt:{}", String::from_utf8_lossy(token)),
            Err(e) => format!("error:{}", e.code()),
        }
    }

    #[test]
    fn a_verified_certificate_naming_a_client_wins_whatever_the_bearer() {
        let c = identities();
        let spiffe = peer(
            &["spiffe://cluster.local/ns/billing/sa/api"],
            &["other.example"],
        );
        // The SDKs always send a bearer token: a valid static token of another client, a JWT,
        // garbage, or none.
        for bearer in [
            Some("Bearer tok-s"),
            Some("Bearer x.y.z"),
            Some("Bearer junk"),
            None,
        ] {
            let h = bearer.map(header);
            for jwt in [false, true] {
                assert_eq!(
                    name_of(c.identify(Some(&spiffe), Authorization::from(h.as_ref()), jwt)),
                    "spiffe",
                    "{bearer:?}"
                );
            }
        }
        // DNS names match without regard to case; URIs only exactly.
        let dns = peer(&[], &["Billing.SVC.cluster.local"]);
        assert_eq!(
            name_of(c.identify(Some(&dns), Authorization::from(None), false)),
            "dns"
        );
        let upper = peer(&["SPIFFE://cluster.local/ns/billing/sa/api"], &[]);
        assert_eq!(
            name_of(c.identify(Some(&upper), Authorization::from(None), false)),
            "error:invalid_api_key"
        );
    }

    /// A URI name is matched as a URI only, and a certificate naming two clients names none:
    /// where a CA lets a requester choose its URI names but polices DNS names, neither can be
    /// used to pass as a DNS-named client.
    #[test]
    fn a_certificate_is_one_client_by_the_right_kind_of_name_or_none() {
        let c = identities();
        let unschemed = peer(&["billing.svc.cluster.local"], &[]);
        let h = header("Bearer tok-s");
        assert_eq!(
            name_of(c.identify(Some(&unschemed), Authorization::from(Some(&h)), false)),
            "static",
            "not the DNS client"
        );
        let both = peer(
            &["spiffe://cluster.local/ns/billing/sa/api"],
            &["billing.svc.cluster.local"],
        );
        assert_eq!(
            name_of(c.identify(Some(&both), Authorization::from(Some(&h)), false)),
            "error:invalid_api_key"
        );
        let twice = peer(
            &[],
            &["billing.svc.cluster.local", "Billing.svc.cluster.local"],
        );
        assert_eq!(
            name_of(c.identify(Some(&twice), Authorization::from(None), false)),
            "dns"
        );
    }

    #[test]
    fn a_certificate_naming_no_client_falls_back_to_the_bearer() {
        let c = identities();
        let stranger = peer(&["spiffe://cluster.local/ns/other/sa/x"], &[]);
        let h = header("Bearer tok-s");
        assert_eq!(
            name_of(c.identify(Some(&stranger), Authorization::from(Some(&h)), false)),
            "static"
        );
        assert_eq!(
            name_of(c.identify(Some(&stranger), Authorization::from(None), true)),
            "error:invalid_api_key"
        );
        assert_eq!(
            name_of(c.identify(None, Authorization::from(Some(&h)), true)),
            "static"
        );
    }

    #[test]
    fn a_bearer_with_two_dots_is_a_jwt_only_when_jwt_is_configured() {
        let c = identities();
        let dotted = header("Bearer a.b.c");
        assert_eq!(
            name_of(c.identify(None, Authorization::from(Some(&dotted)), true)),
            "jwt:a.b.c"
        );
        assert_eq!(
            name_of(c.identify(None, Authorization::from(Some(&dotted)), false)),
            "dotted"
        );
        for other in ["Bearer a.b", "Bearer a.b.c.d", "Bearer abc"] {
            assert_eq!(
                name_of(c.identify(None, Authorization::from(Some(&header(other))), true)),
                "error:invalid_api_key",
                "{other}"
            );
        }
        assert_eq!(
            &*c.by_subject("system:serviceaccount:billing:api")
                .unwrap()
                .name
                .0,
            "workload"
        );
        assert_eq!(
            c.by_subject("system:serviceaccount:billing:other")
                .unwrap_err(),
            Error::Unauthenticated {
                reason: NO_CLIENT_FOR_SUBJECT
            }
        );
        // A tls_identity or jwt_subject is not a token: it never authenticates as one.
        let as_token = header("Bearer system:serviceaccount:billing:api");
        assert!(c.authenticate(Some(&as_token)).is_err());
    }

    #[test]
    fn globs_and_can_write_authorize() {
        let c = clients();
        let acme = Checkpoint::parse("ft:gpt-4o-mini-2024-07-18:acme:weather:B7R9VjQd").unwrap();
        let other = Checkpoint::parse("ft:gpt-4o-mini-2024-07-18:other:x:1").unwrap();
        let get = |t: &str| {
            c.authenticate(Some(&header(&format!("Bearer {t}"))))
                .unwrap()
                .clone()
        };
        assert!(get("tok-r").authorize(&acme, false).is_ok());
        assert_eq!(
            get("tok-r").authorize(&acme, true),
            Err(Error::PermissionDenied)
        );
        assert_eq!(
            get("tok-r").authorize(&other, false),
            Err(Error::PermissionDenied)
        );
        assert!(get("tok-w").authorize(&other, true).is_ok());
        assert_eq!(
            get("tok-n").authorize(&acme, false),
            Err(Error::PermissionDenied)
        );
    }

    /// Each `(pattern, checkpoint, expected)`: the classified grant and the glob matcher agree
    /// with `expected`.
    fn assert_grants_match_like_globs(cases: &[(&str, &str, bool)]) {
        for &(pattern, checkpoint, expected) in cases {
            let grant = Grant::new(pattern).unwrap();
            assert_eq!(
                grant.matches(checkpoint),
                expected,
                "{pattern} vs {checkpoint}"
            );
            let glob = Pattern::new(pattern)
                .unwrap()
                .matches_with(checkpoint, MATCH);
            assert_eq!(glob, expected, "the glob agrees: {pattern} vs {checkpoint}");
        }
    }

    #[test]
    fn every_pattern_shape_matches_like_the_glob_it_is() {
        let cases = [
            ("*", "anything:at:all", true),
            ("ft:a:*", "ft:a:b", true),
            ("ft:a:*", "ft:a:", true),
            ("ft:a:*", "ft:b:c", false),
            ("ft:a:b", "ft:a:b", true),
            ("ft:a:b", "ft:a:bc", false),
            ("ft:?:b", "ft:x:b", true),
            ("ft:[ab]:*", "ft:c:d", false),
            ("*:acme:*", "ft:gpt:acme:x", true),
            ("*:acme:*", "ft:gpt:other:x", false),
        ];
        assert_grants_match_like_globs(&cases);
    }

    /// `*` and `?` match `:` like any other character, so a wildcard is not confined to one
    /// field of `ft:{base_model}:{org}:{suffix}:{id}`: only a literal `:` right after the
    /// organisation pins it.
    #[test]
    fn wildcards_cross_colons() {
        let cases = [
            // A trailing `*` after the organisation's `:` stays within that organisation, any
            // depth (checkpoint ids may carry a further `:ckpt-step-N`).
            ("ft:m:acme:*", "ft:m:acme:team:x", true),
            ("ft:m:acme:*", "ft:m:acme:s:x:ckpt-step-88", true),
            ("ft:m:acme:*", "ft:m:acme-labs:s:x", false),
            // Without that `:` the organisation is only a prefix.
            ("ft:m:acme*", "ft:m:acme-labs:s:x", true),
            // A `*` in the base-model field swallows the organisation: any organisation's
            // checkpoint whose suffix (or id) is `acme` matches.
            ("ft:*:acme:*", "ft:m:acme:s:x", true),
            ("ft:*:acme:*", "ft:m:other:acme:x", true),
            ("*:acme:*", "ft:m:other:acme:x", true),
            ("ft:m:*:weather:*", "ft:m:anyone:weather:x", true),
            // `?` is one character, `:` included; a class pins one character only.
            ("ft:m:acme:?", "ft:m:acme::", true),
            ("ft:[!:]*:acme:*", "ft:m:other:acme:x", true),
            // `[*]` is a literal `*`.
            ("ft:m:[*]:*", "ft:m:*:s:x", true),
            ("ft:m:[*]:*", "ft:m:acme:s:x", false),
        ];
        assert_grants_match_like_globs(&cases);
    }

    #[test]
    fn digest_matches_the_spec_example() {
        assert_eq!(
            hex::encode(digest(b"password")),
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
    }
}
