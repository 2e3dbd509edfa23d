//! [`LocalBuckets`]: token buckets in this process.
//!
//! Keys are spread over a fixed number of shards, each behind its own short-held std mutex
//! (never held across an await), so concurrent users rarely contend. A bucket is created full on
//! first use and dropped once it would be full again (a full bucket is the same as no bucket), so
//! memory follows the number of recently limited keys, not every key ever seen.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use super::{Admission, BackendHealth, BucketSpec, TokenBuckets};

const SHARDS: usize = 16;

/// Sweep a shard's full buckets once it holds more than this many keys.
const SWEEP_THRESHOLD: usize = 4_096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// May be negative: a settled reservation that used more than it reserved is a debt.
    level: f64,
    updated: Instant,
    /// The spec last used with this key, so a sweep knows when the bucket is full.
    spec: BucketSpec,
}

impl Bucket {
    fn level_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.level + elapsed * self.spec.refill_per_sec.max(0.0)).min(self.spec.capacity as f64)
    }
}

#[derive(Default)]
struct Shard {
    buckets: HashMap<String, Bucket>,
    /// Sweep when the shard grows past this; doubled after a sweep that kept most buckets, so
    /// sweeping stays amortized O(1) per insert.
    sweep_at: usize,
}

/// In-process keyed token buckets.
pub struct LocalBuckets {
    shards: Vec<Mutex<Shard>>,
}

impl Default for LocalBuckets {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LocalBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBuckets")
            .field("keys", &self.len())
            .finish()
    }
}

impl LocalBuckets {
    pub fn new() -> Self {
        LocalBuckets {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        buckets: HashMap::new(),
                        sweep_at: SWEEP_THRESHOLD,
                    })
                })
                .collect(),
        }
    }

    /// Buckets held in memory (those not full).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).buckets.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [`TokenBuckets::try_take`] without the async wrapper.
    pub fn take_now(&self, key: &str, spec: BucketSpec, amount: u64) -> Admission {
        self.take_at(key, spec, amount, Instant::now())
    }

    /// [`TokenBuckets::adjust`] without the async wrapper.
    pub fn adjust_now(&self, key: &str, spec: BucketSpec, delta: i64) {
        self.adjust_at(key, spec, delta, Instant::now());
    }

    /// [`TokenBuckets::peek`] without the async wrapper.
    pub fn peek_now(&self, key: &str, spec: BucketSpec) -> Admission {
        self.peek_at(key, spec, Instant::now())
    }

    /// Removes `key` and answers how far below full it was (its spec and the deficit), or
    /// `None` when it was full. With [`LocalBuckets::absorb_now`] on another node, a bucket
    /// moves with its key when the key's owner moves (cluster hand-off).
    pub fn take_deficit_now(&self, key: &str) -> Option<(BucketSpec, f64)> {
        let now = Instant::now();
        let bucket = self.shard(key).buckets.remove(key)?;
        let deficit = bucket.spec.capacity as f64 - bucket.level_at(now);
        (deficit > 0.0).then_some((bucket.spec, deficit))
    }

    /// Lowers `key` by a deficit taken elsewhere (see `take_deficit_now`): what both used adds up.
    pub fn absorb_now(&self, key: &str, spec: BucketSpec, deficit: f64) {
        if !deficit.is_finite() || deficit <= 0.0 {
            return;
        }
        let now = Instant::now();
        let mut shard = self.shard(key);
        let level = current(&shard, key, spec, now) - deficit;
        store(&mut shard, key, spec, level, now);
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let index = (hasher.finish() as usize) % self.shards.len();
        lock(&self.shards[index])
    }

    pub(crate) fn take_at(
        &self,
        key: &str,
        spec: BucketSpec,
        amount: u64,
        now: Instant,
    ) -> Admission {
        let mut shard = self.shard(key);
        if shard.buckets.len() > shard.sweep_at {
            sweep(&mut shard, now);
        }
        let level = current(&shard, key, spec, now);
        let allowed = level >= amount as f64;
        let level = if allowed {
            level - amount as f64
        } else {
            level
        };
        store(&mut shard, key, spec, level, now);
        spec.admission(allowed, level, amount)
    }

    pub(crate) fn adjust_at(&self, key: &str, spec: BucketSpec, delta: i64, now: Instant) {
        if delta == 0 {
            return;
        }
        let mut shard = self.shard(key);
        let level = current(&shard, key, spec, now);
        let level = (level - delta as f64).min(spec.capacity as f64);
        store(&mut shard, key, spec, level, now);
    }

    pub(crate) fn peek_at(&self, key: &str, spec: BucketSpec, now: Instant) -> Admission {
        let shard = self.shard(key);
        let level = current(&shard, key, spec, now);
        spec.admission(level >= 1.0, level, 1)
    }
}

/// A poisoned shard still holds valid buckets (every write is a single assignment).
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    match shard.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The refilled level of `key` (a missing bucket is full). The spec given now wins over the one
/// stored, so a tier change applies at once.
fn current(shard: &Shard, key: &str, spec: BucketSpec, now: Instant) -> f64 {
    match shard.buckets.get(key) {
        Some(bucket) => Bucket { spec, ..*bucket }.level_at(now),
        None => spec.capacity as f64,
    }
}

fn store(shard: &mut Shard, key: &str, spec: BucketSpec, level: f64, now: Instant) {
    if level >= spec.capacity as f64 {
        shard.buckets.remove(key);
        return;
    }
    let bucket = Bucket {
        level,
        updated: now,
        spec,
    };
    match shard.buckets.get_mut(key) {
        Some(existing) => *existing = bucket,
        None => {
            shard.buckets.insert(key.to_owned(), bucket);
        }
    }
}

fn sweep(shard: &mut Shard, now: Instant) {
    shard
        .buckets
        .retain(|_, b| b.level_at(now) < b.spec.capacity as f64);
    shard.sweep_at = (shard.buckets.len() * 2).max(SWEEP_THRESHOLD);
}

#[async_trait::async_trait]
impl TokenBuckets for LocalBuckets {
    async fn try_take(&self, key: &str, spec: BucketSpec, amount: u64) -> Admission {
        self.take_now(key, spec, amount)
    }

    async fn adjust(&self, key: &str, spec: BucketSpec, delta: i64) {
        self.adjust_now(key, spec, delta);
    }

    async fn peek(&self, key: &str, spec: BucketSpec) -> Admission {
        self.peek_now(key, spec)
    }

    fn backend(&self) -> &'static str {
        "local"
    }

    fn health(&self) -> BackendHealth {
        BackendHealth::Healthy
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_deficit_moves_to_another_set_of_buckets() {
        let spec = BucketSpec::per_minute(10);
        let (old, new) = (LocalBuckets::new(), LocalBuckets::new());
        for _ in 0..6 {
            assert!(old.take_now("u:rpm", spec, 1).allowed);
        }
        assert!(new.take_now("u:rpm", spec, 1).allowed);
        let (moved_spec, deficit) = old.take_deficit_now("u:rpm").unwrap();
        assert_eq!(moved_spec, spec);
        assert!((5.9..=6.0).contains(&deficit), "{deficit}");
        // Gone from the old node: moving it again moves nothing.
        assert!(old.take_deficit_now("u:rpm").is_none());
        new.absorb_now("u:rpm", moved_spec, deficit);
        // 10 - 6 - 1 = 3 left.
        for _ in 0..3 {
            assert!(new.take_now("u:rpm", spec, 1).allowed);
        }
        assert!(!new.take_now("u:rpm", spec, 1).allowed);
        assert!(LocalBuckets::new().take_deficit_now("nobody").is_none());
    }

    #[test]
    fn takes_all_or_nothing_and_refills() {
        let buckets = LocalBuckets::new();
        let spec = BucketSpec::per_minute(60);
        let t0 = Instant::now();
        assert!(buckets.take_at("k", spec, 50, t0).allowed);
        let refused = buckets.take_at("k", spec, 11, t0);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 10);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        // Nothing was taken by the refusal.
        assert!(buckets.take_at("k", spec, 10, t0).allowed);
        assert!(
            buckets
                .take_at("k", spec, 2, t0 + Duration::from_secs(2))
                .allowed
        );
    }

    #[test]
    fn adjust_goes_into_debt_and_gives_back_up_to_capacity() {
        let buckets = LocalBuckets::new();
        let spec = BucketSpec::per_minute(60);
        let t0 = Instant::now();
        buckets.adjust_at("k", spec, 70, t0);
        let peek = buckets.peek_at("k", spec, t0);
        assert_eq!(peek.remaining, 0);
        // 10 tokens of debt: 11 s until one token is there.
        assert!(
            !buckets
                .take_at("k", spec, 1, t0 + Duration::from_secs(10))
                .allowed
        );
        assert!(
            buckets
                .take_at("k", spec, 1, t0 + Duration::from_secs(11))
                .allowed
        );
        buckets.adjust_at("k", spec, -1000, t0 + Duration::from_secs(11));
        assert_eq!(
            buckets
                .peek_at("k", spec, t0 + Duration::from_secs(11))
                .remaining,
            60
        );
        // Full buckets are not kept.
        assert!(buckets.is_empty());
    }

    #[test]
    fn full_buckets_are_swept_so_memory_stays_bounded() {
        let buckets = LocalBuckets::new();
        let spec = BucketSpec::per_minute(60);
        let t0 = Instant::now();
        let n = SHARDS * SWEEP_THRESHOLD * 2;
        for i in 0..n {
            buckets.take_at(&format!("k{i}"), spec, 1, t0);
        }
        assert_eq!(buckets.len(), n, "nothing is full yet");
        // Two seconds later the first keys are full again; growing the shards sweeps them.
        let later = t0 + Duration::from_secs(2);
        for i in 0..2 * n {
            buckets.take_at(&format!("other{i}"), spec, 1, later);
        }
        assert_eq!(buckets.len(), 2 * n, "the full buckets were dropped");
    }
}
