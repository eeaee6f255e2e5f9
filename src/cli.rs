//! The command line (SPEC "Command line"): `serve`, `demo`, `mock-upstream`, `check-config`,
//! `hash-token`. Each command reads the real environment here and nowhere else; everything
//! below takes it injected.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::{Config, JwksSource};
use crate::env::process as env;
use crate::fleet;
use crate::mock_upstream::{MockUpstream, SEEDED};
use crate::observability;
use crate::reload;
use crate::secret::AdminKey;
use crate::server;
use crate::state::AppState;
use crate::tls::{self, ServerTls};
use crate::upstream::Upstream;

const DEMO_CONFIG: &str = include_str!("../config/demo.toml");
pub const DEMO_READER_TOKEN: &str = "demo-reader-token";
pub const DEMO_WRITER_TOKEN: &str = "demo-writer-token";

#[derive(Debug, Parser)]
#[command(
    name = "permgate",
    version,
    about = "Caching gateway for OpenAI fine-tuning checkpoint permissions"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the gateway in front of the built-in mock upstream, on an embedded config.
    Demo,
    /// Run a local stand-in for OpenAI's checkpoint permission endpoints.
    MockUpstream {
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        #[arg(long, value_name = "KEY")]
        admin_key: String,
    },
    /// Validate a config file and print it resolved, secrets redacted.
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Read a client token on stdin and print the token_sha256 for the config.
    HashToken,
}

/// Runs a command. Its error is what `main` prints: redacted as a last guard (SPEC "Hygiene
/// rules"), since messages should never quote a key-shaped value in the first place.
pub fn run(cli: Cli) -> Result<(), String> {
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Demo => demo(),
        Command::MockUpstream { listen, admin_key } => mock_upstream(listen, &admin_key),
        Command::CheckConfig { config } => check_config(&config),
        Command::HashToken => hash_token(),
    };
    result.map_err(|e| crate::secret::redact_api_keys(&e).into_owned())
}

fn runtime(worker_threads: Option<usize>) -> Result<tokio::runtime::Runtime, String> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
}

fn serve(path: &Path) -> Result<(), String> {
    let _otel = observability::init(&env)?;
    let config = Config::load(path, &env).map_err(|e| e.to_string())?;
    let key = AdminKey::load(&config.upstream.admin_key, &env).map_err(|e| e.to_string())?;
    config.refuse_key_pieces(&key).map_err(|e| e.to_string())?;
    let redis_password = match &config.redis {
        Some(redis) => fleet::password(redis, &env)?,
        None => None,
    };
    for warning in config
        .warnings()
        .into_iter()
        .chain(key_file_warning(&config))
    {
        tracing::warn!("{warning}");
    }
    let server_tls = match &config.server.tls {
        Some(settings) => Some(Arc::new(ServerTls::load(settings)?)),
        None => None,
    };
    runtime(config.server.worker_threads)?.block_on(async {
        let state = AppState::new(&config, key, Clock::default(), redis_password.as_deref())?;
        state.start_fleet().await;
        let data = bind(config.server.listen, "server.listen").await?;
        let admin = match config.server.admin_listen {
            Some(addr) => Some(bind(addr, "server.admin_listen").await?),
            None => None,
        };
        let bound = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            listen = %bound(&data),
            tls = server_tls.is_some(),
            admin_listen = %admin.as_ref().map(bound).unwrap_or_default(),
            upstream = %config.upstream.base_url,
            clients = config.clients.len(),
            "permgate serving"
        );
        let watcher = tokio::spawn(reload::watch(
            state.clone(),
            path.to_owned(),
            Arc::new(env),
            config.upstream.admin_key_poll,
            true,
        ));
        // The certificate files are polled as often as the admin key file.
        let tls_watcher = server_tls.as_ref().map(|server_tls| {
            let metrics = state.metrics.clone();
            let poll = config.upstream.admin_key_poll;
            let counted = move |ok| metrics.tls_reload(ok);
            tokio::spawn(tls::watch(server_tls.clone(), poll, true, counted))
        });
        server::serve_with_tls(
            data,
            server_tls.map(|t| t.acceptor()),
            admin,
            state,
            server::shutdown_signal(),
            (&config.server).into(),
        )
        .await;
        watcher.abort();
        if let Some(tls_watcher) = tls_watcher {
            tls_watcher.abort();
        }
        Ok(())
    })
}

fn demo() -> Result<(), String> {
    let _otel = observability::init(&env)?;
    let mut config = Config::parse(DEMO_CONFIG, &env).map_err(|e| e.to_string())?;
    // A fresh random key shared by the mock and the gateway; never printed. Letters and digits
    // of both cases, as a real key's: a hex secret could share a piece with the config's
    // hex token digests, which the gateway would refuse.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let secret: String = (0..40)
        .map(|_| char::from(ALPHABET[(rand_u64() % 62) as usize]))
        .collect();
    let secret = format!("sk-admin-{secret}");
    let key = AdminKey::new(&secret).map_err(|e| e.to_string())?;
    runtime(config.server.worker_threads)?.block_on(async {
        let mock = MockUpstream::new(&secret);
        let loopback = "127.0.0.1:0".parse().expect("literal address");
        let mock_listener = bind(loopback, "mock upstream").await?;
        let mock_addr = mock_listener.local_addr().map_err(|e| e.to_string())?;
        config.upstream.base_url = format!("http://{mock_addr}/v1")
            .parse()
            .map_err(|_| "mock address is not a URL".to_string())?;
        let (stop_mock, mock_stopped) = watch::channel(false);
        let mock_task = tokio::spawn(mock.serve(mock_listener, mock_stopped));

        let state = AppState::new(&config, key, Clock::default(), None)?;
        let data = bind(config.server.listen, "server.listen").await?;
        let listen = data.local_addr().map_err(|e| e.to_string())?;
        let admin = match config.server.admin_listen {
            Some(addr) => Some(bind(addr, "server.admin_listen").await?),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        print_demo_banner(listen, admin_addr, mock_addr);
        let limits = (&config.server).into();
        server::serve(data, admin, state, server::shutdown_signal(), limits).await;
        let _ = stop_mock.send(true);
        let _ = mock_task.await;
        Ok(())
    })
}

/// What `permgate demo` prints: the addresses, the demo tokens and a first request to try.
fn print_demo_banner(listen: SocketAddr, admin: Option<SocketAddr>, mock: SocketAddr) {
    let checkpoint = SEEDED[0].0;
    println!("permgate demo: the gateway in front of a built-in mock of OpenAI");
    println!("  gateway        http://{listen}");
    if let Some(a) = admin {
        println!("  admin          http://{a}  (/healthz /readyz /metrics, POST /cache/purge)");
    }
    println!("  mock upstream  http://{mock}/v1  (holds a random admin key that nobody sees)");
    println!();
    println!("client tokens:");
    println!("  {DEMO_READER_TOKEN}   read-only, checkpoints ft:gpt-4o-mini-2024-07-18:acme:*");
    println!("  {DEMO_WRITER_TOKEN}   read and write, every checkpoint");
    println!("  demo-limited-token  as the reader, 1 request/s, burst 1 (shows 429 and retries)");
    println!();
    println!("try it (run it twice: the second answer has 'Cache-Status: permgate; hit'):");
    let url = format!("http://{listen}/v1/fine_tuning/checkpoints/{checkpoint}/permissions");
    println!("  curl -i -H 'Authorization: Bearer {DEMO_READER_TOKEN}' '{url}?limit=3'");
    println!();
    println!("Ctrl-C stops the gateway and the mock.");
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

fn mock_upstream(listen: SocketAddr, admin_key: &str) -> Result<(), String> {
    let _otel = observability::init(&env)?;
    let mock = MockUpstream::new(admin_key);
    runtime(None)?.block_on(async {
        let listener = bind(listen, "--listen").await?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(%addr, "mock upstream serving /v1/fine_tuning/checkpoints/...");
        let (stop, stopped) = watch::channel(false);
        let serving = tokio::spawn(mock.serve(listener, stopped));
        server::shutdown_signal().await;
        let _ = stop.send(true);
        let _ = serving.await;
        Ok(())
    })
}

fn check_config(path: &Path) -> Result<(), String> {
    let config = Config::load(path, &env).map_err(|e| e.to_string())?;
    let key = AdminKey::load(&config.upstream.admin_key, &env).map_err(|e| e.to_string())?;
    config.refuse_key_pieces(&key).map_err(|e| e.to_string())?;
    println!("{}", config.resolved_view()?);
    if let Some(redis) = &config.redis {
        fleet::password(redis, &env)?;
    }
    Upstream::new(&config.upstream, key, Clock::default(), Default::default())?;
    // Which setting identifies each client (names are safe to print; identity values are not
    // printed here).
    for (i, client) in config.clients.iter().enumerate() {
        let name = client.name.escape_debug();
        println!("# clients[{i}] {name}: {}", client.identity.source());
    }
    match config.jwt.as_ref().map(|j| &j.jwks) {
        Some(JwksSource::File(path)) => println!("# {}", crate::jwt::describe_jwks_file(path)?),
        Some(JwksSource::Url(_)) => println!("# jwt.jwks_url is fetched at startup, not here"),
        None => {}
    }
    for warning in config
        .warnings()
        .into_iter()
        .chain(key_file_warning(&config))
    {
        println!("# warning: {warning}");
    }
    println!("# admin key: present (redacted)");
    println!("# config OK");
    Ok(())
}

/// A warning when the admin key file is readable by every user.
fn key_file_warning(config: &Config) -> Option<String> {
    crate::secret::permission_warning(&config.upstream.admin_key, "upstream.admin_key")
}

fn hash_token() -> Result<(), String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("reading stdin: {e}"))?;
    let token = input.trim_end_matches(['\n', '\r']);
    if token.is_empty() {
        return Err("no token on stdin".into());
    }
    println!("{}", hex::encode(crate::auth::digest(token.as_bytes())));
    Ok(())
}
