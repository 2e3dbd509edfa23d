//! [`RedisBuckets`]: token buckets shared by every node through Redis.
//!
//! Each operation is one atomic Lua script (`redis::Script`, sent by hash, loaded again after a
//! Redis restart) that refills the bucket from Redis' own `TIME`, so the nodes' clocks do not
//! matter. A bucket is a hash at `{prefix}:bucket:{key}` holding its level and the microsecond
//! it was last updated; it expires about when it would be full again (a full bucket is the
//! same as none), so Redis holds only recently limited keys.
//!
//! Redis unreachable (no answer within the response timeout, connection refused or dropped) is
//! not an error for callers: every operation is answered by a local bucket holding
//! `fallback_share` of the limit, [`TokenBuckets::health`] reports `Degraded`, one warning is
//! logged, and a background probe pings Redis until it answers — then the next operations go to
//! Redis again (one log line for that transition too).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script};

use super::{Admission, BackendHealth, BucketSpec, LocalBuckets, TokenBuckets};

/// How often a degraded backend asks Redis whether it is back.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Longest time a bucket key lives without use (a bucket that refills slower than this is
/// forgotten, i.e. full, after it).
const MAX_TTL_MS: u64 = 24 * 3600 * 1000;

/// Refills `level` from Redis' clock; defines `now`, `capacity`, `rate`, `level` and `persist`.
const PRELUDE: &str = r#"
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local max_ttl = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stored = redis.call('HMGET', KEYS[1], 'level', 'ts')
local level = tonumber(stored[1])
local ts = tonumber(stored[2])
if level == nil or ts == nil then
  level = capacity
  ts = now
end
if now > ts and rate > 0 then
  level = level + (now - ts) * rate / 1000000
end
if level > capacity then
  level = capacity
end
local function persist(value)
  if value >= capacity then
    redis.call('DEL', KEYS[1])
    return
  end
  local ttl = max_ttl
  if rate > 0 then
    ttl = math.min(max_ttl, math.ceil((capacity - value) / rate * 1000) + 1000)
  end
  redis.call('HSET', KEYS[1], 'level', string.format('%.17g', value), 'ts', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[1], ttl)
end
"#;

const TAKE: &str = r#"
local amount = tonumber(ARGV[4])
if level >= amount then
  level = level - amount
  persist(level)
  return {1, string.format('%.17g', level)}
end
return {0, string.format('%.17g', level)}
"#;

const ADJUST: &str = r#"
local delta = tonumber(ARGV[4])
level = math.min(capacity, level - delta)
persist(level)
return string.format('%.17g', level)
"#;

const PEEK: &str = r#"
return string.format('%.17g', level)
"#;

/// Token buckets in Redis, with a local fallback while Redis is unreachable.
pub struct RedisBuckets {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` when the URL could not be parsed: permanently degraded.
    manager: Option<ConnectionManager>,
    key_prefix: String,
    response_timeout: Duration,
    fallback_share: f64,
    fallback: LocalBuckets,
    degraded: AtomicBool,
    reason: Mutex<String>,
    take: Script,
    adjust: Script,
    peek: Script,
}

impl RedisBuckets {
    /// Connects to `url`. Never fails: an unreachable Redis (or a bad URL) starts the backend
    /// degraded, answering from its local fallback while it keeps trying in the background.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        response_timeout: Duration,
        fallback_share: f64,
    ) -> RedisBuckets {
        let manager = redis::Client::open(url)
            .and_then(|client| {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(response_timeout))
                    .set_connection_timeout(Some(response_timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(20))
                    .set_max_delay(PROBE_EVERY);
                ConnectionManager::new_lazy_with_config(client, config)
            })
            .map_err(|e| e.to_string());
        let (manager, reason) = match manager {
            Ok(manager) => (Some(manager), String::new()),
            Err(e) => (None, format!("invalid Redis URL: {e}")),
        };
        let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        let inner = Arc::new(Inner {
            manager,
            key_prefix: key_prefix.to_owned(),
            response_timeout,
            fallback_share,
            fallback: LocalBuckets::new(),
            degraded: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
            take: script(TAKE),
            adjust: script(ADJUST),
            peek: script(PEEK),
        });
        if inner.manager.is_none() {
            inner.set_degraded(reason);
        } else if let Err(reason) = inner.ping().await {
            inner.set_degraded(reason);
        } else {
            tracing::info!(backend = "redis", "shared token buckets ready");
        }
        let probe = Arc::downgrade(&inner);
        tokio::spawn(probe_while_alive(probe));
        RedisBuckets { inner }
    }
}

/// Pings Redis while degraded, until the backend is dropped.
async fn probe_while_alive(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.degraded.load(Ordering::Acquire) && inner.manager.is_some() {
            match inner.ping().await {
                Ok(()) => inner.set_healthy(),
                Err(reason) => inner.note_reason(reason),
            }
        }
    }
}

impl Inner {
    fn key(&self, key: &str) -> String {
        format!("{}:bucket:{key}", self.key_prefix)
    }

    /// The bound on one call: the connection's own response timeout plus room for a reconnect.
    fn deadline(&self) -> Duration {
        self.response_timeout * 2 + Duration::from_millis(20)
    }

    async fn ping(&self) -> Result<(), String> {
        let Some(manager) = &self.manager else {
            return Err("no Redis connection".into());
        };
        let mut connection = manager.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(self.deadline(), ping.query_async::<String>(&mut connection))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.deadline())),
        }
    }

    /// Runs `script` on `key` with the spec and one more argument; `None` when Redis is
    /// unreachable (the backend is then degraded).
    async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        spec: BucketSpec,
        extra: i64,
    ) -> Option<T> {
        if self.degraded.load(Ordering::Acquire) {
            return None;
        }
        let manager = self.manager.as_ref()?;
        let mut connection = manager.clone();
        let mut invocation = script.key(self.key(key));
        invocation
            .arg(spec.capacity)
            .arg(format!("{:.17e}", spec.refill_per_sec.max(0.0)))
            .arg(MAX_TTL_MS)
            .arg(extra);
        match tokio::time::timeout(
            self.deadline(),
            invocation.invoke_async::<T>(&mut connection),
        )
        .await
        {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                self.set_degraded(e.to_string());
                None
            }
            Err(_) => {
                self.set_degraded(format!("no answer within {:?}", self.deadline()));
                None
            }
        }
    }

    fn set_degraded(&self, reason: String) {
        self.note_reason(reason.clone());
        if !self.degraded.swap(true, Ordering::AcqRel) {
            crate::metrics::metrics()
                .quota_backend_degraded
                .set(["redis"], 1);
            tracing::warn!(
                backend = "redis",
                %reason,
                fallback_share = self.fallback_share,
                "Redis unreachable: shared limits now answered locally with this node's share"
            );
        }
    }

    fn set_healthy(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            crate::metrics::metrics()
                .quota_backend_degraded
                .set(["redis"], 0);
            tracing::warn!(
                backend = "redis",
                "Redis reachable again: shared limits answered by Redis"
            );
        }
    }

    fn note_reason(&self, reason: String) {
        if let Ok(mut current) = self.reason.lock() {
            *current = reason;
        }
    }
}

/// A float level as the script wrote it (a malformed reply counts as an empty bucket).
fn parse_level(text: &str) -> f64 {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .unwrap_or(0.0)
}

#[async_trait::async_trait]
impl TokenBuckets for RedisBuckets {
    async fn try_take(&self, key: &str, spec: BucketSpec, amount: u64) -> Admission {
        let inner = &self.inner;
        let amount_arg = i64::try_from(amount).unwrap_or(i64::MAX);
        match inner
            .eval::<(i64, String)>(&inner.take, key, spec, amount_arg)
            .await
        {
            Some((allowed, level)) => spec.admission(allowed == 1, parse_level(&level), amount),
            None => inner
                .fallback
                .take_now(key, spec.share(inner.fallback_share), amount),
        }
    }

    async fn adjust(&self, key: &str, spec: BucketSpec, delta: i64) {
        if delta == 0 {
            return;
        }
        let inner = &self.inner;
        if inner
            .eval::<String>(&inner.adjust, key, spec, delta)
            .await
            .is_none()
        {
            // Amounts are not scaled (try_take takes the full amount from the smaller bucket).
            let share = spec.share(inner.fallback_share);
            inner.fallback.adjust_now(key, share, delta);
        }
    }

    async fn peek(&self, key: &str, spec: BucketSpec) -> Admission {
        let inner = &self.inner;
        match inner.eval::<String>(&inner.peek, key, spec, 0).await {
            Some(level) => {
                let level = parse_level(&level);
                spec.admission(level >= 1.0, level, 1)
            }
            None => inner
                .fallback
                .peek_now(key, spec.share(inner.fallback_share)),
        }
    }

    fn backend(&self) -> &'static str {
        "redis"
    }

    fn health(&self) -> BackendHealth {
        if self.inner.degraded.load(Ordering::Acquire) {
            let reason = self
                .inner
                .reason
                .lock()
                .map(|r| r.clone())
                .unwrap_or_default();
            BackendHealth::Degraded { reason }
        } else {
            BackendHealth::Healthy
        }
    }
}
