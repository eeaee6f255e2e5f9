//! The admin key: the one secret permgate holds.
//!
//! `AdminKey` can be moved around and logged by mistake without leaking: its `Debug` and
//! `Display` print a fixed placeholder, it does not implement `Serialize`, and the only way to
//! the bytes is [`AdminKey::authorization`], which `upstream` uses to build its request. The
//! header value it returns is marked sensitive, so hyper's HPACK encoder never indexes it.

use std::fmt;

use crate::env::Env;

use hyper::header::HeaderValue;

/// Where the admin key comes from; see SPEC "Command line" (env var or file, never the config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    Env(String),
    File(std::path::PathBuf),
}

impl KeySource {
    /// Where the secret comes from, for messages: the variable's name or the file's path.
    fn describe(&self) -> String {
        match self {
            KeySource::Env(name) => format!("environment variable {name}"),
            KeySource::File(path) => format!("file {}", path.display()),
        }
    }
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
        KeySource::File(path) => std::fs::read_to_string(path).map_err(|e| {
            KeyError(format!(
                "cannot read {key}_file {}: {}",
                path.display(),
                e.kind()
            ))
        })?,
    };
    Ok(value.trim().to_owned())
}

/// Why the key could not be loaded. Never contains key material.
#[derive(Debug)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// The organization admin API key. Never printed, never serialized.
#[derive(Clone)]
pub struct AdminKey {
    /// `Bearer <key>`, prebuilt once so the request path does no formatting.
    authorization: HeaderValue,
}

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
        Ok(AdminKey { authorization })
    }

    /// Reads the key from its source. `env` is the injected environment lookup.
    pub fn load(source: &KeySource, env: &Env) -> Result<Self, KeyError> {
        let value = read(source, "upstream.admin_key", env)?;
        Self::new(&value).map_err(|e| KeyError(format!("{}: {e}", source.describe())))
    }

    /// The `Authorization` header for upstream requests (marked sensitive). Only `upstream`
    /// calls this.
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }
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
}
