//! Hand-off: what a node does when the cluster's membership changes (ARCHITECTURE.md, cluster).
//!
//! - Users whose home moved to another node are passivated here: their session flushes what it
//!   holds and stops, and the new home rebuilds it from the store on the next request. A session
//!   with a turn still running is left alone until the turn ends — the turn finishes where it
//!   started — and tried again every second. Their per-minute buckets go to the new home at
//!   once (it adds them to its own), so moving does not refill a user's limits.
//! - A node that vanished (dead, or gone after leaving) leaves `streaming` messages behind: they
//!   are settled as `interrupted` with whatever text was stored. Their quota reservations lived
//!   in the dead node's memory and are gone with it; its users' per-minute buckets restart full
//!   on their new home (the one case a move refills them).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chorus_actors::session::Passivation;
use chorus_actors::store::MessageStatus;
use uuid::Uuid;

use crate::app::AppState;

/// Runs until the process ends; only started when the node is clustered.
pub fn spawn(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = state.cluster.changes();
        let mut members: HashSet<String> = member_names(&state);
        let mut handed = HashMap::new();
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = member_names(&state);
                    for gone in members.difference(&now) {
                        reap(&state, gone).await;
                    }
                    members = now;
                    passivate_moved(&state, &mut handed).await;
                }
                _ = retry.tick() => passivate_moved(&state, &mut handed).await,
            }
        }
    })
}

fn member_names(state: &AppState) -> HashSet<String> {
    state
        .cluster
        .view()
        .members
        .iter()
        .map(|m| m.name.clone())
        .collect()
}

/// Settles the turns a vanished node left streaming.
async fn reap(state: &AppState, node: &str) {
    match state
        .store
        .settle_orphaned_messages_of(node, chrono::Utc::now(), MessageStatus::Interrupted)
        .await
    {
        Ok(0) => {}
        Ok(reaped) => tracing::warn!(
            node,
            reaped,
            "settled turns left streaming by a node that is gone as interrupted"
        ),
        Err(e) => tracing::error!(node, error = %e, "reaping a gone node's turns"),
    }
}

/// Hands the per-minute limits of users no longer homed here to their new home (once per
/// move: `handed` remembers where each went) and passivates their sessions.
async fn passivate_moved(state: &AppState, handed: &mut HashMap<Uuid, String>) {
    let sessions = &state.sessions;
    let view = state.cluster.view();
    let local = view.local.as_str();
    let live: HashSet<Uuid> = sessions.live_users().into_iter().collect();
    handed.retain(|user, _| live.contains(user));
    for user in live {
        let Some(home) = view.ring.home(user).filter(|home| *home != local) else {
            handed.remove(&user);
            continue;
        };
        if handed.get(&user).map(String::as_str) != Some(home) {
            state.homes.hand_over_limits(user);
            handed.insert(user, home.to_owned());
        }
        match sessions.passivate(user).await {
            Ok(Passivation::Stopped) => {
                tracing::debug!(%user, "user re-homed: session passivated here");
            }
            Ok(Passivation::Busy { .. } | Passivation::NotLive) => {}
            Err(e) => tracing::warn!(%user, error = %e, "passivating a re-homed user"),
        }
    }
}
