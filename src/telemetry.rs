//! Logging: JSON lines (default) or human-readable, filtered by `log.level` or `RUST_LOG`.
//! Request handlers run inside a span carrying `request_id`, so it is on every line they log.
//! Logs never contain passwords, tokens or message text: handlers log ids only.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub fn init(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests building several apps in one process) keeps the first subscriber.
    let _ = match config.format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
