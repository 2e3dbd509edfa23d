//! PROVISIONAL (lead's copy of the interface the quota branch implements; replaced at merge).

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketSpec {
    pub capacity: u64,
    pub refill_per_sec: f64,
}

impl BucketSpec {
    pub fn per_minute(n: u64) -> Self {
        BucketSpec {
            capacity: n,
            refill_per_sec: n as f64 / 60.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    pub retry_after: Duration,
    pub reset_after: Duration,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum BackendHealth {
    Healthy,
    Degraded { reason: String },
}

#[async_trait::async_trait]
pub trait TokenBuckets: Send + Sync + 'static {
    async fn try_take(&self, key: &str, spec: BucketSpec, amount: u64) -> Admission;
    async fn adjust(&self, key: &str, spec: BucketSpec, delta: i64);
    async fn peek(&self, key: &str, spec: BucketSpec) -> Admission;
    fn backend(&self) -> &'static str;
    fn health(&self) -> BackendHealth;
}
