//! Latency of `TokenBuckets::try_take` against Redis and in-process (run by
//! `load-tests/redis_bucket.sh`, which starts the Redis).
//!
//!   cargo run --release -p chorus-actors --example bucket_latency -- REDIS_URL [ITERATIONS] [CONCURRENCY]
//!
//! Prints p50/p99/max per backend: sequential takes (one caller), then CONCURRENCY callers at
//! once (the same total count). Keys spread over 1000 buckets so most takes are admitted.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_actors::quota::{BucketSpec, LocalBuckets, RedisBuckets, TokenBuckets};

const MAX_ITERATIONS: usize = 200_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

fn report(out: &mut impl Write, label: &str, mut samples: Vec<Duration>, wall: Duration) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let _ = writeln!(
        out,
        "{label:<28} n={:<6} p50={:>8.1} µs  p99={:>8.1} µs  max={:>9.1} µs  {:>9.0} ops/s",
        samples.len(),
        us(percentile(&samples, 0.50)),
        us(percentile(&samples, 0.99)),
        us(samples.last().copied().unwrap_or_default()),
        samples.len() as f64 / wall.as_secs_f64().max(1e-9),
    );
}

async fn sequential(buckets: &dyn TokenBuckets, n: usize) -> (Vec<Duration>, Duration) {
    let spec = BucketSpec::per_minute(1_000_000);
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let key = format!("bench:{}", i % 1000);
        let t = Instant::now();
        let _ = buckets.try_take(&key, spec, 1).await;
        samples.push(t.elapsed());
    }
    (samples, started.elapsed())
}

async fn concurrent(
    buckets: Arc<dyn TokenBuckets>,
    n: usize,
    callers: usize,
) -> (Vec<Duration>, Duration) {
    let spec = BucketSpec::per_minute(1_000_000);
    let per_caller = n / callers.max(1);
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let buckets = buckets.clone();
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(per_caller);
                for i in 0..per_caller {
                    let key = format!("bench:{}", (c * per_caller + i) % 1000);
                    let t = Instant::now();
                    let _ = buckets.try_take(&key, spec, 1).await;
                    samples.push(t.elapsed());
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(n);
    for task in tasks {
        samples.extend(task.await.unwrap_or_default());
    }
    (samples, started.elapsed())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: bucket_latency REDIS_URL [ITERATIONS] [CONCURRENCY]")?;
    let n: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let n = n.clamp(1, MAX_ITERATIONS);
    let callers: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(16);
    let mut out = std::io::stdout().lock();

    let local: Arc<dyn TokenBuckets> = Arc::new(LocalBuckets::new());
    let redis: Arc<dyn TokenBuckets> = Arc::new(
        RedisBuckets::connect(&url, "chorus-bench", Duration::from_millis(250), 0.5).await,
    );
    if redis.health() != chorus_actors::quota::BackendHealth::Healthy {
        return Err(format!("Redis at {url} is not reachable: {:?}", redis.health()).into());
    }
    // Warm up: script loaded, connection established, allocator settled.
    sequential(&*redis, 500).await;
    sequential(&*local, 500).await;

    let (samples, wall) = sequential(&*local, n).await;
    report(&mut out, "local, 1 caller", samples, wall);
    let (samples, wall) = concurrent(local.clone(), n, callers).await;
    report(
        &mut out,
        &format!("local, {callers} callers"),
        samples,
        wall,
    );
    let (samples, wall) = sequential(&*redis, n).await;
    report(&mut out, "redis, 1 caller", samples, wall);
    let (samples, wall) = concurrent(redis.clone(), n, callers).await;
    report(
        &mut out,
        &format!("redis, {callers} callers"),
        samples,
        wall,
    );
    if redis.health() != chorus_actors::quota::BackendHealth::Healthy {
        return Err(format!("Redis degraded during the run: {:?}", redis.health()).into());
    }
    Ok(())
}
