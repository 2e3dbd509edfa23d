//! Per-user limits, enforced by the user's home session before anything is stored.
//!
//! A request is admitted in this order, and a refusal changes nothing:
//! 1. the tier allows every model asked for (else `Forbidden`);
//! 2. the monthly limits (`chat_messages`, `tokens`) are not used up: the user's counters for
//!    the current period ([`UsageBook`]: the `usage` table, read once, kept current by the
//!    session) plus what live requests still hold (else `QuotaExceeded`);
//! 3. one request from the requests-per-minute bucket, and the token estimate (prompt + max
//!    output, at most the bucket's capacity) from the tokens-per-minute bucket (else
//!    `RateLimited`; a token refusal gives the request back).
//!
//! The admitted [`Reservation`] is settled once with the real token count: the difference goes
//! back to (or is taken from) the tokens bucket. The request itself stays counted, even when the
//! provider then failed (as OpenAI counts it).
//!
//! The buckets are in-process ([`LocalBuckets`]): one node owns each user, so they are exact.
//!
//! The session keeps what these checks read in its [`Ledger`](super::ledger::Ledger), which
//! the edge may lock to admit and settle `/v1` requests without a message to the session.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::SessionError;
use super::turn::LegResult;
use crate::metrics::metrics;
use crate::quota::tiers::{TierSpec, Tiers};
use crate::quota::{Admission, BucketSpec, Clock, LocalBuckets, next_period_start, period_of};
use crate::store::{MessageStatus, Store, User};

/// What one admitted request holds until it is settled. Not `Clone`: settling consumes it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    pub id: Uuid,
    pub user_id: Uuid,
    /// The usage period (`YYYY-MM`) the request counts in: the one it was admitted in.
    pub period: String,
    /// Tokens taken from the tokens-per-minute bucket (and held against the monthly limit).
    pub tokens: u64,
    /// The requests-per-minute bucket after this request, for `X-RateLimit-*`.
    pub admission: Admission,
    /// The user's own provider keys by provider id, for routing the admitted request (filled in
    /// by the session, which holds them opened).
    pub own_keys: std::collections::HashMap<String, String>,
    rpm: BucketSpec,
    tpm: BucketSpec,
}

/// What live requests hold against the monthly limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct Held {
    pub requests: u64,
    pub tokens: u64,
}

impl Held {
    pub fn add(self, tokens: u64) -> Held {
        Held {
            requests: self.requests + 1,
            tokens: self.tokens.saturating_add(tokens),
        }
    }
}

/// The session's handle on its user's limits.
#[derive(Clone)]
pub struct Quotas {
    pub tiers: Arc<Tiers>,
    pub clock: Clock,
    pub buckets: Arc<LocalBuckets>,
}

/// How far a user's per-minute buckets are used on this node, to move with the user when its
/// home moves (cluster hand-off): the new home absorbs it, so a move does not refill them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UsedLimits {
    pub requests: Option<(BucketSpec, f64)>,
    pub tokens: Option<(BucketSpec, f64)>,
}

impl UsedLimits {
    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }

    /// Takes the user's buckets out of `buckets` (they are the new home's from now on).
    pub fn take(buckets: &LocalBuckets, user_id: Uuid) -> UsedLimits {
        UsedLimits {
            requests: buckets.take_deficit_now(&rpm_key(user_id)),
            tokens: buckets.take_deficit_now(&tpm_key(user_id)),
        }
    }

    /// Adds what the previous home used to the user's buckets here.
    pub fn absorb_into(&self, buckets: &LocalBuckets, user_id: Uuid) {
        if let Some((spec, deficit)) = self.requests {
            buckets.absorb_now(&rpm_key(user_id), spec, deficit);
        }
        if let Some((spec, deficit)) = self.tokens {
            buckets.absorb_now(&tpm_key(user_id), spec, deficit);
        }
    }
}

fn rpm_key(user_id: Uuid) -> BucketKey {
    BucketKey::new(user_id, b":rpm")
}

fn tpm_key(user_id: Uuid) -> BucketKey {
    BucketKey::new(user_id, b":tpm")
}

/// A user's bucket key, `<user id>:rpm` or `:tpm`, made on the stack: every request makes
/// two or three of them.
struct BucketKey([u8; 40]);

impl BucketKey {
    fn new(user_id: Uuid, suffix: &[u8; 4]) -> BucketKey {
        let mut key = [0; 40];
        user_id.hyphenated().encode_lower(&mut key[..36]);
        key[36..].copy_from_slice(suffix);
        BucketKey(key)
    }
}

impl std::ops::Deref for BucketKey {
    type Target = str;

    fn deref(&self) -> &str {
        // ASCII by construction (a hyphenated UUID and an ASCII suffix).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl Quotas {
    pub fn tier<'a>(&'a self, user: &User) -> (&'a str, &'a TierSpec) {
        self.tiers.get(&user.tier)
    }

    /// Checks the monthly RAG limit before a retrieval (a search, or documents attached to a
    /// message); returns the period to count it in once it ran. The book must hold the period's
    /// counters when the tier limits RAG queries ([`Quotas::needs_counters`]).
    pub fn admit_rag(
        &self,
        now: DateTime<Utc>,
        book: &UsageBook,
        user: &User,
    ) -> Result<String, SessionError> {
        let period = period_of(now);
        let (_, tier) = self.tier(user);
        if let Some(limit) = tier.monthly.rag_queries {
            let used = book.loaded(&period).ok_or_else(counters_not_loaded)?;
            let used = used.get("rag_queries").copied().unwrap_or(0).max(0) as u64;
            if used >= limit {
                metrics()
                    .quota_rejections_total
                    .inc(["monthly_rag_queries"]);
                return Err(SessionError::QuotaExceeded {
                    what: "rag_queries".into(),
                    limit,
                    used,
                    resets_at: next_period_start(now),
                });
            }
        }
        Ok(period)
    }

    /// Whether admitting this user's requests reads the month's usage counters (its tier has
    /// monthly limits); `rag`: for a retrieval rather than a chat request.
    pub fn needs_counters(&self, user: &User, rag: bool) -> bool {
        let monthly = &self.tier(user).1.monthly;
        if rag {
            monthly.rag_queries.is_some()
        } else {
            monthly.chat_messages.is_some() || monthly.tokens.is_some()
        }
    }

    /// Refuses a model the user's tier may not use.
    pub fn check_model(
        &self,
        user: &User,
        model_id: &str,
        model_tiers: &[String],
    ) -> Result<(), SessionError> {
        let (tier_id, tier) = self.tier(user);
        if self.tiers.allows_model(&user.tier, model_id, model_tiers) {
            return Ok(());
        }
        metrics().quota_rejections_total.inc(["model_not_in_tier"]);
        Err(SessionError::Forbidden(format!(
            "the {} tier (`{tier_id}`) does not include the model `{model_id}`",
            tier.name
        )))
    }

    /// The usage period (`YYYY-MM`) of now.
    pub fn period_now(&self) -> String {
        period_of(self.clock.now())
    }

    /// Checks the monthly limits and takes from the per-minute buckets (see the module doc).
    /// `period` is `now`'s ([`period_of`]; the caller has it already). `book` must hold its
    /// counters when the tier has monthly limits ([`Quotas::needs_counters`]): they are read
    /// from the store once per period.
    pub fn admit(
        &self,
        now: DateTime<Utc>,
        period: String,
        book: &UsageBook,
        user: &User,
        held: Held,
        estimated_tokens: u64,
    ) -> Result<Reservation, SessionError> {
        let (_, tier) = self.tier(user);
        let monthly = &tier.monthly;
        if monthly.chat_messages.is_some() || monthly.tokens.is_some() {
            let used = book.loaded(&period).ok_or_else(counters_not_loaded)?;
            let counter = |kind: &str| used.get(kind).copied().unwrap_or(0).max(0) as u64;
            for (what, limit, in_use) in [
                (
                    "chat_messages",
                    monthly.chat_messages,
                    counter("chat_messages") + held.requests,
                ),
                (
                    "tokens",
                    monthly.tokens,
                    counter("tokens").saturating_add(held.tokens),
                ),
            ] {
                if let Some(limit) = limit
                    && in_use >= limit
                {
                    metrics().quota_rejections_total.inc([if what == "tokens" {
                        "monthly_tokens"
                    } else {
                        "monthly_chat_messages"
                    }]);
                    return Err(SessionError::QuotaExceeded {
                        what: what.into(),
                        limit,
                        used: in_use,
                        resets_at: next_period_start(now),
                    });
                }
            }
        }

        let rpm = BucketSpec::per_minute(u64::from(tier.requests_per_minute));
        let tpm = BucketSpec::per_minute(tier.tokens_per_minute);
        let (rpm_key, tpm_key) = (rpm_key(user.id), tpm_key(user.id));
        let request = self.buckets.take_now(&rpm_key, rpm, 1);
        if !request.allowed {
            return Err(refused("requests_per_minute", request));
        }
        // A single request larger than the whole bucket could never pass: it takes a full
        // bucket, and its settlement charges the rest as debt.
        let tokens = estimated_tokens.clamp(1, tpm.capacity.max(1));
        let taken = self.buckets.take_now(&tpm_key, tpm, tokens);
        if !taken.allowed {
            self.buckets.adjust_now(&rpm_key, rpm, -1);
            return Err(refused("tokens_per_minute", taken));
        }
        Ok(Reservation {
            id: Uuid::now_v7(),
            user_id: user.id,
            period,
            tokens,
            admission: request,
            own_keys: Default::default(),
            rpm,
            tpm,
        })
    }

    /// The request turned out bigger than estimated (its real prompt is known now): takes the
    /// difference without checking.
    pub fn top_up(&self, reservation: &mut Reservation, tokens: u64) {
        if tokens > reservation.tokens {
            let more = tokens - reservation.tokens;
            self.buckets.adjust_now(
                &tpm_key(reservation.user_id),
                reservation.tpm,
                i64::try_from(more).unwrap_or(i64::MAX),
            );
            reservation.tokens = tokens;
        }
    }

    /// Settles with the real count: the tokens bucket gets back what was reserved and not used
    /// (or gives more). The request stays counted.
    pub fn settle(&self, reservation: Reservation, used_tokens: u64) {
        let delta = i128::from(used_tokens) - i128::from(reservation.tokens);
        let delta = i64::try_from(delta).unwrap_or(if delta > 0 { i64::MAX } else { i64::MIN });
        self.buckets
            .adjust_now(&tpm_key(reservation.user_id), reservation.tpm, delta);
    }

    /// A request admitted and then not started at all (a later step failed): everything back.
    pub fn refund(&self, reservation: Reservation) {
        self.buckets
            .adjust_now(&rpm_key(reservation.user_id), reservation.rpm, -1);
        self.settle(reservation, 0);
    }
}

/// A caller admitted before loading the month's counters (a bug, not the user's doing).
fn counters_not_loaded() -> SessionError {
    SessionError::Unavailable("the user's usage counters are not loaded".into())
}

fn refused(what: &str, admission: Admission) -> SessionError {
    metrics().quota_rejections_total.inc([match what {
        "tokens_per_minute" => "tokens_per_minute",
        _ => "requests_per_minute",
    }]);
    SessionError::RateLimited {
        what: what.into(),
        limit: admission.limit,
        remaining: admission.remaining,
        retry_after: admission.retry_after,
        reset_after: admission.reset_after,
    }
}

/// The usage of one answered request or turn, by the counter kinds `/me/usage` reports.
pub(crate) fn usage_deltas(used_tokens: u64, cost_usd: f64) -> [(&'static str, i64); 3] {
    [
        ("chat_messages", 1),
        ("tokens", i64::try_from(used_tokens).unwrap_or(i64::MAX)),
        ("cost_micro_usd", (cost_usd * 1_000_000.0).round() as i64),
    ]
}

/// A `/v1` request's usage; nothing when it was refused before any output (not a chat
/// message, as for turns).
pub(crate) fn request_usage(used_tokens: u64, cost_usd: f64) -> Option<[(&'static str, i64); 3]> {
    (used_tokens > 0 || cost_usd > 0.0).then(|| usage_deltas(used_tokens, cost_usd))
}

/// A turn's usage — one chat message, the tokens and cost of every leg — or nothing when every
/// provider refused it before output (the user is not charged for that). The turn writes it to
/// the store; the session counts the same figures in its book.
pub(crate) fn turn_usage(results: &[LegResult]) -> Option<[(&'static str, i64); 3]> {
    let answered = results
        .iter()
        .any(|r| r.message.status != MessageStatus::Failed || !r.message.content.is_empty());
    let tokens: u64 = results
        .iter()
        .map(|r| (r.message.usage.input_tokens + r.message.usage.output_tokens).max(0) as u64)
        .sum();
    let cost: f64 = results.iter().map(|r| r.message.cost_usd).sum();
    answered.then(|| usage_deltas(tokens, cost))
}

/// The user's monthly counters as their session knows them: read from the store once per
/// period, then kept current by the session — the only writer of its user's usage — so a
/// request's limit check costs no store read. `/v1` requests add to `pending`, written back in
/// one batch about a second later (and when the session stops), not three writes per request.
///
/// It lives in the session's [`Ledger`](super::ledger::Ledger), under a lock that is never held
/// across an await: loading and writing happen outside it ([`UsageBook::install`],
/// [`UsageBook::take_pending`]), and only the session actor does either, one at a time.
#[derive(Debug, Default)]
pub struct UsageBook {
    period: Option<String>,
    counters: BTreeMap<String, i64>,
    /// Deltas not yet in the store, by period, then kind.
    pending: BTreeMap<String, BTreeMap<String, i64>>,
}

/// Deltas taken out of a [`UsageBook`] to be written: `(period, kind, delta)`.
pub type PendingUsage = Vec<(String, String, i64)>;

impl UsageBook {
    /// The counters of `period` (the store's plus what is pending), if they are loaded.
    pub fn loaded(&self, period: &str) -> Option<&BTreeMap<String, i64>> {
        (self.period.as_deref() == Some(period)).then_some(&self.counters)
    }

    /// Makes `stored` (the store's counters of `period`, read just now) the book's, with what is
    /// pending for that period added.
    pub fn install(&mut self, period: &str, mut stored: BTreeMap<String, i64>) {
        if let Some(pending) = self.pending.get(period) {
            for (kind, delta) in pending {
                *stored.entry(kind.clone()).or_default() += delta;
            }
        }
        self.counters = stored;
        self.period = Some(period.to_owned());
    }

    /// Usage already written to the store by someone else (a turn).
    pub fn observe(&mut self, period: &str, kind: &str, delta: i64) {
        if self.period.as_deref() == Some(period) {
            add_to(&mut self.counters, kind, delta);
        }
    }

    /// Usage to write: counted now, stored at the next flush.
    pub fn add(&mut self, period: &str, kind: &str, delta: i64) {
        self.observe(period, kind, delta);
        // Looked up before inserting: the keys are allocated once per period and kind, not per
        // request.
        match self.pending.get_mut(period) {
            Some(kinds) => add_to(kinds, kind, delta),
            None => {
                self.pending.insert(
                    period.to_owned(),
                    BTreeMap::from([(kind.to_owned(), delta)]),
                );
            }
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes the pending deltas out to be written; give back the ones that failed with
    /// [`restore`](Self::restore).
    pub fn take_pending(&mut self) -> PendingUsage {
        std::mem::take(&mut self.pending)
            .into_iter()
            .flat_map(|(period, kinds)| {
                kinds
                    .into_iter()
                    .filter(|(_, delta)| *delta != 0)
                    .map(move |(kind, delta)| (period.clone(), kind, delta))
            })
            .collect()
    }

    /// Deltas that could not be written: pending again, for the next flush. (They are counted
    /// already.)
    pub fn restore(&mut self, failed: PendingUsage) {
        for (period, kind, delta) in failed {
            *self
                .pending
                .entry(period)
                .or_default()
                .entry(kind)
                .or_default() += delta;
        }
    }
}

fn add_to(counters: &mut BTreeMap<String, i64>, kind: &str, delta: i64) {
    match counters.get_mut(kind) {
        Some(value) => *value += delta,
        None => {
            counters.insert(kind.to_owned(), delta);
        }
    }
}

/// Writes deltas taken from a book; returns the ones the store refused.
pub async fn write_usage(store: &dyn Store, user_id: Uuid, pending: PendingUsage) -> PendingUsage {
    let mut failed = Vec::new();
    for (period, kind, delta) in pending {
        if let Err(e) = store.add_usage(user_id, &period, &kind, delta).await {
            tracing::error!(error = %e, %user_id, kind, "recording usage failed; will retry");
            failed.push((period, kind, delta));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_keys_name_the_user_and_the_limit() {
        let user = Uuid::now_v7();
        assert_eq!(&*rpm_key(user), format!("{user}:rpm"));
        assert_eq!(&*tpm_key(user), format!("{user}:tpm"));
    }
}
