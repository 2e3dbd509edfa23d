//! `POST /api/v1/billing/webhook`: tier changes sent by the billing system, signed like Stripe's.
//!
//! `Chorus-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "{t}.{raw body}")>`. The
//! signature is checked on the raw bytes before the body is parsed, in constant time; a
//! timestamp further than `billing.tolerance_secs` from now is refused, so a captured request
//! cannot be replayed later. Several `v1=` entries are allowed (any may match), so a sender can
//! sign with an old and a new secret while rotating.
//!
//! Events are idempotent by id: the id is recorded (store `billing_events`) before the change is
//! applied, so a redelivered event is acknowledged with 204 and not applied again — even when it
//! arrives after a later event (a replayed `activated` after `revoked` stays revoked). If
//! applying fails, the id is forgotten again so the sender's retry applies it.

use chorus_actors::session::{SessionError, TierRoleChange};
use chorus_actors::store::BillingEvent;
use chrono::Utc;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use uuid::Uuid;
use warp::reply::Response;

use super::admin::known_tier;
use super::context::{Body, Ctx, no_content};
use super::error::{ApiError, ErrorCode};

const SIGNATURE_HEADER: &str = "chorus-signature";
const ACTIVATED: &str = "subscription.activated";
const REVOKED: &str = "subscription.revoked";
const MAX_EVENT_ID_CHARS: usize = 255;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookEvent {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    user_id: Uuid,
    #[serde(default)]
    tier: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SignatureError {
    #[error("missing Chorus-Signature header")]
    Missing,
    #[error("malformed Chorus-Signature header: expected `t=<unix seconds>,v1=<hex>`")]
    Malformed,
    #[error("signature timestamp is more than {0} s from the server's clock")]
    Stale(u64),
    #[error("signature does not match")]
    Mismatch,
}

/// `t` and the `v1` signatures of a `Chorus-Signature` header.
fn parse_header(value: &str) -> Result<(i64, Vec<Vec<u8>>), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in value.split(',') {
        let (key, val) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match key {
            "t" => {
                let t = val.parse::<i64>().map_err(|_| SignatureError::Malformed)?;
                if timestamp.replace(t).is_some() {
                    return Err(SignatureError::Malformed);
                }
            }
            "v1" => signatures.push(decode_hex(val).ok_or(SignatureError::Malformed)?),
            // Other schemes (a future v2) are ignored, as Stripe's verifiers do.
            _ => {}
        }
    }
    match timestamp {
        Some(t) if !signatures.is_empty() => Ok((t, signatures)),
        _ => Err(SignatureError::Malformed),
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Checks the header against the raw body: any `v1` matching, and `t` within `tolerance_secs`
/// of `now`.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secret: &[u8],
    now: i64,
    tolerance_secs: u64,
) -> Result<(), SignatureError> {
    let (timestamp, signatures) = parse_header(header.ok_or(SignatureError::Missing)?)?;
    let matches = signatures.iter().any(|signature| {
        // HMAC accepts keys of any length.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
            return false;
        };
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(signature).is_ok()
    });
    if !matches {
        return Err(SignatureError::Mismatch);
    }
    if now.abs_diff(timestamp) > tolerance_secs {
        return Err(SignatureError::Stale(tolerance_secs));
    }
    Ok(())
}

/// `POST /api/v1/billing/webhook` → 204.
pub async fn webhook(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    let billing = &ctx.state.config.billing;
    let Some(secret) = &billing.webhook_secret else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no route for {} {}", ctx.method, ctx.path),
        ));
    };
    let raw = ctx.read_body(body).await?;
    let header = ctx
        .headers
        .get(SIGNATURE_HEADER)
        .map(|v| v.to_str().map_err(|_| SignatureError::Malformed))
        .transpose();
    header
        .and_then(|header| {
            verify(
                header,
                &raw,
                secret.expose().as_bytes(),
                Utc::now().timestamp(),
                billing.tolerance.as_secs(),
            )
        })
        .map_err(|e| {
            tracing::warn!(reason = %e, "billing webhook refused");
            ApiError::unauthenticated(e.to_string())
        })?;

    let event: WebhookEvent = ctx.decode_json(&raw)?;
    if !event.id.starts_with("evt_")
        || event.id.chars().count() > MAX_EVENT_ID_CHARS
        || event.id.chars().any(char::is_control)
    {
        return Err(ApiError::field(
            "id",
            format!("must be an event id `evt_…` of at most {MAX_EVENT_ID_CHARS} characters"),
        ));
    }
    let tiers = &ctx.state.config.tiers;
    let tier = match (event.event_type.as_str(), event.tier.as_deref()) {
        (ACTIVATED, Some(tier)) => known_tier(&ctx.state.config, "tier", tier)?,
        (ACTIVATED, None) => {
            return Err(ApiError::field(
                "tier",
                "is required for subscription.activated",
            ));
        }
        (REVOKED, None) => tiers.default_tier().to_owned(),
        (REVOKED, Some(_)) => {
            return Err(ApiError::field(
                "tier",
                "is only allowed for subscription.activated",
            ));
        }
        (other, _) => {
            return Err(ApiError::field(
                "type",
                format!("unknown event type `{other}`; expected {ACTIVATED} or {REVOKED}"),
            ));
        }
    };
    // Checked before recording the event, so an unknown user neither starts a session nor
    // burns the event id.
    if ctx.state.store.get_user(event.user_id).await?.is_none() {
        return Err(ApiError::not_found("user"));
    }
    let record = BillingEvent {
        event_id: event.id.clone(),
        user_id: event.user_id,
        event_type: event.event_type.clone(),
        received_at: Utc::now(),
    };
    if !ctx.state.store.insert_billing_event(&record).await? {
        tracing::info!(event_id = %event.id, "billing event already seen; acknowledged, not reapplied");
        return Ok(no_content());
    }
    let change = TierRoleChange {
        tier: Some(tier),
        role: None,
    };
    match ctx.state.homes.set_tier_role(event.user_id, change).await {
        Ok(user) => {
            tracing::info!(
                event_id = %event.id,
                event_type = %event.event_type,
                user_id = %user.id,
                tier = %user.tier,
                "billing event applied"
            );
            Ok(no_content())
        }
        Err(error) => {
            // Not applied: forget the id so the sender's retry is applied, not acknowledged.
            if let Err(forget) = ctx.state.store.delete_billing_event(&event.id).await {
                tracing::error!(event_id = %event.id, error = %forget, "could not forget a failed billing event");
            }
            Err(match error {
                SessionError::NotFound => ApiError::not_found("user"),
                other => other.into(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn a_good_signature_verifies_and_others_do_not() {
        let (secret, body, now) = (b"whsec_test".as_slice(), br#"{"id":"evt_1"}"#, 1_000_000);
        let good = format!("t={now},v1={}", sign(secret, now, body));
        assert_eq!(verify(Some(&good), body, secret, now, 300), Ok(()));
        // Any of several v1 entries may match (secret rotation); unknown schemes are ignored.
        let rotated = format!(
            "t={now},v1={},v0=zz,v1={}",
            "ab".repeat(32),
            sign(secret, now, body)
        );
        assert_eq!(verify(Some(&rotated), body, secret, now, 300), Ok(()));

        assert_eq!(
            verify(None, body, secret, now, 300),
            Err(SignatureError::Missing)
        );
        for malformed in [
            "",
            "t=1",
            "v1=ab",
            "t=x,v1=ab",
            "t=1,v1=abc",
            "t=1,t=2,v1=ab",
            "nonsense",
        ] {
            assert_eq!(
                verify(Some(malformed), body, secret, now, 300),
                Err(SignatureError::Malformed),
                "{malformed}"
            );
        }
        assert_eq!(
            verify(Some(&good), br#"{"id":"evt_2"}"#, secret, now, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(Some(&good), body, b"other", now, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(Some(&good), body, secret, now + 301, 300),
            Err(SignatureError::Stale(300))
        );
        assert_eq!(
            verify(Some(&good), body, secret, now - 301, 300),
            Err(SignatureError::Stale(300))
        );
    }

    #[test]
    fn hex_decoding_is_strict() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0F"), Some(vec![15]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex("é1"), None);
    }
}
