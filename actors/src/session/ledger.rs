//! The part of a user session's state that per-request limits use, shared between the session
//! actor and the edge, so that an OpenAI-compatible (`/v1`) request is admitted and settled
//! under a short lock instead of two messages to the session.
//!
//! Why: `/v1` requests are the hot path of a gateway. A round trip through the session's mailbox
//! per admission, and a message per settlement, cost about a tenth of a request's CPU and wake
//! the session's task twice per request (measured: `load-tests/cpu_per_request.sh` with
//! `PERF=1`). The session still owns this state — it loads the user row, the opened provider
//! keys and the month's counters, writes pending usage and decides when to stop — and the edge
//! only takes the fast lane once everything it needs is loaded ([`Ledger::admit_request_now`]
//! answers `None` otherwise, and the request goes through the actor as before).
//!
//! The lock is a `std::sync::Mutex` held for a few map operations, never across an await.
//! Lock order: ledger, then the per-minute buckets (which take no other lock).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use uuid::Uuid;

use super::SessionError;
use super::quota::{Held, Quotas, Reservation, UsageBook, request_usage};
use crate::quota::period_of;
use crate::store::User;

/// One session's shared limits state (see the module doc).
pub struct Ledger {
    pub quotas: Quotas,
    state: Mutex<LedgerState>,
}

/// What the lock guards.
#[derive(Debug)]
pub struct LedgerState {
    /// The session is stopping (idle, hand-off, shutdown): nothing more is admitted or settled
    /// here; the edge goes through the actor path, which reaches a fresh session.
    pub closed: bool,
    /// The user row, read once: every change to it goes through the session.
    pub user: Option<User>,
    /// The user's own provider keys, opened once; `None` until opened, and after they change.
    pub own_keys: Option<HashMap<String, String>>,
    /// This month's usage counters, kept current here.
    pub usage: UsageBook,
    /// A `FlushUsage` is on its way to the session.
    pub flush_scheduled: bool,
    /// Tokens held by admitted `/v1` requests, by reservation id.
    pub open: HashMap<Uuid, u64>,
    /// Tokens held by live turns, by reservation id.
    pub turns: HashMap<Uuid, u64>,
    /// The last message to the session or request through the fast lane (idle passivation).
    pub last_active: Instant,
}

impl LedgerState {
    /// What live turns and open requests hold against the monthly limits.
    pub fn held(&self) -> Held {
        self.open
            .values()
            .chain(self.turns.values())
            .fold(Held::default(), |held, tokens| held.add(*tokens))
    }
}

/// Who holds a reservation until it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A request outside threads (`/v1`).
    Request,
    /// A turn of a thread.
    Turn,
}

impl Ledger {
    /// `keys_to_open`: whether the user's own provider keys are opened (a key opener is set);
    /// without one they are known to be none.
    pub fn new(quotas: Quotas, keys_to_open: bool) -> Ledger {
        Ledger {
            quotas,
            state: Mutex::new(LedgerState {
                closed: false,
                user: None,
                own_keys: (!keys_to_open).then(HashMap::new),
                usage: UsageBook::default(),
                flush_scheduled: false,
                open: HashMap::new(),
                turns: HashMap::new(),
                last_active: Instant::now(),
            }),
        }
    }

    /// The state, for a few operations; never hold the guard across an await.
    pub fn lock(&self) -> MutexGuard<'_, LedgerState> {
        // Nothing under the lock can leave the state half-changed if it panicked; carry on.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes activity (keeps the session from passivating as idle).
    pub fn touch(&self) {
        self.lock().last_active = Instant::now();
    }

    /// Admits a `/v1` request without the session actor, when everything the check needs is
    /// loaded: the user row, the opened provider keys and, when the tier has monthly limits, the
    /// month's counters. `None`: ask the session (it loads what is missing), or the session is
    /// closing. The reservation is held until [`Ledger::settle_request`].
    pub fn admit_request_now(
        &self,
        model_id: &str,
        model_tiers: &[String],
        estimated_tokens: u64,
    ) -> Option<Result<Reservation, SessionError>> {
        // Outside the lock: the clock, and the period's name (one allocation).
        let now = self.quotas.clock.now();
        let period = period_of(now);
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.closed {
            return None;
        }
        let user = state.user.as_ref()?;
        let own_keys = state.own_keys.as_ref()?;
        if self.quotas.needs_counters(user, false) && state.usage.loaded(&period).is_none() {
            return None;
        }
        let answer = self
            .quotas
            .check_model(user, model_id, model_tiers)
            .and_then(|()| {
                let held = state.held();
                self.quotas
                    .admit(now, period, &state.usage, user, held, estimated_tokens)
            })
            .map(|mut reservation| {
                reservation.own_keys.clone_from(own_keys);
                reservation
            });
        if let Ok(reservation) = &answer {
            state.open.insert(reservation.id, reservation.tokens);
        }
        state.last_active = Instant::now();
        Some(answer)
    }

    /// Admits a request or a turn whose models the caller checked, with the loaded user row
    /// (and counters, when the tier has monthly limits). `None` when the user is not loaded.
    pub fn admit(
        &self,
        holder: Holder,
        estimated_tokens: u64,
    ) -> Option<Result<Reservation, SessionError>> {
        let now = self.quotas.clock.now();
        let period = period_of(now);
        let mut state = self.lock();
        let user = state.user.as_ref()?;
        let answer = self.quotas.admit(
            now,
            period,
            &state.usage,
            user,
            state.held(),
            estimated_tokens,
        );
        if let Ok(reservation) = &answer {
            let holds = match holder {
                Holder::Request => &mut state.open,
                Holder::Turn => &mut state.turns,
            };
            holds.insert(reservation.id, reservation.tokens);
        }
        Some(answer)
    }

    /// Settles a `/v1` request with what it used and records its usage (written about a second
    /// later). `Ok(true)`: schedule that write (`FlushUsage`); `Err`: the session is closing and
    /// the reservation comes back (boxed: the rare way), to settle through a fresh one.
    pub fn settle_request(
        &self,
        reservation: Reservation,
        used_tokens: u64,
        cost_usd: f64,
    ) -> Result<bool, Box<Reservation>> {
        let mut state = self.lock();
        if state.closed {
            return Err(Box::new(reservation));
        }
        Ok(self.settle_request_locked(&mut state, reservation, used_tokens, cost_usd))
    }

    /// [`Ledger::settle_request`] by the session itself (it is not closing while it handles a
    /// message).
    pub fn settle_request_in_session(
        &self,
        reservation: Reservation,
        used_tokens: u64,
        cost_usd: f64,
    ) -> bool {
        let mut state = self.lock();
        self.settle_request_locked(&mut state, reservation, used_tokens, cost_usd)
    }

    fn settle_request_locked(
        &self,
        state: &mut LedgerState,
        reservation: Reservation,
        used_tokens: u64,
        cost_usd: f64,
    ) -> bool {
        state.open.remove(&reservation.id);
        for (kind, delta) in request_usage(used_tokens, cost_usd).into_iter().flatten() {
            state.usage.add(&reservation.period, kind, delta);
        }
        self.quotas.settle(reservation, used_tokens);
        state.last_active = Instant::now();
        let due = state.usage.has_pending() && !state.flush_scheduled;
        state.flush_scheduled |= due;
        due
    }

    /// Settles a turn's reservation (its usage is the turn's to write) and stops holding it.
    pub fn settle(&self, reservation: Reservation, used_tokens: u64) {
        let mut state = self.lock();
        state.turns.remove(&reservation.id);
        state.open.remove(&reservation.id);
        self.quotas.settle(reservation, used_tokens);
    }

    /// A reservation admitted and then not used at all: everything back.
    pub fn refund(&self, reservation: Reservation) {
        let mut state = self.lock();
        state.turns.remove(&reservation.id);
        state.open.remove(&reservation.id);
        self.quotas.refund(reservation);
    }

    /// A turn turned out bigger than estimated: takes the difference and holds it.
    pub fn top_up(&self, reservation: &mut Reservation, tokens: u64) {
        let mut state = self.lock();
        self.quotas.top_up(reservation, tokens);
        if let Some(held) = state.turns.get_mut(&reservation.id) {
            *held = reservation.tokens;
        }
    }
}
