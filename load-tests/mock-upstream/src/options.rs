//! The behaviour switches: what a request asks the mock to do besides answering.
//!
//! One option grammar serves every source. A source is a list of `key=value` pairs separated by
//! `;` or `~` (the second for clients that refuse `;` in a URL path). The sources, applied in
//! this order so that later ones override earlier ones:
//!
//! 1. the server-wide defaults (`MockConfig::default_options`, `--default-options`);
//! 2. the options configured for the base model name (`MockUpstream::set_model_options`,
//!    `--model-options`);
//! 3. the options carried in the model name itself: `mock-model;ttft_ms=200;tokens=5`;
//! 4. `x-mock-*` request headers: `x-mock-ttft-ms: 200`, or all at once in
//!    `x-mock-options: ttft_ms=200;tokens=5`.
//!
//! Unknown keys and malformed values are rejected (the request gets a 400 in the provider's
//! error shape) so that a typo in a test does not silently fall back to the happy path.

use std::time::Duration;

use warp::http::HeaderMap;

/// An option string or value that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mock-upstream: {0}")]
pub struct OptionsError(pub String);

/// An injected failure: an HTTP status, or the provider's context-length error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Answer this HTTP status (400..=599) in the provider's error shape.
    Status(u16),
    /// The provider's "prompt too long" error (HTTP 400 with the provider's exact wording).
    ContextLength,
}

impl Failure {
    /// The HTTP status this failure is answered with.
    pub fn status(self) -> u16 {
        match self {
            Failure::Status(status) => status,
            Failure::ContextLength => 400,
        }
    }
}

/// Every switch, each unset unless a source set it. See the crate README for their meaning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Behavior {
    /// Delay before the first token (streaming) or before the whole response.
    pub ttft_ms: Option<u64>,
    /// Delay between tokens.
    pub delay_ms: Option<u64>,
    /// Answer with this many lorem-ipsum words instead of echoing the last user message.
    pub tokens: Option<usize>,
    /// Fail with this error (upfront, or mid-stream with `error_after`).
    pub error: Option<Failure>,
    /// Seconds for a `Retry-After` header on 429/503/529 answers.
    pub retry_after: Option<u64>,
    /// Stream this many tokens, then the provider's mid-stream error.
    pub error_after: Option<usize>,
    /// Stream this many tokens, then drop the connection without a terminal marker.
    pub cut_after: Option<usize>,
    /// Never answer (until the hang cap or server shutdown).
    pub hang: Option<bool>,
    /// Apply the failure switches only to the first N requests for this exact model string.
    pub fail_first: Option<u64>,
    /// Apply the failure switches only to every N-th request (the N-th, 2N-th, …) for this exact
    /// model string: a deterministic failure rate of 1/N.
    pub fail_every: Option<u64>,
    /// Embedding dimension for `/v1/embeddings`.
    pub dims: Option<usize>,
}

impl Behavior {
    /// Parses an option list such as `ttft_ms=200;tokens=5` (also `~`-separated).
    pub fn parse(options: &str) -> Result<Behavior, OptionsError> {
        let mut behavior = Behavior::default();
        behavior.apply_list(options)?;
        Ok(behavior)
    }

    /// Applies an option list on top of `self`.
    pub fn apply_list(&mut self, options: &str) -> Result<(), OptionsError> {
        for item in options.split([';', '~']) {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (key, value) = match item.split_once('=') {
                Some((key, value)) => (key.trim(), value.trim()),
                None => (item, ""),
            };
            self.set(key, value)?;
        }
        Ok(())
    }

    /// Sets one option by key (`ttft_ms`, `delay_ms`, ...; `-` is accepted for `_`).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), OptionsError> {
        let normalized;
        let key = if key.contains('-') {
            normalized = key.replace('-', "_");
            normalized.as_str()
        } else {
            key
        };
        match key.to_ascii_lowercase().as_str() {
            "ttft_ms" => self.ttft_ms = Some(number(key, value)?),
            "delay_ms" => self.delay_ms = Some(number(key, value)?),
            "tokens" => self.tokens = Some(number(key, value)?),
            "error" => self.error = Some(failure(value)?),
            "retry_after" => self.retry_after = Some(number(key, value)?),
            "error_after" => self.error_after = Some(number(key, value)?),
            "cut_after" => self.cut_after = Some(number(key, value)?),
            "hang" => self.hang = Some(flag(key, value)?),
            "fail_first" => self.fail_first = Some(number(key, value)?),
            "fail_every" => {
                let every: u64 = number(key, value)?;
                if every == 0 {
                    return Err(OptionsError("fail_every must be at least 1".into()));
                }
                self.fail_every = Some(every);
            }
            "dims" | "dimensions" => {
                let dims: usize = number(key, value)?;
                if dims == 0 || dims > 65_536 {
                    return Err(OptionsError(format!(
                        "dims must be in 1..=65536, got {dims}"
                    )));
                }
                self.dims = Some(dims);
            }
            _ => return Err(OptionsError(format!("unknown option `{key}`"))),
        }
        Ok(())
    }

    /// Overrides every field `other` sets.
    pub fn merge(&mut self, other: &Behavior) {
        fn take<T: Copy>(slot: &mut Option<T>, other: Option<T>) {
            if other.is_some() {
                *slot = other;
            }
        }
        take(&mut self.ttft_ms, other.ttft_ms);
        take(&mut self.delay_ms, other.delay_ms);
        take(&mut self.tokens, other.tokens);
        take(&mut self.error, other.error);
        take(&mut self.retry_after, other.retry_after);
        take(&mut self.error_after, other.error_after);
        take(&mut self.cut_after, other.cut_after);
        take(&mut self.hang, other.hang);
        take(&mut self.fail_first, other.fail_first);
        take(&mut self.fail_every, other.fail_every);
        take(&mut self.dims, other.dims);
    }

    /// Applies the `x-mock-*` headers of a request.
    pub fn apply_headers(&mut self, headers: &HeaderMap) -> Result<(), OptionsError> {
        for (name, value) in headers {
            let Some(key) = name.as_str().strip_prefix("x-mock-") else {
                continue;
            };
            let value = value
                .to_str()
                .map_err(|_| OptionsError(format!("header `{name}` is not visible ASCII")))?;
            if key == "options" {
                self.apply_list(value)?;
            } else {
                self.set(key, value)?;
            }
        }
        Ok(())
    }

    /// Whether any failure switch is set.
    pub fn has_failure(&self) -> bool {
        self.error.is_some()
            || self.error_after.is_some()
            || self.cut_after.is_some()
            || self.hang == Some(true)
    }

    /// Whether the `count`-th request (1-based) for a model string gets the failure switches,
    /// given `fail_first` and `fail_every` (either gates in; neither set: every request).
    pub fn fails_at(&self, count: u64) -> bool {
        match (self.fail_first, self.fail_every) {
            (None, None) => true,
            (first, every) => {
                first.is_some_and(|limit| count <= limit)
                    || every.is_some_and(|n| n > 0 && count.is_multiple_of(n))
            }
        }
    }

    /// Clears every failure switch (used for the requests `fail_first` / `fail_every` spare).
    pub fn clear_failures(&mut self) {
        self.error = None;
        self.error_after = None;
        self.cut_after = None;
        self.hang = None;
    }

    /// The time to first token.
    pub fn ttft(&self) -> Duration {
        Duration::from_millis(self.ttft_ms.unwrap_or(0))
    }

    /// The delay between tokens.
    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.unwrap_or(0))
    }
}

/// Splits a model string into its base name and its option list: `m;tokens=3` → (`m`,
/// `tokens=3`). Either `;` or `~` starts the options.
pub fn split_model(model: &str) -> (&str, &str) {
    match model.find([';', '~']) {
        Some(at) => (&model[..at], &model[at + 1..]),
        None => (model, ""),
    }
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, OptionsError> {
    value.parse().map_err(|_| {
        OptionsError(format!(
            "option `{key}` needs a non-negative integer, got `{value}`"
        ))
    })
}

fn flag(key: &str, value: &str) -> Result<bool, OptionsError> {
    match value.to_ascii_lowercase().as_str() {
        "" | "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(OptionsError(format!(
            "option `{key}` needs 1 or 0, got `{value}`"
        ))),
    }
}

fn failure(value: &str) -> Result<Failure, OptionsError> {
    if value.eq_ignore_ascii_case("context") {
        return Ok(Failure::ContextLength);
    }
    match value.parse::<u16>() {
        Ok(status @ 400..=599) => Ok(Failure::Status(status)),
        _ => Err(OptionsError(format!(
            "option `error` needs an HTTP status in 400..=599 or `context`, got `{value}`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_name_options() {
        let (base, options) = split_model("mock;ttft_ms=200;delay_ms=10;tokens=50;error=429");
        assert_eq!(base, "mock");
        let behavior = Behavior::parse(options).unwrap();
        assert_eq!(behavior.ttft_ms, Some(200));
        assert_eq!(behavior.delay_ms, Some(10));
        assert_eq!(behavior.tokens, Some(50));
        assert_eq!(behavior.error, Some(Failure::Status(429)));
    }

    #[test]
    fn tilde_separates_like_semicolon() {
        let (base, options) = split_model("gemini-x~cut_after=3~hang");
        assert_eq!(base, "gemini-x");
        let behavior = Behavior::parse(options).unwrap();
        assert_eq!(behavior.cut_after, Some(3));
        assert_eq!(behavior.hang, Some(true));
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(Behavior::parse("ttft=3").is_err());
        assert!(Behavior::parse("tokens=-1").is_err());
        assert!(Behavior::parse("error=200").is_err());
        assert_eq!(
            Behavior::parse("error=context").unwrap().error,
            Some(Failure::ContextLength)
        );
    }

    #[test]
    fn fail_every_gates_every_nth_request() {
        let every = Behavior::parse("fail_every=3;error=500").unwrap();
        assert_eq!(every.fail_every, Some(3));
        let failing: Vec<u64> = (1..=9).filter(|n| every.fails_at(*n)).collect();
        assert_eq!(failing, [3, 6, 9]);
        assert!((1..=4).all(|n| Behavior::parse("fail_every=1").unwrap().fails_at(n)));
        // Combined with fail_first: the first N, then every M-th.
        let both = Behavior::parse("fail_first=2;fail_every=4").unwrap();
        let failing: Vec<u64> = (1..=8).filter(|n| both.fails_at(*n)).collect();
        assert_eq!(failing, [1, 2, 4, 8]);
        assert!(Behavior::parse("fail_every=0").is_err());
        assert!(Behavior::parse("fail_every=x").is_err());
    }

    #[test]
    fn later_sources_override() {
        let mut behavior = Behavior::parse("ttft_ms=5;tokens=2").unwrap();
        behavior.merge(&Behavior::parse("tokens=9").unwrap());
        assert_eq!(behavior.ttft_ms, Some(5));
        assert_eq!(behavior.tokens, Some(9));
    }

    #[test]
    fn headers_map_to_options() {
        let mut headers = HeaderMap::new();
        headers.insert("x-mock-ttft-ms", "7".parse().unwrap());
        headers.insert("x-mock-options", "tokens=3;retry_after=2".parse().unwrap());
        let mut behavior = Behavior::default();
        behavior.apply_headers(&headers).unwrap();
        assert_eq!(behavior.ttft_ms, Some(7));
        assert_eq!(behavior.tokens, Some(3));
        assert_eq!(behavior.retry_after, Some(2));
    }
}
