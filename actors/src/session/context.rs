//! Context assembly: what a model sees for one turn.
//!
//! The thread's system prompt (or the user's default), the model's rolling summary when older
//! messages have been folded into it, then as many of the most recent messages of that model's
//! conversation as fit `context_length − max_output_tokens`. The newest user message is always
//! sent, even alone over budget: the provider's context-length error is then the honest answer.
//!
//! Token counts: OpenAI models are counted with tiktoken (the model's own encoding). Other
//! providers publish no local tokenizer, so they are estimated at one token per 4 bytes of UTF-8
//! (rounded up) — the rule of thumb Anthropic and Google document for English — plus 4 tokens of
//! framing per message, which errs on the side of sending less.

use crate::provider::catalogue::Model;
use crate::provider::{ChatMessage, ChatRequest, ChatRole};
use crate::store::{Message, MessageRole, MessageStatus, Summary};

/// Per-message framing (role markers, separators) added to every count.
const MESSAGE_OVERHEAD: usize = 4;

/// Counts tokens of `text` as `model` would.
pub fn count_tokens(model: &Model, text: &str) -> usize {
    match model.tokenizer {
        Some(bpe) => bpe.encode_ordinary(text).len(),
        None => text.len().div_ceil(4),
    }
}

/// What went into a request, for logs and the `status` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContextStats {
    pub messages_sent: usize,
    pub messages_dropped: usize,
    pub estimated_tokens: usize,
    pub summary_used: bool,
}

/// Builds the request for one model. `history` is the thread's messages, oldest first, ending
/// with the new user message; assistant messages of other models are skipped, and so are
/// answers that failed with no text.
pub fn assemble(
    model: &Model,
    system_prompt: Option<&str>,
    summary: Option<&Summary>,
    history: &[Message],
    max_tokens: u32,
    temperature: Option<f64>,
) -> (ChatRequest, ContextStats) {
    let conversation: Vec<&Message> = history
        .iter()
        .filter(|m| match m.role {
            MessageRole::User => true,
            MessageRole::Assistant => {
                m.model.as_deref() == Some(model.spec.id.as_str())
                    && !(m.status != MessageStatus::Complete && m.content.is_empty())
            }
            MessageRole::System => false,
        })
        .collect();

    // Only messages newer than what the summary covers go out verbatim.
    let start = summary.map_or(0, |s| {
        conversation.partition_point(|m| m.id <= s.covers_until)
    });
    let recent = &conversation[start..];

    let mut system = system_prompt.map(str::to_owned);
    if let Some(summary) = summary.filter(|_| start > 0) {
        let folded = format!("Summary of the earlier conversation:\n{}", summary.text);
        system = Some(match system {
            Some(prompt) => format!("{prompt}\n\n{folded}"),
            None => folded,
        });
    }

    let budget = (model.spec.context_length as usize).saturating_sub(max_tokens as usize);
    let mut used = system
        .as_deref()
        .map_or(0, |s| count_tokens(model, s) + MESSAGE_OVERHEAD);
    let mut kept = 0;
    for (i, message) in recent.iter().rev().enumerate() {
        let cost = count_tokens(model, &message.content) + MESSAGE_OVERHEAD;
        if i > 0 && used + cost > budget {
            break;
        }
        used += cost;
        kept += 1;
    }
    let sent = &recent[recent.len() - kept..];
    let messages = sent
        .iter()
        .map(|m| ChatMessage {
            role: match m.role {
                MessageRole::Assistant => ChatRole::Assistant,
                _ => ChatRole::User,
            },
            content: m.content.clone(),
        })
        .collect();
    let stats = ContextStats {
        messages_sent: kept,
        // Only what the budget cut: messages a summary already covers are not "dropped".
        messages_dropped: recent.len() - kept,
        estimated_tokens: used,
        summary_used: summary.is_some() && start > 0,
    };
    (
        ChatRequest {
            model: model.spec.upstream.clone(),
            system,
            messages,
            max_tokens: Some(max_tokens),
            temperature,
        },
        stats,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Utc;
    use uuid::Uuid;

    use super::*;
    use crate::provider::catalogue::ModelSpec;
    use crate::provider::mock::MockProvider;
    use crate::store::Usage;

    fn model(context_length: u32) -> Model {
        Model {
            spec: Arc::new(ModelSpec {
                id: "m".into(),
                name: "m".into(),
                provider: "mock".into(),
                upstream: "echo".into(),
                context_length,
                input_per_mtok: 0.0,
                output_per_mtok: 0.0,
                capabilities: vec!["chat".into()],
                tiers: vec![],
                max_output_tokens: 10,
                deployments: Vec::new(),
                fallbacks: Vec::new(),
                context_fallbacks: Vec::new(),
                continue_after_cut: None,
            }),
            provider_id: "mock".into(),
            provider: Arc::new(MockProvider),
            deployments: Vec::new(),
            tokenizer: None,
        }
    }

    fn msg(role: MessageRole, model: Option<&str>, content: &str) -> Message {
        Message {
            user_id: Uuid::nil(),
            thread_id: Uuid::nil(),
            id: Uuid::now_v7(),
            role,
            model: model.map(str::to_owned),
            content: content.into(),
            status: MessageStatus::Complete,
            usage: Usage::default(),
            cost_usd: 0.0,
            latency_ms: None,
            ttft_ms: None,
            provider: None,
            deployment: None,
            citations: Vec::new(),
            parent_id: None,
            turn_id: None,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn keeps_this_models_conversation_newest_first_within_budget() {
        let text = "x".repeat(40); // 10 tokens + 4 overhead = 14 each
        let history = vec![
            msg(MessageRole::User, Some("m"), &text),
            msg(MessageRole::Assistant, Some("m"), &text),
            msg(MessageRole::Assistant, Some("other"), &text),
            msg(MessageRole::User, Some("m"), &text),
            msg(MessageRole::Assistant, Some("m"), &text),
            msg(MessageRole::User, Some("m"), "newest"),
        ];
        // Budget 56 − 10 (max_tokens) = 46: the newest (2 + 4) and two more (2 × 14) fit (34);
        // a third (48) does not.
        let (request, stats) = assemble(&model(56), None, None, &history, 10, None);
        assert_eq!(stats.messages_sent, 3);
        assert_eq!(stats.messages_dropped, 2);
        assert_eq!(request.messages.last().unwrap().content, "newest");
        assert_eq!(request.messages[0].role, ChatRole::User);
        assert_eq!(request.max_tokens, Some(10));
    }

    #[test]
    fn the_newest_message_goes_even_over_budget_and_summary_replaces_old_turns() {
        let history = vec![
            msg(MessageRole::User, Some("m"), "old question"),
            msg(MessageRole::Assistant, Some("m"), "old answer"),
            msg(MessageRole::User, Some("m"), &"y".repeat(400)),
        ];
        let (request, stats) = assemble(&model(20), Some("be brief"), None, &history, 10, None);
        assert_eq!(stats.messages_sent, 1);
        assert_eq!(request.system.as_deref(), Some("be brief"));

        let summary = Summary {
            user_id: Uuid::nil(),
            thread_id: Uuid::nil(),
            model: "m".into(),
            text: "they talked".into(),
            covers_until: history[1].id,
            updated_at: Utc::now(),
        };
        let (request, stats) = assemble(
            &model(100_000),
            Some("be brief"),
            Some(&summary),
            &history,
            10,
            None,
        );
        assert!(stats.summary_used);
        assert_eq!(request.messages.len(), 1);
        // Covered by the summary is not dropped: no new summary is due.
        assert_eq!(stats.messages_dropped, 0);
        let system = request.system.unwrap();
        assert!(system.starts_with("be brief") && system.contains("they talked"));
    }

    #[test]
    fn openai_models_are_counted_with_tiktoken() {
        let mut gpt = model(1000);
        gpt.provider_id = "openai".into();
        Arc::make_mut(&mut gpt.spec).upstream = "gpt-4o".into();
        gpt.tokenizer = tiktoken_rs::bpe_for_model("gpt-4o").ok();
        // "hello world" is two tokens in o200k_base; the byte estimate would say 3.
        assert_eq!(count_tokens(&gpt, "hello world"), 2);
        assert_eq!(count_tokens(&model(1000), "hello world"), 3);
    }
}
