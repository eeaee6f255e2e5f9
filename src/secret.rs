//! The admin key: the one secret permgate holds.
//!
//! `AdminKey` can be moved around and logged by mistake without leaking: its `Debug` and
//! `Display` print a fixed placeholder, it does not implement `Serialize`, and the only way to
//! the bytes is [`AdminKey::authorization`], which `upstream` uses to build its request. The
//! header value it returns is marked sensitive, so hyper's HPACK encoder never indexes it.

use std::fmt;
use std::path::Path;
use std::time::Duration;

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
}
