//! `mock-upstream`: the fake LLM upstream as a process, for load tests and manual runs.
//! Prints `listening on http://ADDR` as its first stdout line, serves until SIGINT/SIGTERM.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use chorus_mock_upstream::{MockConfig, MockUpstream, options::split_model};
use clap::Parser;

/// A fake OpenAI / Anthropic / Gemini upstream with latency and failure switches.
#[derive(Debug, Parser)]
#[command(name = "mock-upstream", version)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// Options applied to every request, e.g. "delay_ms=5;tokens=20".
    #[arg(long, default_value = "")]
    default_options: String,
    /// Options for one model, written like a model name: "gpt-4o;ttft_ms=200;delay_ms=10".
    /// Repeatable.
    #[arg(long = "model-options", value_name = "MODEL;OPTIONS")]
    model_options: Vec<String>,
    /// Model ids listed by GET /v1/models (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "mock-model")]
    models: Vec<String>,
    /// Default embedding dimension.
    #[arg(long, default_value_t = 8)]
    embedding_dims: usize,
    /// How long a `hang=1` request is held before a 504, in seconds.
    #[arg(long, default_value_t = 600)]
    hang_timeout_secs: u64,
    /// Keep the last 10 000 requests in memory (useless for a process; for parity).
    #[arg(long)]
    record: bool,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(workers) = args.workers {
        runtime.worker_threads(workers.max(1));
    }
    let result = runtime
        .build()
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "mock-upstream: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    let config = MockConfig {
        bind: args.bind,
        embedding_dims: args.embedding_dims,
        models: args.models,
        default_options: args.default_options,
        model_options: args
            .model_options
            .iter()
            .map(|spec| {
                let (model, options) = split_model(spec);
                (model.to_owned(), options.to_owned())
            })
            .collect(),
        record_requests: args.record,
        max_recorded: 10_000,
        hang_timeout: Duration::from_secs(args.hang_timeout_secs),
    };
    let mock = MockUpstream::start_with(config).await?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {}", mock.base_url())?;
        stdout.flush()?;
    }
    shutdown_signal().await?;
    mock.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
