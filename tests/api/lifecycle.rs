//! The process as an operator sees it: graceful shutdown on SIGTERM, state surviving a restart,
//! and logs that carry request ids but never secrets or user content.

use chorus_actors::store::MessageRole;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, body_json, encode, log_message, log_request_id, parse_log_line, seed_messages,
    unique_email, uuid_of,
};

#[tokio::test]
async fn sigterm_shuts_down_gracefully_with_exit_code_0() {
    let mut app = TestApp::spawn().await;
    let response = app.get_anon("/readyz").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_json(response).await["status"], "ready");

    let status = app.stop_gracefully().await;
    assert!(
        status.success(),
        "exit status {status}\n{}",
        app.logs().join("\n")
    );
    assert_eq!(status.code(), Some(0));
    let messages: Vec<String> = app
        .logs()
        .iter()
        .filter_map(|l| parse_log_line(l))
        .filter_map(|l| log_message(&l).map(str::to_owned))
        .collect();
    assert!(
        messages.iter().any(|m| m == "shutdown complete"),
        "no `shutdown complete` line: {messages:?}"
    );
    let received = messages.iter().position(|m| m.contains("SIGTERM"));
    let complete = messages.iter().position(|m| m == "shutdown complete");
    assert!(
        received.is_some_and(|r| complete.is_some_and(|c| r < c)),
        "SIGTERM should be logged before completion: {messages:?}"
    );
}

#[tokio::test]
async fn sigterm_with_an_idle_keep_alive_connection_still_exits_0() {
    let mut app = TestApp::spawn().await;
    let session = app.register_user().await;
    // Leave pooled keep-alive connections open in the client.
    for _ in 0..3 {
        app.get_ok("/api/v1/me", session.token()).await;
    }
    let status = app.stop_gracefully().await;
    assert_eq!(status.code(), Some(0), "{}", app.logs().join("\n"));
}

#[tokio::test]
async fn accounts_threads_and_tokens_survive_a_restart() {
    let mut app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token().to_owned();
    let mut threads = Vec::new();
    for title in ["first", "second", "third"] {
        threads.push(
            app.create_thread(&token, &json!({ "title": title, "model": "gpt-4o" }))
                .await,
        );
    }
    let second = threads[1]["id"].as_str().unwrap().to_owned();
    let response = app
        .patch_json(
            &format!("/api/v1/threads/{second}"),
            &token,
            &json!({ "bookmarked": true }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    app.patch_json(
        "/api/v1/me",
        &token,
        &json!({ "display_name": "Persistent" }),
    )
    .await;
    let key = body_json(
        app.post_json(
            "/api/v1/me/api-keys",
            Some(&token),
            &json!({ "name": "kept" }),
        )
        .await,
    )
    .await;
    let store = app.store().await;
    seed_messages(
        &store,
        session.user_uuid(),
        uuid_of(&threads[0]["id"]),
        &[(MessageRole::User, Some("gpt-4o"), "stored before restart")],
    )
    .await;
    drop(store);
    let list_before = app.get_ok("/api/v1/threads", &token).await;

    app.restart().await;

    // The old access token is still valid (same secret), and so is the refresh token.
    let me = app.get_ok("/api/v1/me", &token).await;
    assert_eq!(me["user"]["display_name"], "Persistent");
    let list_after = app.get_ok("/api/v1/threads", &token).await;
    assert_eq!(list_after, list_before);
    let bookmarked = app.get_ok("/api/v1/threads?bookmarked=true", &token).await;
    assert_eq!(bookmarked["threads"][0]["id"], second.as_str());
    let messages = app
        .get_ok(
            &format!(
                "/api/v1/threads/{}/messages",
                threads[0]["id"].as_str().unwrap()
            ),
            &token,
        )
        .await;
    assert_eq!(messages["messages"][0]["content"], "stored before restart");
    let keys = app.get_ok("/api/v1/me/api-keys", &token).await;
    assert_eq!(keys["api_keys"][0]["id"], key["id"]);

    // The same password logs in; the pre-restart refresh token rotates.
    let login = app.login(&session.email, &session.password).await;
    assert_eq!(login.user_id, session.user_id);
    let refreshed = app.refresh(&session).await;
    assert_eq!(refreshed.user_id, session.user_id);

    // A duplicate registration is still refused: the account really is on disk.
    let response = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({ "email": session.email, "password": "whatever-password" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
}

/// Collects the log lines as parsed JSON, asserting every line is JSON.
fn json_logs(app: &TestApp) -> Vec<Value> {
    app.logs()
        .iter()
        .map(|line| {
            parse_log_line(line).unwrap_or_else(|| panic!("a log line is not JSON: {line:?}"))
        })
        .collect()
}

#[tokio::test]
async fn logs_carry_request_ids_and_never_secrets_or_content() {
    let mut app = TestApp::spawn().await;
    let email = unique_email();
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let title = format!("TitleSecret{}", uuid::Uuid::new_v4().simple());
    let prompt = format!("PromptSecret{}", uuid::Uuid::new_v4().simple());
    let content = format!("ContentSecret{}", uuid::Uuid::new_v4().simple());
    let display = format!("NameSecret{}", uuid::Uuid::new_v4().simple());

    let session = app.register(&email, &password).await;
    let login = app.login(&email, &password).await;
    let refreshed = app.refresh(&login).await;
    let bad = app.login_raw(&email, "wrong-password-xyz").await;
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let token = refreshed.access_token.clone();
    let thread = app
        .create_thread(&token, &json!({ "title": title, "system_prompt": prompt }))
        .await;
    let thread_id = thread["id"].as_str().unwrap().to_owned();
    app.patch_json("/api/v1/me", &token, &json!({ "display_name": display }))
        .await;
    let key = body_json(
        app.post_json(
            "/api/v1/me/api-keys",
            Some(&token),
            &json!({ "name": "log-key" }),
        )
        .await,
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let store = app.store().await;
    seed_messages(
        &store,
        session.user_uuid(),
        uuid_of(&thread["id"]),
        &[(MessageRole::User, Some("gpt-4o"), content.as_str())],
    )
    .await;
    drop(store);
    app.get_ok(&format!("/api/v1/threads/{thread_id}/messages"), &token)
        .await;
    app.get_ok(&format!("/api/v1/threads?q={}", encode(&title)), &token)
        .await;
    // Bodies that fail validation must not be logged either.
    let response = app
        .post_json(
            "/api/v1/threads",
            Some(&token),
            &json!({ "title": title, "model": format!("{content} is not a model") }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    app.post_json(
        "/api/v1/auth/logout",
        None,
        &json!({ "refresh_token": refreshed.refresh_token }),
    )
    .await;
    let response = app
        .request(Method::GET, "/api/v1/me")
        .bearer_auth(&token)
        .header("x-request-id", "log-check-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // Stop so every line is flushed and read.
    let status = app.stop_gracefully().await;
    assert!(status.success());

    let lines = app.logs();
    assert!(!lines.is_empty());
    let secrets = [
        ("password", password.as_str()),
        ("register access token", session.access_token.as_str()),
        ("register refresh token", session.refresh_token.as_str()),
        ("login access token", login.access_token.as_str()),
        ("login refresh token", login.refresh_token.as_str()),
        ("refreshed access token", refreshed.access_token.as_str()),
        ("refreshed refresh token", refreshed.refresh_token.as_str()),
        ("api key", key.as_str()),
        ("thread title", title.as_str()),
        ("system prompt", prompt.as_str()),
        ("message content", content.as_str()),
        ("display name", display.as_str()),
    ];
    for line in &lines {
        for (what, secret) in &secrets {
            assert!(
                !line.contains(secret),
                "the {what} appears in a log line: {line}"
            );
        }
        // Token signatures alone must not appear either.
        let signature = session.access_token.rsplit('.').next().unwrap();
        assert!(
            !line.contains(signature),
            "an access token signature was logged: {line}"
        );
    }

    let logs = json_logs(&app);
    let finished: Vec<&Value> = logs
        .iter()
        .filter(|l| log_message(l) == Some("request finished"))
        .collect();
    assert!(
        finished.len() >= 10,
        "too few access lines: {}",
        finished.len()
    );
    for line in &finished {
        assert!(
            log_request_id(line).is_some_and(|id| !id.is_empty()),
            "access line without request_id: {line}"
        );
    }
    assert!(
        finished
            .iter()
            .any(|l| log_request_id(l) == Some("log-check-0001")),
        "the client's request id is not on its access line"
    );
}

#[tokio::test]
async fn without_a_configured_secret_a_persistent_dev_secret_is_used_with_a_warning() {
    let mut app = TestApp::builder()
        .env("CHORUS__AUTH__JWT_SECRET", "")
        .spawn()
        .await;
    let warned = json_logs(&app).iter().any(|l| {
        l["level"]
            .as_str()
            .is_some_and(|level| level.eq_ignore_ascii_case("warn"))
            && log_message(l).is_some_and(|m| m.contains("jwt_secret"))
    });
    assert!(
        warned,
        "no warning about the missing secret:\n{}",
        app.logs().join("\n")
    );
    let secret_file = app.data_dir.path().join("jwt-secret");
    assert!(secret_file.exists(), "no dev secret in the data dir");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the dev secret is readable by others: {mode:o}"
        );
    }

    let session = app.register_user().await;
    // The server does not sign with the harness's test secret here.
    let forged = crate::helpers::sign_token(
        &crate::helpers::access_claims(&session.user_id),
        crate::helpers::TEST_JWT_SECRET,
    );
    let response = app.get("/api/v1/me", &forged).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // The dev secret persists: tokens stay valid across a restart.
    app.restart().await;
    app.get_ok("/api/v1/me", session.token()).await;
}

#[tokio::test]
async fn each_request_gets_one_access_line_with_its_id_and_status() {
    let app = TestApp::spawn().await;
    let response = app
        .request(Method::GET, "/api/v1/threads/some-thread")
        .header("x-request-id", "access-line-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let line = app
        .wait_for_log(|l| {
            log_message(l) == Some("request finished")
                && log_request_id(l) == Some("access-line-0001")
        })
        .await;
    let status = line
        .get("status")
        .or_else(|| line.get("fields").and_then(|f| f.get("status")))
        .and_then(Value::as_u64);
    assert_eq!(status, Some(401), "{line}");
    assert!(
        line.to_string().contains("/api/v1/threads/some-thread"),
        "path missing: {line}"
    );
    let count = json_logs(&app)
        .iter()
        .filter(|l| {
            log_message(l) == Some("request finished")
                && log_request_id(l) == Some("access-line-0001")
        })
        .count();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish() {
    let mut app = TestApp::spawn().await;
    let session = app.register_user().await;

    // A request whose body arrives in two parts: the second is sent only after SIGTERM.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let request = app
        .request(Method::POST, "/api/v1/threads")
        .bearer_auth(session.token())
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(body))
        .send();
    let in_flight = tokio::spawn(request);
    tx.send(Ok(b"{\"title\": \"drai".to_vec())).await.unwrap();

    // Give the server a moment to start handling it (nothing observable marks that point).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    app.terminate();
    let draining = app
        .wait_for_log(|l| log_message(l).is_some_and(|m| m.contains("draining")))
        .await;
    let counted = draining
        .get("in_flight")
        .or_else(|| draining.get("fields").and_then(|f| f.get("in_flight")))
        .and_then(Value::as_u64);
    assert_eq!(counted, Some(1), "{draining}");

    tx.send(Ok(b"ned\"}".to_vec())).await.unwrap();
    drop(tx);
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request was cut off");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(body_json(response).await["thread"]["title"], "drained");

    let status = app.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{}", app.logs().join("\n"));
    assert!(
        app.logs().iter().any(|l| l.contains("shutdown complete")),
        "{}",
        app.logs().join("\n")
    );
}
