//! Config file (TOML) → environment overrides → validation → [`Config`] (SPEC "Config file").
//!
//! Every table uses `deny_unknown_fields`: a misspelt or not-yet-supported key is an error,
//! never silently ignored. Validation collects every problem it finds and names each by its
//! key path. The environment is injected as a lookup function, so tests never touch the
//! process environment. The admin key itself is not read here (see `secret`); this module
//! only records where it comes from.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use hyper::Uri;
use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::secret::KeySource;

/// A config that cannot be used, with one line per problem, each naming its key.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for problem in &self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server: FileServer,
    upstream: FileUpstream,
    #[serde(default)]
    cache: FileCache,
    audit: Option<FileAudit>,
    redis: Option<FileRedis>,
    #[serde(default)]
    clients: Vec<FileClient>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRedis {
    url: String,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    key_prefix: Option<String>,
    timeout_ms: Option<u64>,
    degraded_ttl_seconds: Option<u64>,
    reconnect_max_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    listen: String,
    admin_listen: Option<String>,
    worker_threads: Option<usize>,
    drain_timeout_ms: Option<u64>,
    max_body_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_header_bytes: Option<usize>,
    max_uri_bytes: Option<usize>,
    header_read_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    base_url: String,
    admin_key_env: Option<String>,
    admin_key_file: Option<PathBuf>,
    request_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    ca_file: Option<PathBuf>,
    max_retries: Option<u32>,
    retry_base_delay_ms: Option<u64>,
    retry_max_delay_ms: Option<u64>,
    max_concurrency: Option<usize>,
    queue_timeout_ms: Option<u64>,
    breaker_threshold: Option<u32>,
    breaker_open_ms: Option<u64>,
    admin_key_poll_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCache {
    ttl_seconds: Option<u64>,
    max_bytes: Option<u64>,
    stale_while_revalidate_seconds: Option<u64>,
    stale_if_error_seconds: Option<u64>,
    negative_ttl_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAudit {
    path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClient {
    name: String,
    token_sha256: String,
    #[serde(default)]
    checkpoints: Vec<String>,
    #[serde(default)]
    can_write: bool,
    rate_per_second: Option<u32>,
    burst: Option<u32>,
}

/// The validated runtime configuration. Serializes to the redacted view `check-config` prints
/// (it holds no secret: the admin key is only named by its source).
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub audit: Option<AuditConfig>,
    pub redis: Option<RedisConfig>,
    pub clients: Vec<ClientConfig>,
}

/// `[redis]`: fleet coherence. The password is named by its source, never stored here.
#[derive(Debug, Clone, Serialize)]
pub struct RedisConfig {
    pub url: String,
    #[serde(serialize_with = "optional_key_source")]
    pub password: Option<KeySource>,
    pub key_prefix: String,
    #[serde(serialize_with = "millis")]
    pub timeout: Duration,
    #[serde(serialize_with = "seconds")]
    pub degraded_ttl: Duration,
    #[serde(serialize_with = "millis")]
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub worker_threads: Option<usize>,
    #[serde(serialize_with = "millis")]
    pub drain_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    #[serde(serialize_with = "millis")]
    pub header_read_timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamConfig {
    #[serde(serialize_with = "display")]
    pub base_url: Uri,
    #[serde(serialize_with = "key_source")]
    pub admin_key: KeySource,
    #[serde(serialize_with = "millis")]
    pub request_timeout: Duration,
    #[serde(serialize_with = "millis")]
    pub connect_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub max_retries: u32,
    #[serde(serialize_with = "millis")]
    pub retry_base_delay: Duration,
    #[serde(serialize_with = "millis")]
    pub retry_max_delay: Duration,
    pub max_concurrency: usize,
    #[serde(serialize_with = "millis")]
    pub queue_timeout: Duration,
    pub breaker_threshold: u32,
    #[serde(serialize_with = "millis")]
    pub breaker_open: Duration,
    /// How often `admin_key_file` is checked for a new key.
    #[serde(serialize_with = "millis")]
    pub admin_key_poll: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheConfig {
    #[serde(serialize_with = "seconds")]
    pub ttl: Duration,
    pub max_bytes: u64,
    #[serde(serialize_with = "seconds")]
    pub stale_while_revalidate: Duration,
    #[serde(serialize_with = "seconds")]
    pub stale_if_error: Duration,
    #[serde(serialize_with = "seconds")]
    pub negative_ttl: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientConfig {
    pub name: String,
    #[serde(serialize_with = "hex_digest")]
    pub token_sha256: [u8; 32],
    pub checkpoints: Vec<String>,
    pub can_write: bool,
    /// Token bucket: (rate per second, burst); `None` is unlimited.
    #[serde(serialize_with = "rate")]
    pub rate: Option<(NonZeroU32, NonZeroU32)>,
}

pub const DEFAULT_ADMIN_KEY_ENV: &str = "OPENAI_ADMIN_KEY";

impl Config {
    /// Parses and validates a config file's text. `env` looks up `PERMGATE_LISTEN`,
    /// `PERMGATE_ADMIN_LISTEN` and `PERMGATE_UPSTREAM_URL`, which override the file.
    pub fn parse(text: &str, env: &Env) -> Result<Config, ConfigError> {
        let mut file: FileConfig =
            toml::from_str(text).map_err(|e| ConfigError(vec![describe_toml_error(&e, text)]))?;
        if let Some(listen) = env("PERMGATE_LISTEN") {
            file.server.listen = listen;
        }
        if let Some(admin) = env("PERMGATE_ADMIN_LISTEN") {
            file.server.admin_listen = Some(admin);
        }
        if let Some(url) = env("PERMGATE_UPSTREAM_URL") {
            file.upstream.base_url = url;
        }
        file.validate()
    }

    /// Settings that are valid but probably a mistake; logged at startup, printed by
    /// `check-config`.
    pub fn warnings(&self) -> Vec<String> {
        let url = &self.upstream.base_url;
        let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let mut warnings = Vec::new();
        if url.scheme_str() == Some("http") && !loopback {
            warnings.push(
                "upstream.base_url is plain http to a non-loopback host: the admin key would cross the network unencrypted"
                    .to_string(),
            );
        }
        warnings
    }

    /// Reads and parses a config file.
    pub fn load(path: &std::path::Path, env: &Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
        Self::parse(&text, env)
    }
}

impl FileConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let windows = [
            ("cache.ttl_seconds", self.cache.ttl_seconds),
            (
                "cache.stale_while_revalidate_seconds",
                self.cache.stale_while_revalidate_seconds,
            ),
            (
                "cache.stale_if_error_seconds",
                self.cache.stale_if_error_seconds,
            ),
            (
                "cache.negative_ttl_seconds",
                self.cache.negative_ttl_seconds,
            ),
        ];
        for (key, value) in windows {
            if value.is_some_and(|v| v > MAX_WINDOW_SECONDS) {
                problems.push(format!(
                    "{key} may be at most {MAX_WINDOW_SECONDS} (7 days)"
                ));
            }
        }
        let timeouts = [
            ("server.drain_timeout_ms", self.server.drain_timeout_ms),
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            (
                "upstream.request_timeout_ms",
                self.upstream.request_timeout_ms,
            ),
            (
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
            ),
            (
                "upstream.retry_base_delay_ms",
                self.upstream.retry_base_delay_ms,
            ),
            (
                "upstream.retry_max_delay_ms",
                self.upstream.retry_max_delay_ms,
            ),
            ("upstream.queue_timeout_ms", self.upstream.queue_timeout_ms),
            ("upstream.breaker_open_ms", self.upstream.breaker_open_ms),
            (
                "upstream.admin_key_poll_ms",
                self.upstream.admin_key_poll_ms,
            ),
        ];
        for (key, value) in timeouts {
            if value.is_some_and(|v| v > MAX_TIMEOUT_MS) {
                problems.push(format!("{key} may be at most {MAX_TIMEOUT_MS} (1 hour)"));
            }
        }
        let mut addr = |key: &str, value: &str| match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(format!(
                    "{key}: '{value}' is not an address like 127.0.0.1:8080"
                ));
                None
            }
        };
        let listen = addr("server.listen", &self.server.listen);
        let admin_listen = self
            .server
            .admin_listen
            .as_deref()
            .and_then(|a| addr("server.admin_listen", a));
        if let (Some(l), Some(a)) = (listen, admin_listen) {
            if l == a && l.port() != 0 {
                problems.push("server.admin_listen must differ from server.listen".into());
            }
        }
        if self.server.worker_threads == Some(0) {
            problems.push("server.worker_threads must be at least 1".into());
        }
        let max_body_bytes = self.server.max_body_bytes.unwrap_or(64 * 1024);
        if max_body_bytes == 0 {
            problems.push("server.max_body_bytes must be at least 1".into());
        }
        let max_connections = self.server.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            problems.push("server.max_connections must be at least 1".into());
        }
        let max_header_bytes = self.server.max_header_bytes.unwrap_or(32 * 1024);
        if max_header_bytes < 8192 {
            problems.push("server.max_header_bytes must be at least 8192".into());
        }
        let max_uri_bytes = self.server.max_uri_bytes.unwrap_or(8 * 1024);
        if max_uri_bytes < 256 {
            problems.push("server.max_uri_bytes must be at least 256".into());
        }
        let header_read_timeout =
            Duration::from_millis(self.server.header_read_timeout_ms.unwrap_or(10_000));
        if header_read_timeout.is_zero() {
            problems.push("server.header_read_timeout_ms must be at least 1".into());
        }

        let base_url = match validate_base_url(&self.upstream.base_url) {
            Ok(uri) => Some(uri),
            Err(why) => {
                problems.push(format!("upstream.base_url: {why}"));
                None
            }
        };
        let admin_key = match (self.upstream.admin_key_env, self.upstream.admin_key_file) {
            (Some(_), Some(_)) => {
                problems.push("upstream: set admin_key_env or admin_key_file, not both".into());
                None
            }
            (None, Some(file)) => Some(KeySource::File(file)),
            (Some(env), None) if env.is_empty() => {
                problems.push("upstream.admin_key_env is empty".into());
                None
            }
            (env, None) => Some(KeySource::Env(
                env.unwrap_or_else(|| DEFAULT_ADMIN_KEY_ENV.into()),
            )),
        };
        let request_timeout =
            Duration::from_millis(self.upstream.request_timeout_ms.unwrap_or(10_000));
        let connect_timeout =
            Duration::from_millis(self.upstream.connect_timeout_ms.unwrap_or(2_000));
        if request_timeout.is_zero() {
            problems.push("upstream.request_timeout_ms must be at least 1".into());
        }
        if connect_timeout.is_zero() {
            problems.push("upstream.connect_timeout_ms must be at least 1".into());
        }
        let max_concurrency = self.upstream.max_concurrency.unwrap_or(64);
        if max_concurrency == 0 {
            problems.push("upstream.max_concurrency must be at least 1".into());
        }
        let retry_base_delay =
            Duration::from_millis(self.upstream.retry_base_delay_ms.unwrap_or(100));
        let retry_max_delay =
            Duration::from_millis(self.upstream.retry_max_delay_ms.unwrap_or(2_000));
        if retry_max_delay < retry_base_delay {
            problems
                .push("upstream.retry_max_delay_ms must be at least retry_base_delay_ms".into());
        }

        let cache = CacheConfig {
            ttl: Duration::from_secs(self.cache.ttl_seconds.unwrap_or(60)),
            max_bytes: self.cache.max_bytes.unwrap_or(64 * 1024 * 1024),
            stale_while_revalidate: Duration::from_secs(
                self.cache.stale_while_revalidate_seconds.unwrap_or(10),
            ),
            stale_if_error: Duration::from_secs(self.cache.stale_if_error_seconds.unwrap_or(300)),
            negative_ttl: Duration::from_secs(self.cache.negative_ttl_seconds.unwrap_or(5)),
        };
        if cache.ttl.is_zero() {
            problems.push("cache.ttl_seconds must be at least 1".into());
        }
        if cache.max_bytes < 1024 {
            problems.push("cache.max_bytes must be at least 1024".into());
        }

        if self.clients.is_empty() {
            problems.push(
                "no [[clients]]: permgate has no anonymous mode, configure at least one client"
                    .into(),
            );
        }
        let mut names = HashSet::new();
        let mut digests = HashSet::new();
        let mut clients = Vec::with_capacity(self.clients.len());
        for (i, c) in self.clients.into_iter().enumerate() {
            let at = format!("clients[{i}]");
            if c.name.trim().is_empty() {
                problems.push(format!("{at}.name is empty"));
            } else if !names.insert(c.name.clone()) {
                problems.push(format!("{at}.name '{}' is used twice", c.name));
            }
            let digest = parse_digest(&c.token_sha256);
            match digest {
                None => problems.push(format!(
                    "{at}.token_sha256 must be 64 hex characters (see `permgate hash-token`)"
                )),
                Some(d) if !digests.insert(d) => {
                    problems.push(format!("{at}.token_sha256 is shared with another client"))
                }
                Some(_) => {}
            }
            for (j, pattern) in c.checkpoints.iter().enumerate() {
                if let Err(e) = glob::Pattern::new(pattern) {
                    problems.push(format!(
                        "{at}.checkpoints[{j}]: bad glob '{pattern}': {}",
                        e.msg
                    ));
                }
            }
            let rate = match (c.rate_per_second, c.burst) {
                (None, None) => None,
                (None, Some(_)) => {
                    problems.push(format!("{at}.burst needs {at}.rate_per_second"));
                    None
                }
                (Some(per_second), burst) => {
                    let per_second = NonZeroU32::new(per_second);
                    let burst = burst.map_or(per_second, NonZeroU32::new);
                    match (per_second, burst) {
                        (Some(r), Some(b)) => Some((r, b)),
                        _ => {
                            problems
                                .push(format!("{at}.rate_per_second and burst must be at least 1"));
                            None
                        }
                    }
                }
            };
            clients.push(ClientConfig {
                name: c.name,
                token_sha256: digest.unwrap_or_default(),
                checkpoints: c.checkpoints,
                can_write: c.can_write,
                rate,
            });
        }

        let redis = self.redis.and_then(|r| {
            let ok_url = r.url.starts_with("redis://") || r.url.starts_with("rediss://");
            if !ok_url {
                problems.push("redis.url must start with redis:// or rediss://".into());
            }
            // A password in the URL would sit in the config file: refuse it.
            let has_password = r
                .url
                .split_once("://")
                .and_then(|(_, rest)| rest.split('/').next())
                .is_some_and(|authority| authority.contains('@'));
            if has_password {
                problems.push(
                    "redis.url may not carry credentials: use redis.password_env or redis.password_file"
                        .into(),
                );
            }
            let password = match (r.password_env, r.password_file) {
                (Some(_), Some(_)) => {
                    problems.push("redis: set password_env or password_file, not both".into());
                    None
                }
                (Some(env), None) => Some(KeySource::Env(env)),
                (None, Some(file)) => Some(KeySource::File(file)),
                (None, None) => None,
            };
            let timeout = Duration::from_millis(r.timeout_ms.unwrap_or(100));
            if timeout.is_zero() || timeout > Duration::from_secs(10) {
                problems.push("redis.timeout_ms must be 1 to 10000".into());
            }
            (ok_url && !has_password).then(|| RedisConfig {
                url: r.url,
                password,
                key_prefix: r.key_prefix.unwrap_or_else(|| "permgate:".into()),
                timeout,
                degraded_ttl: Duration::from_secs(r.degraded_ttl_seconds.unwrap_or(5).min(MAX_WINDOW_SECONDS)),
                reconnect_max: Duration::from_millis(r.reconnect_max_ms.unwrap_or(30_000).clamp(100, MAX_TIMEOUT_MS)),
            })
        });

        match (problems.is_empty(), listen, base_url, admin_key) {
            (true, Some(listen), Some(base_url), Some(admin_key)) => Ok(Config {
                server: ServerConfig {
                    listen,
                    admin_listen,
                    worker_threads: self.server.worker_threads,
                    drain_timeout: Duration::from_millis(
                        self.server.drain_timeout_ms.unwrap_or(10_000),
                    ),
                    max_body_bytes,
                    max_connections,
                    max_header_bytes,
                    max_uri_bytes,
                    header_read_timeout,
                },
                upstream: UpstreamConfig {
                    base_url,
                    admin_key,
                    request_timeout,
                    connect_timeout,
                    ca_file: self.upstream.ca_file,
                    max_retries: self.upstream.max_retries.unwrap_or(2),
                    retry_base_delay,
                    retry_max_delay,
                    max_concurrency,
                    queue_timeout: Duration::from_millis(
                        self.upstream.queue_timeout_ms.unwrap_or(1_000),
                    ),
                    breaker_threshold: self.upstream.breaker_threshold.unwrap_or(5),
                    breaker_open: Duration::from_millis(
                        self.upstream.breaker_open_ms.unwrap_or(5_000),
                    ),
                    admin_key_poll: Duration::from_millis(
                        self.upstream.admin_key_poll_ms.unwrap_or(5_000).max(100),
                    ),
                },
                cache,
                audit: self.audit.map(|a| AuditConfig { path: a.path }),
                redis,
                clients,
            }),
            _ => Err(ConfigError(problems)),
        }
    }
}

fn validate_base_url(raw: &str) -> Result<Uri, String> {
    // Values are never echoed: a URL may carry credentials pasted by mistake.
    let uri: Uri = raw.parse().map_err(|_| "is not a URL".to_string())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    if uri.authority().is_none() {
        return Err("has no host".into());
    }
    if uri.query().is_some() {
        return Err("may not have a query".into());
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("credentials in the URL are not allowed".into());
    }
    Ok(uri)
}

/// A TOML error as "line L, column C: message", without the source line toml's `Display`
/// quotes: that line could be an admin key an operator pasted into the file.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {}", e.message())
        }
        None => e.message().to_owned(),
    }
}

/// Durations beyond these are surely typos, and would overflow `Instant` arithmetic.
const MAX_WINDOW_SECONDS: u64 = 7 * 24 * 3600;
const MAX_TIMEOUT_MS: u64 = 3600 * 1000;

fn parse_digest(hex_text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut out).ok()?;
    Some(out)
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn display<S: serde::Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn hex_digest<S: serde::Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(d))
}

fn rate<S: serde::Serializer>(
    r: &Option<(NonZeroU32, NonZeroU32)>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match r {
        Some((per_second, burst)) => s.collect_str(&format_args!("{per_second}/s, burst {burst}")),
        None => s.serialize_str("unlimited"),
    }
}

fn optional_key_source<S: serde::Serializer>(
    k: &Option<KeySource>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match k {
        Some(k) => key_source(k, s),
        None => s.serialize_str("none"),
    }
}

fn key_source<S: serde::Serializer>(k: &KeySource, s: S) -> Result<S::Ok, S::Error> {
    match k {
        KeySource::Env(name) => s.collect_str(&format_args!("env:{name} (value redacted)")),
        KeySource::File(path) => {
            s.collect_str(&format_args!("file:{} (value redacted)", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8080"
[upstream]
base_url = "https://api.openai.com/v1"
[[clients]]
name = "a"
token_sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn problems(text: &str) -> String {
        Config::parse(text, &no_env).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, &no_env).unwrap();
        assert_eq!(
            c.upstream.admin_key,
            KeySource::Env("OPENAI_ADMIN_KEY".into())
        );
        assert_eq!(c.upstream.request_timeout, Duration::from_secs(10));
        assert_eq!(c.cache.ttl, Duration::from_secs(60));
        assert_eq!(c.cache.max_bytes, 64 * 1024 * 1024);
        assert!(c.clients[0].checkpoints.is_empty());
        assert!(!c.clients[0].can_write);
    }

    #[test]
    fn plain_http_upstream_off_the_machine_is_warned_about() {
        let c = Config::parse(MINIMAL, &no_env).unwrap();
        assert!(c.warnings().is_empty());
        for (url, warned) in [
            ("http://127.0.0.1:9/v1", false),
            ("http://localhost:9/v1", false),
            ("http://[::1]:9/v1", false),
            ("http://egress.internal/v1", true),
        ] {
            let c =
                Config::parse(&MINIMAL.replace("https://api.openai.com/v1", url), &no_env).unwrap();
            assert_eq!(!c.warnings().is_empty(), warned, "{url}");
        }
    }

    #[test]
    fn env_overrides_the_file() {
        let env = |k: &str| match k {
            "PERMGATE_LISTEN" => Some("0.0.0.0:9999".to_string()),
            "PERMGATE_UPSTREAM_URL" => Some("http://127.0.0.1:1234/v1".to_string()),
            _ => None,
        };
        let c = Config::parse(MINIMAL, &env).unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:9999");
        assert_eq!(c.upstream.base_url.to_string(), "http://127.0.0.1:1234/v1");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = MINIMAL.replace("[upstream]", "[upstream]\nretry = 3");
        assert!(problems(&text).contains("retry"));
        let text = format!("{MINIMAL}\n[bogus]\nx = 1\n");
        assert!(problems(&text).contains("bogus"));
    }

    #[test]
    fn errors_never_echo_values_from_the_file() {
        let secret = "sk-admin-PASTEDBYMISTAKE0123456789";
        let text = MINIMAL.replace(
            "[upstream]",
            &format!("[upstream]\nadmin_key = \"{secret}\""),
        );
        let err = problems(&text);
        assert!(err.contains("admin_key") && err.contains("line 5"), "{err}");
        let text = MINIMAL.replace(
            "https://api.openai.com/v1",
            &format!("ftp://user:{secret}@example.com/v1"),
        );
        let err = problems(&text);
        assert!(err.contains("upstream.base_url"), "{err}");
        for text in [problems(&format!("x = \"{secret}")), err] {
            assert!(!text.contains("PASTEDBYMISTAKE"), "{text}");
        }
    }

    #[test]
    fn redis_passwords_never_live_in_the_file() {
        let with = |section: &str| format!("{MINIMAL}\n[redis]\n{section}\n");
        let c = Config::parse(
            &with("url = \"redis://127.0.0.1:6379\"\npassword_env = \"REDIS_PW\""),
            &no_env,
        )
        .unwrap();
        let r = c.redis.unwrap();
        assert_eq!(r.password, Some(KeySource::Env("REDIS_PW".into())));
        assert_eq!(r.key_prefix, "permgate:");
        let err = problems(&with("url = \"redis://:hunter2@127.0.0.1:6379\""));
        assert!(
            err.contains("may not carry credentials") && !err.contains("hunter2"),
            "{err}"
        );
        assert!(problems(&with("url = \"http://x\"")).contains("redis.url"));
        assert!(problems(&with("url = \"redis://x\"\npassword = \"p\"")).contains("password"));
    }

    #[test]
    fn absurd_durations_are_refused() {
        let text = MINIMAL.replace(
            "[upstream]",
            "[cache]\nttl_seconds = 9223372036854775807\n[upstream]",
        );
        assert!(problems(&text).contains("cache.ttl_seconds may be at most"));
        let text = MINIMAL.replace("[upstream]", "[upstream]\nrequest_timeout_ms = 99999999999");
        assert!(problems(&text).contains("upstream.request_timeout_ms may be at most"));
    }

    #[test]
    fn no_clients_refuses_to_start() {
        let text = MINIMAL.split("[[clients]]").next().unwrap();
        assert!(problems(text).contains("no [[clients]]"));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
[server]
listen = "nope"
[upstream]
base_url = "ftp://x"
admin_key_env = "A"
admin_key_file = "/k"
[cache]
ttl_seconds = 0
[[clients]]
name = "a"
token_sha256 = "xyz"
checkpoints = ["[unclosed"]
burst = 5
[[clients]]
name = "a"
token_sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
"#;
        let all = problems(text);
        for key in [
            "server.listen",
            "upstream.base_url",
            "admin_key_env or admin_key_file",
            "cache.ttl_seconds",
            "clients[0].token_sha256",
            "clients[0].checkpoints[0]",
            "clients[0].burst needs",
            "clients[1].name",
        ] {
            assert!(all.contains(key), "{key} missing from:\n{all}");
        }
    }

    #[test]
    fn shipped_configs_parse() {
        let env = |k: &str| (k == "OPENAI_ADMIN_KEY").then(|| "x".to_string());
        for text in [
            include_str!("../config/permgate.toml"),
            include_str!("../config/demo.toml"),
        ] {
            Config::parse(text, &env).unwrap();
        }
    }
}
