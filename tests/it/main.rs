//! Integration tests: a real gateway in front of the real mock upstream on loopback sockets.
//! One module per SPEC section; `support` starts everything.

mod admin;
mod admin_token;
mod caching;
mod cli;
mod fairness;
mod fleet;
mod fleet_tls;
mod framing;
mod hostile;
mod hygiene;
mod identity;
mod idle;
mod monitoring;
mod operations;
mod resilience;
mod responses;
mod retries;
mod routes;
mod soak;
mod support;
mod tls;
mod tls_listener;
mod writes;
