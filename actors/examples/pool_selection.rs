//! Benchmark: what choosing a deployment costs per model call (`load-tests/pool_selection.sh`).
//!
//! Three deployments of one model, as a pool would hold them; each iteration selects one
//! (availability, priority, power of two choices, the metrics counter), records a success on
//! the lease and drops it — everything a call pays for routing except the provider call itself.
//! Prints p50/p99/max per call and calls per second, on one task and on two threads at once.

// A benchmark prints its figures: that is its output, not logging.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_actors::provider::mock::MockProvider;
use chorus_actors::provider::pool::{
    Deployment, DeploymentConfig, PoolState, Pools, RoutingPolicy, SelectRequest,
};

fn deployments() -> Vec<Arc<Deployment>> {
    (0..3)
        .map(|i| {
            Arc::new(Deployment::new(
                DeploymentConfig {
                    id: format!("bench@mock#{i}"),
                    provider_id: "mock".into(),
                    upstream: "echo".into(),
                    weight: 1 + i,
                    priority: 0,
                    rpm: None,
                    tpm: None,
                    first_token_timeout: None,
                    timeout: None,
                },
                Arc::new(MockProvider),
            ))
        })
        .collect()
}

async fn run(pools: Arc<Pools>, candidates: Arc<Vec<Arc<Deployment>>>, n: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    let request = SelectRequest::default();
    for _ in 0..n {
        let started = Instant::now();
        if let Some(mut lease) = pools.select(&candidates, &request).await {
            lease.succeeded(Duration::from_millis(20));
        }
        samples.push(started.elapsed());
    }
    samples
}

fn report(label: &str, mut samples: Vec<Duration>, wall: Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{label}: {} calls, p50 {:?}, p99 {:?}, max {:?}, {:.0} selections/s",
        samples.len(),
        at(0.50),
        at(0.99),
        at(1.0),
        samples.len() as f64 / wall.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let candidates = Arc::new(deployments());
    let pools = Arc::new(Pools::new(
        vec![Arc::new(PoolState {
            provider_id: "mock".into(),
            deployments: candidates.to_vec(),
        })],
        None,
        RoutingPolicy::default(),
    ));
    // Warm-up (metrics children, allocator).
    run(pools.clone(), candidates.clone(), 10_000).await;

    let started = Instant::now();
    let samples = run(pools.clone(), candidates.clone(), n).await;
    report("one task", samples, started.elapsed());

    let started = Instant::now();
    let a = tokio::spawn(run(pools.clone(), candidates.clone(), n));
    let b = tokio::spawn(run(pools.clone(), candidates.clone(), n));
    let (Ok(mut a), Ok(b)) = (a.await, b.await) else {
        eprintln!("a benchmark task failed");
        std::process::exit(1);
    };
    a.extend(b);
    report("two tasks on two threads", a, started.elapsed());
}
