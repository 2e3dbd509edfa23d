//! The OpenAI dialect: chat completions, models, embeddings.

use serde_json::{Value, json};

use crate::{client, openai, openai_body, parse_sse, read_body, start};

#[tokio::test]
async fn non_streaming_echoes_the_last_user_message() {
    let mock = start().await;
    let response = openai(
        &mock,
        json!({
            "model": "gpt-test",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "first question here"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": [{"type": "text", "text": "hello  brave"}, {"type": "text", "text": "new world"}]},
            ],
        }),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let body: Value = response.json().await.unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["model"], "gpt-test");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert_eq!(choices[0]["message"]["content"], "hello brave new world");
    assert_eq!(choices[0]["finish_reason"], "stop");
    // 3 (system) + 3 + 2 + 4 words across every message.
    assert_eq!(body["usage"]["prompt_tokens"], 12);
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(body["usage"]["total_tokens"], 16);
}

#[tokio::test]
async fn streaming_sends_role_tokens_finish_and_done() {
    let mock = start().await;
    let response = openai(&mock, openai_body("gpt-test", "hello there world", true)).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = read_body(response).await;
    assert!(body.clean);
    assert!(body.text.ends_with("data: [DONE]\n\n"));
    let events = parse_sse(&body.text);
    assert_eq!(events.len(), 6);
    assert!(events.iter().all(|event| event.event.is_none()));
    assert_eq!(events[5].data, "[DONE]");
    let chunks: Vec<Value> = events[..5].iter().map(|event| event.json()).collect();
    let id = chunks[0]["id"].as_str().unwrap();
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-test");
        assert!(chunk["created"].is_u64());
        assert!(
            chunk.get("usage").is_none(),
            "no usage without include_usage"
        );
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": "", "refusal": null})
    );
    assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(chunks[0]["choices"][0]["index"], 0);
    let tokens: Vec<&str> = chunks[1..4]
        .iter()
        .map(|chunk| chunk["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(tokens, ["hello ", "there ", "world"]);
    for chunk in &chunks[1..4] {
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
        assert!(chunk["choices"][0]["delta"].get("role").is_none());
    }
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn include_usage_adds_a_usage_chunk_before_done() {
    let mock = start().await;
    let mut body = openai_body("gpt-test", "one two", true);
    body["stream_options"] = json!({"include_usage": true});
    body["messages"]
        .as_array_mut()
        .unwrap()
        .insert(0, json!({"role": "system", "content": "sys"}));
    let events = parse_sse(&read_body(openai(&mock, body).await).await.text);
    // role, 2 tokens, finish, usage, [DONE]
    assert_eq!(events.len(), 6);
    assert_eq!(events[5].data, "[DONE]");
    for event in &events[..4] {
        assert_eq!(event.json()["usage"], Value::Null);
        assert!(
            event.json().get("usage").is_some(),
            "usage: null is present"
        );
    }
    let usage_chunk = events[4].json();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 3);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 2);
    assert_eq!(usage_chunk["usage"]["total_tokens"], 5);
}

#[tokio::test]
async fn max_tokens_truncates_with_finish_reason_length() {
    let mock = start().await;
    let mut body = openai_body("gpt-test", "a b c d e", false);
    body["max_tokens"] = json!(2);
    let response: Value = openai(&mock, body.clone()).await.json().await.unwrap();
    assert_eq!(response["choices"][0]["message"]["content"], "a b");
    assert_eq!(response["choices"][0]["finish_reason"], "length");
    assert_eq!(response["usage"]["completion_tokens"], 2);

    // max_completion_tokens wins, and streaming agrees.
    body["max_completion_tokens"] = json!(3);
    body["stream"] = json!(true);
    let events = parse_sse(&read_body(openai(&mock, body).await).await.text);
    let tokens: Vec<String> = events
        .iter()
        .filter(|event| event.data != "[DONE]")
        .filter_map(|event| {
            event.json()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .filter(|text| !text.is_empty())
        .collect();
    // The streamed tokens concatenate to the non-streamed content.
    assert_eq!(tokens, ["a ", "b ", "c"]);
    let finish = events[events.len() - 2].json();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn tokens_switch_answers_lorem_ipsum() {
    let mock = start().await;
    let body: Value = openai(&mock, openai_body("gpt;tokens=5", "ignored", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "lorem ipsum dolor sit amet"
    );
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(
        body["model"], "gpt;tokens=5",
        "the model string is echoed as sent"
    );
}

#[tokio::test]
async fn requires_a_bearer_key() {
    let mock = start().await;
    let url = format!("{}/v1/chat/completions", mock.base_url());
    for auth in [None, Some("Basic abc"), Some("Bearer ")] {
        let mut request = client().post(&url).json(&openai_body("m", "x", false));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{auth:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("You didn't provide an API key")
        );
        assert!(body["error"].get("param").is_some());
        assert!(body["error"].get("code").is_some());
    }
    // Any key is accepted.
    let response = client()
        .post(&url)
        .header("authorization", "bearer whatever")
        .json(&openai_body("m", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn rejects_bad_requests_in_openai_shape() {
    let mock = start().await;
    let response = openai(&mock, json!({"model": "m"})).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "messages");
    assert_eq!(body["error"]["code"], "missing_required_parameter");

    let response = client()
        .post(format!("{}/v1/chat/completions", mock.base_url()))
        .bearer_auth("k")
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let response = client()
        .post(format!("{}/v1/nope", mock.base_url()))
        .bearer_auth("k")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "Invalid URL (POST /v1/nope)");
}

#[tokio::test]
async fn lists_models() {
    let mock = start().await;
    mock.set_model_options("gpt-slow", "ttft_ms=100").unwrap();
    let response = client()
        .get(format!("{}/v1/models", mock.base_url()))
        .bearer_auth("k")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["mock-model", "gpt-slow"]);
    assert_eq!(data[0]["object"], "model");
    assert!(data[0]["created"].is_u64());
    assert!(data[0]["owned_by"].is_string());

    let response = client()
        .get(format!("{}/v1/models", mock.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn embeddings_are_deterministic_unit_vectors() {
    let mock = start().await;
    let embed = |body: Value| {
        let url = format!("{}/v1/embeddings", mock.base_url());
        async move {
            let response = client()
                .post(url)
                .bearer_auth("k")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    let body = embed(json!({"model": "emb", "input": ["hello world", "bye"]})).await;
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "emb");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let vector = |item: &Value| -> Vec<f64> {
        item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    for (index, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], index);
        let v = vector(item);
        assert_eq!(v.len(), 8);
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    }
    assert_ne!(vector(&data[0]), vector(&data[1]));

    let again = embed(json!({"model": "other", "input": "hello world"})).await;
    assert_eq!(vector(&again["data"][0]), vector(&data[0]));

    let wide = embed(json!({"model": "emb", "input": "x", "dimensions": 32})).await;
    assert_eq!(vector(&wide["data"][0]).len(), 32);
    let by_option = embed(json!({"model": "emb;dims=3", "input": "x"})).await;
    assert_eq!(vector(&by_option["data"][0]).len(), 3);

    let b64 =
        embed(json!({"model": "emb", "input": "hello world", "encoding_format": "base64"})).await;
    assert_eq!(b64["data"][0]["embedding"].as_str().unwrap().len(), 44); // 32 bytes
}
