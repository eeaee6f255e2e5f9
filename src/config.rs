//! Config file (TOML) → environment overrides → validation → [`Config`] (SPEC "Config file").
//!
//! Every table uses `deny_unknown_fields`: a misspelt or not-yet-supported key is an error,
//! never silently ignored. Validation collects every problem it finds and names each by its
//! key path. The environment is injected as a lookup function, so tests never touch the
//! process environment. The admin key itself is not read here (see `secret`); this module
//! only records where it comes from.
//!
//! No message and no view of the config ever holds a value from the file (SPEC "Hygiene
//! rules"): problems name the key and what is wrong, and a value that looks like an API key
//! (`secret::looks_like_api_key`), whichever key it was pasted into, is refused outright.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use hyper::Uri;
use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::secret::{self, AdminKey, KeySource};

/// A config that cannot be used, with one line per problem, each naming its key.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    /// Each problem is redacted as a last guard: problems should never quote values at all.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for problem in &self.0 {
            write!(f, "\n  - {}", secret::redact_api_keys(problem))?;
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
    jwt: Option<FileJwt>,
    #[serde(default)]
    clients: Vec<FileClient>,
}

/// `[jwt]`: how a JWT sent as the bearer token is verified (SPEC "Who a caller is").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJwt {
    issuer: String,
    audiences: Vec<String>,
    jwks_file: Option<PathBuf>,
    jwks_url: Option<String>,
    leeway_seconds: Option<u64>,
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
    lease_ms: Option<u64>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    listen: String,
    admin_listen: Option<String>,
    admin_token_sha256: Option<String>,
    worker_threads: Option<usize>,
    drain_timeout_ms: Option<u64>,
    max_body_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_header_bytes: Option<usize>,
    max_uri_bytes: Option<usize>,
    header_read_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    tls: Option<FileServerTls>,
}

/// `[server.tls]`: HTTPS on the data listener (SPEC "The front door").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServerTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    require_client_cert: Option<bool>,
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
    max_concurrency_per_client: Option<usize>,
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
    token_sha256: Option<String>,
    tls_identity: Option<String>,
    jwt_subject: Option<String>,
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
    /// `[jwt]`: needed by clients identified by `jwt_subject`.
    pub jwt: Option<JwtConfig>,
    pub clients: Vec<ClientConfig>,
}

/// `[jwt]`: a JWT is accepted when a key of the JWKS signed it (RS256 or ES256), `iss` is
/// `issuer`, `aud` names one of `audiences`, and `exp`/`nbf` hold within `leeway`.
#[derive(Debug, Clone, Serialize)]
pub struct JwtConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    #[serde(flatten)]
    pub jwks: JwksSource,
    #[serde(serialize_with = "seconds")]
    pub leeway: Duration,
}

impl JwtConfig {
    /// Clock skew allowed on `exp` and `nbf`: Kubernetes' own API server allows 60 s; permgate
    /// stays tighter, since a projected token is refreshed long before it expires.
    pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
    /// `leeway_seconds` above this is refused: it would keep expired tokens alive.
    pub const MAX_LEEWAY_SECONDS: u64 = 300;
}

/// Where the JWKS (the issuer's public keys) comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum JwksSource {
    /// Read off the runtime; re-read on SIGHUP and when a token names an unknown key.
    #[serde(rename = "jwks_file")]
    File(PathBuf),
    /// Fetched with the upstream client's TLS settings (`upstream.ca_file`).
    #[serde(rename = "jwks_url", serialize_with = "display")]
    Url(Uri),
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
    /// How long a renewed lease lets this replica serve from its cache (the same on every
    /// replica: writers wait for it).
    #[serde(serialize_with = "millis")]
    pub lease: Duration,
    /// PEM roots for `rediss://`: only certificates chaining to them are trusted (instead of
    /// the public roots). Read by `fleet`, at startup.
    pub ca_file: Option<PathBuf>,
}

impl RedisConfig {
    /// Prefix of every Redis key and channel permgate uses.
    pub const DEFAULT_KEY_PREFIX: &str = "permgate:";
    /// Deadline of each Redis call; past it the connection is dropped and re-made (the lease
    /// lapses unless a renewal succeeds in time).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
    /// Without a lease, local pages may be served up to this age: 0, never (read-your-writes
    /// holds); more trades it for fewer upstream calls during an outage.
    pub const DEFAULT_DEGRADED_TTL: Duration = Duration::ZERO;
    /// A replica's lease: renewed every third of it, each renewal within `timeout_ms`.
    pub const DEFAULT_LEASE: Duration = Duration::from_millis(1000);
    /// Cap on the backoff between reconnection attempts.
    pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_millis(30_000);
    /// `reconnect_max_ms` is raised to at least this, the backoff's first step.
    pub const MIN_RECONNECT_MAX: Duration = Duration::from_millis(100);
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    /// SHA-256 of the token `/metrics` and `POST /cache/purge` require; `None`: no token.
    #[serde(serialize_with = "optional_hex_digest")]
    pub admin_token_sha256: Option<[u8; 32]>,
    pub worker_threads: Option<usize>,
    #[serde(serialize_with = "millis")]
    pub drain_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    #[serde(serialize_with = "millis")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is shut down (HTTP/2: GOAWAY).
    #[serde(serialize_with = "millis")]
    pub idle_timeout: Duration,
    /// `[server.tls]`: HTTPS on the data listener; `None` is plain HTTP.
    pub tls: Option<ServerTlsConfig>,
}

/// `[server.tls]`. The files are read by `tls::ServerTls` (at startup, then again whenever
/// they change and on SIGHUP), not here.
#[derive(Debug, Clone, Serialize)]
pub struct ServerTlsConfig {
    /// PEM: the server certificate first, then its intermediates.
    pub cert_file: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM: the CAs a client certificate must chain to; set, clients are asked for one (mTLS).
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: a handshake without a verified client certificate is refused.
    pub require_client_cert: bool,
}

impl ServerConfig {
    /// On SIGTERM or SIGINT, the time in-flight requests get to finish.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_millis(10_000);
    /// Larger POST bodies are refused with 413; permission requests are small.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
    /// Past this, new connections wait in the kernel backlog.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
    /// Larger request headers are refused with 431.
    pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
    /// Longer request URIs are refused with 414.
    pub const DEFAULT_MAX_URI_BYTES: usize = 8 * 1024;
    /// Slow-loris guard; hyper also applies it to an HTTP/1 keep-alive connection's wait.
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_millis(10_000);
    /// Connections (HTTP/1 and HTTP/2) with no request in flight this long are shut down.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_millis(30_000);
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
    /// Upstream slots one client may hold at once (at most `max_concurrency`).
    pub max_concurrency_per_client: usize,
    #[serde(serialize_with = "millis")]
    pub queue_timeout: Duration,
    pub breaker_threshold: u32,
    #[serde(serialize_with = "millis")]
    pub breaker_open: Duration,
    /// How often `admin_key_file` is checked for a new key.
    #[serde(serialize_with = "millis")]
    pub admin_key_poll: Duration,
}

/// The admin key's environment variable when neither `admin_key_env` nor `admin_key_file` is set.
/// A config file larger than this is surely not one.
const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

pub const DEFAULT_ADMIN_KEY_ENV: &str = "OPENAI_ADMIN_KEY";

impl UpstreamConfig {
    /// The whole exchange with upstream, body included; past it the caller gets 504.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_millis(10_000);
    /// TCP connect to upstream; past it the caller gets 502.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(2_000);
    /// Retries of list and delete requests, never of a create (it is not idempotent).
    pub const DEFAULT_MAX_RETRIES: u32 = 2;
    /// Backoff base: full jitter in [0, base * 2^attempt].
    pub const DEFAULT_RETRY_BASE_DELAY: Duration = Duration::from_millis(100);
    /// Backoff cap, also the cap on an honoured `Retry-After`.
    pub const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_millis(2_000);
    /// Upstream requests in flight at once.
    pub const DEFAULT_MAX_CONCURRENCY: usize = 64;
    /// Wait for a free upstream slot before answering 503.
    pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_millis(1_000);
    /// Consecutive upstream failures that open the circuit (0 = never).
    pub const DEFAULT_BREAKER_THRESHOLD: u32 = 5;
    /// How long the circuit stays open before one probe.
    pub const DEFAULT_BREAKER_OPEN: Duration = Duration::from_millis(5_000);
    /// How often `admin_key_file` is checked for a rotated key.
    pub const DEFAULT_ADMIN_KEY_POLL: Duration = Duration::from_millis(5_000);
    /// `admin_key_poll_ms` is raised to at least this, so polling never spins on the file.
    pub const MIN_ADMIN_KEY_POLL: Duration = Duration::from_millis(100);
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

impl CacheConfig {
    /// A page is fresh this long.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
    /// Memory bound for cached pages, bodies and bookkeeping.
    pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
    /// After the TTL, a stale page is served at once while one background fetch refreshes it.
    pub const DEFAULT_STALE_WHILE_REVALIDATE: Duration = Duration::from_secs(10);
    /// While upstream fails, a page is served up to this long past its TTL.
    pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(300);
    /// Upstream 404s are remembered this long (0 = not cached).
    pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientConfig {
    pub name: String,
    /// Who this client is: exactly one source per client.
    #[serde(flatten)]
    pub identity: Identity,
    pub checkpoints: Vec<String>,
    pub can_write: bool,
    /// Token bucket: (rate per second, burst); `None` is unlimited.
    #[serde(serialize_with = "rate")]
    pub rate: Option<(NonZeroU32, NonZeroU32)>,
}

/// How a client is recognised (SPEC "Who a caller is"): its config key names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Identity {
    /// The SHA-256 of a static bearer token.
    #[serde(rename = "token_sha256", serialize_with = "hex_digest")]
    TokenSha256([u8; 32]),
    /// A URI or DNS subject-alternative name of a verified client certificate (DNS names are
    /// kept in lower case: they match without regard to case).
    #[serde(rename = "tls_identity")]
    TlsIdentity(String),
    /// The `sub` of a JWT verified per `[jwt]`.
    #[serde(rename = "jwt_subject")]
    JwtSubject(String),
}

impl Identity {
    /// The config key that holds it: what `check-config` reports (never the value).
    pub fn source(&self) -> &'static str {
        match self {
            Identity::TokenSha256(_) => "token_sha256",
            Identity::TlsIdentity(_) => "tls_identity",
            Identity::JwtSubject(_) => "jwt_subject",
        }
    }
}

impl Config {
    /// The settings a reload does not apply, as `check-config` shows them (secrets redacted):
    /// every table but the client list, without the admin key's source (a reload reads the
    /// key again from the source the new file names).
    pub fn restart_only(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut view = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(view)) => view,
            _ => serde_json::Map::new(),
        };
        view.remove("clients");
        if let Some(serde_json::Value::Object(upstream)) = view.get_mut("upstream") {
            upstream.remove("admin_key");
        }
        view
    }

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
        for (i, client) in self.clients.iter().enumerate() {
            for (j, pattern) in client.checkpoints.iter().enumerate() {
                // Named by position only: a pattern or a name could be a secret pasted by
                // mistake.
                let at = format!("clients[{i}].checkpoints[{j}]");
                match organisation_reach(pattern) {
                    OrganisationReach::Pinned => {}
                    OrganisationReach::Every => warnings.push(format!(
                        "{at} matches every organisation's checkpoints: a `*` stands in for the organisation (the third `:`-separated field of ft:{{base_model}}:{{org}}:{{suffix}}:{{id}}), and `*` also matches `:`; write the organisation out, as in ft:gpt-4o-mini-2024-07-18:acme:*"
                    )),
                    OrganisationReach::Prefix => warnings.push(format!(
                        "{at} also matches other organisations whose name starts the same way: its organisation field ends in `*` (acme* matches acme-labs); put a `:` after the organisation, as in ft:gpt-4o-mini-2024-07-18:acme:*"
                    )),
                }
            }
        }
        warnings.extend(self.identity_warnings());
        warnings.extend(self.front_door_warnings(FrontDoor::of(self)));
        warnings
    }

    /// Identity settings that are valid but cannot work as written. Clients are named by
    /// position, never by a value.
    fn identity_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let jwt_clients = self
            .clients
            .iter()
            .any(|c| matches!(c.identity, Identity::JwtSubject(_)));
        if self.jwt.is_some() && !jwt_clients {
            warnings.push(
                "[jwt] is configured but no client has a jwt_subject: every JWT will be refused"
                    .into(),
            );
        }
        warnings
    }

    /// The front door's risky settings (SPEC "The front door"), from the facts in `door`.
    fn front_door_warnings(&self, door: FrontDoor) -> Vec<String> {
        let mut warnings = Vec::new();
        if !door.data_tls && !self.server.listen.ip().is_loopback() {
            warnings.push(
                "server.listen is not a loopback address and [server.tls] is off: client tokens and JWTs would cross the network unencrypted"
                    .into(),
            );
        }
        let tls_clients = self
            .clients
            .iter()
            .any(|c| matches!(c.identity, Identity::TlsIdentity(_)));
        if tls_clients && door.client_ca && !door.require_client_cert {
            warnings.push(
                "clients use tls_identity while server.tls.require_client_cert = false: a caller without a certificate is still let in by a bearer token (static or JWT)"
                    .into(),
            );
        }
        let admin_open = self
            .server
            .admin_listen
            .is_some_and(|a| !a.ip().is_loopback());
        if admin_open && !door.admin_token {
            warnings.push(
                "server.admin_listen is not a loopback address and server.admin_token_sha256 is not set: whoever reaches it can read /metrics and purge the cache"
                    .into(),
            );
        }
        warnings
    }

    /// The resolved config as `check-config` prints it (TOML). Secrets are only named by their
    /// source, and any run of text that looks like an API key is replaced by `<redacted>`
    /// (validation refuses such values, so this is a last guard).
    pub fn resolved_view(&self) -> Result<String, String> {
        let text = toml::to_string_pretty(self)
            .map_err(|_| "cannot render the resolved configuration".to_string())?;
        Ok(secret::redact_api_keys(&text).into_owned())
    }

    /// Reads and parses a config file.
    pub fn load(path: &std::path::Path, env: &Env) -> Result<Config, ConfigError> {
        // Never waits on a FIFO at the path (see `secret::read_regular_file`).
        let text = secret::read_regular_file(path, MAX_CONFIG_BYTES)
            .and_then(|bytes| String::from_utf8(bytes).map_err(std::io::Error::other))
            .map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
        Self::parse(&text, env)
    }
}

/// What the front door has, as the config says: the facts behind
/// [`Config::front_door_warnings`].
#[derive(Debug, Clone, Copy, Default)]
struct FrontDoor {
    /// `[server.tls]` is configured: the data listener speaks HTTPS.
    data_tls: bool,
    /// `server.tls.client_ca_file` is set: client certificates are verified.
    client_ca: bool,
    /// `server.tls.require_client_cert = true`.
    require_client_cert: bool,
    /// `server.admin_token_sha256` is set.
    admin_token: bool,
}

impl FrontDoor {
    fn of(config: &Config) -> FrontDoor {
        let tls = config.server.tls.as_ref();
        FrontDoor {
            data_tls: tls.is_some(),
            client_ca: tls.is_some_and(|t| t.client_ca_file.is_some()),
            require_client_cert: tls.is_some_and(|t| t.require_client_cert),
            admin_token: config.server.admin_token_sha256.is_some(),
        }
    }
}

/// Which organisations a checkpoint pattern can reach. Checkpoint ids read
/// `ft:{base_model}:{org}:{suffix}:{id}`, and glob wildcards match `:` too (see `auth`).
#[derive(Debug, PartialEq, Eq)]
enum OrganisationReach {
    /// No `*` before the organisation's closing `:` (a `?` or class in it still varies one
    /// character).
    Pinned,
    /// A `*` before the organisation field, or making up all of it: that `*` can stand for
    /// `base_model:any-org` or `any-org`.
    Every,
    /// The organisation field is text then `*`: every organisation whose name starts so.
    Prefix,
}

fn organisation_reach(pattern: &str) -> OrganisationReach {
    let mut colons = 0;
    let mut org_text = false;
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            ':' if colons == 2 => return OrganisationReach::Pinned,
            ':' => colons += 1,
            '*' if colons == 2 && org_text => return OrganisationReach::Prefix,
            '*' => return OrganisationReach::Every,
            '?' => {}
            '[' => {
                skip_class(&mut chars);
                org_text |= colons == 2;
            }
            _ => org_text |= colons == 2,
        }
    }
    OrganisationReach::Pinned
}

/// Consumes a glob character class after its `[`: one character of the checkpoint, whatever
/// it holds (`[*]` is a literal `*`). A `]` first in the class, after an optional `!`, is a
/// member.
fn skip_class(chars: &mut std::str::Chars<'_>) {
    if chars.as_str().starts_with('!') {
        chars.next();
    }
    chars.next();
    let _ = chars.find(|&c| c == ']');
}

/// Each client's identity needs what verifies it: `jwt_subject` a `[jwt]` table, `tls_identity`
/// a data listener that verifies client certificates (`[server.tls] client_ca_file`).
fn check_identity_sources(
    clients: &[ClientConfig],
    jwt: bool,
    verifies_certificates: bool,
    problems: &mut Vec<String>,
) {
    for (i, client) in clients.iter().enumerate() {
        match client.identity {
            Identity::JwtSubject(_) if !jwt => problems.push(format!(
                "clients[{i}].jwt_subject needs a [jwt] table (issuer, audiences, jwks_file or jwks_url)"
            )),
            Identity::TlsIdentity(_) if !verifies_certificates => problems.push(format!(
                "clients[{i}].tls_identity needs [server.tls] client_ca_file: without it no client certificate is verified"
            )),
            _ => {}
        }
    }
}

impl Config {
    /// Refuses every text value that holds a piece of the admin key itself (a piece of its
    /// secret, after the public `sk-admin-` prefix: `AdminKey::secret_appears_in`), naming its key and
    /// never its value: the key, or part of it, pasted where it would be printed, whether or
    /// not it looks like a key. Run once the key is loaded, before anything is printed.
    pub fn refuse_key_pieces(&self, key: &AdminKey) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Ok(values) = serde_json::to_value(self) {
            secret::any_json_text(&values, &mut |at, text| {
                if key.secret_appears_in(text.as_bytes()) {
                    problems.push(format!(
                        "{at} holds a piece of the admin key (its value is not shown): the key goes only in the environment variable or file that upstream.admin_key_env or admin_key_file names"
                    ));
                }
                false
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }
}

impl FileConfig {
    /// Validates table by table, collecting every problem before giving up.
    fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        self.check_pasted_keys(&mut problems);
        self.check_duration_bounds(&mut problems);
        let server = self.server.validate(&mut problems);
        let upstream = self.upstream.validate(&mut problems);
        let cache = self.cache.validate(&mut problems);
        let clients = validate_clients(self.clients, &mut problems);
        let verifies_certificates = server
            .as_ref()
            .and_then(|s| s.tls.as_ref())
            .is_some_and(|t| t.client_ca_file.is_some());
        check_identity_sources(
            &clients,
            self.jwt.is_some(),
            verifies_certificates,
            &mut problems,
        );
        let jwt = self.jwt.and_then(|j| j.validate(&mut problems));
        let redis = self.redis.and_then(|r| r.validate(&mut problems));
        let audit = self.audit.map(FileAudit::validate);
        match (server, upstream) {
            (Some(server), Some(upstream)) if problems.is_empty() => Ok(Config {
                server,
                upstream,
                cache,
                audit,
                redis,
                jwt,
                clients,
            }),
            _ => Err(ConfigError(problems)),
        }
    }

    /// Refuses every text value that looks like an API key (`secret::looks_like_api_key`),
    /// naming its key and never its value: such a value is the admin key pasted into the wrong
    /// place, and would otherwise be printed (check-config, errors, logs, metric labels).
    fn check_pasted_keys(&self, problems: &mut Vec<String>) {
        for (key, value) in self.text_values() {
            if !secret::looks_like_api_key(&value) {
                continue;
            }
            let hint = if key.ends_with("_env") {
                ", not a variable's name: put the key in the environment, name the variable here"
            } else if key.ends_with("_file") {
                ", not a path: put the key in a file and give its path here"
            } else {
                ": did you paste the admin key here? It goes in the environment or a key file"
            };
            problems.push(format!(
                "{key} looks like an API key (its value is not shown){hint}"
            ));
        }
    }

    /// Every free-text value of the file (after environment overrides), with its key path.
    fn text_values(&self) -> Vec<(String, String)> {
        let text = |key: &str, value: &str| (key.to_owned(), value.to_owned());
        let path = |key: &str, value: &PathBuf| (key.to_owned(), value.to_string_lossy().into());
        let (server, upstream) = (&self.server, &self.upstream);
        let mut values = vec![
            text("server.listen", &server.listen),
            text("upstream.base_url", &upstream.base_url),
        ];
        values.extend(
            server
                .admin_listen
                .iter()
                .map(|v| text("server.admin_listen", v)),
        );
        values.extend(
            server
                .admin_token_sha256
                .iter()
                .map(|v| text("server.admin_token_sha256", v)),
        );
        values.extend(
            upstream
                .admin_key_env
                .iter()
                .map(|v| text("upstream.admin_key_env", v)),
        );
        values.extend(
            upstream
                .admin_key_file
                .iter()
                .map(|v| path("upstream.admin_key_file", v)),
        );
        values.extend(upstream.ca_file.iter().map(|v| path("upstream.ca_file", v)));
        values.extend(self.audit.iter().map(|a| path("audit.path", &a.path)));
        if let Some(redis) = &self.redis {
            values.push(text("redis.url", &redis.url));
            values.extend(
                redis
                    .password_env
                    .iter()
                    .map(|v| text("redis.password_env", v)),
            );
            values.extend(
                redis
                    .password_file
                    .iter()
                    .map(|v| path("redis.password_file", v)),
            );
            values.extend(redis.key_prefix.iter().map(|v| text("redis.key_prefix", v)));
            values.extend(redis.ca_file.iter().map(|v| path("redis.ca_file", v)));
        }
        if let Some(jwt) = &self.jwt {
            values.push(text("jwt.issuer", &jwt.issuer));
            for (j, audience) in jwt.audiences.iter().enumerate() {
                values.push(text(&format!("jwt.audiences[{j}]"), audience));
            }
            values.extend(jwt.jwks_file.iter().map(|v| path("jwt.jwks_file", v)));
            values.extend(jwt.jwks_url.iter().map(|v| text("jwt.jwks_url", v)));
        }
        for (i, client) in self.clients.iter().enumerate() {
            values.push(text(&format!("clients[{i}].name"), &client.name));
            let identities = [
                ("token_sha256", &client.token_sha256),
                ("tls_identity", &client.tls_identity),
                ("jwt_subject", &client.jwt_subject),
            ];
            for (key, value) in identities {
                if let Some(value) = value {
                    values.push(text(&format!("clients[{i}].{key}"), value));
                }
            }
            for (j, pattern) in client.checkpoints.iter().enumerate() {
                values.push(text(&format!("clients[{i}].checkpoints[{j}]"), pattern));
            }
        }
        values
    }

    /// Refuses absurd durations in `[server]`, `[upstream]` and `[cache]` before any table is
    /// validated, so these problems lead the report whichever table they sit in.
    fn check_duration_bounds(&self, problems: &mut Vec<String>) {
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
    }
}

impl FileServer {
    /// `[server]`; `None` when `listen` is not an address.
    fn validate(self, problems: &mut Vec<String>) -> Option<ServerConfig> {
        let listen = parse_addr("server.listen", &self.listen, problems);
        let admin_listen = self
            .admin_listen
            .as_deref()
            .and_then(|a| parse_addr("server.admin_listen", a, problems));
        if let (Some(l), Some(a)) = (listen, admin_listen) {
            if l == a && l.port() != 0 {
                problems.push("server.admin_listen must differ from server.listen".into());
            }
        }
        let admin_token_sha256 = self.admin_token_sha256.as_deref().and_then(|hex_text| {
            let digest = parse_digest(hex_text);
            if digest.is_none() {
                problems.push(
                    "server.admin_token_sha256 must be 64 hex characters (see `permgate hash-token`)"
                        .into(),
                );
            }
            digest
        });
        if self.worker_threads == Some(0) {
            problems.push("server.worker_threads must be at least 1".into());
        }
        let max_body_bytes = self
            .max_body_bytes
            .unwrap_or(ServerConfig::DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            problems.push("server.max_body_bytes must be at least 1".into());
        }
        let max_connections = self
            .max_connections
            .unwrap_or(ServerConfig::DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            problems.push("server.max_connections must be at least 1".into());
        }
        let max_header_bytes = self
            .max_header_bytes
            .unwrap_or(ServerConfig::DEFAULT_MAX_HEADER_BYTES);
        if max_header_bytes < 8192 {
            problems.push("server.max_header_bytes must be at least 8192".into());
        }
        let max_uri_bytes = self
            .max_uri_bytes
            .unwrap_or(ServerConfig::DEFAULT_MAX_URI_BYTES);
        if max_uri_bytes < 256 {
            problems.push("server.max_uri_bytes must be at least 256".into());
        }
        let header_read_timeout = millis_or(
            self.header_read_timeout_ms,
            ServerConfig::DEFAULT_HEADER_READ_TIMEOUT,
        );
        if header_read_timeout.is_zero() {
            problems.push("server.header_read_timeout_ms must be at least 1".into());
        }
        let idle_timeout = millis_or(self.idle_timeout_ms, ServerConfig::DEFAULT_IDLE_TIMEOUT);
        if idle_timeout.is_zero() || idle_timeout > Duration::from_millis(MAX_TIMEOUT_MS) {
            problems.push(format!(
                "server.idle_timeout_ms must be 1 to {MAX_TIMEOUT_MS} (1 hour)"
            ));
        }
        let tls = self.tls.map(|t| t.validate(problems));
        Some(ServerConfig {
            listen: listen?,
            admin_listen,
            admin_token_sha256,
            worker_threads: self.worker_threads,
            drain_timeout: millis_or(self.drain_timeout_ms, ServerConfig::DEFAULT_DRAIN_TIMEOUT),
            max_body_bytes,
            max_connections,
            max_header_bytes,
            max_uri_bytes,
            header_read_timeout,
            idle_timeout,
            tls,
        })
    }
}

impl FileServerTls {
    /// `[server.tls]`. Paths are never echoed: a value pasted into the wrong key could be a
    /// secret.
    fn validate(self, problems: &mut Vec<String>) -> ServerTlsConfig {
        let paths = [
            ("cert_file", Some(&self.cert_file)),
            ("key_file", Some(&self.key_file)),
            ("client_ca_file", self.client_ca_file.as_ref()),
        ];
        for (key, path) in paths {
            if path.is_some_and(|p| p.as_os_str().is_empty()) {
                problems.push(format!("server.tls.{key} is empty"));
            }
        }
        let require_client_cert = self.require_client_cert.unwrap_or(false);
        if require_client_cert && self.client_ca_file.is_none() {
            problems.push(
                "server.tls.require_client_cert = true needs server.tls.client_ca_file (the CAs client certificates must chain to)"
                    .into(),
            );
        }
        ServerTlsConfig {
            cert_file: self.cert_file,
            key_file: self.key_file,
            client_ca_file: self.client_ca_file,
            require_client_cert,
        }
    }
}

impl FileUpstream {
    /// `[upstream]`; `None` when `base_url` or the admin key's source is unusable.
    fn validate(self, problems: &mut Vec<String>) -> Option<UpstreamConfig> {
        let base_url = match validate_base_url(&self.base_url) {
            Ok(uri) => Some(uri),
            Err(why) => {
                problems.push(format!("upstream.base_url: {why}"));
                None
            }
        };
        let admin_key = admin_key_source(self.admin_key_env, self.admin_key_file, problems);
        let request_timeout = millis_or(
            self.request_timeout_ms,
            UpstreamConfig::DEFAULT_REQUEST_TIMEOUT,
        );
        let connect_timeout = millis_or(
            self.connect_timeout_ms,
            UpstreamConfig::DEFAULT_CONNECT_TIMEOUT,
        );
        if request_timeout.is_zero() {
            problems.push("upstream.request_timeout_ms must be at least 1".into());
        }
        if connect_timeout.is_zero() {
            problems.push("upstream.connect_timeout_ms must be at least 1".into());
        }
        let max_concurrency = self
            .max_concurrency
            .unwrap_or(UpstreamConfig::DEFAULT_MAX_CONCURRENCY);
        if max_concurrency == 0 {
            problems.push("upstream.max_concurrency must be at least 1".into());
        }
        let max_concurrency_per_client =
            per_client_concurrency(self.max_concurrency_per_client, max_concurrency, problems);
        let retry_base_delay = millis_or(
            self.retry_base_delay_ms,
            UpstreamConfig::DEFAULT_RETRY_BASE_DELAY,
        );
        let retry_max_delay = millis_or(
            self.retry_max_delay_ms,
            UpstreamConfig::DEFAULT_RETRY_MAX_DELAY,
        );
        if retry_max_delay < retry_base_delay {
            problems
                .push("upstream.retry_max_delay_ms must be at least retry_base_delay_ms".into());
        }
        Some(UpstreamConfig {
            base_url: base_url?,
            admin_key: admin_key?,
            request_timeout,
            connect_timeout,
            ca_file: self.ca_file,
            max_retries: self
                .max_retries
                .unwrap_or(UpstreamConfig::DEFAULT_MAX_RETRIES),
            retry_base_delay,
            retry_max_delay,
            max_concurrency,
            max_concurrency_per_client,
            queue_timeout: millis_or(self.queue_timeout_ms, UpstreamConfig::DEFAULT_QUEUE_TIMEOUT),
            breaker_threshold: self
                .breaker_threshold
                .unwrap_or(UpstreamConfig::DEFAULT_BREAKER_THRESHOLD),
            breaker_open: millis_or(self.breaker_open_ms, UpstreamConfig::DEFAULT_BREAKER_OPEN),
            admin_key_poll: millis_or(
                self.admin_key_poll_ms,
                UpstreamConfig::DEFAULT_ADMIN_KEY_POLL,
            )
            .max(UpstreamConfig::MIN_ADMIN_KEY_POLL),
        })
    }
}

/// `upstream.max_concurrency_per_client`: by default half of `max_concurrency` (at least 1), so
/// one client can never take every upstream slot; never more than `max_concurrency`.
fn per_client_concurrency(
    configured: Option<usize>,
    max_concurrency: usize,
    problems: &mut Vec<String>,
) -> usize {
    let Some(per_client) = configured else {
        return (max_concurrency / 2).max(1);
    };
    if per_client == 0 {
        problems.push("upstream.max_concurrency_per_client must be at least 1".into());
    } else if per_client > max_concurrency {
        problems.push(format!(
            "upstream.max_concurrency_per_client must be at most upstream.max_concurrency ({max_concurrency})"
        ));
    }
    per_client
}

/// Where the admin key comes from: at most one of `admin_key_env` and `admin_key_file`,
/// [`DEFAULT_ADMIN_KEY_ENV`] when neither is set.
fn admin_key_source(
    env: Option<String>,
    file: Option<PathBuf>,
    problems: &mut Vec<String>,
) -> Option<KeySource> {
    match (env, file) {
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
    }
}

impl FileCache {
    /// `[cache]`: every key has a default, so there is always a config to return.
    fn validate(self, problems: &mut Vec<String>) -> CacheConfig {
        let cache = CacheConfig {
            ttl: seconds_or(self.ttl_seconds, CacheConfig::DEFAULT_TTL),
            max_bytes: self.max_bytes.unwrap_or(CacheConfig::DEFAULT_MAX_BYTES),
            stale_while_revalidate: seconds_or(
                self.stale_while_revalidate_seconds,
                CacheConfig::DEFAULT_STALE_WHILE_REVALIDATE,
            ),
            stale_if_error: seconds_or(
                self.stale_if_error_seconds,
                CacheConfig::DEFAULT_STALE_IF_ERROR,
            ),
            negative_ttl: seconds_or(self.negative_ttl_seconds, CacheConfig::DEFAULT_NEGATIVE_TTL),
        };
        if cache.ttl.is_zero() {
            problems.push("cache.ttl_seconds must be at least 1".into());
        }
        if cache.max_bytes < 1024 {
            problems.push("cache.max_bytes must be at least 1024".into());
        }
        cache
    }
}

/// `[[clients]]`: at least one, and no two sharing a name or an identity.
fn validate_clients(clients: Vec<FileClient>, problems: &mut Vec<String>) -> Vec<ClientConfig> {
    if clients.is_empty() {
        problems.push(
            "no [[clients]]: permgate has no anonymous mode, configure at least one client".into(),
        );
    }
    let mut seen = Seen::default();
    let mut validated = Vec::with_capacity(clients.len());
    for (i, client) in clients.into_iter().enumerate() {
        let at = format!("clients[{i}]");
        validated.push(client.validate(&at, &mut seen, problems));
    }
    validated
}

/// What the `[[clients]]` entries before this one used, each with where it was first used.
#[derive(Default)]
struct Seen {
    names: HashMap<String, String>,
    digests: HashSet<[u8; 32]>,
    tls_identities: HashMap<String, String>,
    subjects: HashMap<String, String>,
}

impl FileClient {
    /// One `[[clients]]` entry, found at `at`. Problems never quote the values.
    fn validate(self, at: &str, seen: &mut Seen, problems: &mut Vec<String>) -> ClientConfig {
        if self.name.trim().is_empty() {
            problems.push(format!("{at}.name is empty"));
        } else if let Some(first) = seen.names.get(&self.name) {
            problems.push(format!("{at}.name is already the name of {first}"));
        } else {
            seen.names.insert(self.name.clone(), at.to_owned());
        }
        let identity = self.identity(at, seen, problems);
        for (j, pattern) in self.checkpoints.iter().enumerate() {
            if let Err(e) = glob::Pattern::new(pattern) {
                problems.push(format!(
                    "{at}.checkpoints[{j}] is not a valid glob: {} (at character {})",
                    e.msg,
                    e.pos + 1
                ));
            }
        }
        let rate = match (self.rate_per_second, self.burst) {
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
                        problems.push(format!("{at}.rate_per_second and burst must be at least 1"));
                        None
                    }
                }
            }
        };
        ClientConfig {
            name: self.name,
            identity: identity.unwrap_or(Identity::TokenSha256([0; 32])),
            checkpoints: self.checkpoints,
            can_write: self.can_write,
            rate,
        }
    }

    /// Exactly one of `token_sha256`, `tls_identity` and `jwt_subject`, valid and used by no
    /// earlier client.
    fn identity(&self, at: &str, seen: &mut Seen, problems: &mut Vec<String>) -> Option<Identity> {
        let set: Vec<&str> = [
            ("token_sha256", self.token_sha256.is_some()),
            ("tls_identity", self.tls_identity.is_some()),
            ("jwt_subject", self.jwt_subject.is_some()),
        ]
        .iter()
        .filter_map(|&(key, present)| present.then_some(key))
        .collect();
        if set.len() != 1 {
            let what = if set.is_empty() { "none" } else { "several" };
            problems.push(format!(
                "{at} needs exactly one identity: token_sha256, tls_identity or jwt_subject ({what} set{})",
                if set.is_empty() { String::new() } else { format!(": {}", set.join(", ")) }
            ));
            return None;
        }
        let shared = |first: &String, key: &str| format!("{at}.{key} is already that of {first}");
        if let Some(hex_text) = &self.token_sha256 {
            let Some(digest) = parse_digest(hex_text) else {
                problems.push(format!(
                    "{at}.token_sha256 must be 64 hex characters (see `permgate hash-token`)"
                ));
                return None;
            };
            if !seen.digests.insert(digest) {
                // Not named: which client holds the same token is itself a hint to the token.
                problems.push(format!("{at}.token_sha256 is shared with another client"));
            }
            return Some(Identity::TokenSha256(digest));
        }
        if let Some(name) = &self.tls_identity {
            let name = tls_identity(name)
                .map_err(|why| problems.push(format!("{at}.tls_identity {why}")))
                .ok()?;
            if let Some(first) = seen.tls_identities.get(&name) {
                problems.push(shared(first, "tls_identity"));
            } else {
                seen.tls_identities.insert(name.clone(), at.to_owned());
            }
            return Some(Identity::TlsIdentity(name));
        }
        let subject = self.jwt_subject.clone()?;
        if subject.trim().is_empty() || subject.chars().any(char::is_control) {
            problems.push(format!(
                "{at}.jwt_subject is empty or holds control characters"
            ));
            return None;
        }
        if let Some(first) = seen.subjects.get(&subject) {
            problems.push(shared(first, "jwt_subject"));
        } else {
            seen.subjects.insert(subject.clone(), at.to_owned());
        }
        Some(Identity::JwtSubject(subject))
    }
}

/// A `tls_identity` as it is matched: a URI SAN (`spiffe://cluster.local/ns/x/sa/y`) as
/// written, or a DNS SAN (`billing.svc.cluster.local`) in lower case.
fn tls_identity(name: &str) -> Result<String, &'static str> {
    if let Some((scheme, rest)) = name.split_once("://") {
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        let rest_ok = !rest.is_empty() && rest.chars().all(|c| c.is_ascii_graphic());
        return if scheme_ok && rest_ok {
            Ok(name.to_owned())
        } else {
            Err("is not a URI (like spiffe://cluster.local/ns/billing/sa/api)")
        };
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(name.to_ascii_lowercase())
    } else {
        Err("is neither a URI nor a DNS name (like billing.svc.cluster.local)")
    }
}

impl FileJwt {
    /// `[jwt]`; `None` when a key is missing or unusable.
    fn validate(self, problems: &mut Vec<String>) -> Option<JwtConfig> {
        let before = problems.len();
        if self.issuer.trim().is_empty() {
            problems.push("jwt.issuer is empty".into());
        }
        if self.audiences.is_empty() {
            problems.push("jwt.audiences needs at least one audience".into());
        }
        if self.audiences.iter().any(|a| a.trim().is_empty()) {
            problems.push("jwt.audiences has an empty audience".into());
        }
        let leeway = self
            .leeway_seconds
            .map_or(JwtConfig::DEFAULT_LEEWAY, Duration::from_secs);
        if leeway.as_secs() > JwtConfig::MAX_LEEWAY_SECONDS {
            problems.push(format!(
                "jwt.leeway_seconds may be at most {}",
                JwtConfig::MAX_LEEWAY_SECONDS
            ));
        }
        let jwks = match (self.jwks_file, self.jwks_url) {
            (Some(file), None) => Some(JwksSource::File(file)),
            (None, Some(url)) => match validate_jwks_url(&url) {
                Ok(uri) => Some(JwksSource::Url(uri)),
                Err(why) => {
                    problems.push(format!("jwt.jwks_url {why}"));
                    None
                }
            },
            _ => {
                problems.push("jwt: set exactly one of jwks_file and jwks_url".into());
                None
            }
        };
        (problems.len() == before).then_some(JwtConfig {
            issuer: self.issuer,
            audiences: self.audiences,
            jwks: jwks?,
            leeway,
        })
    }
}

/// `https://`, or `http://` to a loopback host only: whoever can change the keys on their way
/// can sign any token. No credentials in the URL.
fn validate_jwks_url(raw: &str) -> Result<Uri, &'static str> {
    let uri: Uri = raw.parse().map_err(|_| "is not a URL")?;
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if loopback => {}
        Some("http") => return Err("must be https:// (plain http only to a loopback host): whoever can change the keys on their way could sign any token"),
        _ => return Err("must start with https://"),
    }
    if host.is_empty() {
        return Err("has no host");
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("may not carry credentials");
    }
    Ok(uri)
}

impl FileRedis {
    /// `[redis]`; `None` when the URL is unusable. A password is only named by its source.
    fn validate(self, problems: &mut Vec<String>) -> Option<RedisConfig> {
        let ok_url = self.url.starts_with("redis://") || self.url.starts_with("rediss://");
        if !ok_url {
            problems.push("redis.url must start with redis:// or rediss://".into());
        }
        // A password in the URL would sit in the config file (and in every message quoting
        // it): refuse it, in the user-info or in the query.
        let (has_password, odd_query) = redis_url_credentials(&self.url);
        if has_password {
            problems.push(
                "redis.url may not carry credentials: use redis.password_env or redis.password_file"
                    .into(),
            );
        }
        if odd_query {
            problems.push("redis.url: protocol is the only query parameter permgate uses".into());
        }
        let password = match (self.password_env, self.password_file) {
            (Some(_), Some(_)) => {
                problems.push("redis: set password_env or password_file, not both".into());
                None
            }
            (Some(env), None) => Some(KeySource::Env(env)),
            (None, Some(file)) => Some(KeySource::File(file)),
            (None, None) => None,
        };
        let timeout = millis_or(self.timeout_ms, RedisConfig::DEFAULT_TIMEOUT);
        if timeout.is_zero() || timeout > Duration::from_secs(10) {
            problems.push("redis.timeout_ms must be 1 to 10000".into());
        }
        let lease = millis_or(self.lease_ms, RedisConfig::DEFAULT_LEASE);
        if lease < Duration::from_millis(100) || lease > Duration::from_millis(60_000) {
            problems.push("redis.lease_ms must be 100 to 60000".into());
        } else if lease < timeout * 3 {
            problems.push(
                "redis.lease_ms must be at least 3 x redis.timeout_ms (renewed every third of it)"
                    .into(),
            );
        }
        if let Some(ca_file) = &self.ca_file {
            if ca_file.as_os_str().is_empty() {
                problems.push("redis.ca_file is empty".into());
            } else if !self.url.starts_with("rediss://") {
                problems.push("redis.ca_file needs a rediss:// redis.url (TLS to Redis)".into());
            }
        }
        (ok_url && !has_password && !odd_query).then(|| RedisConfig {
            url: self.url,
            password,
            key_prefix: self
                .key_prefix
                .unwrap_or_else(|| RedisConfig::DEFAULT_KEY_PREFIX.into()),
            timeout,
            // Out-of-range values are clamped, not refused.
            degraded_ttl: seconds_or(self.degraded_ttl_seconds, RedisConfig::DEFAULT_DEGRADED_TTL)
                .min(Duration::from_secs(MAX_WINDOW_SECONDS)),
            reconnect_max: millis_or(self.reconnect_max_ms, RedisConfig::DEFAULT_RECONNECT_MAX)
                .clamp(
                    RedisConfig::MIN_RECONNECT_MAX,
                    Duration::from_millis(MAX_TIMEOUT_MS),
                ),
            lease,
            ca_file: self.ca_file,
        })
    }
}

impl FileAudit {
    /// `[audit]`: nothing to check here; `audit` opens the file at startup.
    fn validate(self) -> AuditConfig {
        AuditConfig { path: self.path }
    }
}

/// Whether a Redis URL carries credentials (user-info, or a query parameter named like
/// `password`, `pass`, `user`, `token`...), and whether its query has any other parameter than
/// `protocol` (the only one redis-rs reads for `redis://`, so anything else is a mistake).
fn redis_url_credentials(url: &str) -> (bool, bool) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split('#').next().unwrap_or_default();
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or_default();
    let mut credentials = authority.contains('@');
    let mut odd = false;
    for name in query.split('&').filter(|p| !p.is_empty()) {
        let name = name
            .split('=')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let secret = [
            "pass", "pwd", "user", "auth", "token", "secret", "key", "cred",
        ]
        .iter()
        .any(|word| name.contains(word));
        credentials |= secret;
        odd |= !secret && name != "protocol";
    }
    (credentials, odd)
}

/// A listen address, or `None` and a problem naming `key`.
fn parse_addr(key: &str, value: &str, problems: &mut Vec<String>) -> Option<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(format!("{key} is not an address like 127.0.0.1:8080"));
            None
        }
    }
}

/// A `*_ms` key's value, or `default` when it is omitted.
fn millis_or(value: Option<u64>, default: Duration) -> Duration {
    value.map_or(default, Duration::from_millis)
}

/// A `*_seconds` key's value, or `default` when it is omitted.
fn seconds_or(value: Option<u64>, default: Duration) -> Duration {
    value.map_or(default, Duration::from_secs)
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
/// quotes and without the value serde's messages quote: either could be an admin key an
/// operator pasted into the file.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let message = without_values(e.message());
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// A serde or toml message with the offending value left out: `invalid type: string "…",
/// expected usize` becomes `invalid type: string, expected usize`, and `unknown variant `…``
/// loses its variant. Field names stay (`unknown field `retry``), key-shaped ones redacted.
fn without_values(message: &str) -> String {
    let kept = ["invalid type: ", "invalid value: ", "invalid length "]
        .iter()
        .find_map(|prefix| {
            let rest = message.strip_prefix(prefix)?;
            let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
            let kind = found
                .split(|c| "`'\"".contains(c))
                .next()
                .unwrap_or_default()
                .trim();
            Some(match expected {
                "" => format!("{prefix}{kind}"),
                _ => format!("{prefix}{kind}, expected {expected}"),
            })
        })
        .or_else(|| {
            let rest = message.strip_prefix("unknown variant `")?;
            let expected = rest.split_once("`, ").map_or("", |(_, e)| e);
            Some(format!("unknown variant, {expected}"))
        })
        .unwrap_or_else(|| message.to_owned());
    secret::redact_api_keys(&kept).into_owned()
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

fn optional_hex_digest<S: serde::Serializer>(
    d: &Option<[u8; 32]>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => hex_digest(d, s),
        None => s.serialize_str("none"),
    }
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
        let lease = |lines: &str| problems(&with(&format!("url = \"redis://x\"\n{lines}")));
        assert!(lease("lease_ms = 99").contains("redis.lease_ms must be 100 to 60000"));
        assert!(lease("timeout_ms = 400\nlease_ms = 1000").contains("3 x redis.timeout_ms"));
        let c = Config::parse(&with("url = \"redis://x\""), &|_| None).unwrap();
        let r = c.redis.unwrap();
        assert_eq!(r.lease, Duration::from_millis(1000));
        assert_eq!(
            r.degraded_ttl,
            Duration::ZERO,
            "no serving without a lease by default"
        );
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
    fn idle_timeout_defaults_to_30_seconds_and_is_bounded() {
        let c = Config::parse(MINIMAL, &no_env).unwrap();
        assert_eq!(c.server.idle_timeout, Duration::from_secs(30));
        let with = |ms: &str| {
            MINIMAL.replace("[upstream]", &format!("idle_timeout_ms = {ms}\n[upstream]"))
        };
        let c = Config::parse(&with("250"), &no_env).unwrap();
        assert_eq!(c.server.idle_timeout, Duration::from_millis(250));
        for bad in ["0", "3600001"] {
            assert!(
                problems(&with(bad)).contains("server.idle_timeout_ms must be 1 to 3600000"),
                "{bad}"
            );
        }
    }

    #[test]
    fn patterns_whose_wildcards_reach_the_organisation_are_warned_about() {
        use OrganisationReach::*;
        let cases = [
            ("ft:gpt-4o-mini-2024-07-18:acme:*", Pinned),
            ("ft:gpt-4o-mini-2024-07-18:acme:weather:B7R9VjQd", Pinned),
            ("ft:gpt-4o-mini-2024-07-18:acme:*:*", Pinned),
            ("ft:gpt-4o-mini-2024-07-18:ac?e:*", Pinned),
            ("ft:gpt-4o-mini-2024-07-18:[*]:*", Pinned),
            ("ft:gpt-4o-mini-2024-07-18:[]*]:*", Pinned),
            ("ft:gpt-4o-mini-2024-07-18:[!:]:*", Pinned),
            ("*", Every),
            ("ft:*", Every),
            ("ft:gpt-4o*", Every),
            ("ft:gpt-4o-mini-2024-07-18:*", Every),
            ("ft:gpt-4o-mini-2024-07-18:*:weather:*", Every),
            ("ft:gpt-4o-mini-2024-07-18:?*", Every),
            // `*` swallows `model:other-org`: matches ft:m:other:acme:x.
            ("ft:*:acme:*", Every),
            ("*:acme:*", Every),
            ("ft:[!:]*:acme:*", Every),
            // `?` may be a `:`: the organisation field starts at the `*`.
            ("ft:m?acme:*", Every),
            ("ft:gpt-4o-mini-2024-07-18:acme*", Prefix),
            ("ft:gpt-4o-mini-2024-07-18:[ab]*", Prefix),
        ];
        for (pattern, reach) in cases {
            assert_eq!(organisation_reach(pattern), reach, "{pattern}");
        }
        let text = MINIMAL.replace(
            "name = \"a\"",
            "name = \"a\"\ncheckpoints = [\"ft:m:acme:*\", \"ft:*:acme:*\", \"ft:m:acme*\"]",
        );
        let warnings = Config::parse(&text, &no_env).unwrap().warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0]
                .starts_with("clients[0].checkpoints[1] matches every organisation's checkpoints"),
            "{}",
            warnings[0]
        );
        assert!(
            warnings[1].starts_with("clients[0].checkpoints[2] also matches other organisations")
        );
        for warning in &warnings {
            assert!(
                !warning.contains("ft:*:acme:*") && !warning.contains("ft:m:acme*"),
                "{warning}"
            );
        }
        let env = |k: &str| (k == "OPENAI_ADMIN_KEY").then(|| "x".to_string());
        let shipped = Config::parse(include_str!("../config/permgate.toml"), &env).unwrap();
        assert_eq!(
            shipped.warnings(),
            Vec::<String>::new(),
            "the production example"
        );
    }

    #[test]
    fn per_client_concurrency_defaults_to_half_and_stays_within_the_total() {
        let with = |keys: &str| MINIMAL.replace("[upstream]", &format!("[upstream]\n{keys}"));
        let per_client = |keys: &str| {
            Config::parse(&with(keys), &no_env)
                .unwrap()
                .upstream
                .max_concurrency_per_client
        };
        assert_eq!(per_client(""), 32);
        assert_eq!(per_client("max_concurrency = 9"), 4);
        assert_eq!(per_client("max_concurrency = 1"), 1);
        assert_eq!(
            per_client("max_concurrency = 8\nmax_concurrency_per_client = 8"),
            8
        );
        assert!(problems(&with("max_concurrency_per_client = 0"))
            .contains("upstream.max_concurrency_per_client must be at least 1"));
        assert!(
            problems(&with("max_concurrency = 4\nmax_concurrency_per_client = 5"))
                .contains("upstream.max_concurrency_per_client must be at most")
        );
    }

    #[test]
    fn server_tls_is_optional_and_checked() {
        let c = Config::parse(MINIMAL, &no_env).unwrap();
        assert!(c.server.tls.is_none(), "plain HTTP by default");
        let with = |table: &str| format!("{MINIMAL}\n[server.tls]\n{table}\n");
        let pair = "cert_file = \"/tls/tls.crt\"\nkey_file = \"/tls/tls.key\"";
        let tls = Config::parse(&with(pair), &no_env)
            .unwrap()
            .server
            .tls
            .unwrap();
        assert_eq!(tls.cert_file, PathBuf::from("/tls/tls.crt"));
        assert_eq!(tls.key_file, PathBuf::from("/tls/tls.key"));
        assert_eq!(tls.client_ca_file, None);
        assert!(!tls.require_client_cert);
        let mtls = format!("{pair}\nclient_ca_file = \"/tls/ca.pem\"\nrequire_client_cert = true");
        let tls = Config::parse(&with(&mtls), &no_env)
            .unwrap()
            .server
            .tls
            .unwrap();
        assert_eq!(tls.client_ca_file, Some(PathBuf::from("/tls/ca.pem")));
        assert!(tls.require_client_cert);

        let secret = "sk-admin-PASTEDBYMISTAKE0123456789";
        let err = problems(&with(&format!(
            "cert_file = \"/tls/{secret}\"\nkey_file = \"\"\nrequire_client_cert = true"
        )));
        assert!(err.contains("server.tls.key_file is empty"), "{err}");
        assert!(
            err.contains("server.tls.require_client_cert = true needs server.tls.client_ca_file"),
            "{err}"
        );
        assert!(!err.contains("PASTEDBYMISTAKE"), "{err}");
        assert!(problems(&with("cert_file = \"/c\"")).contains("key_file"));
        assert!(problems(&with(&format!("{pair}\nciphers = \"x\""))).contains("ciphers"));
    }

    #[test]
    fn the_admin_token_is_a_64_hex_digest_and_optional() {
        let c = Config::parse(MINIMAL, &no_env).unwrap();
        assert_eq!(
            c.server.admin_token_sha256, None,
            "no admin token by default"
        );
        let with = |value: &str| {
            MINIMAL.replace(
                "[upstream]",
                &format!("admin_token_sha256 = \"{value}\"\n[upstream]"),
            )
        };
        let digest = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
        let c = Config::parse(&with(digest), &no_env).unwrap();
        assert_eq!(
            c.server.admin_token_sha256.map(hex::encode).as_deref(),
            Some(digest)
        );
        let view = c.resolved_view().unwrap();
        assert!(
            view.contains(&format!("admin_token_sha256 = \"{digest}\"")),
            "{view}"
        );
        for bad in ["", "xyz", &digest[1..], "hunter2-not-a-digest"] {
            let err = problems(&with(bad));
            assert!(
                err.contains("server.admin_token_sha256 must be 64 hex characters"),
                "{bad}: {err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
        let err = problems(&with(PASTED));
        assert!(
            err.contains("server.admin_token_sha256 looks like an API key"),
            "{err}"
        );
        assert_no_piece(&err);
    }

    #[test]
    fn redis_ca_file_needs_rediss() {
        let with = |url: &str, ca: &str| {
            format!("{MINIMAL}[redis]\nurl = \"{url}\"\nca_file = \"{ca}\"\n")
        };
        let c = Config::parse(
            &with("rediss://h:6380", "/etc/permgate/redis-ca.pem"),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            c.redis.unwrap().ca_file,
            Some(PathBuf::from("/etc/permgate/redis-ca.pem"))
        );
        let plain = Config::parse(
            &format!("{MINIMAL}[redis]\nurl = \"rediss://h\"\n"),
            &no_env,
        );
        assert_eq!(plain.unwrap().redis.unwrap().ca_file, None);
        let err = problems(&with("redis://h:6379", "/secret-ish/hunter2.pem"));
        assert!(
            err.contains("redis.ca_file needs a rediss:// redis.url"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        assert!(problems(&with("rediss://h", "")).contains("redis.ca_file is empty"));
        let err = problems(&with("rediss://h", &format!("/etc/{PASTED}.pem")));
        assert!(err.contains("redis.ca_file looks like an API key"), "{err}");
        assert_no_piece(&err);
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

    /// A recognizable fake key; no 6-character piece of it may appear in any problem.
    const PASTED: &str = "sk-Zq9XvLk2PmW7tR4yB8nC3dF6hJ1wQ5eT";

    fn assert_no_piece(text: &str) {
        for i in 0..=PASTED.len() - 6 {
            let piece = &PASTED[i..i + 6];
            assert!(
                !text.contains(piece),
                "piece {piece:?} of the key in:\n{text}"
            );
        }
    }

    /// `MINIMAL` with `line` added at the top of `[upstream]`.
    fn upstream_with(line: &str) -> String {
        MINIMAL.replace("[upstream]", &format!("[upstream]\n{line}"))
    }

    /// `MINIMAL` with a `[redis]` table holding `lines`.
    fn redis_with(lines: &str) -> String {
        format!("{MINIMAL}[redis]\nurl = \"redis://h\"\n{lines}\n")
    }

    #[test]
    fn a_key_pasted_into_any_text_key_is_refused_by_name_and_never_echoed() {
        let k = PASTED;
        let digest = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
        let second = format!("name = \"b\"\ntoken_sha256 = \"{}\"", "ab".repeat(32));
        let cases = [
            (
                "upstream.admin_key_env",
                upstream_with(&format!("admin_key_env = \"{k}\"")),
            ),
            (
                "upstream.admin_key_file",
                upstream_with(&format!("admin_key_file = \"/s/{k}\"")),
            ),
            (
                "upstream.ca_file",
                upstream_with(&format!("ca_file = \"{k}\"")),
            ),
            (
                "upstream.base_url",
                MINIMAL.replace("/v1", &format!("/{k}/v1")),
            ),
            ("server.listen", MINIMAL.replace("127.0.0.1:8080", k)),
            (
                "server.admin_listen",
                MINIMAL.replace("[upstream]", &format!("admin_listen = \"{k}\"\n[upstream]")),
            ),
            (
                "audit.path",
                format!("{MINIMAL}[audit]\npath = \"/var/log/{k}.jsonl\"\n"),
            ),
            (
                "redis.url",
                format!("{MINIMAL}[redis]\nurl = \"redis://h:6379/?password={k}\"\n"),
            ),
            (
                "redis.password_env",
                redis_with(&format!("password_env = \"{k}\"")),
            ),
            (
                "redis.password_file",
                redis_with(&format!("password_file = \"{k}\"")),
            ),
            (
                "redis.key_prefix",
                redis_with(&format!("key_prefix = \"{k}:\"")),
            ),
            (
                "clients[0].name",
                MINIMAL.replace("name = \"a\"", &format!("name = \"{k}\"")),
            ),
            (
                "clients[1].checkpoints[0]",
                format!("{MINIMAL}[[clients]]\n{second}\ncheckpoints = [\"[{k}\"]\n"),
            ),
            ("clients[0].token_sha256", MINIMAL.replace(digest, k)),
        ];
        for (key, text) in cases {
            let err = problems(&text);
            let expected = format!("{key} looks like an API key");
            assert!(err.contains(&expected), "{expected} missing from:\n{err}");
            assert_no_piece(&err);
        }
        let err = problems(&upstream_with(&format!("admin_key_env = \"{k}\"")));
        assert!(err.contains("put the key in the environment"), "{err}");
        // Environment overrides are checked like the file.
        let env = |name: &str| (name == "PERMGATE_LISTEN").then(|| k.to_string());
        let err = Config::parse(MINIMAL, &env).unwrap_err().to_string();
        assert!(err.contains("server.listen looks like an API key"), "{err}");
        assert_no_piece(&err);
    }

    #[test]
    fn problems_name_the_key_never_the_value() {
        let secretish = "hunter2-not-a-key";
        let twice = format!(
            "{MINIMAL}[[clients]]\nname = \"a\"\ntoken_sha256 = \"{}\"\n",
            "ab".repeat(32)
        );
        let cases = [
            ("server.listen is not an address", MINIMAL.replace("127.0.0.1:8080", secretish)),
            ("clients[0].checkpoints[0] is not a valid glob", MINIMAL.replace("name = \"a\"", &format!("name = \"a\"\ncheckpoints = [\"[{secretish}\"]"))),
            ("clients[1].name is already the name of clients[0]", twice.replace("name = \"a\"", &format!("name = \"{secretish}\""))),
            ("line 3, column 18: invalid type: string, expected usize", MINIMAL.replace("listen", &format!("worker_threads = \"{secretish}\"\nlisten"))),
            ("redis.url may not carry credentials", format!("{MINIMAL}[redis]\nurl = \"redis://h/?pass={secretish}\"\n")),
            ("redis.url may not carry credentials", format!("{MINIMAL}[redis]\nurl = \"rediss://h:6380/0?protocol=resp3&Password={secretish}\"\n")),
            ("redis.url: protocol is the only query parameter", format!("{MINIMAL}[redis]\nurl = \"redis://h/?db=0&x={secretish}\"\n")),
        ];
        for (expected, text) in cases {
            let err = problems(&text);
            assert!(err.contains(expected), "{expected} missing from:\n{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let ok = format!("{MINIMAL}[redis]\nurl = \"rediss://h:6380/0?protocol=resp3\"\n");
        Config::parse(&ok, &no_env).unwrap();
    }

    #[test]
    fn toml_messages_lose_their_values_and_key_shaped_names() {
        let k = PASTED;
        for (text, expected) in [
            (
                MINIMAL.replace("listen", &format!("max_body_bytes = \"{k}\"\nlisten")),
                "invalid type: string, expected usize",
            ),
            (
                MINIMAL.replace("listen", &format!("{k} = 1\nlisten")),
                "unknown field `<redacted>`, expected one of",
            ),
            (format!("[{k}]\n{MINIMAL}"), "unknown field `<redacted>`"),
            (
                MINIMAL.replace("listen", &format!("max_body_bytes = {k}\nlisten")),
                "invalid string",
            ),
        ] {
            let err = problems(&text);
            assert!(err.contains(expected), "{expected} missing from:\n{err}");
            assert_no_piece(&err);
        }
        assert_eq!(
            without_values("unknown variant `sk-x`, expected `json` or `pretty`"),
            "unknown variant, expected `json` or `pretty`"
        );
        assert_eq!(
            without_values("invalid value: integer `-1`, expected usize"),
            "invalid value: integer, expected usize"
        );
    }

    #[test]
    fn the_resolved_view_redacts_key_shaped_text() {
        let mut c = Config::parse(MINIMAL, &no_env).unwrap();
        c.clients[0].name = format!("x {PASTED}");
        c.upstream.admin_key = KeySource::Env(PASTED.into());
        let view = c.resolved_view().unwrap();
        assert!(
            view.contains("<redacted>") && view.contains("token_sha256"),
            "{view}"
        );
        assert_no_piece(&view);
    }

    /// `MINIMAL`'s client replaced by `clients` (TOML), plus `tail`.
    fn with_clients(clients: &str, tail: &str) -> String {
        let head = MINIMAL.split("[[clients]]").next().unwrap();
        format!("{head}{clients}\n{tail}")
    }

    const JWT: &str = r#"
[jwt]
issuer = "https://kubernetes.default.svc.cluster.local"
audiences = ["permgate"]
jwks_file = "/etc/permgate/jwks.json"
"#;

    /// A data listener that verifies client certificates, as `tls_identity` clients need.
    const MTLS: &str = r#"
[server.tls]
cert_file = "/etc/permgate/tls/tls.crt"
key_file = "/etc/permgate/tls/tls.key"
client_ca_file = "/etc/permgate/tls/ca.crt"
require_client_cert = true
"#;

    #[test]
    fn each_client_has_exactly_one_identity() {
        let digest = "ab".repeat(32);
        let err = problems(&with_clients("[[clients]]\nname = \"a\"\n", ""));
        assert!(
            err.contains("clients[0] needs exactly one identity: token_sha256, tls_identity or jwt_subject (none set)"),
            "{err}"
        );
        let several = format!(
            "[[clients]]\nname = \"a\"\ntoken_sha256 = \"{digest}\"\njwt_subject = \"s\"\n"
        );
        let err = problems(&with_clients(&several, JWT));
        assert!(
            err.contains("clients[0] needs exactly one identity")
                && err.contains("(several set: token_sha256, jwt_subject)"),
            "{err}"
        );
        let c = Config::parse(
            &with_clients(
                "[[clients]]\nname = \"m\"\ntls_identity = \"Billing.SVC.cluster.local\"\n[[clients]]\nname = \"s\"\ntls_identity = \"spiffe://cluster.local/ns/Billing/sa/api\"\n[[clients]]\nname = \"j\"\njwt_subject = \"system:serviceaccount:billing:api\"\n",
                &format!("{JWT}{MTLS}"),
            ),
            &no_env,
        )
        .unwrap();
        let identities: Vec<_> = c.clients.iter().map(|c| c.identity.clone()).collect();
        assert_eq!(
            identities,
            [
                Identity::TlsIdentity("billing.svc.cluster.local".into()),
                Identity::TlsIdentity("spiffe://cluster.local/ns/Billing/sa/api".into()),
                Identity::JwtSubject("system:serviceaccount:billing:api".into()),
            ]
        );
        let jwt = c.jwt.unwrap();
        assert_eq!(jwt.leeway, Duration::from_secs(30));
        assert_eq!(jwt.jwks, JwksSource::File("/etc/permgate/jwks.json".into()));
    }

    #[test]
    fn identities_are_not_shared_and_are_named_by_position() {
        let client = |name: &str, line: &str| format!("[[clients]]\nname = \"{name}\"\n{line}\n");
        let err = problems(&with_clients(
            &[
                client("a", "tls_identity = \"billing.svc.cluster.local\""),
                client("b", "tls_identity = \"BILLING.svc.cluster.local\""),
                client("c", "jwt_subject = \"hunter2-subject\""),
                client("d", "jwt_subject = \"hunter2-subject\""),
                client("e", &format!("token_sha256 = \"{}\"", "ab".repeat(32))),
                client("f", &format!("token_sha256 = \"{}\"", "AB".repeat(32))),
            ]
            .concat(),
            JWT,
        ));
        for expected in [
            "clients[1].tls_identity is already that of clients[0]",
            "clients[3].jwt_subject is already that of clients[2]",
            "clients[5].token_sha256 is shared with another client",
        ] {
            assert!(err.contains(expected), "{expected} missing from:\n{err}");
        }
        assert!(
            !err.contains("hunter2") && !err.contains("billing"),
            "{err}"
        );
    }

    #[test]
    fn bad_identities_and_jwt_tables_are_refused_by_key() {
        let client = |line: &str| format!("[[clients]]\nname = \"a\"\n{line}\n");
        let jwt = |lines: &str| format!("[jwt]\n{lines}\n");
        let cases = [
            (
                client("jwt_subject = \"s\""),
                String::new(),
                "clients[0].jwt_subject needs a [jwt] table",
            ),
            (
                client("tls_identity = \"not a name\""),
                String::new(),
                "clients[0].tls_identity is neither a URI nor a DNS name",
            ),
            (
                client("tls_identity = \"spiffe://\""),
                String::new(),
                "clients[0].tls_identity is not a URI",
            ),
            (
                client("jwt_subject = \"\""),
                JWT.into(),
                "clients[0].jwt_subject is empty",
            ),
            (
                client("jwt_subject = \"s\""),
                jwt("issuer = \"\"\naudiences = []\njwks_file = \"/j\""),
                "jwt.issuer is empty",
            ),
            (
                client("jwt_subject = \"s\""),
                jwt("issuer = \"i\"\naudiences = []\njwks_file = \"/j\""),
                "jwt.audiences needs at least one audience",
            ),
            (
                client("jwt_subject = \"s\""),
                jwt("issuer = \"i\"\naudiences = [\"a\"]"),
                "jwt: set exactly one of jwks_file and jwks_url",
            ),
            (
                client("jwt_subject = \"s\""),
                jwt("issuer = \"i\"\naudiences = [\"a\"]\njwks_file = \"/j\"\njwks_url = \"https://x/j\""),
                "jwt: set exactly one of jwks_file and jwks_url",
            ),
            (
                client("jwt_subject = \"s\""),
                jwt("issuer = \"i\"\naudiences = [\"a\"]\njwks_url = \"http://issuer.internal/jwks\""),
                "jwt.jwks_url must be https://",
            ),
            (
                client("jwt_subject = \"s\""),
                jwt("issuer = \"i\"\naudiences = [\"a\"]\njwks_url = \"https://u:hunter2@x/jwks\""),
                "jwt.jwks_url may not carry credentials",
            ),
            (
                client("jwt_subject = \"s\""),
                jwt("issuer = \"i\"\naudiences = [\"a\"]\njwks_file = \"/j\"\nleeway_seconds = 301"),
                "jwt.leeway_seconds may be at most 300",
            ),
            (
                client("jwt_subject = \"s\""),
                jwt("issuer = \"i\"\naudiences = [\"a\"]\njwks_file = \"/j\"\nalgorithms = [\"HS256\"]"),
                "unknown field `algorithms`",
            ),
        ];
        for (clients, tail, expected) in cases {
            let err = problems(&with_clients(&clients, &tail));
            assert!(err.contains(expected), "{expected} missing from:\n{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let loopback =
            jwt("issuer = \"i\"\naudiences = [\"a\"]\njwks_url = \"http://127.0.0.1:1/jwks\"");
        let c = Config::parse(
            &with_clients(&client("jwt_subject = \"s\""), &loopback),
            &no_env,
        );
        assert!(c.is_ok(), "plain http to loopback is allowed");
    }

    #[test]
    fn a_key_pasted_into_an_identity_or_jwt_key_is_refused_by_name() {
        let k = PASTED;
        let cases = [
            (
                "clients[0].jwt_subject",
                with_clients(
                    &format!("[[clients]]\nname = \"a\"\njwt_subject = \"{k}\"\n"),
                    JWT,
                ),
            ),
            (
                "clients[0].tls_identity",
                with_clients(
                    &format!("[[clients]]\nname = \"a\"\ntls_identity = \"spiffe://x/{k}\"\n"),
                    "",
                ),
            ),
            (
                "jwt.issuer",
                with_clients(
                    "[[clients]]\nname = \"a\"\njwt_subject = \"s\"\n",
                    &JWT.replace("https://kubernetes.default.svc.cluster.local", k),
                ),
            ),
            (
                "jwt.audiences[0]",
                with_clients(
                    "[[clients]]\nname = \"a\"\njwt_subject = \"s\"\n",
                    &JWT.replace("\"permgate\"", &format!("\"{k}\"")),
                ),
            ),
            (
                "jwt.jwks_file",
                with_clients(
                    "[[clients]]\nname = \"a\"\njwt_subject = \"s\"\n",
                    &JWT.replace("jwks.json", k),
                ),
            ),
        ];
        for (key, text) in cases {
            let err = problems(&text);
            let expected = format!("{key} looks like an API key");
            assert!(err.contains(&expected), "{expected} missing from:\n{err}");
            assert_no_piece(&err);
        }
    }

    #[test]
    fn identity_settings_that_cannot_work_are_refused_or_warned_about() {
        let client =
            "[[clients]]\nname = \"m\"\ntls_identity = \"spiffe://cluster.local/ns/b/sa/api\"\n";
        let err = problems(&with_clients(client, JWT));
        assert!(
            err.contains("clients[0].tls_identity needs [server.tls] client_ca_file"),
            "{err}"
        );
        assert!(!err.contains("spiffe"), "{err}");
        let text = with_clients(client, &format!("{JWT}{MTLS}"));
        let warnings = Config::parse(&text, &no_env).unwrap().warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("[jwt] is configured but no client has a jwt_subject"));
    }

    #[test]
    fn front_door_warnings_follow_its_facts() {
        let text = with_clients(
            "[[clients]]\nname = \"m\"\ntls_identity = \"billing.svc.cluster.local\"\n",
            MTLS,
        )
        .replace("127.0.0.1:8080", "0.0.0.0:8080")
        .replace("[upstream]", "admin_listen = \"10.0.0.1:9090\"\n[upstream]");
        let open = Config::parse(&text, &no_env).unwrap();
        let closed = Config::parse(MINIMAL, &no_env).unwrap();
        let door = |data_tls, client_ca, require_client_cert, admin_token| FrontDoor {
            data_tls,
            client_ca,
            require_client_cert,
            admin_token,
        };
        let starts = |warnings: Vec<String>, expected: &[&str]| {
            assert_eq!(warnings.len(), expected.len(), "{warnings:?}");
            for (warning, start) in warnings.iter().zip(expected) {
                assert!(warning.starts_with(start), "{warning} vs {start}");
            }
        };
        starts(
            open.front_door_warnings(door(false, false, false, false)),
            &[
                "server.listen is not a loopback",
                "server.admin_listen is not",
            ],
        );
        starts(
            open.front_door_warnings(door(true, true, false, true)),
            &["clients use tls_identity while server.tls.require_client_cert = false"],
        );
        starts(open.front_door_warnings(door(true, true, true, true)), &[]);
        starts(
            closed.front_door_warnings(door(false, false, false, false)),
            &[],
        );
    }

    #[test]
    fn the_resolved_view_names_each_identity_source() {
        let text = with_clients(
            "[[clients]]\nname = \"t\"\ntoken_sha256 = \"5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\"\n[[clients]]\nname = \"j\"\njwt_subject = \"system:serviceaccount:b:api\"\n",
            JWT,
        );
        let view = Config::parse(&text, &no_env)
            .unwrap()
            .resolved_view()
            .unwrap();
        for expected in [
            "token_sha256 = \"5e884898",
            "jwt_subject = \"system:serviceaccount:b:api\"",
            "[jwt]",
            "jwks_file = \"/etc/permgate/jwks.json\"",
            "leeway = 30",
        ] {
            assert!(view.contains(expected), "{expected} missing from:\n{view}");
        }
    }
}
