//! Method + path + query (+ a create's body) → what the caller asked for, as a typed [`Call`]
//! (SPEC "Routes served to callers").
//!
//! Pure: no I/O, no hyper bodies. Matching is structural and happens before authentication
//! (unknown routes are 404/405 for everyone); decoding and validating the checkpoint, the
//! permission id and the query happen after it, so an unauthenticated caller learns nothing
//! about which inputs are valid. The normalized [`ListQuery`] is both the cache key's query
//! part and what is forwarded upstream, so equivalent queries share one entry by construction.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

use hyper::Method;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::error::Error;

const PREFIX: &str = "/v1/fine_tuning/checkpoints/";
const MAX_CHECKPOINT_BYTES: usize = 256;
const MAX_PERMISSION_ID_BYTES: usize = 128;
const MAX_VALUE_BYTES: usize = 256;
const MAX_PROJECT_ID_BYTES: usize = 256;
pub const DEFAULT_LIMIT: u8 = 10;
pub const MAX_LIMIT: u8 = 100;

/// What is percent-encoded when a decoded value is forwarded: everything but RFC 3986's
/// unreserved characters and `:` (checkpoint ids are full of colons, which paths allow).
const FORWARD: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':');

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    List,
    Create,
    Delete,
}

impl Operation {
    /// The route name used in spans, logs and the audit trail.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::List => "list_permissions",
            Operation::Create => "create_permission",
            Operation::Delete => "delete_permission",
        }
    }
}

/// A matched route whose path segments are still raw (not yet decoded or validated).
#[derive(Debug, PartialEq, Eq)]
pub struct Matched<'a> {
    pub operation: Operation,
    raw_checkpoint: &'a str,
    raw_permission_id: Option<&'a str>,
}

/// Structural routing: 404 for paths permgate does not serve, 405 for other methods.
pub fn match_route<'a>(method: &Method, path: &'a str) -> Result<Matched<'a>, Error> {
    let rest = path.strip_prefix(PREFIX).ok_or(Error::NotFound)?;
    let mut segments = rest.split('/');
    let raw_checkpoint = segments.next().ok_or(Error::NotFound)?;
    if segments.next() != Some("permissions") {
        return Err(Error::NotFound);
    }
    match (segments.next(), segments.next()) {
        (None, _) => {
            let operation = match *method {
                Method::GET => Operation::List,
                Method::POST => Operation::Create,
                _ => return Err(Error::MethodNotAllowed { allow: "GET, POST" }),
            };
            Ok(Matched {
                operation,
                raw_checkpoint,
                raw_permission_id: None,
            })
        }
        (Some(id), None) if !id.is_empty() => {
            if *method != Method::DELETE {
                return Err(Error::MethodNotAllowed { allow: "DELETE" });
            }
            Ok(Matched {
                operation: Operation::Delete,
                raw_checkpoint,
                raw_permission_id: Some(id),
            })
        }
        _ => Err(Error::NotFound),
    }
}

/// What an authenticated caller asked for, with its path and query inputs validated. A
/// create's body is read and checked after authorization ([`CreateBody::parse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    List(ListQuery),
    Create,
    Delete(Box<str>),
}

impl Call {
    /// Create and delete change upstream state: they need `can_write`.
    pub fn is_write(&self) -> bool {
        !matches!(self, Call::List(_))
    }
}

impl Matched<'_> {
    /// Validates the query (and a delete's permission id): a list's query is normalized, create
    /// and delete take none. Call after [`Matched::checkpoint`].
    pub fn call(&self, query: Option<&str>) -> Result<Call, Error> {
        match self.operation {
            Operation::List => ListQuery::parse(query).map(Call::List),
            Operation::Create => reject_query(query).map(|()| Call::Create),
            Operation::Delete => {
                reject_query(query)?;
                let id = self.permission_id()?.ok_or(Error::NotFound)?;
                Ok(Call::Delete(id))
            }
        }
    }

    /// Decodes and validates `{checkpoint}`.
    pub fn checkpoint(&self) -> Result<Checkpoint, Error> {
        Checkpoint::parse(self.raw_checkpoint)
    }

    /// Decodes and validates `{permission_id}` (DELETE only).
    pub fn permission_id(&self) -> Result<Option<Box<str>>, Error> {
        let Some(raw) = self.raw_permission_id else {
            return Ok(None);
        };
        let id = decode("permission_id", raw)?;
        let sane = !id.is_empty()
            && id.len() <= MAX_PERMISSION_ID_BYTES
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !sane {
            return Err(Error::invalid(
                "permission_id",
                "permission_id must be 1 to 128 characters of letters, digits, '_' or '-'.",
            ));
        }
        Ok(Some(id.into()))
    }
}

/// A decoded, validated checkpoint id. Cheap to clone (shared).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Checkpoint(Arc<str>);

impl Checkpoint {
    pub fn parse(raw: &str) -> Result<Self, Error> {
        // The usual id is printable ASCII with nothing encoded: one pass over the bytes decides
        // (the same rules as below, for that alphabet).
        let plain = !raw.is_empty()
            && raw.len() <= MAX_CHECKPOINT_BYTES
            && raw
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'%' && b != b'/')
            && !raw.contains("..")
            && raw != ".";
        if plain {
            return Ok(Checkpoint(Arc::from(raw)));
        }
        let decoded = decode("checkpoint", raw)?;
        let problem = if decoded.is_empty() {
            Some("The checkpoint id is empty.")
        } else if decoded.len() > MAX_CHECKPOINT_BYTES {
            Some("The checkpoint id is longer than 256 bytes.")
        } else if decoded.contains('/') || decoded.contains("..") {
            Some("The checkpoint id may not contain '/' or '..'.")
        } else if decoded == "." {
            // A dot segment: any normalising hop would turn the path into another route.
            Some("The checkpoint id may not be '.'.")
        } else if decoded.chars().any(|c| c.is_control() || c.is_whitespace()) {
            Some("The checkpoint id may not contain whitespace or control characters.")
        } else {
            None
        };
        match problem {
            Some(message) => Err(Error::invalid("checkpoint", message)),
            None => Ok(Checkpoint(Arc::from(decoded.as_ref()))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Appends the id as one percent-encoded path segment.
    pub fn write_encoded(&self, out: &mut String) {
        out.extend(utf8_percent_encode(&self.0, FORWARD));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Order {
    Ascending,
    Descending,
}

impl Order {
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Ascending => "ascending",
            Order::Descending => "descending",
        }
    }
}

/// The normalized query of a list request: defaults applied, parameter order irrelevant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListQuery {
    pub limit: u8,
    pub order: Order,
    pub after: Option<Box<str>>,
    pub project_id: Option<Box<str>>,
}

impl Default for ListQuery {
    fn default() -> Self {
        ListQuery {
            limit: DEFAULT_LIMIT,
            order: Order::Descending,
            after: None,
            project_id: None,
        }
    }
}

impl ListQuery {
    /// Parses the raw query string of a list request. Unknown, repeated, empty or malformed
    /// parameters are a 400 naming the parameter.
    pub fn parse(query: Option<&str>) -> Result<Self, Error> {
        let mut out = ListQuery::default();
        let (mut seen_limit, mut seen_order) = (false, false);
        for pair in pairs(query) {
            let (name, value) = pair?;
            match name.as_ref() {
                "limit" => {
                    once(&mut seen_limit, "limit")?;
                    out.limit = parse_limit(&value)?;
                }
                "order" => {
                    once(&mut seen_order, "order")?;
                    out.order = match value.as_ref() {
                        "ascending" => Order::Ascending,
                        "descending" => Order::Descending,
                        _ => {
                            return Err(Error::invalid(
                                "order",
                                "order must be 'ascending' or 'descending'.",
                            ))
                        }
                    };
                }
                "after" => set_value(&mut out.after, "after", value)?,
                "project_id" => set_value(&mut out.project_id, "project_id", value)?,
                _ => return Err(unknown(&name)),
            }
        }
        Ok(out)
    }

    /// Appends the canonical query string (fixed order, defaults explicit, values encoded).
    pub fn write_canonical(&self, out: &mut String) {
        let _ = write!(out, "limit={}&order={}", self.limit, self.order.as_str());
        for (name, value) in [("after", &self.after), ("project_id", &self.project_id)] {
            if let Some(value) = value {
                out.push('&');
                out.push_str(name);
                out.push('=');
                out.extend(utf8_percent_encode(value, FORWARD));
            }
        }
    }

    /// The approximate heap size of the owned strings, for the cache weigher.
    pub fn heap_bytes(&self) -> usize {
        self.after.as_deref().map_or(0, str::len) + self.project_id.as_deref().map_or(0, str::len)
    }
}

/// Rejects any query parameter: create and delete take none.
pub fn reject_query(query: Option<&str>) -> Result<(), Error> {
    match pairs(query).next() {
        Some(Ok((name, _))) => Err(unknown(&name)),
        Some(Err(e)) => Err(e),
        None => Ok(()),
    }
}

/// A create's body, validated against upstream's schema: `{"project_ids": ["proj_...", ...]}`
/// and no other field, and `project_ids` once: with two, which one counts would depend on the
/// JSON reader, as with an ambiguous framing at the front door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateBody {
    pub project_ids: Vec<String>,
}

impl CreateBody {
    pub fn parse(body: &[u8]) -> Result<CreateBody, Error> {
        let shape = "The body must be JSON like {\"project_ids\": [\"proj_abc\"]}.";
        let members: Members =
            serde_json::from_slice(body).map_err(|_| Error::invalid("body", shape))?;
        if members.unknown {
            return Err(Error::invalid(
                "body",
                "Unknown field in the body; only project_ids is accepted.",
            ));
        }
        if members.repeated {
            return Err(Error::invalid(
                "project_ids",
                "project_ids appears more than once in the body; send it once.",
            ));
        }
        let ids = members
            .project_ids
            .as_ref()
            .ok_or_else(|| Error::invalid("project_ids", "project_ids is required."))?
            .as_array()
            .filter(|ids| !ids.is_empty())
            .ok_or_else(|| {
                Error::invalid(
                    "project_ids",
                    "project_ids must be a non-empty array of strings.",
                )
            })?;
        let project_ids = ids
            .iter()
            .map(|id| match id.as_str() {
                Some(s)
                    if !s.is_empty()
                        && s.len() <= MAX_PROJECT_ID_BYTES
                        && !s.chars().any(char::is_control) =>
                {
                    Ok(s.to_owned())
                }
                _ => Err(Error::invalid(
                    "project_ids",
                    "Each project id must be a non-empty string of at most 256 bytes.",
                )),
            })
            .collect::<Result<_, _>>()?;
        Ok(CreateBody { project_ids })
    }

    /// The body forwarded upstream: re-serialized, so only what was validated is sent.
    pub fn forwarded(&self) -> bytes::Bytes {
        serde_json::json!({ "project_ids": self.project_ids })
            .to_string()
            .into()
    }
}

/// A create body's members as they were written: `serde_json::Value` keeps only the last of
/// two members of one name, so the object is read member by member.
struct Members {
    project_ids: Option<serde_json::Value>,
    /// A member other than `project_ids`.
    unknown: bool,
    /// `project_ids` more than once.
    repeated: bool,
}

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = Members;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut members = Members {
                    project_ids: None,
                    unknown: false,
                    repeated: false,
                };
                while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                    if name != "project_ids" {
                        members.unknown = true;
                        map.next_value::<serde::de::IgnoredAny>()?;
                    } else if members.project_ids.is_some() {
                        members.repeated = true;
                        map.next_value::<serde::de::IgnoredAny>()?;
                    } else {
                        members.project_ids = Some(map.next_value()?);
                    }
                }
                Ok(members)
            }
        }
        deserializer.deserialize_map(Object)
    }
}

type Pair<'a> = (Cow<'a, str>, Cow<'a, str>);

/// Splits and decodes `name=value` pairs. Empty pieces (`a=1&&b=2`, a trailing `&`) are
/// skipped, as every HTTP client library tolerates them; a piece without `=` is malformed.
fn pairs(query: Option<&str>) -> impl Iterator<Item = Result<Pair<'_>, Error>> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|piece| {
            let (raw_name, raw_value) = piece.split_once('=').unwrap_or((piece, ""));
            let name = decode_form("query", raw_name)?;
            if name.is_empty() {
                return Err(Error::invalid("query", "A query parameter has no name."));
            }
            let param = param_name(&name);
            if !piece.contains('=') {
                return Err(Error::invalid(param, "A query parameter has no value."));
            }
            let value = decode_form(param, raw_value)?;
            Ok((name, value))
        })
}

fn once(seen: &mut bool, name: &'static str) -> Result<(), Error> {
    if std::mem::replace(seen, true) {
        return Err(repeated(name));
    }
    Ok(())
}

fn repeated(name: &'static str) -> Error {
    Error::invalid(name, "This query parameter may appear only once.")
}

fn unknown(name: &str) -> Error {
    Error::invalid(
        param_name(name),
        "Unknown query parameter. Supported: project_id, after, limit, order.",
    )
}

/// A caller-supplied parameter name, bounded so an error never echoes a huge string.
fn param_name(name: &str) -> Cow<'static, str> {
    match name {
        "limit" => "limit".into(),
        "order" => "order".into(),
        "after" => "after".into(),
        "project_id" => "project_id".into(),
        other => {
            let end = (0..=other.len().min(64))
                .rev()
                .find(|&i| other.is_char_boundary(i))
                .unwrap_or(0);
            Cow::Owned(other[..end].to_owned())
        }
    }
}

fn parse_limit(value: &str) -> Result<u8, Error> {
    let bad = || Error::invalid("limit", "limit must be an integer from 1 to 100.");
    if value.is_empty() || value.len() > 3 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match value.parse::<u8>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(bad()),
    }
}

fn set_value(
    slot: &mut Option<Box<str>>,
    name: &'static str,
    value: Cow<'_, str>,
) -> Result<(), Error> {
    if slot.is_some() {
        return Err(repeated(name));
    }
    if value.is_empty() || value.len() > MAX_VALUE_BYTES || value.chars().any(char::is_control) {
        return Err(Error::invalid(
            name,
            "The value must be 1 to 256 bytes without control characters.",
        ));
    }
    *slot = Some(value.into());
    Ok(())
}

/// Query strings are form-encoded: `+` is a space.
fn decode_form<'a>(
    param: impl Into<Cow<'static, str>>,
    raw: &'a str,
) -> Result<Cow<'a, str>, Error> {
    if raw.contains('+') {
        decode(param, &raw.replace('+', " ")).map(|s| Cow::Owned(s.into_owned()))
    } else {
        decode(param, raw)
    }
}

/// Strict percent-decoding: every `%` starts a two-hex-digit escape, and the result is UTF-8.
fn decode<'a>(param: impl Into<Cow<'static, str>>, raw: &'a str) -> Result<Cow<'a, str>, Error> {
    let bytes = raw.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || (bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return Err(Error::invalid(param, "Malformed percent-encoding."));
    }
    percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| Error::invalid(param, "The value is not valid UTF-8 once decoded."))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CP: &str = "ft:gpt-4o-mini-2024-07-18:org:weather:B7R9VjQd";

    fn param_of(err: Error) -> String {
        match err {
            Error::InvalidParameter { param, .. } => param.into_owned(),
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn routes_match_structurally() {
        let p = format!("/v1/fine_tuning/checkpoints/{CP}/permissions");
        assert_eq!(
            match_route(&Method::GET, &p).unwrap().operation,
            Operation::List
        );
        assert_eq!(
            match_route(&Method::POST, &p).unwrap().operation,
            Operation::Create
        );
        assert_eq!(
            match_route(&Method::PUT, &p),
            Err(Error::MethodNotAllowed { allow: "GET, POST" })
        );
        let d = format!("{p}/cp_abc");
        assert_eq!(
            match_route(&Method::DELETE, &d).unwrap().operation,
            Operation::Delete
        );
        assert_eq!(
            match_route(&Method::GET, &d),
            Err(Error::MethodNotAllowed { allow: "DELETE" })
        );
        for path in [
            "/",
            "/v1/models",
            "/v1/fine_tuning/checkpoints",
            "/v1/fine_tuning/checkpoints/x",
            "/v1/fine_tuning/checkpoints/x/permission",
            "/v1/fine_tuning/checkpoints/x/permissions/",
            "/v1/fine_tuning/checkpoints/x/permissions/a/b",
            "/v1/fine_tuning/checkpoints/a/../permissions",
            "/v2/fine_tuning/checkpoints/x/permissions",
        ] {
            assert_eq!(
                match_route(&Method::GET, path),
                Err(Error::NotFound),
                "{path}"
            );
        }
    }

    #[test]
    fn raw_and_encoded_checkpoints_are_the_same() {
        let raw = Checkpoint::parse(CP).unwrap();
        let encoded = Checkpoint::parse(&CP.replace(':', "%3A")).unwrap();
        let lower = Checkpoint::parse(&CP.replace(':', "%3a")).unwrap();
        assert_eq!(raw, encoded);
        assert_eq!(raw, lower);
        let mut out = String::new();
        raw.write_encoded(&mut out);
        assert_eq!(out, CP);
        let odd = Checkpoint::parse("ft%3Aa%3Fb%23c%25d").unwrap();
        let mut out = String::new();
        odd.write_encoded(&mut out);
        assert_eq!(out, "ft:a%3Fb%23c%25d");
    }

    #[test]
    fn bad_checkpoints_are_400_naming_checkpoint() {
        let long = "a".repeat(257);
        for bad in [
            "",
            "..",
            "a..b",
            "a%2Fb",
            "a%2fb",
            "%2E%2E",
            "a%00b",
            "a%0Ab",
            "a%20b",
            "a%09b",
            "%ZZ",
            "a%",
            "a%4",
            "%C3%28",
            long.as_str(),
        ] {
            assert_eq!(
                param_of(Checkpoint::parse(bad).unwrap_err()),
                "checkpoint",
                "{bad:?}"
            );
        }
        assert!(Checkpoint::parse(&"a".repeat(256)).is_ok());
        assert!(Checkpoint::parse("ft:é").is_ok());
    }

    #[test]
    fn dot_segments_are_never_a_checkpoint() {
        for dot in [".", "%2E", "%2e", "..", "%2E%2E", ".%2E"] {
            assert_eq!(
                param_of(Checkpoint::parse(dot).unwrap_err()),
                "checkpoint",
                "{dot:?}"
            );
        }
        assert!(Checkpoint::parse(".a").is_ok() && Checkpoint::parse("a.").is_ok());
    }

    #[test]
    fn permission_ids_are_checked() {
        let base = format!("/v1/fine_tuning/checkpoints/{CP}/permissions/");
        let ok = format!("{base}cp_zc4Q7MP6XxulcVzj4MZdwsAB");
        let m = match_route(&Method::DELETE, &ok).unwrap();
        assert_eq!(
            m.permission_id().unwrap().as_deref(),
            Some("cp_zc4Q7MP6XxulcVzj4MZdwsAB")
        );
        for bad in ["..", ".", "%2E", "%2e%2e", "a%2Fb", "a%20b", "a.b", "%00"] {
            let p = format!("{base}{bad}");
            let m = match_route(&Method::DELETE, &p).unwrap();
            assert_eq!(
                param_of(m.permission_id().unwrap_err()),
                "permission_id",
                "{bad}"
            );
        }
    }

    #[test]
    fn queries_normalize_to_one_form() {
        let canonical = |q: Option<&str>| {
            let mut s = String::new();
            ListQuery::parse(q).unwrap().write_canonical(&mut s);
            s
        };
        assert_eq!(canonical(None), "limit=10&order=descending");
        assert_eq!(canonical(Some("")), "limit=10&order=descending");
        assert_eq!(canonical(Some("limit=10")), "limit=10&order=descending");
        assert_eq!(
            canonical(Some("order=descending&limit=10&")),
            "limit=10&order=descending"
        );
        assert_eq!(
            canonical(Some("project_id=proj_1&after=cp_2&order=ascending&limit=5")),
            canonical(Some("limit=5&order=ascending&after=cp_2&project_id=proj_1")),
        );
        assert_eq!(
            canonical(Some("after=a%26b%3Dc&project_id=p+q")),
            "limit=10&order=descending&after=a%26b%3Dc&project_id=p%20q"
        );
        assert_eq!(canonical(Some("limit=007")), "limit=7&order=descending");
    }

    #[test]
    fn bad_queries_name_their_parameter() {
        for (query, param) in [
            ("limit=0", "limit"),
            ("limit=101", "limit"),
            ("limit=abc", "limit"),
            ("limit=-1", "limit"),
            ("limit=+5", "limit"),
            ("limit=1000", "limit"),
            ("limit=", "limit"),
            ("limit", "limit"),
            ("order=up", "order"),
            ("order=ASCENDING", "order"),
            ("limit=5&limit=5", "limit"),
            ("order=ascending&order=ascending", "order"),
            ("after=a&after=b", "after"),
            ("project_id=", "project_id"),
            ("after=%00", "after"),
            ("after=%ZZ", "after"),
            ("foo=bar", "foo"),
            ("Limit=5", "Limit"),
            ("=5", "query"),
        ] {
            assert_eq!(
                param_of(ListQuery::parse(Some(query)).unwrap_err()),
                param,
                "{query}"
            );
        }
        let long_name = format!("{}=1", "x".repeat(500));
        assert_eq!(
            param_of(ListQuery::parse(Some(&long_name)).unwrap_err()).len(),
            64
        );
        assert_eq!(
            param_of(reject_query(Some("limit=5")).unwrap_err()),
            "limit"
        );
        assert!(reject_query(None).is_ok());
    }
}
