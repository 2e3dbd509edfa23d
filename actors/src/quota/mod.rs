//! Rate limits and quotas: token buckets behind one interface, and the tiers they come from.
//!
//! [`TokenBuckets`] is the one interface: take an amount from a key's bucket (all or nothing),
//! settle a reservation later with the real amount ([`TokenBuckets::adjust`]), or look at the
//! level. Two backends implement it:
//!
//! - [`LocalBuckets`]: in-process, exact on one node. Per-user limits use it, because each user
//!   has exactly one home session (ARCHITECTURE.md, principle 1), so a user's buckets need no
//!   sharing between nodes.
//! - [`RedisBuckets`]: one atomic Lua script per operation on a shared Redis, with Redis' own
//!   clock, for limits every node shares (per-deployment provider RPM/TPM, per-IP limits in a
//!   cluster). When Redis does not answer within the configured response timeout it degrades to
//!   a local bucket holding `fallback_share` of each limit, reports
//!   [`BackendHealth::Degraded`], and goes back to Redis once it answers again: an outage of
//!   Redis never stops traffic.
//!
//! [`buckets_for`] picks the backend from configuration. [`KeyedLimiter`] is the small
//! synchronous limiter the edge uses for its public auth routes. [`tiers`] holds the plans
//! (`config/tiers.toml`); [`Clock`] and [`period_of`] define the calendar month (UTC) monthly
//! limits count in.

mod buckets;
mod local;
mod redis;
pub mod tiers;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};

pub use buckets::LocalBuckets;
pub use local::{Decision, KeyedLimiter, LimitSpec};
pub use redis::RedisBuckets;

/// A bucket's shape: it holds up to `capacity` and refills continuously at `refill_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BucketSpec {
    pub capacity: u64,
    pub refill_per_sec: f64,
}

impl BucketSpec {
    /// `n` per minute, with a burst of `n`.
    pub fn per_minute(n: u64) -> Self {
        BucketSpec {
            capacity: n,
            refill_per_sec: n as f64 / 60.0,
        }
    }

    /// The same limit scaled by `share` (at least 1 token of capacity), e.g. one node's part of
    /// a shared limit while the shared store is unreachable.
    pub fn share(self, share: f64) -> Self {
        let share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            1.0
        };
        BucketSpec {
            capacity: ((self.capacity as f64 * share).floor() as u64).max(1),
            refill_per_sec: self.refill_per_sec * share,
        }
    }

    /// The answer for a bucket holding `level` after a take of `amount` was `allowed` or not.
    pub(crate) fn admission(self, allowed: bool, level: f64, amount: u64) -> Admission {
        let capacity = self.capacity as f64;
        let level = if level.is_finite() { level } else { capacity };
        let missing_for_amount = (amount as f64 - level).max(0.0);
        Admission {
            allowed,
            limit: self.capacity,
            remaining: level.max(0.0).floor() as u64,
            retry_after: if allowed {
                Duration::ZERO
            } else {
                self.time_for(missing_for_amount)
            },
            reset_after: self.time_for((capacity - level).max(0.0)),
        }
    }

    /// How long refilling `tokens` takes (bounded, so a zero rate never overflows a Duration).
    pub(crate) fn time_for(self, tokens: f64) -> Duration {
        if tokens <= 0.0 {
            return Duration::ZERO;
        }
        let secs = tokens / self.refill_per_sec;
        if !secs.is_finite() || secs > MAX_WAIT.as_secs_f64() {
            return MAX_WAIT;
        }
        Duration::from_secs_f64(secs.max(0.0))
    }
}

/// The longest wait reported (a bucket that never refills reports this).
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// The answer of a bucket, with what the `X-RateLimit-*` and `Retry-After` headers need.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Admission {
    pub allowed: bool,
    pub limit: u64,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Until the refused amount is available (zero when allowed).
    pub retry_after: Duration,
    /// Until the bucket is full again.
    pub reset_after: Duration,
}

impl From<Decision> for Admission {
    fn from(d: Decision) -> Self {
        Admission {
            allowed: d.allowed,
            limit: u64::from(d.limit),
            remaining: u64::from(d.remaining),
            retry_after: d.retry_after,
            reset_after: d.reset_after,
        }
    }
}

/// Whether a backend answers from where it should (Redis), or from its local fallback.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum BackendHealth {
    Healthy,
    Degraded { reason: String },
}

/// Keyed token buckets. Every operation refills the bucket for the time passed first.
#[async_trait::async_trait]
pub trait TokenBuckets: Send + Sync + 'static {
    /// Takes `amount` from `key`'s bucket if it holds that much (all or nothing).
    async fn try_take(&self, key: &str, spec: BucketSpec, amount: u64) -> Admission;
    /// Settles a reservation: delta > 0 takes more without checking (the level may go below
    /// zero: a debt refill repays), delta < 0 gives back (capped at capacity).
    async fn adjust(&self, key: &str, spec: BucketSpec, delta: i64);
    /// The current level, unchanged.
    async fn peek(&self, key: &str, spec: BucketSpec) -> Admission;
    /// "local" or "redis".
    fn backend(&self) -> &'static str;
    fn health(&self) -> BackendHealth;
}

/// Where shared buckets live when they are not in-process (`[redis]` in chorus.toml).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    pub url: String,
    pub key_prefix: String,
    /// Longest wait for one reply before Redis counts as unreachable.
    pub response_timeout: Duration,
    /// The fraction of each limit this node admits alone while Redis is unreachable.
    pub fallback_share: f64,
}

/// The shared buckets of this node: Redis when configured, else in-process.
pub async fn buckets_for(redis: Option<RedisSettings>) -> Arc<dyn TokenBuckets> {
    match redis {
        Some(settings) => Arc::new(
            RedisBuckets::connect(
                &settings.url,
                &settings.key_prefix,
                settings.response_timeout,
                settings.fallback_share,
            )
            .await,
        ),
        None => Arc::new(LocalBuckets::new()),
    }
}

/// The time monthly limits are counted against: the real clock, or a test's.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Arc::new(Utc::now))
    }

    /// A clock reading `now` (tests move time across a month boundary with it).
    pub fn new(now: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(now))
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now().to_rfc3339())
    }
}

/// The usage period of an instant: its calendar month in UTC, `YYYY-MM`.
pub fn period_of(now: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", now.year(), now.month())
}

/// The first instant of the month after `now`'s (UTC): when monthly limits reset.
pub fn next_period_start(now: DateTime<Utc>) -> DateTime<Utc> {
    let (year, month) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0)
        .single()
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_calendar_months() {
        let t = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        assert_eq!(period_of(t), "2026-12");
        let next = next_period_start(t);
        assert_eq!(next, Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap());
        assert_eq!(period_of(next), "2027-01");
        let mid = Utc.with_ymd_and_hms(2026, 2, 14, 12, 0, 0).unwrap();
        assert_eq!(
            next_period_start(mid),
            Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn admission_reports_waits_from_the_level() {
        let spec = BucketSpec::per_minute(60);
        let refused = spec.admission(false, 0.5, 1);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        assert_eq!(refused.reset_after, Duration::from_secs_f64(59.5));
        let zero_rate = BucketSpec {
            capacity: 1,
            refill_per_sec: 0.0,
        };
        assert_eq!(zero_rate.admission(false, 0.0, 1).retry_after, MAX_WAIT);
        assert_eq!(spec.share(0.5).capacity, 30);
        assert_eq!(BucketSpec::per_minute(1).share(0.1).capacity, 1);
    }
}
