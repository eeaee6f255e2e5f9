//! Key and client-list lifecycle without a restart: on SIGHUP, and whenever the admin key file
//! changes (Kubernetes updates mounted Secrets in place), the config file's `[[clients]]` and
//! the admin key are read again and swapped in atomically.
//!
//! A bad new file (unparsable config, missing or empty key) keeps the old state, logs why and
//! counts a failed reload. Requests in flight finish with the key and clients they started
//! with. Only the client list and the key are reloaded; every other setting applies at the
//! next restart, and a reload whose file changes one says so (a warning naming the tables). SIGHUP also reopens the audit file (log rotation), re-reads the JWKS of
//! `[jwt]` (see `jwt::Verifier::reload`), and reloads the data listener's certificate and
//! key (`[server.tls]`): `tls::watch` listens for the signal itself, next to its own polling
//! of those files, and counts in `permgate_tls_reloads_total`.
//!
//! Files are read off the runtime with a deadline (`secret::off_runtime`), and never waited on
//! when they are not regular files: a FIFO, a device or a hung filesystem at a watched path
//! stalls no request and no shutdown; it is logged and counted as a failed reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::config::Config;
use crate::env::SharedEnv;
use crate::secret::{self, AdminKey, KeySource};
use crate::state::AppState;

/// Re-reads `path` and the admin key and applies them, or keeps the old state. Returns the
/// tables whose settings the new file changes but a reload does not apply (they are logged as
/// a warning: they take effect at the next restart).
pub fn reload(state: &AppState, path: &Path, env: &SharedEnv) -> Result<Vec<String>, String> {
    let result = Config::load(path, &**env)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            let key =
                AdminKey::load(&config.upstream.admin_key, &**env).map_err(|e| e.to_string())?;
            config.refuse_key_pieces(&key).map_err(|e| e.to_string())?;
            Ok((config, key))
        });
    match result {
        Ok((config, key)) => {
            if let Some(warning) =
                secret::permission_warning(&config.upstream.admin_key, "upstream.admin_key")
            {
                warn!("{warning}");
            }
            state.apply_reload(&config, key);
            state.metrics.key_reload(true);
            info!(
                clients = config.clients.len(),
                "reloaded the admin key and client list"
            );
            let new = config.restart_only();
            let changed: Vec<String> = (state.restart_only.keys())
                .chain(new.keys())
                .filter(|table| state.restart_only.get(*table) != new.get(*table))
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if !changed.is_empty() {
                warn!(
                    tables = %changed.join(", "),
                    "the config file changes settings a reload does not apply; they take effect at the next restart"
                );
            }
            Ok(changed)
        }
        Err(why) => {
            state.metrics.key_reload(false);
            error!(reason = %why, "reload failed; keeping the previous admin key and clients");
            Err(why)
        }
    }
}

/// [`reload`] off the runtime, within `secret::FILE_READ_TIMEOUT`.
async fn reload_off_runtime(state: &Arc<AppState>, path: &Path, env: &SharedEnv) {
    let (state, path, env) = (state.clone(), path.to_owned(), env.clone());
    let metrics = state.metrics.clone();
    if let Err(e) = secret::off_runtime(move || reload(&state, &path, &env)).await {
        metrics.key_reload(false);
        error!(reason = %e, "reload failed; keeping the previous admin key and clients");
    }
}

/// Returns a task that runs until dropped: it reloads on SIGHUP (when `sighup` is set) and
/// whenever the admin key file's content changes (checked every `poll`). The key file is read
/// here, before the task starts, so a change made right after startup is not missed. Call it
/// inside the runtime.
pub fn watch(
    state: Arc<AppState>,
    path: PathBuf,
    env: SharedEnv,
    poll: Duration,
    sighup: bool,
) -> impl std::future::Future<Output = ()> + Send {
    let key_file = match Config::load(&path, &*env) {
        Ok(config) => match config.upstream.admin_key {
            KeySource::File(file) => Some(file),
            KeySource::Env(_) => None,
        },
        Err(_) => None,
    };
    let mut last_seen = key_file
        .as_deref()
        .and_then(|f| secret::read_regular_file(f, KEY_FILE_LIMIT).ok());
    let mut hangups = if sighup {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; reload by key file change only");
                None
            }
        }
    } else {
        None
    };
    async move {
        let mut ticks = tokio::time::interval(poll);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error = None;
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hangup => {
                    info!("SIGHUP: reloading, reopening the audit file");
                    if let Some(audit) = &state.audit {
                        audit.reopen(&state.metrics).await;
                    }
                    reload_off_runtime(&state, &path, &env).await;
                    if let Some(jwt) = &state.jwt {
                        jwt.reload().await;
                    }
                }
                _ = ticks.tick() => {
                    let Some(file) = key_file.as_deref() else { continue };
                    let now = match secret::read_regular_file_bounded(file, KEY_FILE_LIMIT).await {
                        Ok(bytes) => {
                            last_error = None;
                            Some(bytes)
                        }
                        Err(e) => {
                            let why = e.to_string();
                            if last_error.as_ref() != Some(&why) {
                                warn!(
                                    reason = %why,
                                    "cannot read the admin key file; keeping the current key"
                                );
                                last_error = Some(why);
                            }
                            None
                        }
                    };
                    if now.is_some() && now != last_seen {
                        info!(file = %file.display(), "admin key file changed: reloading");
                        // A failure (say, a half-written file) is retried at the next change.
                        reload_off_runtime(&state, &path, &env).await;
                        last_seen = now;
                    }
                }
            }
        }
    }
}

/// The most of the key file the watcher compares between polls.
const KEY_FILE_LIMIT: u64 = 64 * 1024;
