//! Resilience against hostile input: the pure parser under property tests, and the data listener
//! fed raw bytes over a plain TCP socket (request smuggling shapes, odd request-target forms,
//! bytes no HTTP client would send, oversized heads, truncated messages, HTTP/2 garbage).
//!
//! Every hostile exchange is checked three ways: who answered and with what (a head refused at
//! the front door, by the framing guard or by hyper's parser, gets `invalid_parameter`,
//! `invalid_request` or `request_too_large` and `Connection: close`; a request gets the
//! handler's answer; every answer carries an `x-request-id` and, for an error, an
//! OpenAI-shaped JSON body), that the mock upstream saw nothing (or, for
//! the few shapes that are legitimate requests, exactly what the configured upstream must see),
//! and that the gateway still serves a normal authenticated GET afterwards.
//!
//! No sleeps: every raw exchange ends in a request carrying `Connection: close` (or in a shape
//! after which the server closes), so reading to EOF terminates by itself; `timeout` is only a
//! hang guard.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::Method;
use permgate::error::Error;
use permgate::route::{self, Checkpoint, ListQuery, Order, DEFAULT_LIMIT};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Part 1: the pure parser (route::match_route, Matched::{checkpoint, permission_id},
// ListQuery::{parse, write_canonical}, route::reject_query) under proptest.
// ---------------------------------------------------------------------------------------------

const PREFIX: &str = "/v1/fine_tuning/checkpoints/";

/// Characters that make parsers stumble: escapes, separators, controls, multi-byte UTF-8.
fn hostile_char() -> impl Strategy<Value = char> {
    let specials: Vec<char> = vec![
        '%',
        '/',
        '.',
        ':',
        '&',
        '=',
        '+',
        '?',
        '#',
        ';',
        ' ',
        '\t',
        '\n',
        '\r',
        '\0',
        '\u{1}',
        '\u{1b}',
        '\u{7f}',
        '\u{85}',
        '\u{a0}',
        '\u{2028}',
        '\u{200b}',
        '\u{feff}',
        '\\',
        '~',
        '-',
        '_',
        'é',
        '€',
        'ß',
        '\u{1d11e}',
        '\u{10ffff}',
        '\u{fffd}',
    ];
    prop_oneof![
        4 => prop::sample::select(specials),
        3 => prop::sample::select("0123456789abcdefABCDEF".chars().collect::<Vec<_>>()),
        2 => prop::char::range('a', 'z'),
        1 => any::<char>(),
    ]
}

/// Fragments that are meaningful to the parser: escapes (valid, truncated, overlong, invalid
/// UTF-8), traversal, route words and parameter names.
fn hostile_piece() -> impl Strategy<Value = String> {
    let words: Vec<&'static str> = vec![
        "%2F",
        "%2f",
        "%3A",
        "%3a",
        "%00",
        "%0A",
        "%0d",
        "%20",
        "%25",
        "%26",
        "%3D",
        "%2B",
        "%2E",
        "%2E%2E",
        "..",
        "%C3%A9",
        "%C3%28",
        "%C0%AF",
        "%E2%82%AC",
        "%F0%9F%98%80",
        "%ED%A0%80",
        "%ff",
        "%FE",
        "%",
        "%4",
        "%%",
        "%G0",
        "+",
        "++",
        "&&",
        "==",
        "=",
        "&",
        "/",
        "//",
        "permissions",
        "/permissions",
        "/permissions/",
        "limit",
        "order",
        "after",
        "project_id",
        "limit=",
        "order=",
        "after=",
        "project_id=",
        "ascending",
        "descending",
        "0",
        "1",
        "10",
        "100",
        "101",
        "255",
        "256",
        "007",
        "-1",
        PREFIX,
        "ft:gpt-4o-mini-2024-07-18:acme:x:y",
    ];
    prop_oneof![
        6 => hostile_char().prop_map(String::from),
        4 => prop::sample::select(words).prop_map(String::from),
        1 => (prop::sample::select(vec!["a", "%41", "é", "%C3%A9", ":"]), 100usize..300)
            .prop_map(|(p, n)| p.repeat(n)),
    ]
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop::collection::vec(hostile_piece(), 0..48).prop_map(|v| v.concat())
}

/// Very long strings (up to ~100 KiB) built from one repeated hostile fragment.
fn long_string() -> impl Strategy<Value = String> {
    (hostile_piece(), 1usize..4096).prop_map(|(p, n)| {
        let mut s = p.repeat(n);
        let mut cut = s.len().min(100 * 1024);
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s
    })
}

/// Arbitrary bytes, made into a `&str` the way a lossy HTTP layer would.
fn lossy_bytes() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<u8>(), 0..512)
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => hostile_string(),
        2 => lossy_bytes(),
        1 => long_string(),
    ]
}

/// Paths that mostly get past the structural prefix check, so the segment parsers are reached.
fn path_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any_string(),
        3 => any_string().prop_map(|cp| format!("{PREFIX}{cp}/permissions")),
        3 => (any_string(), any_string())
            .prop_map(|(cp, id)| format!("{PREFIX}{cp}/permissions/{id}")),
        1 => any_string().prop_map(|tail| format!("{PREFIX}{tail}")),
    ]
}

fn method_strategy() -> impl Strategy<Value = Method> {
    prop_oneof![
        4 => prop::sample::select(vec![
            Method::GET,
            Method::POST,
            Method::DELETE,
            Method::PUT,
            Method::PATCH,
            Method::HEAD,
            Method::OPTIONS,
            Method::CONNECT,
            Method::TRACE,
        ]),
        1 => "[A-Za-z!#$%&'*+.^_`|~-]{1,24}"
            .prop_map(|m| Method::from_bytes(m.as_bytes()).expect("a token is a method")),
    ]
}

/// Every error the parsers produce is a 400 naming a bounded parameter, renderable as JSON.
fn assert_parse_error(e: &Error) {
    match e {
        Error::InvalidParameter { param, .. } => {
            assert!(
                !param.is_empty() && param.len() <= 64,
                "param not bounded: {param:?}"
            );
        }
        other => panic!("the parsers may only fail with a 400, got {other:?}"),
    }
    assert_eq!(e.status(), 400);
    let body: serde_json::Value = serde_json::from_slice(&e.body()).expect("error body is JSON");
    assert_eq!(body["error"]["code"], "invalid_parameter");
}

fn canonical(q: &ListQuery) -> String {
    let mut s = String::new();
    q.write_canonical(&mut s);
    s
}

fn encoded(cp: &Checkpoint) -> String {
    let mut s = String::new();
    cp.write_encoded(&mut s);
    s
}

/// A validated checkpoint obeys the SPEC's rules, and its forwarded form is one safe path
/// segment that decodes back to the same checkpoint.
fn assert_checkpoint_invariants(cp: &Checkpoint) {
    let s = cp.as_str();
    assert!(!s.is_empty() && s.len() <= 256, "{s:?}");
    assert!(!s.contains('/') && !s.contains(".."), "{s:?}");
    assert!(
        !s.chars().any(|c| c.is_control() || c.is_whitespace()),
        "{s:?}"
    );
    let enc = encoded(cp);
    assert!(
        enc.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:%".contains(&b)),
        "forwarded segment has unsafe bytes: {enc:?}"
    );
    assert_eq!(&Checkpoint::parse(&enc).expect("re-parses"), cp);
    let path = list_path(&enc);
    let matched = route::match_route(&Method::GET, &path).expect("still a route");
    assert_eq!(&matched.checkpoint().expect("still valid"), cp);
}

/// The normalized query re-parses to itself, and is something a URI accepts verbatim.
fn assert_canonical_fixed_point(q: &ListQuery) {
    let c1 = canonical(q);
    let again = ListQuery::parse(Some(&c1))
        .unwrap_or_else(|e| panic!("canonical {c1:?} does not re-parse: {e:?}"));
    assert_eq!(&again, q, "canonical {c1:?}");
    assert_eq!(canonical(&again), c1);
    let uri: hyper::Uri = format!("http://upstream.test/v1/x?{c1}")
        .parse()
        .unwrap_or_else(|e| panic!("canonical {c1:?} is not a valid query: {e}"));
    assert_eq!(uri.query(), Some(c1.as_str()));
}

/// A decoded value that `ListQuery` must accept: 1..=256 bytes, no control characters.
fn valid_value() -> impl Strategy<Value = String> {
    let no_controls = hostile_char().prop_filter("no controls", |c| !c.is_control());
    prop::collection::vec(no_controls, 1..80).prop_map(|chars| {
        let mut s: String = chars.into_iter().collect();
        let mut cut = s.len().min(256);
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s
    })
}

/// Percent-encodes a decoded value in one of several styles a client might use.
fn encode_value(value: &str, style: u8) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS, NON_ALPHANUMERIC};
    // What must be escaped in a query value: the pair separators, '+', '%', '#', and spaces.
    const MINIMAL: &AsciiSet = &CONTROLS
        .add(b' ')
        .add(b'%')
        .add(b'&')
        .add(b'=')
        .add(b'+')
        .add(b'#');
    match style % 4 {
        // Every byte escaped, upper-case hex.
        0 => value.bytes().map(|b| format!("%{b:02X}")).collect(),
        // Every byte escaped, lower-case hex.
        1 => value.bytes().map(|b| format!("%{b:02x}")).collect(),
        // Only what must be escaped; multi-byte UTF-8 left raw.
        2 => utf8_percent_encode(value, MINIMAL).to_string(),
        // Form style: spaces as '+', everything else non-alphanumeric escaped.
        _ => value
            .split(' ')
            .map(|part| utf8_percent_encode(part, NON_ALPHANUMERIC).to_string())
            .collect::<Vec<_>>()
            .join("+"),
    }
}

/// A valid query as (raw pairs, the `ListQuery` it must parse to). Names appear at most once.
fn valid_query() -> impl Strategy<Value = (Vec<String>, ListQuery)> {
    (
        prop::option::of((1u8..=100, 0usize..=2)),
        prop::option::of(any::<bool>()),
        prop::option::of((valid_value(), any::<u8>())),
        prop::option::of((valid_value(), any::<u8>())),
    )
        .prop_map(|(limit, order, after, project_id)| {
            let mut pairs = Vec::new();
            let mut expected = ListQuery::default();
            if let Some((n, zeros)) = limit {
                let digits = n.to_string();
                let padded = format!("{}{digits}", "0".repeat(zeros.min(3 - digits.len())));
                pairs.push(format!("limit={padded}"));
                expected.limit = n;
            }
            if let Some(asc) = order {
                let (word, o) = if asc {
                    ("ascending", Order::Ascending)
                } else {
                    ("descending", Order::Descending)
                };
                pairs.push(format!("order={word}"));
                expected.order = o;
            }
            if let Some((v, style)) = after {
                pairs.push(format!("after={}", encode_value(&v, style)));
                expected.after = Some(v.into());
            }
            if let Some((v, style)) = project_id {
                pairs.push(format!("project_id={}", encode_value(&v, style)));
                expected.project_id = Some(v.into());
            }
            (pairs, expected)
        })
}

/// Joins pairs with '&', sprinkling the empty pieces every client library tolerates.
fn join_pairs(pairs: &[String], empties: &[bool]) -> String {
    let mut q = String::new();
    for (i, p) in pairs.iter().enumerate() {
        if empties.get(i).copied().unwrap_or(false) {
            q.push('&');
        }
        if !q.is_empty() {
            q.push('&');
        }
        q.push_str(p);
    }
    if empties.last().copied().unwrap_or(false) {
        q.push('&');
    }
    q
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// No input panics any parser; routing only ever says 404/405; every parse error is a
    /// bounded 400; whatever validates obeys the SPEC and forwards as a safe URI.
    #[test]
    fn parsers_never_panic(
        method in method_strategy(),
        path in path_strategy(),
        query in prop::option::of(any_string()),
    ) {
        if let Err(e) = Checkpoint::parse(&path) {
            assert_parse_error(&e);
        }
        match route::match_route(&method, &path) {
            Ok(m) => {
                prop_assert!(path.starts_with(PREFIX));
                let expected_method = match m.operation {
                    route::Operation::List => Method::GET,
                    route::Operation::Create => Method::POST,
                    route::Operation::Delete => Method::DELETE,
                };
                prop_assert_eq!(&method, &expected_method);
                match m.checkpoint() {
                    Ok(cp) => assert_checkpoint_invariants(&cp),
                    Err(e) => assert_parse_error(&e),
                }
                match m.permission_id() {
                    Ok(Some(id)) => {
                        prop_assert_eq!(m.operation, route::Operation::Delete);
                        prop_assert!(!id.is_empty() && id.len() <= 128);
                        prop_assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
                    }
                    Ok(None) => prop_assert_ne!(m.operation, route::Operation::Delete),
                    Err(e) => assert_parse_error(&e),
                }
            }
            Err(e) => prop_assert!(
                matches!(e, Error::NotFound | Error::MethodNotAllowed { .. }),
                "routing failed with {:?}", e
            ),
        }
        match ListQuery::parse(query.as_deref()) {
            Ok(q) => assert_canonical_fixed_point(&q),
            Err(e) => assert_parse_error(&e),
        }
        match route::reject_query(query.as_deref()) {
            Ok(()) => prop_assert!(
                query.as_deref().unwrap_or("").split('&').all(str::is_empty),
                "reject_query accepted {:?}", query
            ),
            Err(e) => assert_parse_error(&e),
        }
    }

    /// The query parser is total over raw bytes too (lossy-decoded, as a path would be).
    #[test]
    fn query_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let q = String::from_utf8_lossy(&bytes);
        match ListQuery::parse(Some(&q)) {
            Ok(parsed) => assert_canonical_fixed_point(&parsed),
            Err(e) => assert_parse_error(&e),
        }
    }

    /// Normalization is idempotent, and a valid query decodes to exactly what was encoded,
    /// whatever the client's escaping style.
    #[test]
    fn normalization_is_idempotent(
        (pairs, expected) in valid_query(),
        empties in prop::collection::vec(any::<bool>(), 0..6),
    ) {
        let raw = join_pairs(&pairs, &empties);
        let parsed = ListQuery::parse(Some(&raw))
            .map_err(|e| TestCaseError::fail(format!("{raw:?} rejected: {e:?}")))?;
        prop_assert_eq!(&parsed, &expected, "raw {:?}", raw);
        assert_canonical_fixed_point(&parsed);
        // Defaults are explicit in the canonical form, so omitted == default-valued.
        let c = canonical(&parsed);
        let explicit_limit = format!("limit={}&order=", parsed.limit);
        prop_assert!(c.starts_with(&explicit_limit), "{}", c);
    }

    /// Parameter order does not matter: a shuffled permutation of the same valid pairs gives
    /// the same `ListQuery` and the same canonical string (so the same cache entry).
    #[test]
    fn normalization_is_order_independent(
        ((pairs, expected), shuffled) in valid_query().prop_flat_map(|(pairs, expected)| {
            let shuffled = Just(pairs.clone()).prop_shuffle();
            ((Just(pairs), Just(expected)), shuffled)
        }),
        empties in prop::collection::vec(any::<bool>(), 0..6),
    ) {
        let a = ListQuery::parse(Some(&join_pairs(&pairs, &[]))).expect("valid");
        let b = ListQuery::parse(Some(&join_pairs(&shuffled, &empties))).expect("valid");
        prop_assert_eq!(&a, &expected);
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(canonical(&a), canonical(&b));
    }

    /// A repeated parameter is a 400 naming it, wherever the repetition sits.
    #[test]
    fn repeated_parameters_are_rejected_in_any_order(
        (pairs, _) in valid_query().prop_filter("at least one pair", |(p, _)| !p.is_empty()),
        pick in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
    ) {
        let mut pairs = pairs;
        let dup = pairs[pick.index(pairs.len())].clone();
        let name = dup.split('=').next().unwrap().to_string();
        pairs.insert(at.index(pairs.len() + 1), dup);
        match ListQuery::parse(Some(&pairs.join("&"))) {
            Err(Error::InvalidParameter { param, .. }) => prop_assert_eq!(param.as_ref(), name.as_str()),
            other => prop_assert!(false, "expected a 400 naming {}, got {:?}", name, other),
        }
    }

    /// Raw and percent-encoded spellings of a checkpoint are the same checkpoint.
    #[test]
    fn checkpoint_spellings_agree(cp in valid_value(), style in any::<u8>()) {
        let spelled = encode_value(&cp, style).replace('+', "%20");
        match (Checkpoint::parse(&spelled), Checkpoint::parse(&encode_value(&cp, 0))) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(&a, &b);
                prop_assert_eq!(a.as_str(), cp.as_str());
                assert_checkpoint_invariants(&a);
            }
            (Err(a), Err(b)) => {
                assert_parse_error(&a);
                assert_parse_error(&b);
                // A dot segment (`.`, `..`) is never a checkpoint (SPEC "Hygiene rules").
                prop_assert!(cp == "." || cp.contains('/') || cp.contains("..") || cp.chars().any(char::is_whitespace));
            }
            (a, b) => prop_assert!(false, "spellings disagree: {:?} vs {:?}", a, b),
        }
    }
}

#[test]
fn default_query_is_the_empty_query() {
    let empty = ListQuery::parse(None).unwrap();
    assert_eq!(empty, ListQuery::parse(Some("")).unwrap());
    assert_eq!(empty, ListQuery::parse(Some("&&&")).unwrap());
    assert_eq!(empty.limit, DEFAULT_LIMIT);
    assert_eq!(
        empty,
        ListQuery::parse(Some("order=descending&limit=10")).unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Part 2: raw bytes on the data listener.
// ---------------------------------------------------------------------------------------------

/// Hang guard for one raw exchange. The server's own header read timeout is 10 s.
const GUARD: Duration = Duration::from_secs(30);

/// A request that, if served, answers 404 locally and never reaches upstream; it closes the
/// connection, so reading to EOF terminates.
const CANARY: &str = "GET /canary HTTP/1.1\r\nHost: permgate.test\r\nConnection: close\r\n\r\n";

/// A smuggled request that, if ever served, reaches upstream (the mock would record it).
fn smuggled_get() -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: permgate.test\r\nAuthorization: Bearer {WRITER}\r\nConnection: close\r\n\r\n",
        list_path(CP)
    )
}

impl RawResponse {
    /// The answer to a head hyper's parser refused (400, or 431 / 414 when it is too large):
    /// permgate's JSON error with a request id, written by the framing guard in place of
    /// hyper's bodiless one, and the connection closed (permgate's handler never ran).
    fn assert_unparsed(&self, status: u16) {
        let code = match status {
            400 => "invalid_request",
            _ => "request_too_large",
        };
        assert_eq!(self.assert_from_permgate(status, code), None, "{self:?}");
        assert_eq!(self.header("connection"), Some("close"), "{self:?}");
    }

    /// The front door's refusal of ambiguous framing (SPEC "The front door"): permgate's 400
    /// naming `transfer-encoding`, and the connection closed right after it.
    fn assert_framing_refused(&self) {
        let param = self.assert_from_permgate(400, "invalid_parameter");
        assert_eq!(param.as_deref(), Some("transfer-encoding"), "{self:?}");
        assert_eq!(self.header("connection"), Some("close"), "{self:?}");
    }

    /// An error made by permgate's handler: request id and OpenAI-shaped JSON.
    fn assert_from_permgate(&self, status: u16, code: &str) -> Option<String> {
        assert_eq!(
            self.status,
            status,
            "{self:?} {}",
            String::from_utf8_lossy(&self.body)
        );
        assert!(self.header("x-request-id").is_some(), "{self:?}");
        let v: serde_json::Value = serde_json::from_slice(&self.body).expect("JSON error body");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string());
        v["error"]["param"].as_str().map(str::to_owned)
    }
}

/// What came back on one raw connection.
#[derive(Debug)]
struct Exchange {
    bytes: Vec<u8>,
    /// `None`: clean EOF. `Some(kind)`: the read ended in an error (e.g. a reset).
    read_error: Option<ErrorKind>,
}

impl Exchange {
    /// Every HTTP/1.1 response in the stream (each must be length-delimited).
    fn responses(&self) -> Vec<RawResponse> {
        raw_responses(&self.bytes)
    }

    /// The one response, with the connection closed right after it.
    fn only_response(&self) -> RawResponse {
        let mut all = self.responses();
        assert_eq!(all.len(), 1, "expected exactly one response: {all:?}");
        all.pop().unwrap()
    }
}

/// [`raw_exchange`], kept whole.
async fn exchange(addr: SocketAddr, bytes: impl Into<Vec<u8>>) -> Exchange {
    let (bytes, read_error) = raw_exchange(addr, bytes).await;
    Exchange { bytes, read_error }
}

/// Writes `bytes`, half-closes, and reads until the server closes.
async fn exchange_then_eof(addr: SocketAddr, bytes: &[u8]) -> Exchange {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream.shutdown().await.unwrap();
    let (bytes, read_error) = read_to_close(&mut stream).await;
    Exchange { bytes, read_error }
}

fn assert_no_upstream(gw: &Gateway, what: &str) {
    let seen = gw.mock.requests();
    assert!(
        seen.is_empty(),
        "{what}: upstream saw {:?}",
        seen.iter()
            .map(|r| format!("{} {}", r.method, r.path_and_query))
            .collect::<Vec<_>>()
    );
}

/// After the hostile traffic, a normal authenticated GET is served from upstream as usual.
async fn assert_still_serves(gw: &Gateway) {
    let before = gw.upstream_gets();
    let r = gw.client.get(&list_path(CP2), READER).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.ids().len(), 3);
    assert_eq!(gw.upstream_gets(), before + 1);
}

/// A loopback listener standing in for an attacker-named host: nothing may ever connect to it.
struct Evil(std::net::TcpListener);

impl Evil {
    fn bind() -> Evil {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        Evil(l)
    }

    fn authority(&self) -> String {
        self.0.local_addr().unwrap().to_string()
    }

    /// No connection was ever made (a completed TCP handshake would be in the accept queue).
    fn assert_untouched(&self) {
        match self.0.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("something connected to the attacker-named host: {other:?}"),
        }
    }
}

/// CL.TE and TE.CL: refused before any handler runs (SPEC "The front door"; hyper alone would
/// let Transfer-Encoding win and serve it), and the connection closed, so bytes after it are
/// never read as a second request. The smuggled request is an authenticated GET that would
/// reach upstream if it were ever served.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_and_closes() {
    let gw = start().await;
    let cp = list_path(CP);
    let smuggled = smuggled_get();
    for (name, framing) in [
        (
            "CL then TE",
            "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "TE then CL",
            "Transfer-Encoding: chunked\r\nContent-Length: 6\r\n",
        ),
        (
            "CL then TE, CL covering the smuggled request",
            "Content-Length: 200\r\nTransfer-Encoding: chunked\r\n",
        ),
    ] {
        let req = format!(
            "POST {cp} HTTP/1.1\r\nHost: permgate.test\r\nAuthorization: Bearer {READER}\r\n\
             Content-Type: application/json\r\n{framing}\r\n0\r\n\r\n{smuggled}"
        );
        let ex = exchange(gw.addr, req).await;
        // Refused before authorization would have answered the reader 403.
        ex.only_response().assert_framing_refused();
        assert_eq!(ex.read_error, None, "{name}");
        assert_no_upstream(&gw, name);
    }
    assert_still_serves(&gw).await;
}

/// Content-Length values that disagree or are not a plain decimal: the front door answers 400
/// naming `content-length` and closes; identical duplicates are allowed (RFC 9110 8.6) and
/// reach permgate.
#[tokio::test]
async fn conflicting_or_malformed_content_length_is_refused() {
    let gw = start().await;
    let cp = list_path(CP);
    let smuggled = smuggled_get();
    for (name, framing) in [
        (
            "two different",
            "Content-Length: 2\r\nContent-Length: 3\r\n",
        ),
        ("a list", "Content-Length: 2, 3\r\n"),
        ("negative", "Content-Length: -1\r\n"),
        ("signed", "Content-Length: +2\r\n"),
        ("hex", "Content-Length: 0x2\r\n"),
        ("overflowing", "Content-Length: 99999999999999999999999\r\n"),
        ("empty", "Content-Length: \r\n"),
    ] {
        let req = format!(
            "POST {cp} HTTP/1.1\r\nHost: permgate.test\r\nAuthorization: Bearer {WRITER}\r\n\
             {framing}\r\n{{}}x{smuggled}"
        );
        let ex = exchange(gw.addr, req).await;
        let refused = ex.only_response();
        let param = refused.assert_from_permgate(400, "invalid_parameter");
        assert_eq!(param.as_deref(), Some("content-length"), "{name}");
        assert_eq!(refused.header("connection"), Some("close"), "{name}");
        assert_no_upstream(&gw, name);
    }
    // Identical duplicates: one length, one request, and the connection stays usable.
    let req = format!(
        "POST {cp} HTTP/1.1\r\nHost: permgate.test\r\nAuthorization: Bearer {READER}\r\n\
         Content-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}{CANARY}"
    );
    let responses = exchange(gw.addr, req).await.responses();
    assert_eq!(responses.len(), 2, "{responses:?}");
    responses[0].assert_from_permgate(403, "permission_denied");
    responses[1].assert_from_permgate(404, "not_found");
    assert_no_upstream(&gw, "identical duplicates");
    assert_still_serves(&gw).await;
}

/// Transfer-Encoding other than exactly `chunked`, or TE on HTTP/1.0: refused by permgate's
/// front door, which closes. A malformed `Transfer-Encoding` line (whitespace before the colon,
/// a control byte) makes the head malformed: hyper refuses it (400) and closes.
#[tokio::test]
async fn odd_transfer_encodings_are_refused() {
    let gw = start().await;
    let cp = list_path(CP);
    let smuggled = smuggled_get();
    for (name, version, framing, hyper) in [
        (
            "chunked, identity",
            "HTTP/1.1",
            "Transfer-Encoding: chunked, identity\r\n",
            false,
        ),
        (
            "xchunked",
            "HTTP/1.1",
            "Transfer-Encoding: xchunked\r\n",
            false,
        ),
        (
            "chunkedx",
            "HTTP/1.1",
            "Transfer-Encoding: chunkedx\r\n",
            false,
        ),
        (
            "identity",
            "HTTP/1.1",
            "Transfer-Encoding: identity\r\n",
            false,
        ),
        (
            "two lines, identity last",
            "HTTP/1.1",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            false,
        ),
        (
            "space before colon",
            "HTTP/1.1",
            "Transfer-Encoding : chunked\r\n",
            true,
        ),
        (
            "vertical tab",
            "HTTP/1.1",
            "Transfer-Encoding: \x0bchunked\r\n",
            true,
        ),
        (
            "on HTTP/1.0",
            "HTTP/1.0",
            "Transfer-Encoding: chunked\r\n",
            false,
        ),
    ] {
        let req = format!(
            "POST {cp} {version}\r\nHost: permgate.test\r\nAuthorization: Bearer {WRITER}\r\n\
             {framing}\r\n0\r\n\r\n{smuggled}"
        );
        let ex = exchange(gw.addr, req).await;
        if hyper {
            ex.only_response().assert_unparsed(400);
        } else {
            ex.only_response().assert_framing_refused();
        }
        assert_no_upstream(&gw, name);
    }
    assert_still_serves(&gw).await;
}

/// A Transfer-Encoding list that ends in `chunked` (which hyper alone would accept, handing the
/// handler a body still in the other coding) is refused at the front door (400 naming
/// `transfer-encoding`, connection closed). A Content-Encoding is framing-neutral, so it
/// reaches the handler, which refuses such a body (400 naming `body`) instead of reading it
/// as plain JSON. Either way nothing reaches upstream. (RFC 9112 6.1 suggests 501 for an
/// unknown transfer coding; a 400 is permgate's choice and equally safe.)
#[tokio::test]
async fn encoded_request_bodies_are_refused() {
    let gw = start().await;
    let cp = list_path(CP);
    let body = r#"{"project_ids": ["proj_gz"]}"#;
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    for (name, framing, payload) in [
        (
            "gzip, chunked",
            "Transfer-Encoding: gzip, chunked\r\n".to_string(),
            chunked.as_str(),
        ),
        (
            "deflate, chunked",
            "Transfer-Encoding: deflate, chunked\r\n".to_string(),
            chunked.as_str(),
        ),
        (
            "br, chunked",
            "Transfer-Encoding: br, chunked\r\n".to_string(),
            chunked.as_str(),
        ),
        (
            "two lines, gzip then chunked",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n".to_string(),
            chunked.as_str(),
        ),
        (
            "Content-Encoding: gzip",
            format!(
                "Content-Encoding: gzip\r\nContent-Length: {}\r\n",
                body.len()
            ),
            body,
        ),
        (
            "Content-Encoding: br, chunked body",
            "Content-Encoding: br\r\nTransfer-Encoding: chunked\r\n".to_string(),
            chunked.as_str(),
        ),
    ] {
        let req = format!(
            "POST {cp} HTTP/1.1\r\nHost: permgate.test\r\nAuthorization: Bearer {WRITER}\r\n\
             Content-Type: application/json\r\n{framing}\r\n{payload}{CANARY}"
        );
        let responses = exchange(gw.addr, req).await.responses();
        if framing.starts_with("Transfer-Encoding") {
            assert_eq!(responses.len(), 1, "{name}: {responses:?}");
            responses[0].assert_framing_refused();
            assert_no_upstream(&gw, name);
            continue;
        }
        let param = responses[0].assert_from_permgate(400, "invalid_parameter");
        assert_eq!(param.as_deref(), Some("body"), "{name}");
        // hyper may drain the unread body and answer the canary, or close: both are fine.
        if let Some(next) = responses.get(1) {
            next.assert_from_permgate(404, "not_found");
        }
        assert_no_upstream(&gw, name);
    }
    // The same body, plain: accepted (so the refusals above are about the coding alone).
    let r = gw.client.post(&cp, WRITER, body).await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.mock.count(&Method::POST), 1);
}

/// Absolute-form (RFC 9112 3.2.2): hyper accepts it and permgate routes on the path alone, so
/// it is served exactly like origin-form. What matters: nothing connects to the host named in
/// the URI, upstream gets the normal request for the configured base URL, and a path that is
/// not a SPEC route is still a local 404.
#[tokio::test]
async fn absolute_form_is_routed_by_path_to_the_configured_upstream_only() {
    let gw = start().await;
    let evil = Evil::bind();
    let cp = list_path(CP);
    let target_host = evil.authority();
    let forms = [
        format!("http://{target_host}{cp}"),
        format!("http://user:pass@{target_host}{cp}?limit=3"),
        format!("https://{target_host}{cp}?order=ascending"),
    ];
    for uri in &forms {
        let req = format!(
            "GET {uri} HTTP/1.1\r\nHost: {target_host}\r\nAuthorization: Bearer {READER}\r\n\
             Connection: close\r\n\r\n"
        );
        let r = exchange(gw.addr, req).await.only_response();
        assert_eq!(r.status, 200, "{uri}: {r:?}");
        assert!(r.header("x-request-id").is_some());
    }
    evil.assert_untouched();
    let seen = gw.mock.requests();
    let paths: Vec<&str> = seen.iter().map(|r| r.path_and_query.as_str()).collect();
    assert_eq!(
        paths,
        [
            format!("{cp}?limit=10&order=descending"),
            format!("{cp}?limit=3&order=descending"),
            format!("{cp}?limit=10&order=ascending"),
        ]
    );
    for r in &seen {
        assert_eq!(r.method, Method::GET);
        let host = r.headers["host"].to_str().unwrap();
        assert_ne!(host, target_host, "the caller's host reached upstream");
        assert!(!host.contains("user") && !host.contains("pass"));
        let auth = r.headers["authorization"].to_str().unwrap();
        assert_eq!(auth, format!("Bearer {ADMIN_KEY}"));
    }

    // Absolute-form for anything but a SPEC route is a local 404 (a different mock request
    // count would mean permgate behaved as a proxy).
    for uri in [
        format!("http://{target_host}/v1/models"),
        format!("http://{target_host}"),
        format!("http://{target_host}/"),
    ] {
        let req = format!(
            "GET {uri} HTTP/1.1\r\nHost: {target_host}\r\nAuthorization: Bearer {WRITER}\r\n\
             Connection: close\r\n\r\n"
        );
        let r = exchange(gw.addr, req).await.only_response();
        r.assert_from_permgate(404, "not_found");
    }
    assert_eq!(gw.mock.requests().len(), 3);
    evil.assert_untouched();
    assert_still_serves(&gw).await;
}

/// Authority-form (CONNECT host:port) and asterisk-form (OPTIONS *): hyper hands them to the
/// handler, permgate answers 404 (405 for CONNECT on a real route path), no tunnel is opened
/// (the connection keeps speaking HTTP: the next request is answered) and nothing connects to
/// the named host.
#[tokio::test]
async fn authority_and_asterisk_forms_are_refused_without_tunnelling() {
    let gw = start().await;
    let evil = Evil::bind();
    let target = evil.authority();
    for (name, line, status, code) in [
        (
            "CONNECT authority",
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}"),
            404,
            "not_found",
        ),
        (
            "CONNECT evil.example:443",
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443".to_string(),
            404,
            "not_found",
        ),
        (
            "CONNECT route path",
            format!("CONNECT {} HTTP/1.1\r\nHost: permgate.test", list_path(CP)),
            405,
            "method_not_allowed",
        ),
        (
            "authority-form GET",
            format!("GET {target} HTTP/1.1\r\nHost: {target}"),
            404,
            "not_found",
        ),
        (
            "OPTIONS *",
            "OPTIONS * HTTP/1.1\r\nHost: permgate.test".to_string(),
            404,
            "not_found",
        ),
    ] {
        let req = format!("{line}\r\nAuthorization: Bearer {WRITER}\r\n\r\n{CANARY}");
        let responses = exchange(gw.addr, req).await.responses();
        assert_eq!(responses.len(), 2, "{name}: {responses:?}");
        responses[0].assert_from_permgate(status, code);
        responses[1].assert_from_permgate(404, "not_found");
        assert_no_upstream(&gw, name);
    }
    evil.assert_untouched();
    assert_still_serves(&gw).await;
}

/// Bytes that are not allowed in a request line: hyper's parser refuses them (400). Their
/// percent-encoded spellings reach permgate, which answers 400 naming `checkpoint`.
#[tokio::test]
async fn invalid_bytes_in_the_request_line_are_rejected() {
    let gw = start().await;
    let smuggled = smuggled_get();
    let raw_cases: [(&str, &[u8]); 8] = [
        (
            "invalid UTF-8",
            b"GET /v1/fine_tuning/checkpoints/\xff\xfe/permissions HTTP/1.1",
        ),
        (
            "lone continuation byte",
            b"GET /v1/fine_tuning/checkpoints/ft:\x80/permissions HTTP/1.1",
        ),
        (
            "raw NUL",
            b"GET /v1/fine_tuning/checkpoints/a\x00b/permissions HTTP/1.1",
        ),
        (
            "raw DEL",
            b"GET /v1/fine_tuning/checkpoints/a\x7fb/permissions HTTP/1.1",
        ),
        (
            "tab separator",
            b"GET\t/v1/fine_tuning/checkpoints/x/permissions HTTP/1.1",
        ),
        (
            "double space",
            b"GET  /v1/fine_tuning/checkpoints/x/permissions HTTP/1.1",
        ),
        (
            "bare CR",
            b"GET /v1/fine_tuning/checkpoints/x/permissions HTTP/1.1\rX: y",
        ),
        (
            "HTTP/2.0 in text",
            b"GET /v1/fine_tuning/checkpoints/x/permissions HTTP/2.0",
        ),
    ];
    for (name, line) in raw_cases {
        let mut req = line.to_vec();
        req.extend_from_slice(
            format!("\r\nHost: permgate.test\r\nAuthorization: Bearer {WRITER}\r\n\r\n{smuggled}")
                .as_bytes(),
        );
        let ex = exchange(gw.addr, req).await;
        ex.only_response().assert_unparsed(400);
        assert_no_upstream(&gw, name);
    }
    // A request line that is not a token: refused by hyper's parser too.
    let ex = exchange(
        gw.addr,
        format!("G(ET / HTTP/1.1\r\nHost: x\r\n\r\n{smuggled}"),
    )
    .await;
    ex.only_response().assert_unparsed(400);

    for encoded in [
        "%FF%FE", "ft%3A%80", "a%00b", "a%7Fb", "a%0D%0Ab", "%2E%2E", "a%2Fb",
    ] {
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: permgate.test\r\nAuthorization: Bearer {WRITER}\r\n\r\n{CANARY}",
            list_path(encoded)
        );
        let responses = exchange(gw.addr, req).await.responses();
        assert_eq!(responses.len(), 2, "{encoded}: {responses:?}");
        let param = responses[0].assert_from_permgate(400, "invalid_parameter");
        assert_eq!(param.as_deref(), Some("checkpoint"), "{encoded}");
    }
    assert_no_upstream(&gw, "percent-encoded hostile bytes");

    // Raw, valid multi-byte UTF-8 is accepted by hyper; permgate treats it as the checkpoint it
    // spells and forwards it percent-encoded (the mock does not know it: 404 passed through).
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: permgate.test\r\nAuthorization: Bearer {WRITER}\r\nConnection: close\r\n\r\n",
        list_path("ft:\u{e9}\u{20ac}")
    );
    let r = exchange(gw.addr, req).await.only_response();
    assert_eq!(r.status, 404);
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].path_and_query,
        format!(
            "{}?limit=10&order=descending",
            list_path("ft:%C3%A9%E2%82%AC")
        )
    );
    assert_still_serves(&gw).await;
}

/// Odd but syntactically valid methods are extension methods: permgate answers 405 on a route.
#[tokio::test]
async fn extension_methods_are_405_from_permgate() {
    let gw = start().await;
    let cp = list_path(CP);
    let long = "A".repeat(5000);
    for method in ["get", "Get", "PROPFIND", "X-!#$%&'*+.^_`|~", long.as_str()] {
        let req = format!(
            "{method} {cp} HTTP/1.1\r\nHost: permgate.test\r\nAuthorization: Bearer {WRITER}\r\n\r\n{CANARY}"
        );
        let responses = exchange(gw.addr, req).await.responses();
        assert_eq!(responses.len(), 2, "{responses:?}");
        responses[0].assert_from_permgate(405, "method_not_allowed");
        assert_eq!(responses[0].header("allow"), Some("GET, POST"));
    }
    assert_no_upstream(&gw, "extension methods");
    assert_still_serves(&gw).await;
}

/// Heads past the limits. hyper's HTTP/1 read buffer is capped at `server.max_header_bytes`
/// (default 32 KiB): a head that does not fit, whatever part of it is long (a header value, the
/// query, the path), is refused 431 `request_too_large` by the front door before hyper's buffer
/// fills, and the connection closed. (With a buffer larger than the request line hyper would
/// answer 414 for a request-target over 65534 bytes; with the 32 KiB default the buffer runs
/// out first.) More than 100 header fields is 431 too, refused by hyper's parser.
#[tokio::test]
async fn oversized_heads_are_431() {
    let gw = start().await;
    let cp = list_path(CP);
    let smuggled = smuggled_get();
    let kib100 = "a".repeat(100 * 1024);
    let mib1 = "a".repeat(1024 * 1024);
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let head = format!("Host: x\r\nAuthorization: Bearer {WRITER}\r\n");
    for (name, req) in [
        (
            "100 KiB header value",
            format!("GET {cp} HTTP/1.1\r\n{head}X-Junk: {kib100}\r\n\r\n{smuggled}"),
        ),
        (
            "100 KiB bearer token",
            format!(
                "GET {cp} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {kib100}\r\n\r\n{smuggled}"
            ),
        ),
        (
            "1 MiB header value",
            format!("GET {cp} HTTP/1.1\r\n{head}X-Junk: {mib1}\r\n\r\n{smuggled}"),
        ),
        (
            "100 KiB query",
            format!("GET {cp}?after={kib100} HTTP/1.1\r\n{head}\r\n{smuggled}"),
        ),
        (
            "100 KiB path",
            format!(
                "GET {} HTTP/1.1\r\n{head}\r\n{smuggled}",
                list_path(&kib100)
            ),
        ),
    ] {
        let ex = exchange(gw.addr, req).await;
        let refused = ex.only_response();
        assert_eq!(refused.assert_from_permgate(431, "request_too_large"), None);
        assert_eq!(refused.header("connection"), Some("close"), "{name}");
        assert_no_upstream(&gw, name);
    }
    let ex = exchange(
        gw.addr,
        format!("GET {cp} HTTP/1.1\r\n{head}{many}\r\n{smuggled}"),
    );
    ex.await.only_response().assert_unparsed(431);
    assert_no_upstream(&gw, "200 header fields");
    assert_still_serves(&gw).await;
}

/// Long heads that fit hyper's buffer reach permgate: a request-target over
/// `server.max_uri_bytes` (default 8 KiB) is permgate's 414 `request_too_large`, checked before
/// routing and authentication; under it, a 4 KiB bearer token is an unknown token (401) and a
/// 1 KiB `after` a 400 naming it, without echoing the value. The connection stays usable.
#[tokio::test]
async fn long_heads_within_the_buffer_get_permgate_errors() {
    let gw = start().await;
    let cp = list_path(CP);
    let kib20 = "a".repeat(20 * 1024);
    for (name, target) in [
        ("20 KiB query", format!("{cp}?after={kib20}")),
        ("20 KiB path", list_path(&kib20)),
        ("20 KiB unknown path", format!("/{kib20}")),
    ] {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRITER}\r\n\r\n{CANARY}"
        );
        let responses = exchange(gw.addr, req).await.responses();
        assert_eq!(responses.len(), 2, "{name}: {responses:?}");
        responses[0].assert_from_permgate(414, "request_too_large");
        assert!(responses[0].body.len() < 1024, "{name}: echoes the target");
        responses[1].assert_from_permgate(404, "not_found");
    }

    let token = "a".repeat(4 * 1024);
    let req =
        format!("GET {cp} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n{CANARY}");
    let responses = exchange(gw.addr, req).await.responses();
    assert_eq!(responses.len(), 2, "{responses:?}");
    responses[0].assert_from_permgate(401, "invalid_api_key");

    let after = "a".repeat(1024);
    let req = format!(
        "GET {cp}?after={after} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READER}\r\n\r\n{CANARY}"
    );
    let responses = exchange(gw.addr, req).await.responses();
    assert_eq!(responses.len(), 2, "{responses:?}");
    let param = responses[0].assert_from_permgate(400, "invalid_parameter");
    assert_eq!(param.as_deref(), Some("after"));
    assert!(responses[0].body.len() < 512, "echoes the value");
    assert_no_upstream(&gw, "long heads");
    assert_still_serves(&gw).await;
}

/// An insane `X-Request-Id` (4 KiB, or with characters outside the safe set) on a valid
/// request: served, but the id is replaced by a fresh one, and only that one is sent upstream
/// (SPEC: "the caller's, if it sent a sane one").
#[tokio::test]
async fn insane_request_ids_are_replaced_and_not_forwarded() {
    let gw = start().await;
    let long_id = "a".repeat(4 * 1024);
    for bad_id in [
        long_id.as_str(),
        "../../etc/passwd",
        "a b",
        "id;drop",
        "\u{e9}t\u{e9}",
    ] {
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READER}\r\nCache-Control: no-cache\r\n",
            list_path(CP)
        )
        .into_bytes();
        req.extend_from_slice(b"X-Request-Id: ");
        req.extend_from_slice(bad_id.as_bytes());
        req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let r = exchange(gw.addr, req).await.only_response();
        assert_eq!(r.status, 200, "{bad_id}");
        let id = r.header("x-request-id").unwrap().to_owned();
        assert!(id.starts_with("req_") && id.len() <= 64, "{id}");
        let seen = gw.mock.requests();
        let last = seen.last().expect("forwarded");
        assert_eq!(last.headers["x-client-request-id"], id.as_str());
        assert!(last.headers.get("x-request-id").is_none());
    }
    assert_eq!(gw.mock.requests().len(), 5);
}

/// Line endings: a bare LF as line terminator is tolerated by hyper (RFC 9112 2.2 allows a
/// recipient to), so such a request is an ordinary request to permgate. A bare LF inside the
/// head therefore starts a new header line: a Transfer-Encoding hidden behind one is seen as
/// Transfer-Encoding, and with a Content-Length the request is refused and the connection
/// closed (SPEC "The front door").
/// Obsolete line folding and whitespace before the colon are rejected by hyper (400).
#[tokio::test]
async fn bare_lf_and_obs_fold() {
    let gw = start().await;
    let cp = list_path(CP);
    let smuggled = smuggled_get();

    let req = format!("GET {cp} HTTP/1.1\nHost: x\nAuthorization: Bearer {NOBODY}\n\n{CANARY}");
    let responses = exchange(gw.addr, req).await.responses();
    assert_eq!(responses.len(), 2, "{responses:?}");
    responses[0].assert_from_permgate(403, "permission_denied");
    responses[1].assert_from_permgate(404, "not_found");

    let req = format!(
        "POST {cp} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READER}\r\nX-A: a\n\
         Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n{smuggled}"
    );
    exchange(gw.addr, req)
        .await
        .only_response()
        .assert_framing_refused();

    for (name, header) in [
        ("obs-fold with space", "X-A: a\r\n b\r\n"),
        ("obs-fold with tab", "X-A: a\r\n\tb\r\n"),
        (
            "folded authorization",
            &format!("Authorization: Bearer\r\n {WRITER}\r\n"),
        ),
        ("space before colon", "Authorization : Bearer x\r\n"),
        ("control byte in value", "X-A: a\x01b\r\n"),
        ("NUL in value", "X-A: a\x00b\r\n"),
        ("separator in name", "X(A): b\r\n"),
    ] {
        let req = format!(
            "GET {cp} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRITER}\r\n{header}\r\n{smuggled}"
        );
        let ex = exchange(gw.addr, req).await;
        ex.only_response().assert_unparsed(400);
        assert_no_upstream(&gw, name);
    }
    assert_no_upstream(&gw, "line endings");
    assert_still_serves(&gw).await;
}

/// Messages cut short by the client. A head that never completes is dropped without an answer:
/// there is no request to answer, the client already closed its side, and hyper's only
/// alternative would be to invent a status for bytes it never saw in full (acceptable, and what
/// RFC 9112 9.6 leaves to the server). A body that ends early, or a broken chunked body, is a
/// 400 from permgate naming `body`; nothing reaches upstream.
#[tokio::test]
async fn truncated_or_broken_messages_never_reach_upstream() {
    let gw = start().await;
    let cp = list_path(CP);

    let head_only = format!("GET {cp} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READER}\r\n");
    let ex = exchange_then_eof(gw.addr, head_only.as_bytes()).await;
    assert!(ex.bytes.is_empty(), "{ex:?}");
    assert_eq!(ex.read_error, None, "closed cleanly");

    for (name, framing, body) in [
        (
            "short Content-Length body",
            "Content-Length: 100\r\n",
            "{\"pro",
        ),
        (
            "short chunked body",
            "Transfer-Encoding: chunked\r\n",
            "64\r\n{\"pro",
        ),
        (
            "chunk size overflow",
            "Transfer-Encoding: chunked\r\n",
            "ffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
        ),
        (
            "chunk size not hex",
            "Transfer-Encoding: chunked\r\n",
            "zz\r\n{}\r\n0\r\n\r\n",
        ),
    ] {
        let req = format!(
            "POST {cp} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRITER}\r\n\
             Content-Type: application/json\r\n{framing}\r\n{body}"
        );
        let ex = exchange_then_eof(gw.addr, req.as_bytes()).await;
        let param = ex
            .only_response()
            .assert_from_permgate(400, "invalid_parameter");
        assert_eq!(param.as_deref(), Some("body"), "{name}");
        assert_no_upstream(&gw, name);
    }
    assert_still_serves(&gw).await;
}

/// Garbage after the HTTP/2 connection preface: the connection is closed with HTTP/2 frames
/// (SETTINGS, then GOAWAY) and no HTTP/1 response. That is acceptable: the client chose HTTP/2
/// with prior knowledge, and GOAWAY is HTTP/2's way to refuse a broken connection.
#[tokio::test]
async fn http2_garbage_after_the_preface_gets_goaway() {
    let gw = start().await;
    let ex = exchange(
        gw.addr,
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nthis is not an HTTP/2 frame, not at all"[..],
    )
    .await;
    assert!(!ex.bytes.starts_with(b"HTTP/1"), "{ex:?}");
    let mut frame_types = Vec::new();
    let mut rest = &ex.bytes[..];
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        frame_types.push(rest[3]);
        rest = &rest[(9 + len).min(rest.len())..];
    }
    assert!(frame_types.contains(&0x4), "SETTINGS: {frame_types:?}");
    assert!(frame_types.contains(&0x7), "GOAWAY: {frame_types:?}");
    assert_no_upstream(&gw, "h2 garbage");
    assert_still_serves(&gw).await;
}

/// HTTP/2 (h2c prior knowledge) carries the target as `:scheme`/`:authority`/`:path`; an
/// attacker-chosen authority changes nothing: routing is by path, upstream is the configured
/// one, and other paths are local 404s.
#[tokio::test]
async fn http2_foreign_authority_only_reaches_the_configured_upstream() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let gw = start().await;
    let evil = Evil::bind();
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut send = |path: String, token: &str| {
        let req = hyper::Request::get(format!("http://{}{path}", evil.authority()))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let fut = sender.send_request(req);
        async move {
            let resp = tokio::time::timeout(GUARD, fut).await.unwrap().unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }
    };
    let (status, _) = send(list_path(CP), READER).await;
    assert_eq!(status, 200);
    let (status, body) = send("/v1/models".into(), WRITER).await;
    assert_eq!(status, 404, "{body:?}");
    let (status, _) = send(format!("{}/cp_x", list_path(CP)), READER).await;
    assert_eq!(status, 405);
    evil.assert_untouched();
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].path_and_query,
        format!("{}?limit=10&order=descending", list_path(CP))
    );
    assert_ne!(seen[0].headers["host"], evil.authority().as_str());
}

/// A connection that never sends a complete request must not be held forever. hyper's HTTP/1
/// header timer only starts once hyper-util has sniffed the protocol (up to 24 bytes, looking for
/// the HTTP/2 preface, with no timeout of its own), and an HTTP/2 connection that opens no stream
/// is only bounded by its keep-alive pings; permgate's first-request deadline
/// (`server.header_read_timeout_ms`) covers all three: a silent socket, a prefix of the preface
/// (`PRI * HTT`), and the full preface with nothing after it. Each holds a
/// `server.max_connections` slot while open, so leaving them open would let a few idle sockets
/// starve the listener (slowloris).
#[tokio::test]
async fn idle_connections_without_a_request_are_closed() {
    let gw = start_with(|c| {
        *c = c.replacen(
            "drain_timeout_ms = 5000",
            "drain_timeout_ms = 5000\nheader_read_timeout_ms = 300",
            1,
        )
    })
    .await;
    let addr = gw.addr;
    let idle = |bytes: &'static [u8]| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(GUARD, stream.read_to_end(&mut buf)).await;
        (String::from_utf8_lossy(bytes).into_owned(), read.is_ok())
    };
    let results = tokio::join!(
        idle(b""),
        idle(b"PRI * HTT"),
        idle(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    );
    let still_open: Vec<String> = [results.0, results.1, results.2]
        .into_iter()
        .filter(|(_, closed)| !closed)
        .map(|(sent, _)| sent)
        .collect();
    assert!(
        still_open.is_empty(),
        "still open after {GUARD:?}, having sent: {still_open:?}"
    );
    assert_no_upstream(&gw, "idle connections");
    assert_still_serves(&gw).await;
}
