//! The `Store` trait: the logical schema of ARCHITECTURE.md (Storage), keyed by user.
//!
//! Every user-owned table is addressed by `user_id` first, so the same trait maps onto SQLite (the
//! embedded default) and onto ScyllaDB partitions. Only the global lookup tables (`users_by_email`,
//! `refresh_tokens`, `api_keys`, `shares`) are keyed otherwise. Backends must pass the shared
//! contract suite in [`contract`] (feature `store-contract`).
//!
//! The store holds no business rules: ownership checks, rotation policy and validation live in the
//! callers. It does guarantee the atomic steps those rules need (a unique email, spending a refresh
//! token exactly once, cascading a thread delete).

#[cfg(feature = "store-contract")]
pub mod contract;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use sqlite::SqliteStore;

/// Errors a backend reports. Callers map them to HTTP once, at the edge.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was violated (e.g. an email already registered).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The backend failed (I/O, SQL, connection); the message names the operation.
    #[error("store backend error during {op}: {source}")]
    Backend {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored value could not be decoded (corruption or a schema mismatch).
    #[error("corrupt stored value in {0}")]
    Corrupt(String),
    /// The migration set on disk is newer than this binary knows.
    #[error("database schema version {found} is newer than this binary supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Per-user preferences (`PATCH /api/v1/me`).
///
/// No `skip_serializing_if` here or in any type that crosses the cluster: bincode (the cluster
/// codec) is not self-describing, so a skipped field shifts every field after it. The API view
/// (`UserView`) leaves unset settings out instead.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserSettings {
    #[serde(default)]
    pub default_model: Option<String>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub system_prompt: Option<String>,
}

/// `users` (partition `user_id`) plus its `users_by_email` lookup.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct User {
    pub id: Uuid,
    /// Normalised (trimmed, lower-cased) by the caller; unique across users.
    pub email: String,
    pub display_name: Option<String>,
    /// PHC string (argon2id).
    pub password_hash: String,
    pub tier: String,
    pub role: Role,
    pub settings: UserSettings,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `refresh_tokens` (partition `token_hash`). The raw token is never stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshToken {
    pub token_hash: String,
    pub user_id: Uuid,
    /// All tokens descended from one login share a family; reuse of a spent one revokes it.
    pub family_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Set when the token was exchanged for a new pair.
    pub spent_at: Option<DateTime<Utc>>,
    /// Set on logout or family revocation.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Outcome of [`Store::spend_refresh_token`].
#[derive(Debug, Clone, PartialEq)]
pub enum SpendOutcome {
    /// This call spent it; the row as it was before spending.
    Spent(RefreshToken),
    /// It was spent or revoked before; the row as stored (caller treats this as reuse).
    AlreadyUsed(RefreshToken),
    NotFound,
}

/// `api_keys` (partition `key_hash`). The raw key is shown once and never stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ApiKey {
    pub id: Uuid,
    pub key_hash: String,
    pub user_id: Uuid,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// `threads` (partition `user_id`, clustering `thread_id`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Thread {
    pub user_id: Uuid,
    /// UUIDv7.
    pub id: Uuid,
    pub title: Option<String>,
    pub system_prompt: Option<String>,
    pub model: Option<String>,
    pub bookmarked: bool,
    pub created_at: DateTime<Utc>,
    /// Last activity: creation, a patch, or a new message. Lists are ordered by it, newest first.
    pub updated_at: DateTime<Utc>,
    /// Maintained by the store on `append_message` / `delete_thread`.
    pub message_count: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    User,
    Assistant,
    System,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Pending,
    Streaming,
    Complete,
    Interrupted,
    Failed,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: i64,
    pub output_tokens: i64,
}

/// `messages` (partition `(user_id, thread_id)`, clustering `message_id`, a UUIDv7 so that id order
/// is time order). The store also records which node inserted a message (its owner, for the
/// reapers); that is not part of the value.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub user_id: Uuid,
    pub thread_id: Uuid,
    pub id: Uuid,
    pub role: MessageRole,
    pub model: Option<String>,
    pub content: String,
    pub status: MessageStatus,
    pub usage: Usage,
    pub cost_usd: f64,
    pub latency_ms: Option<i64>,
    pub ttft_ms: Option<i64>,
    pub provider: Option<String>,
    /// The deployment (models.toml) that served an assistant message.
    pub deployment: Option<String>,
    /// Document passages an assistant message was given (retrieval, or whole documents).
    pub citations: Vec<Citation>,
    /// The message this one answers (the user message for an assistant reply).
    pub parent_id: Option<Uuid>,
    pub turn_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// A document passage given to a model for an answer (stored with the message as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Citation {
    pub document_id: Uuid,
    pub document_name: String,
    /// The chunk's `seq` within the document.
    pub chunk: u32,
    pub position: ChunkPosition,
    pub text: String,
}

/// `summaries` (partition `(user_id, thread_id)`, clustering `model`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub user_id: Uuid,
    pub thread_id: Uuid,
    pub model: String,
    pub text: String,
    /// The newest message id folded into the summary.
    pub covers_until: Uuid,
    pub updated_at: DateTime<Utc>,
}

/// `shares` (partition `share_id`).
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub share_id: String,
    pub user_id: Uuid,
    pub thread_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// `provider_keys` (partition `user_id`, clustering `provider`): a user's own provider key,
/// encrypted by the caller (AES-256-GCM); the store only keeps the sealed bytes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProviderKey {
    pub user_id: Uuid,
    pub provider: String,
    /// Nonce followed by ciphertext and tag.
    pub sealed: Vec<u8>,
    pub updated_at: DateTime<Utc>,
}

/// `billing_events` (partition `event_id`): billing webhook events already received, so a
/// redelivered event is acknowledged without being applied twice.
#[derive(Debug, Clone, PartialEq)]
pub struct BillingEvent {
    /// The sender's event id (`evt_…`), unique per event.
    pub event_id: String,
    pub user_id: Uuid,
    /// The event type as sent, e.g. `subscription.activated`.
    pub event_type: String,
    pub received_at: DateTime<Utc>,
}

/// Where a document is in its ingestion (`documents.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocumentStatus {
    /// Stored, waiting for an ingestion slot.
    Pending,
    /// A `DocumentIndexer` is extracting, chunking and storing it.
    Processing,
    /// Every chunk is stored; the document is searchable.
    Ready,
    /// Ingestion gave up; `error` says why.
    Failed,
}

impl DocumentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentStatus::Pending => "pending",
            DocumentStatus::Processing => "processing",
            DocumentStatus::Ready => "ready",
            DocumentStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<DocumentStatus> {
        match s {
            "pending" => Some(DocumentStatus::Pending),
            "processing" => Some(DocumentStatus::Processing),
            "ready" => Some(DocumentStatus::Ready),
            "failed" => Some(DocumentStatus::Failed),
            _ => None,
        }
    }
}

/// `documents` (partition `user_id`, clustering `document_id`, a UUIDv7 so that id order is
/// upload order). The bytes live in the blob store under `blob_key`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Document {
    pub user_id: Uuid,
    pub id: Uuid,
    /// The uploaded file name, as given (validated by the edge).
    pub name: String,
    /// The detected type, e.g. `application/pdf`.
    pub mime: String,
    /// Bytes of the uploaded file.
    pub size: i64,
    pub status: DocumentStatus,
    /// 0.0..=1.0 while processing; 1.0 when ready.
    pub progress: f64,
    /// Chunks stored for it (set when it becomes ready).
    pub chunk_count: i64,
    /// Why ingestion failed (status `failed`).
    pub error: Option<String>,
    pub blob_key: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A change of a document's ingestion state ([`Store::update_document_progress`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentProgress {
    pub status: DocumentStatus,
    pub progress: f64,
    pub chunk_count: i64,
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// Where a chunk's text sits in the document's extracted text (stored as JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkPosition {
    /// 1-based page (PDF), when the format has pages. (Never skipped when serializing: see
    /// `UserSettings`.)
    #[serde(default)]
    pub page: Option<u32>,
    /// The Markdown-style headings the chunk sits under, outermost first.
    #[serde(default)]
    pub heading_path: Vec<String>,
    /// Character (Unicode scalar) offsets into the extracted text, end exclusive.
    pub char_start: u64,
    pub char_end: u64,
}

/// `chunks` (partition `(user_id, document_id)`, clustering `seq`).
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub user_id: Uuid,
    pub document_id: Uuid,
    /// 0-based order within the document.
    pub seq: i64,
    pub text: String,
    pub position: ChunkPosition,
    pub token_count: i64,
    /// The chunk's embedding, when an embedder produced one.
    pub embedding: Option<Vec<f32>>,
}

/// Position after the last chunk of a page of [`Store::list_user_chunks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkCursor {
    pub document_id: Uuid,
    pub seq: i64,
}

/// Position after the last thread of a page: `(updated_at, id)` of that thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadCursor {
    pub updated_at: DateTime<Utc>,
    pub id: Uuid,
}

#[derive(Debug, Clone, Default)]
pub struct ThreadQuery {
    /// 1..=100, enforced by the caller.
    pub limit: usize,
    pub cursor: Option<ThreadCursor>,
    /// Case-insensitive substring of the title or of any of the thread's summaries.
    pub q: Option<String>,
    pub bookmarked: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    Asc,
    Desc,
}

#[derive(Debug, Clone, Default)]
pub struct MessageQuery {
    pub limit: usize,
    /// Exclusive: the page starts after this message id in the chosen order.
    pub cursor: Option<Uuid>,
    pub order: Order,
    /// Only messages whose `model` equals this (user messages have the model they were sent to).
    pub model: Option<String>,
}

/// One page of a list; `next` is `Some` exactly when more items follow.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T, C> {
    pub items: Vec<T>,
    pub next: Option<C>,
}

/// Per-model figures of a thread for `GET /threads/{id}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStats {
    pub model: String,
    pub message_count: i64,
    pub summary: Option<Summary>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip for `/readyz`.
    async fn ping(&self) -> StoreResult<()>;

    // users / users_by_email
    /// Fails with `Conflict` when the email is taken.
    async fn create_user(&self, user: &User) -> StoreResult<()>;
    async fn get_user(&self, user_id: Uuid) -> StoreResult<Option<User>>;
    async fn get_user_by_email(&self, email: &str) -> StoreResult<Option<User>>;
    /// Replaces the mutable fields (display_name, password_hash, tier, role, settings,
    /// updated_at); the email is immutable. Returns false when the user does not exist.
    async fn update_user(&self, user: &User) -> StoreResult<bool>;

    // refresh_tokens
    async fn insert_refresh_token(&self, token: &RefreshToken) -> StoreResult<()>;
    async fn get_refresh_token(&self, token_hash: &str) -> StoreResult<Option<RefreshToken>>;
    /// Atomically marks an unspent, unrevoked token spent at `at` (compare-and-set).
    async fn spend_refresh_token(
        &self,
        token_hash: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<SpendOutcome>;
    /// Revokes one token (logout). Returns false when it does not exist.
    async fn revoke_refresh_token(&self, token_hash: &str, at: DateTime<Utc>) -> StoreResult<bool>;
    /// Revokes every token of a family (reuse detected); returns how many were newly revoked.
    async fn revoke_refresh_family(
        &self,
        user_id: Uuid,
        family_id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<u64>;

    // api_keys
    async fn insert_api_key(&self, key: &ApiKey) -> StoreResult<()>;
    async fn get_api_key_by_hash(&self, key_hash: &str) -> StoreResult<Option<ApiKey>>;
    /// Newest first.
    async fn list_api_keys(&self, user_id: Uuid) -> StoreResult<Vec<ApiKey>>;
    /// Returns false when no key with that id belongs to the user.
    async fn delete_api_key(&self, user_id: Uuid, key_id: Uuid) -> StoreResult<bool>;
    async fn touch_api_key(&self, key_hash: &str, at: DateTime<Utc>) -> StoreResult<()>;

    // threads
    async fn create_thread(&self, thread: &Thread) -> StoreResult<()>;
    async fn get_thread(&self, user_id: Uuid, thread_id: Uuid) -> StoreResult<Option<Thread>>;
    /// Replaces title, system_prompt, model, bookmarked and updated_at. False when absent.
    async fn update_thread(&self, thread: &Thread) -> StoreResult<bool>;
    /// Deletes the thread with its messages, summaries and shares. False when absent.
    async fn delete_thread(&self, user_id: Uuid, thread_id: Uuid) -> StoreResult<bool>;
    /// Newest activity first (`updated_at` desc, then `id` desc).
    async fn list_threads(
        &self,
        user_id: Uuid,
        query: &ThreadQuery,
    ) -> StoreResult<Page<Thread, ThreadCursor>>;
    /// Per-model message counts and summaries of a thread, ordered by model name.
    async fn thread_model_stats(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
    ) -> StoreResult<Vec<ModelStats>>;

    // messages
    /// Inserts the message, bumps the thread's `message_count` and sets its `updated_at` to the
    /// message's `created_at` (if later), in one transaction.
    async fn append_message(&self, message: &Message) -> StoreResult<()>;
    /// Replaces content, status, usage, cost, timings, provider, model. False when absent.
    async fn update_message(&self, message: &Message) -> StoreResult<bool>;
    async fn get_message(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
        message_id: Uuid,
    ) -> StoreResult<Option<Message>>;
    async fn list_messages(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
        query: &MessageQuery,
    ) -> StoreResult<Page<Message, Uuid>>;

    /// The startup reaper: settles as `status` every message still `streaming`, created before
    /// `created_before`, that this store's node owns — or that no node owns (written before
    /// owners were recorded) — keeping the text it had stored. Returns how many. Messages owned
    /// by other nodes sharing the backend are left alone: their turns may still be running.
    async fn settle_orphaned_messages(
        &self,
        created_before: DateTime<Utc>,
        status: MessageStatus,
    ) -> StoreResult<u64>;

    /// The reaper for a node declared dead: settles as `status` every message still
    /// `streaming` owned by `node` and created before `at` (pass the moment the node was
    /// declared dead), keeping the text it had stored. Returns how many; unowned messages and
    /// other nodes' are left alone. Idempotent.
    async fn settle_orphaned_messages_of(
        &self,
        node: &str,
        at: DateTime<Utc>,
        status: MessageStatus,
    ) -> StoreResult<u64>;

    /// The node that owns the newest message of the thread still `streaming` — where a turn
    /// of it runs, or ran until its node died — if any. After a hand-off, edges use it to reach
    /// a turn that is finishing on the user's previous home.
    async fn streaming_node(&self, user_id: Uuid, thread_id: Uuid) -> StoreResult<Option<String>>;

    // summaries
    async fn upsert_summary(&self, summary: &Summary) -> StoreResult<()>;
    async fn get_summary(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
        model: &str,
    ) -> StoreResult<Option<Summary>>;

    // usage
    /// Adds `delta` to the counter and returns the new value.
    async fn add_usage(
        &self,
        user_id: Uuid,
        period: &str,
        kind: &str,
        delta: i64,
    ) -> StoreResult<i64>;
    async fn get_usage(&self, user_id: Uuid, period: &str) -> StoreResult<BTreeMap<String, i64>>;

    // shares
    async fn create_share(&self, share: &Share) -> StoreResult<()>;
    async fn get_share(&self, share_id: &str) -> StoreResult<Option<Share>>;
    /// Removes the thread's shares; returns how many.
    async fn delete_shares_for_thread(&self, user_id: Uuid, thread_id: Uuid) -> StoreResult<u64>;

    // provider_keys
    /// Inserts or replaces the user's key for `key.provider`.
    async fn put_provider_key(&self, key: &ProviderKey) -> StoreResult<()>;
    /// The user's keys, ordered by provider.
    async fn list_provider_keys(&self, user_id: Uuid) -> StoreResult<Vec<ProviderKey>>;
    /// False when the user had no key for that provider.
    async fn delete_provider_key(&self, user_id: Uuid, provider: &str) -> StoreResult<bool>;

    // billing_events
    /// Records an event id atomically: true when newly recorded, false when that id was already
    /// there (the stored row is left unchanged). Of concurrent inserts of one id, one wins.
    async fn insert_billing_event(&self, event: &BillingEvent) -> StoreResult<bool>;
    async fn get_billing_event(&self, event_id: &str) -> StoreResult<Option<BillingEvent>>;
    /// Forgets an event (its application failed, so a redelivery must apply it). False when
    /// absent.
    async fn delete_billing_event(&self, event_id: &str) -> StoreResult<bool>;

    // documents / chunks
    /// Fails with `Conflict` when the id is taken.
    async fn create_document(&self, document: &Document) -> StoreResult<()>;
    async fn get_document(&self, user_id: Uuid, document_id: Uuid)
    -> StoreResult<Option<Document>>;
    /// Newest first (`id` desc); `cursor` is the last id of the previous page (exclusive).
    async fn list_documents(
        &self,
        user_id: Uuid,
        limit: usize,
        cursor: Option<Uuid>,
    ) -> StoreResult<Page<Document, Uuid>>;
    /// Sets status, progress, chunk count, error and updated_at. False when the document does
    /// not exist (it was deleted): an ingestion seeing that stops.
    async fn update_document_progress(
        &self,
        user_id: Uuid,
        document_id: Uuid,
        progress: &DocumentProgress,
    ) -> StoreResult<bool>;
    /// Deletes the document with its chunks. False when absent.
    async fn delete_document(&self, user_id: Uuid, document_id: Uuid) -> StoreResult<bool>;
    /// Documents of every user still `pending` or `processing`, oldest first, at most `limit`:
    /// what a node starting after a crash must ingest again.
    async fn list_unfinished_documents(&self, limit: usize) -> StoreResult<Vec<Document>>;
    /// Inserts (or replaces, by `seq`) a batch of chunks of one document, atomically. False,
    /// with nothing written, when the document does not exist (deleted meanwhile). Every chunk
    /// must belong to `user_id`/`document_id`.
    async fn put_chunks(
        &self,
        user_id: Uuid,
        document_id: Uuid,
        chunks: &[Chunk],
    ) -> StoreResult<bool>;
    /// Removes every chunk of a document (an ingestion starting over); returns how many.
    async fn delete_chunks(&self, user_id: Uuid, document_id: Uuid) -> StoreResult<u64>;
    /// The chunks of one document, by `seq`.
    async fn list_chunks(&self, user_id: Uuid, document_id: Uuid) -> StoreResult<Vec<Chunk>>;
    /// Every chunk of a user, by `(document_id, seq)`, a page at a time (rebuilding a search
    /// index). Chunks of documents not yet `ready` are included: callers filter by status.
    async fn list_user_chunks(
        &self,
        user_id: Uuid,
        limit: usize,
        cursor: Option<ChunkCursor>,
    ) -> StoreResult<Page<Chunk, ChunkCursor>>;
}
