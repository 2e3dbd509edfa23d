//! Ingestion through the node: the `IndexerSupervisor` and its `DocumentIndexer`s against a real
//! SQLite store and an in-memory blob store — crashes, resume after a dead process, cancellation
//! by delete, the concurrency limit, and the tier's upload limit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chorus_actors::Node;
use chorus_actors::blob::{BlobStore, document_key};
use chorus_actors::indexer::{ChunkEmbedder, IndexerConfig};
use chorus_actors::node::DocumentsConfig;
use chorus_actors::provider::catalogue::{Catalogue, CatalogueFile};
use chorus_actors::quota::tiers::{MonthlyLimits, TierSpec, Tiers, TiersFile};
use chorus_actors::session::{SessionConfig, SessionError};
use chorus_actors::store::{
    Chunk, ChunkPosition, Document, DocumentStatus, Role, SqliteStore, Store, User, UserSettings,
};
use chrono::Utc;
use tokio::sync::Notify;
use uuid::Uuid;

struct Setup {
    node: Node,
    store: Arc<dyn Store>,
    blobs: BlobStore,
    _dir: tempfile::TempDir,
}

fn tiers(upload_max_bytes: u64) -> Arc<Tiers> {
    let free = TierSpec {
        name: "Free".into(),
        requests_per_minute: 1000,
        tokens_per_minute: 1_000_000,
        models: vec!["*".into()],
        files_per_request: 3,
        upload_max_bytes,
        monthly: MonthlyLimits::default(),
    };
    Arc::new(
        Tiers::build(TiersFile {
            default_tier: "free".into(),
            tiers: [("free".to_owned(), free)].into_iter().collect(),
        })
        .unwrap(),
    )
}

async fn start(
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    blobs: BlobStore,
    embedder: Option<Arc<dyn ChunkEmbedder>>,
) -> Setup {
    let indexer = IndexerConfig {
        concurrency: 1,
        embedder,
        ..Default::default()
    };
    start_with(dir, store, blobs, indexer, 1000).await
}

async fn start_with(
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    blobs: BlobStore,
    indexer: IndexerConfig,
    upload_max_bytes: u64,
) -> Setup {
    let sessions = SessionConfig {
        call_timeout: Duration::from_secs(5),
        tiers: tiers(upload_max_bytes),
        ..Default::default()
    };
    let empty = CatalogueFile {
        providers: Default::default(),
        models: Vec::new(),
    };
    let catalogue = Arc::new(Catalogue::build(&empty, &|_| None).unwrap());
    let documents = DocumentsConfig {
        blobs: blobs.clone(),
        indexer,
    };
    let node = Node::start_with(store.clone(), catalogue, sessions, Some(documents))
        .await
        .unwrap();
    Setup {
        node,
        store,
        blobs,
        _dir: dir,
    }
}

async fn setup(embedder: Option<Arc<dyn ChunkEmbedder>>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    start(dir, store, BlobStore::in_memory(), embedder).await
}

async fn user(store: &dyn Store) -> Uuid {
    let now = Utc::now();
    let user = User {
        id: Uuid::now_v7(),
        email: format!("{}@example.com", Uuid::new_v4().simple()),
        display_name: None,
        password_hash: "x".into(),
        tier: "free".into(),
        role: Role::User,
        settings: UserSettings::default(),
        created_at: now,
        updated_at: now,
    };
    store.create_user(&user).await.unwrap();
    user.id
}

fn pending(user_id: Uuid, text: &str) -> Document {
    let id = Uuid::now_v7();
    let now = Utc::now();
    Document {
        user_id,
        id,
        name: "notes.txt".into(),
        mime: "text/plain".into(),
        size: text.len() as i64,
        status: DocumentStatus::Pending,
        progress: 0.0,
        chunk_count: 0,
        error: None,
        blob_key: document_key(user_id, id),
        created_at: now,
        updated_at: now,
    }
}

/// Stores the blob and records the document through the user's session.
async fn upload(s: &Setup, user_id: Uuid, text: &str) -> Document {
    let doc = pending(user_id, text);
    s.blobs
        .put(&doc.blob_key, Bytes::from(text.to_owned()))
        .await
        .unwrap();
    s.node.sessions.create_document(doc.clone()).await.unwrap()
}

async fn wait_for(store: &dyn Store, doc: &Document, status: DocumentStatus) -> Document {
    for _ in 0..400 {
        if let Some(found) = store.get_document(doc.user_id, doc.id).await.unwrap()
            && found.status == status
        {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "document never became {status:?}: {:?}",
        store.get_document(doc.user_id, doc.id).await.unwrap()
    );
}

/// Panics on texts containing `PANIC`; otherwise a 2-dimensional vector per text.
struct Embedder {
    calls: AtomicUsize,
    /// When set, each call waits here first (and `entered` is notified).
    gate: Option<(Arc<Notify>, Arc<Notify>)>,
}

#[async_trait]
impl ChunkEmbedder for Embedder {
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some((entered, release)) = &self.gate {
            entered.notify_one();
            release.notified().await;
        }
        if texts.iter().any(|t| t.contains("PANIC")) {
            panic!("embedder blew up on purpose");
        }
        if texts.iter().any(|t| t.contains("REFUSE")) {
            return Err("the embedding service said no".into());
        }
        Ok(texts.iter().map(|t| vec![t.len() as f32, 1.0]).collect())
    }
}

fn embedder() -> Arc<Embedder> {
    Arc::new(Embedder {
        calls: AtomicUsize::new(0),
        gate: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn documents_become_ready_with_embedded_chunks() {
    let s = setup(Some(embedder())).await;
    let user_id = user(&*s.store).await;
    let doc = upload(&s, user_id, "First paragraph.\n\nSecond paragraph.").await;
    assert_eq!(doc.status, DocumentStatus::Pending);
    let ready = wait_for(&*s.store, &doc, DocumentStatus::Ready).await;
    assert_eq!(ready.progress, 1.0);
    assert_eq!(ready.chunk_count, 1);
    assert_eq!(ready.error, None);
    let chunks = s.store.list_chunks(user_id, doc.id).await.unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].text, "First paragraph.\n\nSecond paragraph.");
    assert_eq!(chunks[0].embedding, Some(vec![35.0, 1.0]));
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashing_indexer_fails_its_document_and_the_next_one_runs() {
    let s = setup(Some(embedder())).await;
    let user_id = user(&*s.store).await;
    let doomed = upload(&s, user_id, "PANIC in this text").await;
    let refused = upload(&s, user_id, "REFUSE this one").await;
    let fine = upload(&s, user_id, "A perfectly fine text.").await;

    let failed = wait_for(&*s.store, &doomed, DocumentStatus::Failed).await;
    let reason = failed.error.unwrap();
    assert!(
        reason.starts_with("ingestion failed unexpectedly") && reason.contains("blew up"),
        "{reason}"
    );
    let failed = wait_for(&*s.store, &refused, DocumentStatus::Failed).await;
    assert_eq!(
        failed.error.as_deref(),
        Some("embedding failed: the embedding service said no")
    );
    assert!(
        s.store
            .list_chunks(user_id, refused.id)
            .await
            .unwrap()
            .is_empty()
    );
    wait_for(&*s.store, &fine, DocumentStatus::Ready).await;
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_documents_fail_with_a_reason() {
    let s = setup(None).await;
    let user_id = user(&*s.store).await;
    let mut doc = pending(user_id, "x");
    doc.mime = "application/pdf".into();
    s.blobs
        .put(&doc.blob_key, Bytes::from_static(b"%PDF-1.4\ntruncated"))
        .await
        .unwrap();
    s.node.sessions.create_document(doc.clone()).await.unwrap();
    let failed = wait_for(&*s.store, &doc, DocumentStatus::Failed).await;
    assert!(
        failed
            .error
            .as_deref()
            .unwrap()
            .starts_with("unreadable PDF"),
        "{failed:?}"
    );

    // A row whose blob is gone fails too, instead of staying pending.
    let lost = pending(user_id, "gone");
    s.node.sessions.create_document(lost.clone()).await.unwrap();
    let failed = wait_for(&*s.store, &lost, DocumentStatus::Failed).await;
    assert_eq!(
        failed.error.as_deref(),
        Some("the uploaded file is missing from the blob store")
    );
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unfinished_documents_are_resumed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    let blobs = BlobStore::in_memory();
    let user_id = user(&*store).await;
    // What a process that died mid-ingestion left: one document processing with a stale chunk,
    // one still pending, one failed (left alone).
    let mut docs = Vec::new();
    for (status, text) in [
        (DocumentStatus::Processing, "Resumed text one."),
        (DocumentStatus::Pending, "Resumed text two."),
        (DocumentStatus::Failed, "Left alone."),
    ] {
        let doc = Document {
            status,
            progress: 0.5,
            ..pending(user_id, text)
        };
        store.create_document(&doc).await.unwrap();
        blobs
            .put(&doc.blob_key, Bytes::from(text.to_owned()))
            .await
            .unwrap();
        docs.push(doc);
    }
    let stale = Chunk {
        user_id,
        document_id: docs[0].id,
        seq: 7,
        text: "stale".into(),
        position: ChunkPosition::default(),
        token_count: 1,
        embedding: None,
    };
    assert!(
        store
            .put_chunks(user_id, docs[0].id, &[stale])
            .await
            .unwrap()
    );

    let s = start(dir, store, blobs, None).await;
    for doc in &docs[..2] {
        let ready = wait_for(&*s.store, doc, DocumentStatus::Ready).await;
        assert_eq!(ready.chunk_count, 1);
        let chunks = s.store.list_chunks(user_id, doc.id).await.unwrap();
        assert_eq!(chunks.len(), 1, "{chunks:?}");
        assert_eq!(chunks[0].seq, 0);
    }
    let left = s.store.get_document(user_id, docs[2].id).await.unwrap();
    assert_eq!(left.map(|d| d.status), Some(DocumentStatus::Failed));
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_document_stops_its_ingestion_and_frees_the_slot() {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let gated = Arc::new(Embedder {
        calls: AtomicUsize::new(0),
        gate: Some((entered.clone(), release.clone())),
    });
    let s = setup(Some(gated.clone())).await;
    let user_id = user(&*s.store).await;
    let first = upload(&s, user_id, "Held in the embedder.").await;
    tokio::time::timeout(Duration::from_secs(10), entered.notified())
        .await
        .expect("the first document reached the embedder");
    let processing = s
        .store
        .get_document(user_id, first.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(processing.status, DocumentStatus::Processing);
    // Streamed: nothing is stored before its first batch is embedded.
    assert_eq!(processing.progress, 0.05);

    // Concurrency 1: the second waits, pending, behind the first.
    let second = upload(&s, user_id, "Waits its turn.").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = s
        .store
        .get_document(user_id, second.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(waiting.status, DocumentStatus::Pending);

    s.node
        .sessions
        .delete_document(user_id, first.id)
        .await
        .unwrap();
    assert_eq!(s.store.get_document(user_id, first.id).await.unwrap(), None);
    assert!(!s.blobs.exists(&first.blob_key).await.unwrap());
    // The slot is free without releasing the embedder: the cancelled indexer has stopped.
    tokio::time::timeout(Duration::from_secs(10), entered.notified())
        .await
        .expect("the second document started");
    release.notify_one();
    wait_for(&*s.store, &second, DocumentStatus::Ready).await;
    assert!(
        s.store
            .list_chunks(user_id, first.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(gated.calls.load(Ordering::SeqCst), 2);

    assert!(matches!(
        s.node.sessions.delete_document(user_id, first.id).await,
        Err(SessionError::NotFound)
    ));
    // Another user's document is not found either.
    let other = user(&*s.store).await;
    assert!(matches!(
        s.node.sessions.delete_document(other, second.id).await,
        Err(SessionError::NotFound)
    ));
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tier_bounds_uploads() {
    let s = setup(None).await;
    let user_id = user(&*s.store).await;
    assert_eq!(s.node.sessions.upload_limit(user_id).await.unwrap(), 1000);
    let mut big = pending(user_id, "x");
    big.size = 1001;
    assert!(matches!(
        s.node.sessions.create_document(big.clone()).await,
        Err(SessionError::TooLarge { limit: 1000, .. })
    ));
    assert_eq!(s.store.get_document(user_id, big.id).await.unwrap(), None);
    s.node.shutdown().await;
}

/// Stores `bytes` as a document named `name` of type `mime`.
async fn upload_as(s: &Setup, user_id: Uuid, name: &str, mime: &str, bytes: &[u8]) -> Document {
    let mut doc = pending(user_id, "");
    doc.name = name.into();
    doc.mime = mime.into();
    doc.size = bytes.len() as i64;
    s.blobs
        .put(&doc.blob_key, Bytes::copy_from_slice(bytes))
        .await
        .unwrap();
    s.node.sessions.create_document(doc.clone()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_documents_are_streamed_in_pieces_with_the_same_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    let params = chorus_actors::indexer::chunk::ChunkParams {
        target_tokens: 60,
        overlap_tokens: 10,
    };
    let indexer = IndexerConfig {
        concurrency: 1,
        embedder: Some(embedder()),
        // Pieces and windows far smaller than the document: about 60 of each.
        piece_bytes: 4096,
        chunk: params,
        ..Default::default()
    };
    let s = start_with(dir, store, BlobStore::in_memory(), indexer, 10_000_000).await;
    let user_id = user(&*s.store).await;
    let mut markdown = String::from("\u{FEFF}# Handbook\r\n\r\n");
    for i in 0..1500 {
        markdown.push_str(&format!(
            "## Rule {i}\r\n\r\nRule {i} says: keep the ünïcödé text whole. It is streamed.\r\n\r\n"
        ));
        if i % 3 == 0 {
            markdown.push_str(&format!(
                "A second paragraph for rule {i}, a little longer than the first one.\r\n\r\n"
            ));
        }
    }
    assert!(markdown.len() > 100_000);
    let doc = upload_as(
        &s,
        user_id,
        "handbook.md",
        "text/markdown",
        markdown.as_bytes(),
    )
    .await;
    let ready = wait_for(&*s.store, &doc, DocumentStatus::Ready).await;

    // What reading it whole gives: the same chunks, positions and heading paths.
    let whole = chorus_actors::indexer::extract::extract_sync(
        chorus_actors::indexer::detect::DocumentKind::Markdown,
        markdown.as_bytes(),
        usize::MAX,
    )
    .unwrap();
    let expected = chorus_actors::indexer::chunk::chunk(&whole, &params);
    let chunks = s.store.list_chunks(user_id, doc.id).await.unwrap();
    assert_eq!(ready.chunk_count as usize, expected.len());
    assert_eq!(chunks.len(), expected.len());
    for (i, (got, want)) in chunks.iter().zip(&expected).enumerate() {
        assert_eq!(got.seq, i as i64);
        assert_eq!(got.text, want.text);
        assert_eq!(got.position, want.position);
        assert!(got.embedding.is_some());
    }
    assert_eq!(
        chunks.last().unwrap().position.heading_path,
        vec!["Handbook".to_owned(), "Rule 1499".to_owned()]
    );
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_read_whole_are_capped_and_fail_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    let indexer = IndexerConfig {
        concurrency: 1,
        piece_bytes: 256,
        max_whole_bytes: 1000,
        extract: chorus_actors::indexer::extract::ExtractConfig {
            max_text_bytes: 5000,
            ..Default::default()
        },
        ..Default::default()
    };
    let s = start_with(dir, store, BlobStore::in_memory(), indexer, 10_000_000).await;
    let user_id = user(&*s.store).await;
    let mut pdf = b"%PDF-1.4\n".to_vec();
    pdf.resize(2000, b' ');
    let doc = upload_as(&s, user_id, "big.pdf", "application/pdf", &pdf).await;
    let failed = wait_for(&*s.store, &doc, DocumentStatus::Failed).await;
    let reason = failed.error.unwrap();
    assert!(
        reason.contains("read whole, at most 1000 bytes"),
        "{reason}"
    );
    assert!(reason.contains("2000"), "{reason}");

    // JSON: an array beyond the cap streams; an object that large cannot be read whole.
    let items: Vec<String> = (0..100).map(|i| format!("{{\"n\": {i}}}")).collect();
    let array = format!("[{}]", items.join(","));
    let doc = upload_as(&s, user_id, "a.json", "application/json", array.as_bytes()).await;
    let ready = wait_for(&*s.store, &doc, DocumentStatus::Ready).await;
    assert!(ready.chunk_count >= 1);
    let text: String = s
        .store
        .list_chunks(user_id, doc.id)
        .await
        .unwrap()
        .iter()
        .map(|c| c.text.clone())
        .collect();
    assert!(text.contains("[99].n: 99"), "{text}");
    let entries: Vec<String> = (0..200).map(|i| format!("\"k{i}\": {i}")).collect();
    let object = format!("{{{}}}", entries.join(","));
    let doc = upload_as(&s, user_id, "o.json", "application/json", object.as_bytes()).await;
    let failed = wait_for(&*s.store, &doc, DocumentStatus::Failed).await;
    assert!(failed.error.unwrap().contains("JSON array"));

    // Streamed text stays under max_text_bytes too.
    let long = "Too much text. ".repeat(400);
    let doc = upload_as(&s, user_id, "long.txt", "text/plain", long.as_bytes()).await;
    let failed = wait_for(&*s.store, &doc, DocumentStatus::Failed).await;
    let reason = failed.error.unwrap();
    assert!(
        reason.contains("exceeds the limit of 5000 bytes"),
        "{reason}"
    );
    assert!(
        s.store
            .list_chunks(user_id, doc.id)
            .await
            .unwrap()
            .is_empty()
    );

    // The node goes on: a small text after them is ingested.
    let doc = upload(&s, user_id, "Still serving.").await;
    wait_for(&*s.store, &doc, DocumentStatus::Ready).await;
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_at_start_can_be_limited_to_some_users() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    let blobs = BlobStore::in_memory();
    let (here, elsewhere) = (user(&*store).await, user(&*store).await);
    let mut docs = Vec::new();
    for user_id in [here, elsewhere] {
        let doc = Document {
            status: DocumentStatus::Processing,
            ..pending(user_id, "Left unfinished.")
        };
        store.create_document(&doc).await.unwrap();
        blobs
            .put(&doc.blob_key, Bytes::from_static(b"Left unfinished."))
            .await
            .unwrap();
        docs.push(doc);
    }
    let indexer = IndexerConfig {
        concurrency: 1,
        resume_users: Some(Arc::new(move |user_id| user_id == here)),
        ..Default::default()
    };
    let s = start_with(dir, store, blobs, indexer, 1000).await;
    wait_for(&*s.store, &docs[0], DocumentStatus::Ready).await;
    // The other user's document is left for the node that is their home: a document queued
    // after the resume (one at a time, in order) is done while it is still untouched.
    let later = upload(&s, here, "Queued after the resume.").await;
    wait_for(&*s.store, &later, DocumentStatus::Ready).await;
    let other = s.store.get_document(elsewhere, docs[1].id).await.unwrap();
    assert_eq!(other.map(|d| d.status), Some(DocumentStatus::Processing));
    s.node.shutdown().await;
}
