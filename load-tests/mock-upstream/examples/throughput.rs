//! A closed-loop throughput probe for a running `mock-upstream` (when `oha` is not at hand):
//!
//! ```sh
//! cargo run --release -p chorus-mock-upstream --example throughput -- http://127.0.0.1:PORT [CONNECTIONS] [SECONDS] [stream]
//! ```
//!
//! It keeps CONNECTIONS requests in flight for SECONDS and prints the achieved rate. The load
//! generator shares the machine with the server, so the figure is a floor.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .get(1)
        .expect("usage: throughput BASE_URL [CONNECTIONS] [SECONDS] [stream]");
    let connections: usize = args.get(2).map_or(64, |v| v.parse().expect("CONNECTIONS"));
    let seconds: u64 = args.get(3).map_or(5, |v| v.parse().expect("SECONDS"));
    let stream = args.get(4).is_some_and(|v| v == "stream");

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .unwrap();
    let url = format!("{base}/v1/chat/completions");
    let body = serde_json::json!({
        "model": "mock-model",
        "stream": stream,
        "messages": [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}],
    });
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let result = client.post(&url).bearer_auth("k").json(&body).send().await;
                let ok = match result {
                    Ok(response) if response.status().is_success() => {
                        response.bytes().await.is_ok()
                    }
                    _ => false,
                };
                let counter = if ok { &done } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let done = done.load(Ordering::Relaxed);
    println!(
        "{done} ok, {} failed in {elapsed:.1} s: {:.0} req/s ({} connections, stream={stream})",
        failed.load(Ordering::Relaxed),
        done as f64 / elapsed,
        connections
    );
}
