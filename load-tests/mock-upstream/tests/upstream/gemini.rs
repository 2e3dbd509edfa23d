//! The Gemini dialect: generateContent and streamGenerateContent (SSE and JSON array).

use serde_json::{Value, json};

use crate::{client, gemini, gemini_body, parse_sse, read_body, start};

#[tokio::test]
async fn generate_content() {
    let mock = start().await;
    let request = json!({
        "systemInstruction": {"parts": [{"text": "be kind"}]},
        "contents": [
            {"role": "user", "parts": [{"text": "first"}]},
            {"role": "model", "parts": [{"text": "reply here"}]},
            {"role": "user", "parts": [{"text": "echo"}, {"text": "me please"}]},
        ],
    });
    let response = gemini(&mock, "gemini-test", "generateContent", request).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["candidates"],
        json!([{
            "content": {"parts": [{"text": "echo me please"}], "role": "model"},
            "finishReason": "STOP",
            "index": 0,
        }])
    );
    // 2 + 1 + 2 + 3
    assert_eq!(body["usageMetadata"]["promptTokenCount"], 8);
    assert_eq!(body["usageMetadata"]["candidatesTokenCount"], 3);
    assert_eq!(body["usageMetadata"]["totalTokenCount"], 11);
    assert_eq!(body["modelVersion"], "gemini-test");
}

#[tokio::test]
async fn stream_generate_content_sse() {
    let mock = start().await;
    let response = gemini(
        &mock,
        "gemini-test",
        "streamGenerateContent?alt=sse",
        gemini_body("hello there world"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = read_body(response).await;
    assert!(body.clean);
    // Events are CRLF-separated, as the real API sends them.
    assert!(body.text.ends_with("}\r\n\r\n"));
    let events = parse_sse(&body.text);
    assert_eq!(events.len(), 3);
    let chunks: Vec<Value> = events.iter().map(|e| e.json()).collect();
    let texts: Vec<&str> = chunks
        .iter()
        .map(|c| {
            c["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(texts, ["hello ", "there ", "world"]);
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["candidates"][0]["content"]["role"], "model");
        assert_eq!(chunk["usageMetadata"]["promptTokenCount"], 3);
        assert_eq!(chunk["usageMetadata"]["candidatesTokenCount"], i + 1);
        assert_eq!(chunk["modelVersion"], "gemini-test");
    }
    assert!(chunks[0]["candidates"][0].get("finishReason").is_none());
    assert!(chunks[1]["candidates"][0].get("finishReason").is_none());
    assert_eq!(chunks[2]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(chunks[2]["usageMetadata"]["totalTokenCount"], 6);
}

#[tokio::test]
async fn stream_without_alt_sse_is_a_json_array() {
    let mock = start().await;
    let response = gemini(
        &mock,
        "gemini-test",
        "streamGenerateContent",
        gemini_body("a b"),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let chunks = body.as_array().unwrap();
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[1]["candidates"][0]["finishReason"], "STOP");
}

#[tokio::test]
async fn max_output_tokens_truncates() {
    let mock = start().await;
    let mut request = gemini_body("a b c d");
    request["generationConfig"] = json!({"maxOutputTokens": 2});
    let body: Value = gemini(&mock, "g", "generateContent", request.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["candidates"][0]["content"]["parts"][0]["text"], "a b");
    assert_eq!(body["candidates"][0]["finishReason"], "MAX_TOKENS");

    let events = parse_sse(
        &read_body(gemini(&mock, "g", "streamGenerateContent?alt=sse", request).await)
            .await
            .text,
    );
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[1].json()["candidates"][0]["finishReason"],
        "MAX_TOKENS"
    );
}

#[tokio::test]
async fn empty_answer_streams_one_final_chunk() {
    let mock = start().await;
    let events = parse_sse(
        &read_body(gemini(&mock, "g", "streamGenerateContent?alt=sse", gemini_body("")).await)
            .await
            .text,
    );
    assert_eq!(events.len(), 1);
    let chunk = events[0].json();
    assert_eq!(chunk["candidates"][0]["content"]["parts"][0]["text"], "");
    assert_eq!(chunk["candidates"][0]["finishReason"], "STOP");
}

#[tokio::test]
async fn key_by_header_or_query_and_model_options_in_the_path() {
    let mock = start().await;
    let url = |model: &str, query: &str| {
        format!(
            "{}/v1beta/models/{model}:generateContent{query}",
            mock.base_url()
        )
    };
    let response = client()
        .post(url("g", ""))
        .json(&gemini_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], 401);
    assert_eq!(error["error"]["status"], "UNAUTHENTICATED");
    assert!(error["error"]["message"].is_string());

    let response = client()
        .post(url("g", "?key=abc"))
        .json(&gemini_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // `;` percent-encoded, and `~` as the separator.
    for model in ["g%3Btokens=2", "g~tokens=2", "g;tokens=2"] {
        let body: Value = client()
            .post(url(model, "?key=abc"))
            .json(&gemini_body("x"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            body["candidates"][0]["content"]["parts"][0]["text"], "lorem ipsum",
            "{model}"
        );
    }

    let response = client()
        .post(url("g", "?key=abc"))
        .json(&json!({"nope": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["status"], "INVALID_ARGUMENT");
}
