//! Fuzzes permgate's pure request parser (`permgate::route`): routing, checkpoint and
//! permission-id decoding, list-query parsing and normalization, and `reject_query`.
//!
//! The input is read as `METHOD SP path[?query]` (lossy UTF-8, as a path reaches the parser
//! as `&str`); the path is also wrapped into list and delete routes so the segment decoders
//! are reached even when the input does not start with the route prefix.
//!
//! Invariants (the same as `tests/it/hostile.rs`): nothing panics; routing fails only with
//! 404/405; decoding fails only with a 400 naming a bounded parameter; a valid checkpoint obeys
//! the SPEC and its forwarded encoding is one safe path segment that re-parses to itself; a
//! valid query's canonical form re-parses to the same `ListQuery` and the same string, and is
//! a valid URI query.
#![no_main]

use hyper::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use permgate::error::Error;
use permgate::route::{self, Checkpoint, ListQuery, Operation};

const PREFIX: &str = "/v1/fine_tuning/checkpoints/";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (method_raw, target) = text.split_once(' ').unwrap_or(("GET", &text));
    let method = Method::from_bytes(method_raw.as_bytes()).unwrap_or(Method::GET);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };

    check_route(&method, path);
    check_route(&Method::GET, &format!("{PREFIX}{path}/permissions"));
    let (cp, id) = path.split_once('/').unwrap_or((path, "x"));
    check_route(&Method::DELETE, &format!("{PREFIX}{cp}/permissions/{id}"));
    if let Ok(cp) = Checkpoint::parse(path) {
        check_checkpoint(&cp);
    }
    check_query(query);
    check_query(Some(target));
});

fn check_route(method: &Method, path: &str) {
    match route::match_route(method, path) {
        Ok(m) => {
            assert!(path.starts_with(PREFIX));
            let expected = match m.operation {
                Operation::List => Method::GET,
                Operation::Create => Method::POST,
                Operation::Delete => Method::DELETE,
            };
            assert_eq!(method, expected);
            match m.checkpoint() {
                Ok(cp) => check_checkpoint(&cp),
                Err(e) => check_parse_error(&e),
            }
            match m.permission_id() {
                Ok(Some(id)) => {
                    assert_eq!(m.operation, Operation::Delete);
                    assert!(!id.is_empty() && id.len() <= 128);
                    assert!(id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
                }
                Ok(None) => assert_ne!(m.operation, Operation::Delete),
                Err(e) => check_parse_error(&e),
            }
        }
        Err(e) => assert!(
            matches!(e, Error::NotFound | Error::MethodNotAllowed { .. }),
            "routing failed with {e:?}"
        ),
    }
}

fn check_checkpoint(cp: &Checkpoint) {
    let s = cp.as_str();
    assert!(!s.is_empty() && s.len() <= 256);
    assert!(!s.contains('/') && !s.contains(".."));
    assert!(!s.chars().any(|c| c.is_control() || c.is_whitespace()));
    let mut enc = String::new();
    cp.write_encoded(&mut enc);
    assert!(
        enc.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:%".contains(&b)),
        "{enc:?}"
    );
    assert_eq!(&Checkpoint::parse(&enc).expect("encoded re-parses"), cp);
}

fn check_query(query: Option<&str>) {
    match ListQuery::parse(query) {
        Ok(q) => {
            let mut c1 = String::new();
            q.write_canonical(&mut c1);
            let again = ListQuery::parse(Some(&c1)).expect("canonical re-parses");
            assert_eq!(again, q, "{c1:?}");
            let mut c2 = String::new();
            again.write_canonical(&mut c2);
            assert_eq!(c1, c2);
            let uri: Uri = format!("http://upstream.test/v1/x?{c1}")
                .parse()
                .expect("canonical query is a valid URI query");
            assert_eq!(uri.query(), Some(c1.as_str()));
        }
        Err(e) => check_parse_error(&e),
    }
    match route::reject_query(query) {
        Ok(()) => assert!(query.unwrap_or("").split('&').all(str::is_empty)),
        Err(e) => check_parse_error(&e),
    }
}

fn check_parse_error(e: &Error) {
    match e {
        Error::InvalidParameter { param, .. } => {
            assert!(!param.is_empty() && param.len() <= 64, "{param:?}");
        }
        other => panic!("a parser failed with {other:?}"),
    }
    let body: serde_json::Value = serde_json::from_slice(&e.body()).expect("JSON error body");
    assert_eq!(body["error"]["code"], "invalid_parameter");
}
