//! permgate: a caching gateway in front of OpenAI's fine-tuning checkpoint permission
//! endpoints, so internal services can read (and, where granted, change) them without ever
//! holding the organization's admin key. `../SPEC.md`'s contract, module by module.
//!
//! The life of a request: [`server`] accepts and hands it to [`proxy::handle`], which opens a
//! [`request_log::RequestLog`], matches the [`route`] (404/405), identifies the caller by
//! client certificate, JWT ([`jwt`]) or static token ([`auth`], 401), validates path and
//! query into a typed [`route::Call`] (400), authorizes the checkpoint and method (403) and
//! checks the rate limit (429), then serves a list from the [`cache`] or forwards to
//! [`upstream`] with the admin key from [`secret`].
//! Writes invalidate their checkpoint (here and, with `[redis]`, through [`fleet`]) before
//! answering. Every failure is one [`error::Error`], rendered in OpenAI's shape in one place;
//! the request log then writes the [`audit`] record, [`metrics`] and the access line.
//!
//! Layers (imports point down only): leaves `error`, `clock`, `env`, `secret`, `config`,
//! `route`, `tls`; mechanisms `cache`, `metrics`, `ratelimit`, `breaker`, `auth`, `jwt`,
//! `upstream`, `audit`, `fleet`, `head_timer`, `framing`, `access_log`, `otel`, `observability`; app `state`,
//! `request_log`, `proxy`, `admin`, `reload`, `server`, `mock_upstream`, `cli`.
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
pub mod framing;
pub mod head_timer;
pub mod jwt;
pub mod metrics;
pub mod mock_upstream;
pub mod observability;
#[cfg(feature = "otel")]
pub mod otel;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod request_log;
pub mod route;
pub mod secret;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;
