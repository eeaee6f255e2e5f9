//! The environment as permgate reads it: one lookup type, injected everywhere below `cli`.
//!
//! Only `cli` reads the real process environment ([`process`]); everything else takes an
//! [`Env`], so tests pass a map and never touch `std::env`.

use std::sync::Arc;

/// Looks up one environment variable.
pub type Env<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// An [`Env`] a background task can keep (the reload watcher).
pub type SharedEnv = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The process environment.
pub fn process(name: &str) -> Option<String> {
    std::env::var(name).ok()
}
