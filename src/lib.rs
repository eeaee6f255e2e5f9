//! permgate: a caching gateway in front of OpenAI's fine-tuning checkpoint permission
//! endpoints, so internal services can read (and, where granted, change) them without ever
//! holding the organization's admin key. `../SPEC.md`'s contract, module by module.
//!
//! The life of a request: [`server`] accepts and hands it to [`proxy::handle`], which matches
//! the [`route`] (404/405), authenticates the caller's token ([`auth`], 401), decodes and
//! validates path and query (400), authorizes the checkpoint and method (403), then serves a
//! list from the [`cache`] or forwards to [`upstream`] with the admin key from [`secret`].
//! Writes invalidate their checkpoint before answering and leave an [`audit`] record. Every
//! failure is one [`error::Error`], rendered in OpenAI's shape in one place. [`observability`]
//! owns logging and request ids ([`access_log`] writes the JSON access line); [`admin`] the
//! operator listener; [`config`] the TOML file; [`mock_upstream`] a faithful local OpenAI for
//! `permgate demo` and the tests; [`cli`] the commands.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod audit;
pub mod auth;
pub mod breaker;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod env;
pub mod error;
pub mod fleet;
pub mod metrics;
pub mod mock_upstream;
pub mod observability;
#[cfg(feature = "otel")]
pub mod otel;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod route;
pub mod secret;
pub mod server;
pub mod tls;
pub mod upstream;
