//! The built-in `mock` provider: deterministic models that need no key and no network, so a fresh
//! `chorus serve` answers out of the box and tests know the answer in advance.
//!
//! The upstream name picks the behaviour, with `;key=value` options (the same syntax as the mock
//! upstream server in `load-tests/mock-upstream`):
//! - `echo` — answers with the words of the last user message;
//! - `lorem` — answers with `words` (default 40) words of deterministic filler;
//! - options: `words=N`, `delay_ms=N` between words (default 0 for echo, 20 for lorem),
//!   `ttft_ms=N` before the first word.
//!
//! Usage is reported like a real provider: input tokens are the words of the whole request,
//! output tokens the words sent.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;

use super::{
    ChatRequest, ChatRole, Chunk, ChunkStream, Completion, FinishReason, Provider, ProviderError,
    TokenUsage,
};

/// The filler words of `lorem` answers, cycled (public so tests can predict answers).
pub const LOREM: &[&str] = &[
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
];

#[derive(Debug, Default)]
pub struct MockProvider;

/// The answer as a source of words, produced on demand: a long `lorem` answer costs no memory
/// up front, so thousands of slow mock streams stay cheap.
#[derive(Debug, Clone, PartialEq)]
enum Words {
    Echo(Vec<String>),
    Lorem(usize),
}

impl Words {
    fn len(&self) -> usize {
        match self {
            Words::Echo(words) => words.len(),
            Words::Lorem(n) => *n,
        }
    }

    fn word(&self, i: usize) -> &str {
        match self {
            Words::Echo(words) => words.get(i).map(String::as_str).unwrap_or_default(),
            Words::Lorem(_) => LOREM[i % LOREM.len()],
        }
    }

    /// The `i`-th streamed piece: the word and a space, except after the last word.
    fn piece(&self, i: usize) -> String {
        let word = self.word(i);
        if i + 1 == self.len() {
            word.to_owned()
        } else {
            format!("{word} ")
        }
    }

    fn joined(&self) -> String {
        (0..self.len())
            .map(|i| self.word(i))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[derive(Debug, Clone, PartialEq)]
struct MockBehaviour {
    words: Words,
    delay: Duration,
    ttft: Duration,
    finish: FinishReason,
}

/// Decides the whole answer up front (pure: same request, same answer).
fn plan(request: &ChatRequest) -> Result<MockBehaviour, ProviderError> {
    let mut parts = request.model.split(';');
    let kind = parts.next().unwrap_or_default().trim();
    let mut words_opt = None;
    let mut delay_ms = None;
    let mut ttft_ms = 0u64;
    for option in parts {
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| ProviderError::BadRequest {
                message: format!("mock option `{option}` is not key=value"),
            })?;
        let number: u64 = value
            .trim()
            .parse()
            .map_err(|_| ProviderError::BadRequest {
                message: format!("mock option `{key}` needs a number"),
            })?;
        match key.trim() {
            "words" => words_opt = Some(number as usize),
            "delay_ms" => delay_ms = Some(number),
            "ttft_ms" => ttft_ms = number,
            other => {
                return Err(ProviderError::BadRequest {
                    message: format!("unknown mock option `{other}`"),
                });
            }
        }
    }
    let (words, default_delay) = match kind {
        "echo" => (
            Words::Echo(
                request
                    .messages
                    .iter()
                    .rev()
                    .find(|m| m.role == ChatRole::User)
                    .map(|m| m.content.split_whitespace().map(str::to_owned).collect())
                    .unwrap_or_default(),
            ),
            0,
        ),
        "lorem" => (Words::Lorem(words_opt.unwrap_or(40)), 20),
        other => {
            return Err(ProviderError::BadRequest {
                message: format!("unknown mock model `{other}` (echo, lorem)"),
            });
        }
    };
    let mut finish = FinishReason::Stop;
    let words = match request.max_tokens.map(|m| m as usize) {
        Some(max) if words.len() > max => {
            finish = FinishReason::Length;
            match words {
                Words::Echo(mut list) => {
                    list.truncate(max);
                    Words::Echo(list)
                }
                Words::Lorem(_) => Words::Lorem(max),
            }
        }
        _ => words,
    };
    Ok(MockBehaviour {
        words,
        delay: Duration::from_millis(delay_ms.unwrap_or(default_delay)),
        ttft: Duration::from_millis(ttft_ms),
        finish,
    })
}

fn input_tokens(request: &ChatRequest) -> u64 {
    let system = request
        .system
        .as_deref()
        .map_or(0, |s| s.split_whitespace().count());
    let messages: usize = request
        .messages
        .iter()
        .map(|m| m.content.split_whitespace().count())
        .sum();
    (system + messages) as u64
}

#[async_trait]
impl Provider for MockProvider {
    fn kind(&self) -> &'static str {
        "mock"
    }

    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, ProviderError> {
        let behaviour = plan(&request)?;
        let usage = TokenUsage {
            input_tokens: input_tokens(&request),
            output_tokens: behaviour.words.len() as u64,
        };
        let (delay, ttft, finish) = (behaviour.delay, behaviour.ttft, behaviour.finish);
        let words = std::sync::Arc::new(behaviour.words);
        let count = words.len();
        let text = futures_util::stream::iter(0..count).then(move |i| {
            let words = words.clone();
            async move {
                let wait = if i == 0 { ttft } else { delay };
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Ok(Chunk::Text(words.piece(i)))
            }
        });
        let tail = futures_util::stream::iter([Ok(Chunk::Finish(finish)), Ok(Chunk::Usage(usage))]);
        Ok(text.chain(tail).boxed())
    }

    async fn complete(&self, request: ChatRequest) -> Result<Completion, ProviderError> {
        let behaviour = plan(&request)?;
        if !behaviour.ttft.is_zero() {
            tokio::time::sleep(behaviour.ttft).await;
        }
        Ok(Completion {
            text: behaviour.words.joined(),
            usage: Some(TokenUsage {
                input_tokens: input_tokens(&request),
                output_tokens: behaviour.words.len() as u64,
            }),
            finish: Some(behaviour.finish),
        })
    }

    /// Deterministic unit vectors (8 dimensions) derived from the text, for tests and demos.
    async fn embed(&self, _model: &str, inputs: &[String]) -> Result<Vec<Vec<f32>>, ProviderError> {
        Ok(inputs.iter().map(|text| mock_embedding(text, 8)).collect())
    }
}

fn mock_embedding(text: &str, dims: usize) -> Vec<f32> {
    // FNV-1a over the bytes, then a small LCG per dimension: stable across runs and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let mut values: Vec<f32> = (0..dims)
        .map(|_| {
            hash = hash.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            ((hash >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = values
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    for v in &mut values {
        *v /= norm;
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ChatMessage;

    fn request(model: &str, prompt: &str) -> ChatRequest {
        ChatRequest {
            model: model.into(),
            system: Some("be brief".into()),
            messages: vec![
                ChatMessage {
                    role: ChatRole::User,
                    content: "earlier question".into(),
                },
                ChatMessage {
                    role: ChatRole::Assistant,
                    content: "earlier answer".into(),
                },
                ChatMessage {
                    role: ChatRole::User,
                    content: prompt.into(),
                },
            ],
            ..Default::default()
        }
    }

    async fn collect(stream: ChunkStream) -> Vec<Chunk> {
        stream.map(|c| c.unwrap()).collect().await
    }

    #[tokio::test]
    async fn echo_streams_the_last_user_message_word_by_word() {
        let chunks = collect(
            MockProvider
                .stream(request("echo", "hello  big world"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            chunks,
            vec![
                Chunk::Text("hello ".into()),
                Chunk::Text("big ".into()),
                Chunk::Text("world".into()),
                Chunk::Finish(FinishReason::Stop),
                Chunk::Usage(TokenUsage {
                    input_tokens: 9,
                    output_tokens: 3
                }),
            ]
        );
    }

    #[tokio::test]
    async fn lorem_honours_words_and_max_tokens() {
        let done = MockProvider
            .complete(request("lorem;words=5;delay_ms=0", "x"))
            .await
            .unwrap();
        assert_eq!(done.text, "lorem ipsum dolor sit amet");
        assert_eq!(done.finish, Some(FinishReason::Stop));
        let mut capped = request("lorem;words=5;delay_ms=0", "x");
        capped.max_tokens = Some(2);
        let done = MockProvider.complete(capped).await.unwrap();
        assert_eq!(done.text, "lorem ipsum");
        assert_eq!(done.finish, Some(FinishReason::Length));
        assert_eq!(done.usage.unwrap().output_tokens, 2);
    }

    #[tokio::test]
    async fn bad_models_and_options_are_bad_requests() {
        for model in ["nope", "echo;words", "lorem;words=x", "lorem;colour=3"] {
            let err = MockProvider
                .complete(request(model, "x"))
                .await
                .unwrap_err();
            assert_eq!(err.class(), "bad_request", "{model}");
        }
    }

    #[tokio::test]
    async fn embeddings_are_deterministic_unit_vectors() {
        let inputs = vec!["a".to_owned(), "b".to_owned(), "a".to_owned()];
        let vectors = MockProvider.embed("any", &inputs).await.unwrap();
        assert_eq!(vectors[0], vectors[2]);
        assert_ne!(vectors[0], vectors[1]);
        let norm: f32 = vectors[0].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}
