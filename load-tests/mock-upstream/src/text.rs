//! The deterministic answer: which words the mock says, how tokens are counted, and the
//! embedding vectors. A token is a whitespace-separated word, in prompts and answers alike.

use serde_json::Value;

const LOREM: [&str; 19] = [
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

/// The `n`-word lorem-ipsum answer (`tokens=N`), cycling through the 19 words.
pub fn lorem(n: usize) -> Vec<&'static str> {
    LOREM.iter().copied().cycle().take(n).collect()
}

/// Counts the words of every text found in a message content value.
pub fn count_words(content: &Value) -> u64 {
    let mut count = 0u64;
    visit_text(content, &mut |text| {
        count += text.split_whitespace().count() as u64;
    });
    count
}

/// Appends the words of every text found in a message content value.
pub fn push_words<'a>(content: &'a Value, out: &mut Vec<&'a str>) {
    visit_text(content, &mut |text| out.extend(text.split_whitespace()));
}

/// Calls `f` on every text in a content value: a string, or an array of parts/blocks whose
/// `text` is a string (OpenAI parts, Anthropic blocks, Gemini parts) or whose `content` nests
/// further (Anthropic `tool_result`).
pub fn visit_text<'a>(content: &'a Value, f: &mut impl FnMut(&'a str)) {
    match content {
        Value::String(text) => f(text),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(text) => f(text),
                    Value::Object(block) => {
                        if let Some(Value::String(text)) = block.get("text") {
                            f(text);
                        }
                        if let Some(inner) = block.get("content") {
                            visit_text(inner, f);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// The text of one streamed token: the word, with a trailing space unless it is the last word
/// of the answer.
pub fn token_text(word: &str, last: bool) -> String {
    if last {
        word.to_owned()
    } else {
        let mut text = String::with_capacity(word.len() + 1);
        text.push_str(word);
        text.push(' ');
        text
    }
}

/// A deterministic unit vector of `dims` components derived from `text`.
pub fn embedding(text: &str, dims: usize) -> Vec<f32> {
    // FNV-1a over the text, then SplitMix64 per component.
    let mut seed: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        seed ^= u64::from(byte);
        seed = seed.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut values: Vec<f64> = (0..dims as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(i + 1));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // 53 random bits mapped onto [-1, 1).
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect();
    let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
    if norm > 0.0 {
        for v in &mut values {
            *v /= norm;
        }
    } else if let Some(first) = values.first_mut() {
        *first = 1.0;
    }
    values.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_words_in_strings_parts_and_blocks() {
        assert_eq!(count_words(&json!("a b  c")), 3);
        assert_eq!(
            count_words(&json!([{"type": "text", "text": "one two"}, {"type": "image_url"}])),
            2
        );
        assert_eq!(
            count_words(
                &json!([{"type": "tool_result", "content": [{"type": "text", "text": "x y"}]}])
            ),
            2
        );
    }

    #[test]
    fn lorem_cycles() {
        let words = lorem(21);
        assert_eq!(words[0], "lorem");
        assert_eq!(words[19], "lorem");
        assert_eq!(words[20], "ipsum");
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding("hello world", 8);
        assert_eq!(a, embedding("hello world", 8));
        assert_ne!(a, embedding("hello there", 8));
        let norm: f32 = a.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}
