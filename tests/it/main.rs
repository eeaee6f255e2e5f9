//! Integration tests: a real gateway in front of the real mock upstream on loopback sockets.
//! One module per SPEC section; `support` starts everything.

mod admin;
mod caching;
mod cli;
mod fairness;
mod fleet;
mod hostile;
mod operations;
mod resilience;
mod responses;
mod routes;
mod soak;
mod support;
mod tls;
mod writes;
