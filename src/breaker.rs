//! Circuit breaker for upstream: after `upstream.breaker_threshold` consecutive failures it
//! opens and callers are answered at once (503, or a stale page where `stale_if_error`
//! allows) instead of queueing on a failing OpenAI. After `upstream.breaker_open_ms` one probe
//! request is let through; its success closes the breaker, its failure reopens it.
//!
//! A failure is a transport error, a timeout, a 5xx or a 429; any other answer (even a 401)
//! shows upstream is up. Pure state machine over the injectable [`Clock`]; transitions are
//! logged as tracing events.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::clock::Clock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    open_for: Duration,
    clock: Clock,
}

/// Leave to send one request. Report its verdict with [`Permit::success`] or
/// [`Permit::failure`]; a probe dropped without a verdict (the caller went away) lets the next
/// request probe instead.
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    settled: bool,
}

impl Breaker {
    /// `threshold` 0 disables the breaker.
    pub fn new(threshold: u32, open_for: Duration, clock: Clock) -> Breaker {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold,
            open_for,
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `None` while open: fail fast.
    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        let mut state = self.lock();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if self.clock.now() >= until => {
                *state = State::HalfOpen { probing: true };
                tracing::warn!(
                    target: "permgate::breaker",
                    "circuit half-open: sending one probe upstream"
                );
                true
            }
            State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                true
            }
            State::Open { .. } | State::HalfOpen { probing: true } => return None,
        };
        Some(Permit {
            breaker: self,
            probe,
            settled: false,
        })
    }

    /// While open: how long until a probe may go. Callers are told to wait that long.
    pub fn open_remaining(&self) -> Option<Duration> {
        match *self.lock() {
            State::Open { until } => Some(until.saturating_duration_since(self.clock.now())),
            State::Closed { .. } | State::HalfOpen { .. } => None,
        }
    }

    /// "closed", "open" or "half_open".
    pub fn state_name(&self) -> &'static str {
        match *self.lock() {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        }
    }

    fn settle(&self, probe: bool, success: bool) {
        let mut state = self.lock();
        match (*state, probe, success) {
            (State::Closed { .. }, _, true) => *state = State::Closed { failures: 0 },
            (State::Closed { failures }, _, false) => {
                let failures = failures + 1;
                if self.threshold > 0 && failures >= self.threshold {
                    *state = State::Open {
                        until: self.clock.now() + self.open_for,
                    };
                    tracing::warn!(
                        target: "permgate::breaker",
                        failures,
                        open_ms = self.open_for.as_millis() as u64,
                        "circuit opened: upstream keeps failing"
                    );
                } else {
                    *state = State::Closed { failures };
                }
            }
            (State::HalfOpen { .. }, true, true) => {
                *state = State::Closed { failures: 0 };
                tracing::warn!(target: "permgate::breaker", "circuit closed: probe succeeded");
            }
            (State::HalfOpen { .. }, true, false) => {
                *state = State::Open {
                    until: self.clock.now() + self.open_for,
                };
                tracing::warn!(target: "permgate::breaker", "circuit reopened: probe failed");
            }
            // Verdicts of requests that started before the circuit opened change nothing.
            _ => {}
        }
    }
}

impl Permit<'_> {
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.settle(self.probe, true);
    }

    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.settle(self.probe, false);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            let mut state = self.breaker.lock();
            if *state == (State::HalfOpen { probing: true }) {
                *state = State::HalfOpen { probing: false };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_and_closes() {
        let clock = Clock::default();
        let b = Breaker::new(3, Duration::from_secs(5), clock.clone());
        b.try_acquire().unwrap().failure();
        b.try_acquire().unwrap().success();
        for _ in 0..2 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(b.state_name(), "closed", "a success reset the count");
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state_name(), "open");
        assert!(b.try_acquire().is_none());
        clock.advance(Duration::from_secs(5));
        let probe = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none(), "one probe at a time");
        probe.failure();
        assert_eq!(b.state_name(), "open");
        clock.advance(Duration::from_secs(5));
        b.try_acquire().unwrap().success();
        assert_eq!(b.state_name(), "closed");
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let clock = Clock::default();
        let b = Breaker::new(1, Duration::from_secs(1), clock.clone());
        b.try_acquire().unwrap().failure();
        clock.advance(Duration::from_secs(1));
        drop(b.try_acquire().unwrap());
        assert_eq!(b.state_name(), "half_open");
        b.try_acquire().unwrap().success();
        assert_eq!(b.state_name(), "closed");
    }

    #[test]
    fn threshold_zero_never_opens() {
        let b = Breaker::new(0, Duration::from_secs(1), Clock::default());
        for _ in 0..100 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(b.state_name(), "closed");
    }
}
