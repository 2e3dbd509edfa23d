//! Client CPU per provider call: `reqwest` (as Chorus configured it until session 5) against
//! the providers' own client (`provider::http::HttpClient`, hyper's pooled client called
//! directly), both posting the same chat body (serialized per call, as the adapters do) to the mock upstream with 64 callers for 6 s.
//!
//!   target/release/mock-upstream --bind 127.0.0.1:8089 &
//!   cargo run --release -p chorus-actors --example http_client_cost -- http://127.0.0.1:8089
//!
//! CPU is this process's utime+stime (`/proc/self/stat`) over the run, divided by the calls;
//! the mock upstream runs in its own process and is not counted.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chorus_actors::provider::http::{HttpClient, HttpTimeouts};
use http::header::{AUTHORIZATION, HeaderValue};

const BODY: &str = r#"{"model":"bench","messages":[{"role":"user","content":"hello there, how are you today"}],"max_tokens":256,"stream":false}"#;
const CALLERS: usize = 64;
const RUN: Duration = Duration::from_secs(6);

/// Seconds of CPU this process has used.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) end with `)`.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs `CALLERS` loops of `call` for `RUN`; prints calls per second and CPU per call.
async fn measure<F, Fut>(name: &str, call: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let calls = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let (cpu_before, started) = (cpu_seconds(), Instant::now());
    let until = started + RUN;
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (call, calls, failures) = (call.clone(), calls.clone(), failures.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    let counter = if call().await { &calls } else { &failures };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let (cpu, elapsed) = (cpu_seconds() - cpu_before, started.elapsed().as_secs_f64());
    let calls = calls.load(Ordering::Relaxed).max(1) as f64;
    let _ = writeln!(
        std::io::stdout(),
        "{name:<10} {:>8.0} calls/s   client CPU {:>5.1} us/call   failures {}",
        calls / elapsed,
        cpu * 1e6 / calls,
        failures.load(Ordering::Relaxed)
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::args()
        .nth(1)
        .ok_or("usage: http_client_cost MOCK_UPSTREAM_URL")?;
    let url = format!("{}/v1/chat/completions", base.trim_end_matches('/'));
    let bearer = HeaderValue::from_static("Bearer bench");

    let reqwest_client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(120))
        .tcp_nodelay(true)
        .build()?;
    let parsed = reqwest::Url::parse(&url)?;
    let body: serde_json::Value = serde_json::from_str(BODY)?;
    let (auth, json) = (bearer.clone(), body.clone());
    measure("reqwest", move || {
        let (client, url, auth, body) = (
            reqwest_client.clone(),
            parsed.clone(),
            auth.clone(),
            json.clone(),
        );
        async move {
            match client
                .post(url)
                .header(AUTHORIZATION, auth)
                .json(&body)
                .send()
                .await
            {
                Ok(response) => response.bytes().await.is_ok_and(|b| !b.is_empty()),
                Err(_) => false,
            }
        }
    })
    .await;

    let client = HttpClient::new(HttpTimeouts::default())?;
    let uri: http::Uri = url.parse()?;
    measure("chorus", move || {
        let (client, uri, auth, body) = (client.clone(), uri.clone(), bearer.clone(), body.clone());
        async move {
            match client
                .post(uri)
                .header(AUTHORIZATION, auth)
                .json(&body)
                .send()
                .await
            {
                Ok(response) => response.bytes().await.is_ok_and(|b| !b.is_empty()),
                Err(_) => false,
            }
        }
    })
    .await;
    Ok(())
}
