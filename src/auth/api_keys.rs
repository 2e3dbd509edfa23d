//! API-key authentication for the OpenAI-compatible `/v1` routes.
//!
//! A key is verified by hashing it and looking the hash up — in memory first: the hot path makes
//! no store call. Entries live `TTL`; deleting a key through this node evicts it at once, so on a
//! single node a deleted key stops working immediately (other nodes: within `TTL`).

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use chorus_actors::store::Store;
use uuid::Uuid;

use super::tokens::hash_secret;

const TTL: Duration = Duration::from_secs(60);
/// Beyond this many cached keys, expired ones are swept on insert.
const SWEEP_AT: usize = 100_000;

#[derive(Clone, Copy)]
struct Cached {
    user_id: Option<Uuid>,
    key_id: Option<Uuid>,
    fetched: Instant,
}

#[derive(Default)]
pub struct ApiKeyCache {
    entries: RwLock<HashMap<String, Cached>>,
}

impl ApiKeyCache {
    /// The owner of `key`, or `None` when no such key exists.
    pub async fn user_for(
        &self,
        store: &dyn Store,
        key: &str,
    ) -> Result<Option<Uuid>, chorus_actors::store::StoreError> {
        let hash = hash_secret(key);
        if let Ok(entries) = self.entries.read()
            && let Some(hit) = entries.get(&hash)
            && hit.fetched.elapsed() < TTL
        {
            return Ok(hit.user_id);
        }
        let row = store.get_api_key_by_hash(&hash).await?;
        if row.is_some() {
            // Recorded once per cache fill (at most once a minute per key and node).
            store.touch_api_key(&hash, chrono::Utc::now()).await?;
        }
        let cached = Cached {
            user_id: row.as_ref().map(|k| k.user_id),
            key_id: row.as_ref().map(|k| k.id),
            fetched: Instant::now(),
        };
        if let Ok(mut entries) = self.entries.write() {
            if entries.len() >= SWEEP_AT {
                entries.retain(|_, e| e.fetched.elapsed() < TTL);
            }
            // Still full of fresh entries (e.g. a flood of made-up keys): answer without
            // caching rather than grow without bound.
            if entries.len() < SWEEP_AT {
                entries.insert(hash, cached);
            }
        }
        Ok(cached.user_id)
    }

    /// Forgets a deleted key.
    pub fn evict(&self, key_id: Uuid) {
        if let Ok(mut entries) = self.entries.write() {
            entries.retain(|_, e| e.key_id != Some(key_id));
        }
    }
}
