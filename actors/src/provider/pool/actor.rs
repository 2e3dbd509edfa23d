//! `ProviderPool`: the actor owning one provider's deployments (ARCHITECTURE.md, the actor tree).
//!
//! Calls read and update deployment state directly under short locks (see the parent module), so
//! the actor is off the hot path. It exists for what has no caller: every second it moves open
//! breakers whose cool-down has passed to half-open, so the admin view and the gauges are
//! current when no traffic arrives, exports the breaker and in-flight gauges, and logs each
//! change of a deployment's state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;

use super::{BreakerPolicy, BreakerState, PoolState};
use crate::metrics::metrics;

/// How often breakers and gauges are refreshed without traffic.
const TICK: Duration = Duration::from_secs(1);

pub struct ProviderPool;

pub struct ProviderPoolArgs {
    pub pool: Arc<PoolState>,
    pub breaker: BreakerPolicy,
}

pub struct ProviderPoolState {
    pool: Arc<PoolState>,
    breaker: BreakerPolicy,
    last: HashMap<String, (BreakerState, bool)>,
}

#[derive(RactorMessage)]
pub enum ProviderPoolMessage {
    Tick,
}

impl Actor for ProviderPool {
    type Msg = ProviderPoolMessage;
    type State = ProviderPoolState;
    type Arguments = ProviderPoolArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(TICK, || ProviderPoolMessage::Tick);
        Ok(ProviderPoolState {
            pool: args.pool,
            breaker: args.breaker,
            last: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ProviderPoolMessage::Tick => {
                for deployment in &state.pool.deployments {
                    let snap = deployment.snapshot(&state.breaker);
                    let labels = [state.pool.provider_id.as_str(), snap.id.as_str()];
                    metrics()
                        .provider_breaker_state
                        .set(labels, snap.breaker.gauge());
                    metrics()
                        .provider_inflight
                        .set(labels, i64::from(snap.in_flight));
                    let now = (snap.breaker, snap.healthy);
                    let before = state.last.insert(snap.id.clone(), now);
                    if before.is_some_and(|b| b != now) {
                        tracing::info!(
                            provider = %state.pool.provider_id,
                            deployment = %snap.id,
                            breaker = ?snap.breaker,
                            healthy = snap.healthy,
                            "deployment state changed"
                        );
                    }
                }
            }
        }
        Ok(())
    }
}
