//! The admin key: the one secret permgate holds.
//!
//! `AdminKey` can be moved around and logged by mistake without leaking: its `Debug` and
//! `Display` print a fixed placeholder, it does not implement `Serialize`, and the only way to
//! the bytes is [`AdminKey::authorization`], which `upstream` uses to build its request. The
//! header value it returns is marked sensitive, so hyper's HPACK encoder never indexes it.
//!
//! It also owns the two guards of SPEC "Hygiene rules": [`looks_like_api_key`], the one rule
//! for text that must never be printed (an admin key pasted into the wrong config key), with
//! [`redact_api_keys`] applying it to text on its way out; and [`AdminKey::leaks_in`], which
//! finds any 6-character piece of the loaded key in an upstream body.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aho_corasick::AhoCorasick;

use crate::env::Env;

use hyper::header::HeaderValue;

/// Where the admin key comes from; see SPEC "Command line" (env var or file, never the config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    Env(String),
    File(std::path::PathBuf),
}

impl KeySource {
    /// Where the secret comes from, for messages: the variable's name or the file's path, or,
    /// when that looks like an API key, only the config key (`key` without `_env`/`_file`).
    fn describe(&self, key: &str) -> String {
        let hidden = self.looks_like_api_key();
        match self {
            KeySource::Env(_) if hidden => format!("the environment variable named by {key}_env"),
            KeySource::File(_) if hidden => format!("the file named by {key}_file"),
            KeySource::Env(name) => format!("environment variable {name}"),
            KeySource::File(path) => format!("file {}", path.display()),
        }
    }

    /// Whether the variable's name or the file's path looks like an API key: someone pasted
    /// the key itself where its name belongs.
    pub fn looks_like_api_key(&self) -> bool {
        match self {
            KeySource::Env(name) => looks_like_api_key(name),
            KeySource::File(path) => looks_like_api_key(&path.to_string_lossy()),
        }
    }
}

/// [`read`], except that its errors never name a variable or path that looks like an API key
/// (see [`looks_like_api_key`]); they name the config key and the likely mistake instead.
pub fn read_secret(source: &KeySource, key: &str, env: &Env) -> Result<String, KeyError> {
    read(source, key, env).map_err(|e| {
        if !source.looks_like_api_key() {
            return e;
        }
        let what = match source {
            KeySource::Env(_) => "is not set (its name looks like an API key",
            KeySource::File(_) => "cannot be read (its path looks like an API key",
        };
        KeyError(format!(
            "{} {what}: did you paste the key itself?)",
            source.describe(key)
        ))
    })
}

/// The one rule for text that must never be printed because it may be an API key. A *run* is
/// a maximal stretch of the characters API keys are made of (ASCII letters, digits, `-`, `_`);
/// text looks like an API key when one of its runs
///
/// - contains `sk-` (not preceded by a letter or digit) followed by at least 20 more run
///   characters, some of them upper case or digits: every OpenAI key (`sk-admin-…`,
///   `sk-proj-…`, `sk-…`) starts so and has a random body, while a lower-case name such as
///   `sk-learn-model-server-…` does not; or
/// - contains at least 32 consecutive letters and digits that mix upper case, lower case and
///   digits: the random body of a key (or any token) pasted without its prefix.
///
/// OpenAI object ids (`cp_…`, `proj_…`, `ft:…:B7R9VjQd`), hex digests, environment variable
/// names, paths and host names do not match.
pub fn looks_like_api_key(text: &str) -> bool {
    runs(text).any(run_looks_like_key)
}

/// `text` with every run (see [`looks_like_api_key`]) that looks like an API key replaced by
/// `<redacted>`: the last guard on text that leaves the process (errors, the resolved config).
pub fn redact_api_keys(text: &str) -> Cow<'_, str> {
    if !looks_like_api_key(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for run in runs(text).filter(|r| run_looks_like_key(r)) {
        let start = run.as_ptr() as usize - text.as_ptr() as usize;
        out.push_str(&text[copied..start]);
        out.push_str(REDACTED);
        copied = start + run.len();
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// What [`redact_api_keys`] puts in place of a key-shaped run.
pub const REDACTED: &str = "<redacted>";

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// The maximal runs of key characters in `text`, as slices of it.
fn runs(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !is_key_char(c))
        .filter(|run| !run.is_empty())
}

fn run_looks_like_key(run: &str) -> bool {
    let bytes = run.as_bytes();
    let prefixed = run.match_indices("sk-").any(|(i, _)| {
        let boundary = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        let rest = &bytes[i + "sk-".len()..];
        boundary
            && rest.len() >= 20
            && rest
                .iter()
                .any(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    });
    prefixed
        || run
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|stretch| {
                stretch.len() >= 32
                    && stretch.bytes().any(|b| b.is_ascii_uppercase())
                    && stretch.bytes().any(|b| b.is_ascii_lowercase())
                    && stretch.bytes().any(|b| b.is_ascii_digit())
            })
}

/// Reads a secret (the admin key, the Redis password) from its source, trimmed. `key` is its
/// config key without the `_env`/`_file` suffix, for messages, which never hold the value.
pub fn read(source: &KeySource, key: &str, env: &Env) -> Result<String, KeyError> {
    let value = match source {
        KeySource::Env(name) => env(name).ok_or_else(|| {
            KeyError(format!(
                "environment variable {name} ({key}_env) is not set"
            ))
        })?,
        KeySource::File(path) => {
            let bytes = read_regular_file(path, MAX_SECRET_FILE_BYTES)
                .map_err(|e| KeyError(format!("cannot read {key}_file {}: {e}", path.display())))?;
            String::from_utf8(bytes)
                .map_err(|_| KeyError(format!("{key}_file {} is not UTF-8 text", path.display())))?
        }
    };
    Ok(value.trim().to_owned())
}

/// A secret file larger than this is not a key.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Reads at most `limit` bytes of a regular file, without ever waiting on what is at the path:
/// it is opened non-blocking, so a FIFO or a device opens at once (instead of waiting for a
/// writer) and is then refused because it is not a regular file. A hung filesystem can still
/// block the calling thread: code on the runtime calls this through
/// [`read_regular_file_bounded`].
pub fn read_regular_file(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if metadata.len() > limit {
        return Err(std::io::Error::other("the file is too large"));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// How long reading a watched file may take on the runtime before it is given up.
pub const FILE_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs `read` (blocking file I/O: a key or config file) on a thread of its own and waits at
/// most [`FILE_READ_TIMEOUT`], so a hung filesystem stalls no request and no shutdown: the
/// thread is left behind, and the process can still exit.
pub async fn off_runtime<T: Send + 'static>(
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<T, KeyError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("permgate-file-read".into())
        .spawn(move || {
            let _ = tx.send(read());
        })
        .map_err(|e| KeyError(format!("cannot start a file reader: {}", e.kind())))?;
    match tokio::time::timeout(FILE_READ_TIMEOUT, rx).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(KeyError("the file reader stopped without an answer".into())),
        Err(_) => Err(KeyError(format!(
            "reading the file took longer than {} ms; is the filesystem hung?",
            FILE_READ_TIMEOUT.as_millis()
        ))),
    }
}

/// [`read_regular_file`] on the runtime: never blocks it.
pub async fn read_regular_file_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, KeyError> {
    let owned = path.to_owned();
    off_runtime(move || read_regular_file(&owned, limit))
        .await?
        .map_err(|e| KeyError(format!("cannot read {}: {e}", path.display())))
}

/// A warning when a secret file can be read by every user of the machine.
pub fn permission_warning(source: &KeySource, key: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let KeySource::File(path) = source else {
        return None;
    };
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| {
        format!(
            "{key}_file {} is readable by every user (mode {:o}); make it 0400 or 0440",
            path.display(),
            mode & 0o777
        )
    })
}

/// Why the key could not be loaded. Never contains key material.
#[derive(Debug)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    /// Redacted as a last guard: a message should never hold key-shaped text in the first place.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_api_keys(&self.0))
    }
}

impl std::error::Error for KeyError {}

/// The organization admin API key. Never printed, never serialized.
#[derive(Clone)]
pub struct AdminKey {
    /// `Bearer <key>`, prebuilt once so the request path does no formatting.
    authorization: HeaderValue,
    /// Finds any [`PIECE`]-byte piece of the key; built once per key (load, reload).
    pieces: Arc<AhoCorasick>,
    /// The same, but only for the pieces wholly after the key's public prefix (`sk-admin-`).
    secret_pieces: Arc<AhoCorasick>,
}

/// The length of the key pieces [`AdminKey::leaks_in`] looks for (SPEC "Hygiene rules").
pub const PIECE: usize = 6;

impl AdminKey {
    /// Validates and wraps a key. The error message never repeats the key.
    pub fn new(key: &str) -> Result<Self, KeyError> {
        let key = key.trim();
        if key.is_empty() {
            return Err(KeyError("the admin key is empty".into()));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeyError(
                "the admin key contains whitespace or non-printable characters".into(),
            ));
        }
        let mut authorization = HeaderValue::try_from(format!("Bearer {key}"))
            .map_err(|_| KeyError("the admin key is not a valid header value".into()))?;
        authorization.set_sensitive(true);
        Ok(AdminKey {
            authorization,
            pieces: Arc::new(piece_matcher(key.as_bytes())?),
            secret_pieces: Arc::new(piece_matcher(secret_part(key.as_bytes()))?),
        })
    }

    /// Reads the key from its source. `env` is the injected environment lookup.
    pub fn load(source: &KeySource, env: &Env) -> Result<Self, KeyError> {
        const KEY: &str = "upstream.admin_key";
        let value = read_secret(source, KEY, env)?;
        Self::new(&value).map_err(|e| KeyError(format!("{}: {e}", source.describe(KEY))))
    }

    /// Whether `bytes` hold a [`PIECE`]-byte piece of the key that is not also in one of `sent`:
    /// such text is never passed on, stored or logged. Every window is a pattern, so a masked
    /// form showing only the key's start and end (`sk-XXXXX****…YYYYYY`) is found too. A key
    /// shorter than a piece is matched whole.
    ///
    /// `sent` is what the caller put in the request `bytes` answer: upstream quotes parts of a
    /// request back (a 404 names the checkpoint, a create lists its project ids). Refusing an
    /// answer for a piece the caller sent itself would tell the caller which of its guesses
    /// are pieces of the key, and so the key, a character at a time; a piece found only where
    /// the caller put it tells the caller nothing it did not send.
    pub fn leaks_in(&self, bytes: &[u8], sent: &[&[u8]]) -> bool {
        self.pieces.find_overlapping_iter(bytes).any(|found| {
            let piece = &bytes[found.range()];
            !sent
                .iter()
                .any(|s| memchr::memmem::find(s, piece).is_some())
        })
    }

    /// Whether `bytes` hold any piece of the key at all: the quick search that tells nearly
    /// every answer apart before [`AdminKey::leaks_in`] walks one piece by piece.
    pub fn appears_in(&self, bytes: &[u8]) -> bool {
        self.pieces.is_match(bytes)
    }

    /// Whether `bytes` hold a piece of the key's secret: a piece wholly after its public prefix
    /// (`sk-admin-`: `sk-` and at most one more lower-case word ending in `-`, the same for
    /// every key of its kind).
    /// For the operator's own text (config values), where `-admin` in a client's name or
    /// `admin-key` in a path is no leak; answers use [`AdminKey::appears_in`].
    pub fn secret_appears_in(&self, bytes: &[u8]) -> bool {
        self.secret_pieces.is_match(bytes)
    }

    /// The `Authorization` header for upstream requests (marked sensitive). Only `upstream`
    /// calls this.
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }
}

/// Whether `found` holds for any string in `value`, object member names included, given where
/// it is (`clients[0].name`); every string is visited while it does not. Where key pieces are
/// looked for in JSON: a config's values, an upstream answer written with escapes.
pub fn any_json_text(
    value: &serde_json::Value,
    found: &mut impl FnMut(&str, &str) -> bool,
) -> bool {
    fn walk(
        value: &serde_json::Value,
        at: &mut String,
        found: &mut impl FnMut(&str, &str) -> bool,
    ) -> bool {
        use serde_json::Value;
        use std::fmt::Write as _;
        let len = at.len();
        let hit = match value {
            Value::String(text) => found(at, text),
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                at.truncate(len);
                let _ = write!(at, "[{i}]");
                walk(item, at, found)
            }),
            Value::Object(members) => members.iter().any(|(name, member)| {
                at.truncate(len);
                if len > 0 {
                    at.push('.');
                }
                at.push_str(name);
                found(at, name) || walk(member, at, found)
            }),
            Value::Null | Value::Bool(_) | Value::Number(_) => false,
        };
        at.truncate(len);
        hit
    }
    walk(value, &mut String::new(), found)
}

/// `key` after its public prefix: OpenAI's `sk-` and at most one more lower-case word and `-`
/// (`sk-admin-`, `sk-proj-`, `sk-svcacct-`), as long as a whole piece is left after it. What
/// follows is secret even when it starts like a word (`sk-admin-ab-X…`). A piece that
/// straddles the prefix is mostly prefix: with one secret character, `dmin-k` would be found in
/// every `openai-admin-key` path for one key in 62, and it tells no more of the secret than a
/// shorter piece anywhere else.
fn secret_part(key: &[u8]) -> &[u8] {
    let mut prefix = 0;
    for _ in 0..2 {
        let word = key[prefix..]
            .iter()
            .take_while(|b| b.is_ascii_lowercase())
            .count();
        if word == 0
            || key.get(prefix + word) != Some(&b'-')
            || prefix + word + 1 + PIECE > key.len()
        {
            break;
        }
        prefix += word + 1;
    }
    &key[prefix..]
}

/// One automaton over every [`PIECE`]-byte window of `key` (the whole key if shorter).
fn piece_matcher(bytes: &[u8]) -> Result<AhoCorasick, KeyError> {
    let windows: Vec<&[u8]> = if bytes.len() < PIECE {
        vec![bytes]
    } else {
        bytes.windows(PIECE).collect()
    };
    // A DFA: some 30 patterns of 6 bytes make a small one, and every miss scans its page.
    AhoCorasick::builder()
        .kind(Some(aho_corasick::AhoCorasickKind::DFA))
        .build(windows)
        .map_err(|_| KeyError("cannot prepare the admin key's leak check".into()))
}

impl fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminKey(<redacted>)")
    }
}

impl fmt::Display for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-admin-TESTKEY0123456789abcdef";

    #[test]
    fn the_public_prefix_is_no_secret_piece() {
        let key = AdminKey::new(KEY).unwrap();
        for own in [
            "ops-admin-reader",
            "sk-admin-",
            "batch-admin",
            "dmin-T",
            "n-TESTK",
        ] {
            assert!(key.appears_in(own.as_bytes()), "{own}");
            assert!(!key.secret_appears_in(own.as_bytes()), "{own}");
        }
        for leak in ["sk-admin-TESTKEY", "TESTKE", "KEY012", "9abcde"] {
            assert!(key.secret_appears_in(leak.as_bytes()), "{leak}");
        }
        // A key whose secret starts as the shipped key file's name goes on: one key in 62
        // starts with `k`, and `openai-admin-key` is in every shipped config.
        let k_key = AdminKey::new("sk-admin-key0Zq9XvLk2Wm8Pn4Rt6Yh1").unwrap();
        let path = b"/run/secrets/permgate/openai-admin-key";
        assert!(!k_key.secret_appears_in(path));
        assert!(k_key.secret_appears_in(b"key0Zq"));
        assert_eq!(secret_part(b"sk-admin-TESTKEY0123"), b"TESTKEY0123");
        // What follows the prefix is secret, even when it starts like a word.
        assert_eq!(secret_part(b"sk-admin-ab-Xyz0123"), b"ab-Xyz0123");
        let word_key = AdminKey::new("sk-admin-ab-Xyz0Zq9XvLk2Wm8Pn4Rt6Yh1").unwrap();
        assert!(word_key.secret_appears_in(b"name-ab-Xyz"));
        assert_eq!(secret_part(b"sk-Zq9XvLk2"), b"Zq9XvLk2");
        assert_eq!(secret_part(b"abc"), b"abc");
    }

    #[test]
    fn debug_and_display_never_show_the_key() {
        let key = AdminKey::new(KEY).unwrap();
        for shown in [
            format!("{key:?}"),
            format!("{key}"),
            format!("{:#?}", Some(&key)),
        ] {
            assert!(!shown.contains("sk-admin"), "{shown}");
            assert!(!shown.contains("TESTKEY"), "{shown}");
        }
        assert!(key.authorization().is_sensitive());
        assert_eq!(key.authorization(), &format!("Bearer {KEY}")[..]);
    }

    #[test]
    fn bad_keys_are_rejected_without_echoing_them() {
        for bad in ["", "   ", "sk-admin with space", "sk-admin-\u{7f}x"] {
            let err = AdminKey::new(bad).unwrap_err().to_string();
            assert!(!err.contains("sk-admin"), "{err}");
        }
    }

    #[test]
    fn load_reads_env_and_trims_files() {
        let env = |name: &str| (name == "K").then(|| format!("{KEY}\n"));
        let key = AdminKey::load(&KeySource::Env("K".into()), &env).unwrap();
        assert_eq!(key.authorization(), &format!("Bearer {KEY}")[..]);
        let err = AdminKey::load(&KeySource::Env("MISSING".into()), &env).unwrap_err();
        assert!(err.to_string().contains("MISSING"));

        let dir = std::env::temp_dir().join(format!("permgate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, format!("{KEY}\r\n")).unwrap();
        let key = AdminKey::load(&KeySource::File(path.clone()), &env).unwrap();
        assert_eq!(key.authorization(), &format!("Bearer {KEY}")[..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_is_refused_at_once_and_loose_permissions_are_warned_about() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("permgate-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("key");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        // Opening a FIFO for reading blocks until a writer comes; this must not.
        let err = read(
            &KeySource::File(fifo.clone()),
            "upstream.admin_key",
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_file(&fifo).unwrap();

        let file = dir.join("key2");
        std::fs::write(&file, KEY).unwrap();
        let source = KeySource::File(file.clone());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = permission_warning(&source, "upstream.admin_key").unwrap();
        assert!(warning.contains("readable by every user") && !warning.contains("TESTKEY"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o440)).unwrap();
        assert_eq!(permission_warning(&source, "upstream.admin_key"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_api_key_rule_catches_pasted_keys_and_spares_ordinary_values() {
        let body = "Zq9XvLk2PmW7tR4yB8nC3dF6hJ1wQ5eT";
        for key_like in [
            KEY,
            "sk-Zq9XvLk2PmW7tR4yB8nC3dF6hJ1wQ5eT",
            "sk-proj-Ab_cD-ef01234567890123456789",
            "Bearer sk-admin-abcdefghijklmnopqrs7u",
            "/run/secrets/sk-admin-abcdefghijklmnopqrs7u",
            "redis://cache:6379/0?password=sk-admin-abcdefghijklmnopqrs7u",
            "OPENAI_ADMIN_KEY=sk-admin-abcdefghijklmnopqrs7u",
            "task_sk-admin-abcdefghijklmnopqrs7u",
            body,
            "prefix:Zq9XvLk2PmW7tR4yB8nC3dF6hJ1wQ5eT:suffix",
            // The price of the rule: a long unbroken mixed-case name with digits is refused
            // too. A refused config costs a rename; a printed key costs a rotation.
            "DataPipelineWorkerEuropeWest2024",
        ] {
            assert!(looks_like_api_key(key_like), "{key_like}");
        }
        for ordinary in [
            "OPENAI_ADMIN_KEY",
            "/run/secrets/openai-admin-key",
            "billing-service",
            "my-sk-learn-model-server",
            "sk-learn-model-server-europe-west",
            "ask-me-anything-about-anything-at-all",
            "sk-short",
            "ft:gpt-4o-mini-2024-07-18:acme:*",
            "ft:gpt-4o-mini-2024-07-18:acme:weather:B7R9VjQd",
            "ft-AF1WoRqd3aJAHsqc9NY7iL8F",
            "cp_zc4Q7MP6XxulcVzj4MZdwsAB",
            "proj_abGMw1llN8IrBb6SvvY5A1iH",
            "system:serviceaccount:billing:api",
            "spiffe://cluster.local/ns/billing/sa/api",
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8",
            "rediss://redis.internal:6380",
            "permgate:",
            "127.0.0.1:8080",
            "DataPipelineWorkerEurope2024",
            "",
        ] {
            assert!(!looks_like_api_key(ordinary), "{ordinary}");
        }
    }

    #[test]
    fn redaction_replaces_each_key_shaped_run_and_keeps_the_rest() {
        let text = format!("unknown field `{KEY}`, and \"{KEY}\" again; OPENAI_ADMIN_KEY");
        assert_eq!(
            redact_api_keys(&text),
            "unknown field `<redacted>`, and \"<redacted>\" again; OPENAI_ADMIN_KEY"
        );
        assert!(matches!(
            redact_api_keys("nothing to see"),
            Cow::Borrowed("nothing to see")
        ));
        assert_eq!(KeyError(format!("x {KEY}")).to_string(), "x <redacted>");
    }

    #[test]
    fn a_key_pasted_as_its_own_source_is_never_named() {
        let env = |_: &str| None;
        let err = AdminKey::load(&KeySource::Env(KEY.into()), &env)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "the environment variable named by upstream.admin_key_env is not set (its name \
             looks like an API key: did you paste the key itself?)"
        );
        let path = std::path::PathBuf::from(format!("/nonexistent/{KEY}"));
        let err = AdminKey::load(&KeySource::File(path), &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream.admin_key_file"), "{err}");
        assert!(
            !err.contains("TESTKEY") && !err.contains("sk-admin"),
            "{err}"
        );
        // A key-shaped variable that is set, but holds no usable key, is not named either.
        let env = |_: &str| Some(" ".to_string());
        let err = AdminKey::load(&KeySource::Env(KEY.into()), &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("the environment variable named by"),
            "{err}"
        );
        assert!(!err.contains("TESTKEY"), "{err}");
    }

    #[test]
    fn leaks_in_finds_any_six_character_piece_of_the_key() {
        let key = AdminKey::new(KEY).unwrap();
        let masked = format!("{}{}{}", &KEY[..8], "*".repeat(12), &KEY[KEY.len() - 6..]);
        for leaking in [
            KEY.to_string(),
            format!("{{\"error\":{{\"message\":\"Incorrect API key: {masked}\"}}}}"),
            format!("...{}...", &KEY[10..16]),
            KEY[KEY.len() - 6..].to_string(),
        ] {
            assert!(key.leaks_in(leaking.as_bytes(), &[]), "{leaking}");
        }
        for clean in [
            &KEY[10..15],
            r#"{"object":"list","data":[],"has_more":false}"#,
            "",
        ] {
            assert!(!key.leaks_in(clean.as_bytes(), &[]), "{clean}");
        }
        let short = AdminKey::new("sk-1").unwrap();
        assert!(short.leaks_in(b"x sk-1 y", &[]) && !short.leaks_in(b"sk-2", &[]));
    }

    #[test]
    fn a_piece_the_caller_sent_is_not_a_leak_but_any_other_piece_still_is() {
        let key = AdminKey::new(KEY).unwrap();
        let guess = format!("guess-{}", &KEY[10..16]);
        let quoted = format!("The model checkpoint '{guess}' does not exist.");
        assert!(!key.leaks_in(quoted.as_bytes(), &[b"other", guess.as_bytes()]));
        // The caller's guess does not cover what upstream adds of its own.
        let both = format!("{quoted} Key: {}", &KEY[20..26]);
        assert!(key.leaks_in(both.as_bytes(), &[guess.as_bytes()]));
        // Nor does a guess that only overlaps a longer piece quoted by upstream.
        assert!(key.leaks_in(&KEY.as_bytes()[8..18], &[guess.as_bytes()]));
    }
}
