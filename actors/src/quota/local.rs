//! An in-process token bucket per key.
//!
//! Each key's bucket holds up to `burst` tokens and refills at `per_period / period`. Buckets are
//! created on first use and dropped once full again (a full bucket is the same as no bucket), so
//! memory follows the number of recently active keys, not every key ever seen.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many events a key may have per period (also the burst size).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitSpec {
    pub per_period: u32,
    pub period: Duration,
}

impl LimitSpec {
    pub fn per_minute(n: u32) -> Self {
        LimitSpec {
            per_period: n,
            period: Duration::from_secs(60),
        }
    }

    fn refill_per_sec(&self) -> f64 {
        f64::from(self.per_period) / self.period.as_secs_f64().max(f64::EPSILON)
    }
}

/// The answer for one key, with what the `X-RateLimit-*` headers need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset_after: Duration,
    /// Until one token is available (zero when allowed).
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Keyed token buckets behind one short-held mutex (never held across an await).
pub struct KeyedLimiter {
    spec: LimitSpec,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Sweep full buckets once the map grows past this many keys.
const SWEEP_THRESHOLD: usize = 10_000;

impl KeyedLimiter {
    pub fn new(spec: LimitSpec) -> Self {
        KeyedLimiter {
            spec,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn spec(&self) -> LimitSpec {
        self.spec
    }

    /// Takes one token for `key` if there is one.
    pub fn acquire(&self, key: &str) -> Decision {
        self.decide(key, Instant::now(), true)
    }

    /// Reports whether `key` has a token, without taking it.
    pub fn check(&self, key: &str) -> Decision {
        self.decide(key, Instant::now(), false)
    }

    /// Gives back one token taken by [`acquire`](Self::acquire) (the event turned out not to
    /// count, e.g. a login that succeeded). Never fills past the burst size.
    pub fn refund(&self, key: &str) {
        let now = Instant::now();
        let capacity = f64::from(self.spec.per_period);
        let Ok(mut buckets) = self.buckets.lock() else {
            return;
        };
        let bucket = self.refilled(&mut buckets, key, now);
        bucket.tokens = (bucket.tokens + 1.0).min(capacity);
    }

    fn decide(&self, key: &str, now: Instant, take: bool) -> Decision {
        let spec = self.spec;
        let Ok(mut buckets) = self.buckets.lock() else {
            // A poisoned limiter must not take the login route down with it.
            return Decision {
                allowed: true,
                limit: spec.per_period,
                remaining: spec.per_period,
                reset_after: Duration::ZERO,
                retry_after: Duration::ZERO,
            };
        };
        if buckets.len() > SWEEP_THRESHOLD {
            self.sweep(&mut buckets, now);
        }
        let rate = spec.refill_per_sec();
        let bucket = self.refilled(&mut buckets, key, now);
        let allowed = bucket.tokens >= 1.0;
        if allowed && take {
            bucket.tokens -= 1.0;
        }
        let tokens = bucket.tokens;
        let missing_for_one = (1.0 - tokens).max(0.0);
        let missing_for_full = (f64::from(spec.per_period) - tokens).max(0.0);
        Decision {
            allowed,
            limit: spec.per_period,
            remaining: tokens.max(0.0).floor() as u32,
            reset_after: Duration::from_secs_f64(missing_for_full / rate),
            retry_after: if allowed {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(missing_for_one / rate)
            },
        }
    }

    fn refilled<'a>(
        &self,
        buckets: &'a mut HashMap<String, Bucket>,
        key: &str,
        now: Instant,
    ) -> &'a mut Bucket {
        let capacity = f64::from(self.spec.per_period);
        let rate = self.spec.refill_per_sec();
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.updated = now;
        bucket
    }

    fn sweep(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        let capacity = f64::from(self.spec.per_period);
        let rate = self.spec.refill_per_sec();
        buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * rate < capacity
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_burst_then_refuses_with_retry_after() {
        let limiter = KeyedLimiter::new(LimitSpec::per_minute(3));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.decide("ip", t0, true).allowed);
        }
        let refused = limiter.decide("ip", t0, true);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        // One token per 20 s at 3/min.
        assert!(refused.retry_after > Duration::from_secs(19));
        assert!(refused.retry_after <= Duration::from_secs(20));
        // Another key is unaffected.
        assert!(limiter.decide("other", t0, true).allowed);
    }

    #[test]
    fn refills_over_time() {
        let limiter = KeyedLimiter::new(LimitSpec::per_minute(60));
        let t0 = Instant::now();
        for _ in 0..60 {
            limiter.decide("k", t0, true);
        }
        assert!(!limiter.decide("k", t0, true).allowed);
        assert!(
            limiter
                .decide("k", t0 + Duration::from_secs(2), true)
                .allowed
        );
    }

    #[test]
    fn refund_returns_a_token_up_to_the_burst() {
        let limiter = KeyedLimiter::new(LimitSpec::per_minute(2));
        assert!(limiter.acquire("k").allowed);
        assert!(limiter.acquire("k").allowed);
        assert!(!limiter.acquire("k").allowed);
        limiter.refund("k");
        assert!(limiter.acquire("k").allowed);
        limiter.refund("k");
        limiter.refund("k");
        limiter.refund("k");
        assert_eq!(limiter.check("k").remaining, 2);
    }

    #[test]
    fn check_does_not_take() {
        let limiter = KeyedLimiter::new(LimitSpec::per_minute(1));
        assert!(limiter.check("acct").allowed);
        assert!(limiter.check("acct").allowed);
        assert!(limiter.acquire("acct").allowed);
        let d = limiter.check("acct");
        assert!(!d.allowed);
        assert!(d.retry_after > Duration::from_secs(59));
    }
}
