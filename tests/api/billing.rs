//! `POST /api/v1/billing/webhook`: signed tier events, idempotent by event id.

use hmac::{Hmac, Mac};
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use sha2::Sha256;
use uuid::Uuid;

use crate::helpers::{Session, TestApp, assert_error, message_of};

const SECRET: &str = "whsec_chorus_e2e_0123456789";
const PATH: &str = "/api/v1/billing/webhook";

async fn billing_app() -> TestApp {
    TestApp::builder()
        .env("CHORUS__BILLING__WEBHOOK_SECRET", SECRET)
        .env("CHORUS__BILLING__TOLERANCE_SECS", "300")
        .spawn()
        .await
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// `t=<t>,v1=<hex hmac(secret, "{t}.{body}")>`.
fn signature(secret: &str, t: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

async fn post_signed(app: &TestApp, body: &str, signature: Option<&str>) -> Response {
    let mut request = app
        .request(Method::POST, PATH)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(signature) = signature {
        request = request.header("Chorus-Signature", signature);
    }
    request.send().await.unwrap()
}

async fn deliver(app: &TestApp, event: &Value) -> Response {
    let body = event.to_string();
    post_signed(app, &body, Some(&signature(SECRET, now(), &body))).await
}

async fn tier_of(app: &TestApp, user: &Session) -> String {
    let me = app.get_ok("/api/v1/me", user.token()).await;
    me["user"]["tier"].as_str().unwrap().to_owned()
}

fn activated(id: &str, user: &Session, tier: &str) -> Value {
    json!({ "id": id, "type": "subscription.activated", "user_id": user.user_id, "tier": tier })
}

fn revoked(id: &str, user: &Session) -> Value {
    json!({ "id": id, "type": "subscription.revoked", "user_id": user.user_id })
}

fn event_id() -> String {
    format!("evt_{}", Uuid::new_v4().simple())
}

#[tokio::test]
async fn a_signed_activation_sets_the_tier_and_a_revocation_resets_it() {
    let app = billing_app().await;
    let user = app.register_user().await;
    let bystander = app.register_user().await;

    let response = deliver(&app, &activated(&event_id(), &user, "pro")).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(tier_of(&app, &user).await, "pro");
    assert_eq!(tier_of(&app, &bystander).await, "free");

    let response = deliver(&app, &revoked(&event_id(), &user)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(tier_of(&app, &user).await, "free", "back to default_tier");
}

#[tokio::test]
async fn a_replayed_event_id_is_acknowledged_and_not_applied_again() {
    let app = billing_app().await;
    let user = app.register_user().await;

    let activation = activated(&event_id(), &user, "pro");
    assert_eq!(
        deliver(&app, &activation).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(tier_of(&app, &user).await, "pro");
    assert_eq!(
        deliver(&app, &revoked(&event_id(), &user)).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(tier_of(&app, &user).await, "free");

    // The activation again, freshly signed (a redelivery): 204, and the user stays revoked.
    assert_eq!(
        deliver(&app, &activation).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(tier_of(&app, &user).await, "free");
    // Same id with other contents: still the same event.
    let mut altered = activation.clone();
    altered["tier"] = json!("enterprise");
    assert_eq!(
        deliver(&app, &altered).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(tier_of(&app, &user).await, "free");

    let store = app.store().await;
    use chorus_actors::store::Store;
    let seen = store
        .get_billing_event(activation["id"].as_str().unwrap())
        .await
        .unwrap()
        .expect("the event id is recorded");
    assert_eq!(seen.user_id, user.user_uuid());
    assert_eq!(seen.event_type, "subscription.activated");
}

#[tokio::test]
async fn bad_or_missing_signatures_are_unauthenticated_and_change_nothing() {
    let app = billing_app().await;
    let user = app.register_user().await;
    let body = activated(&event_id(), &user, "pro").to_string();
    let t = now();

    let wrong_secret = signature("another-secret", t, &body);
    let other_body = signature(
        SECRET,
        t,
        &activated(&event_id(), &user, "enterprise").to_string(),
    );
    let good = signature(SECRET, t, &body);
    let tampered_t = good.replacen(&format!("t={t}"), &format!("t={}", t + 1), 1);
    for (label, header) in [
        ("missing", None),
        ("wrong secret", Some(wrong_secret.as_str())),
        ("signed another body", Some(other_body.as_str())),
        ("timestamp changed", Some(tampered_t.as_str())),
        ("malformed", Some("v1=deadbeef")),
        ("not hex", Some("t=1,v1=xyz")),
    ] {
        let response = post_signed(&app, &body, header).await;
        let error = assert_error(response, 401, "UNAUTHENTICATED").await;
        assert!(!message_of(&error).is_empty(), "{label}: {error}");
    }
    assert_eq!(tier_of(&app, &user).await, "free");

    // The body is not recorded either: the genuine delivery still applies.
    let response = post_signed(&app, &body, Some(&good)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(tier_of(&app, &user).await, "pro");
}

#[tokio::test]
async fn a_stale_timestamp_is_refused_as_a_replay() {
    let app = billing_app().await;
    let user = app.register_user().await;
    let body = activated(&event_id(), &user, "pro").to_string();

    for t in [now() - 600, now() + 600] {
        let response = post_signed(&app, &body, Some(&signature(SECRET, t, &body))).await;
        let error = assert_error(response, 401, "UNAUTHENTICATED").await;
        assert!(message_of(&error).contains("300"), "{error}");
    }
    assert_eq!(tier_of(&app, &user).await, "free");
}

#[tokio::test]
async fn the_webhook_is_off_without_a_secret() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let body = activated(&event_id(), &user, "pro").to_string();
    let response = post_signed(&app, &body, Some(&signature("", now(), &body))).await;
    assert_error(response, 404, "NOT_FOUND").await;
    assert_eq!(tier_of(&app, &user).await, "free");
}

#[tokio::test]
async fn malformed_or_unknown_events_are_refused_and_change_nothing() {
    let app = billing_app().await;
    let user = app.register_user().await;

    let cases = [
        ("{\"id\":".to_owned(), "malformed JSON"),
        ("[]".to_owned(), "JSON object"),
        (
            json!({ "id": event_id(), "type": "subscription.paused", "user_id": user.user_id })
                .to_string(),
            "subscription.paused",
        ),
        (
            activated(&event_id(), &user, "platinum").to_string(),
            "free, pro",
        ),
        (
            json!({ "id": event_id(), "type": "subscription.activated", "user_id": user.user_id })
                .to_string(),
            "tier",
        ),
        (
            json!({ "id": "nope", "type": "subscription.revoked", "user_id": user.user_id })
                .to_string(),
            "id",
        ),
        (
            json!({ "id": event_id(), "type": "subscription.revoked", "user_id": "u-1" })
                .to_string(),
            "user_id",
        ),
        (
            json!({ "id": event_id(), "type": "subscription.revoked", "user_id": user.user_id,
                     "extra": 1 })
            .to_string(),
            "extra",
        ),
    ];
    for (body, expected) in cases {
        let body = body.as_str();
        let response = post_signed(&app, body, Some(&signature(SECRET, now(), body))).await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert!(message_of(&error).contains(expected), "{body}: {error}");
    }
    assert_eq!(tier_of(&app, &user).await, "free");
}

#[tokio::test]
async fn an_unknown_user_is_not_found_and_the_event_is_not_burnt() {
    let app = billing_app().await;
    let id = event_id();
    let ghost = json!({
        "id": id, "type": "subscription.activated", "user_id": Uuid::now_v7(), "tier": "pro"
    });
    let error = assert_error(deliver(&app, &ghost).await, 404, "NOT_FOUND").await;
    assert!(message_of(&error).contains("user"), "{error}");

    use chorus_actors::store::Store;
    assert_eq!(
        app.store().await.get_billing_event(&id).await.unwrap(),
        None
    );
}
