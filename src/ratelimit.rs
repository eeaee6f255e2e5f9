//! Per-client token buckets (`clients[].rate_per_second`, `burst`) using governor's GCRA, with
//! the `Retry-After` a rejected caller should wait.

use std::num::NonZeroU32;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::error::Error;

#[derive(Debug)]
pub struct RateLimit {
    limiter: DefaultDirectRateLimiter,
}

impl RateLimit {
    /// `per_second` and `burst` were validated as non-zero by `config`.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> RateLimit {
        RateLimit {
            limiter: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
        }
    }

    /// Takes one token, or says how long until one is free.
    pub fn check(&self) -> Result<(), Error> {
        self.limiter
            .check()
            .map_err(|not_until| Error::RateLimitExceeded {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_429_with_retry_after() {
        let limit = RateLimit::new(NonZeroU32::new(1).unwrap(), NonZeroU32::new(3).unwrap());
        for _ in 0..3 {
            limit.check().unwrap();
        }
        match limit.check() {
            Err(Error::RateLimitExceeded { retry_after }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1))
            }
            other => panic!("{other:?}"),
        }
    }
}
