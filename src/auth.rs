//! Caller authentication and authorization (SPEC "Routes": client tokens, checkpoint globs,
//! `can_write`).
//!
//! Tokens are never stored: the config holds their SHA-256 and a caller's bearer token is
//! hashed and looked up. Pure: no I/O. Client names are safe to log; tokens never are.

use std::collections::HashMap;
use std::sync::Arc;

use glob::{MatchOptions, Pattern};
use hyper::header::HeaderValue;
use sha2::{Digest, Sha256};

use crate::config::ClientConfig;
use crate::error::Error;
use crate::metrics::{ClientLabel, ClientSeries};
use crate::ratelimit::RateLimit;
use crate::route::Checkpoint;

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

/// All configured clients, by token digest.
#[derive(Debug, Default)]
pub struct Clients {
    /// Keyed by SHA-256 digests: foldhash (seeded) rather than SipHash, on every request.
    by_digest: HashMap<[u8; 32], Arc<Client>, foldhash::fast::RandomState>,
}

impl Clients {
    /// Builds the table from validated config (globs were checked by `config`).
    pub fn new(configs: &[ClientConfig]) -> Clients {
        let by_digest = configs
            .iter()
            .map(|c| {
                let grants = c.checkpoints.iter().filter_map(|p| Grant::new(p)).collect();
                let name = ClientLabel(c.name.as_str().into());
                let client = Client {
                    series: ClientSeries::new(name.clone()),
                    name,
                    grants,
                    can_write: c.can_write,
                    rate: c
                        .rate
                        .map(|(per_second, burst)| RateLimit::new(per_second, burst)),
                };
                (c.token_sha256, Arc::new(client))
            })
            .collect();
        Clients { by_digest }
    }

    /// 401 unless the header is `Bearer <token>` for a configured token.
    pub fn authenticate(&self, authorization: Option<&HeaderValue>) -> Result<&Arc<Client>, Error> {
        let token = authorization
            .and_then(|v| bearer_token(v.as_bytes()))
            .ok_or(Error::InvalidApiKey)?;
        self.by_digest
            .get(&digest(token))
            .ok_or(Error::InvalidApiKey)
    }
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
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

    fn clients() -> Clients {
        let config = |name: &str, token: &str, checkpoints: &[&str], can_write| ClientConfig {
            name: name.into(),
            token_sha256: digest(token.as_bytes()),
            checkpoints: checkpoints.iter().map(|s| s.to_string()).collect(),
            can_write,
            rate: None,
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
        for (pattern, checkpoint, expected) in cases {
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
        for (pattern, checkpoint, expected) in cases {
            let grant = Grant::new(pattern).unwrap();
            assert_eq!(
                grant.matches(checkpoint),
                expected,
                "{pattern} vs {checkpoint}"
            );
            let glob = Pattern::new(pattern).unwrap();
            assert_eq!(
                glob.matches_with(checkpoint, MATCH),
                expected,
                "glob {pattern}"
            );
        }
    }

    #[test]
    fn digest_matches_the_spec_example() {
        assert_eq!(
            hex::encode(digest(b"password")),
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
    }
}
