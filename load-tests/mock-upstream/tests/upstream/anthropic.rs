//! The Anthropic dialect: messages, JSON and named-event SSE.

use serde_json::{Value, json};

use crate::{anthropic, anthropic_body, client, parse_sse, read_body, start};

#[tokio::test]
async fn non_streaming_message() {
    let mock = start().await;
    let response = anthropic(
        &mock,
        json!({
            "model": "claude-test",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "Be brief please."}],
            "messages": [
                {"role": "user", "content": "earlier words"},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                {"role": "user", "content": [{"type": "text", "text": "say this back"}]},
            ],
        }),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["model"], "claude-test");
    assert_eq!(
        body["content"],
        json!([{"type": "text", "text": "say this back"}])
    );
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["stop_sequence"], Value::Null);
    // 3 (system) + 2 + 1 + 3
    assert_eq!(body["usage"]["input_tokens"], 9);
    assert_eq!(body["usage"]["output_tokens"], 3);
}

#[tokio::test]
async fn streaming_event_sequence() {
    let mock = start().await;
    let mut request = anthropic_body("claude-test", "hello there world", true);
    request["system"] = json!("sys");
    let response = anthropic(&mock, request).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = read_body(response).await;
    assert!(body.clean);
    let events = parse_sse(&body.text);
    let names: Vec<&str> = events.iter().map(|e| e.event.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    for event in &events {
        assert_eq!(event.json()["type"], event.event.as_deref().unwrap());
    }
    let start = events[0].json();
    assert!(start["message"]["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["message"]["type"], "message");
    assert_eq!(start["message"]["role"], "assistant");
    assert_eq!(start["message"]["content"], json!([]));
    assert_eq!(start["message"]["model"], "claude-test");
    assert_eq!(start["message"]["stop_reason"], Value::Null);
    assert_eq!(start["message"]["usage"]["input_tokens"], 4);
    assert_eq!(start["message"]["usage"]["output_tokens"], 1);
    assert_eq!(
        events[1].json(),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    );
    assert_eq!(events[2].json(), json!({"type": "ping"}));
    let tokens: Vec<Value> = events[3..6].iter().map(|e| e.json()).collect();
    assert_eq!(
        tokens[0],
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello "}})
    );
    assert_eq!(tokens[1]["delta"]["text"], "there ");
    assert_eq!(tokens[2]["delta"]["text"], "world");
    assert_eq!(
        events[6].json(),
        json!({"type": "content_block_stop", "index": 0})
    );
    assert_eq!(
        events[7].json(),
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": 3},
        })
    );
    assert_eq!(events[8].json(), json!({"type": "message_stop"}));
}

#[tokio::test]
async fn max_tokens_truncates_with_stop_reason_max_tokens() {
    let mock = start().await;
    let mut request = anthropic_body("claude-test", "one two three four", false);
    request["max_tokens"] = json!(3);
    let body: Value = anthropic(&mock, request.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["content"][0]["text"], "one two three");
    assert_eq!(body["stop_reason"], "max_tokens");
    assert_eq!(body["usage"]["output_tokens"], 3);

    request["stream"] = json!(true);
    let events = parse_sse(&read_body(anthropic(&mock, request).await).await.text);
    let deltas = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_delta"))
        .count();
    assert_eq!(deltas, 3);
    let message_delta = events
        .iter()
        .find(|e| e.event.as_deref() == Some("message_delta"))
        .unwrap()
        .json();
    assert_eq!(message_delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(message_delta["usage"]["output_tokens"], 3);
}

#[tokio::test]
async fn requires_key_version_and_max_tokens() {
    let mock = start().await;
    let url = format!("{}/v1/messages", mock.base_url());
    let body = anthropic_body("claude-test", "x", false);

    let response = client()
        .post(&url)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "authentication_error");
    assert!(error["error"]["message"].is_string());

    // A Bearer header is not Anthropic's auth.
    let response = client()
        .post(&url)
        .bearer_auth("k")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let response = client()
        .post(&url)
        .header("x-api-key", "k")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-version")
    );

    let mut no_max = body.clone();
    no_max.as_object_mut().unwrap().remove("max_tokens");
    let response = anthropic(&mock, no_max).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(
        error,
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}})
    );

    // A final assistant message (a prefill) must not end in whitespace; without it, it is fine.
    let mut prefill = body.clone();
    let messages = prefill["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": "The answer is "}));
    let response = anthropic(&mock, prefill.clone()).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(
        error["error"]["message"],
        "messages: final assistant content cannot end with trailing whitespace"
    );
    prefill["messages"]
        .as_array_mut()
        .unwrap()
        .last_mut()
        .unwrap()["content"] = json!([{"type": "text", "text": "The answer is"}]);
    assert_eq!(anthropic(&mock, prefill).await.status(), 200);
}
