//! Documents: multipart upload (typed from content and name, bounded by the tier), ingestion of
//! every format to `ready` with the expected chunks, hostile files failing cleanly, progress,
//! delete (row, chunks and blob), and isolation between users.
//!
//! Fixtures live in `tests/fixtures/documents/` (binary ones built by `make_fixtures.py` there).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chorus_actors::store::{Chunk, Store};
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{Session, TestApp, assert_corpus_passage_cited, assert_error, body_json};

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/documents")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

const BOUNDARY: &str = "chorus-test-boundary-7d1e";

/// A multipart/form-data body with one file field.
fn multipart(field: &str, file_name: &str, bytes: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; \
         filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn multipart_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

async fn upload_raw(app: &TestApp, token: &str, name: &str, bytes: &[u8]) -> Response {
    app.send_raw(
        Method::POST,
        "/api/v1/documents",
        Some(token),
        Some(&multipart_type()),
        multipart("file", name, bytes),
    )
    .await
}

/// Uploads; asserts 202 and the `pending` answer; returns the document id.
pub(crate) async fn upload(app: &TestApp, token: &str, name: &str, bytes: &[u8]) -> String {
    let response = upload_raw(app, token, name, bytes).await;
    let status = response.status();
    let body = body_json(response).await;
    assert_eq!(status, StatusCode::ACCEPTED, "upload {name}: {body}");
    let document = &body["document"];
    assert_eq!(document["name"], name, "{body}");
    assert_eq!(document["status"], "pending", "{body}");
    assert_eq!(document["size"], bytes.len(), "{body}");
    document["id"].as_str().expect("document id").to_owned()
}

async fn get_document(app: &TestApp, token: &str, id: &str) -> Value {
    app.get_ok(&format!("/api/v1/documents/{id}"), token).await["document"].clone()
}

/// Polls until the document is `ready` or `failed`; returns it.
async fn settled(app: &TestApp, token: &str, id: &str) -> Value {
    let started = Instant::now();
    loop {
        let document = get_document(app, token, id).await;
        if document["status"] == "ready" || document["status"] == "failed" {
            return document;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "document {id} never settled: {document}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

pub(crate) async fn ready(app: &TestApp, token: &str, id: &str) -> Value {
    let document = settled(app, token, id).await;
    assert_eq!(document["status"], "ready", "{document}");
    assert_eq!(document["progress"], 1.0, "{document}");
    assert!(document.get("error").is_none(), "{document}");
    document
}

async fn failed(app: &TestApp, token: &str, id: &str) -> String {
    let document = settled(app, token, id).await;
    assert_eq!(document["status"], "failed", "{document}");
    assert_eq!(document["chunks"], 0, "{document}");
    document["error"]
        .as_str()
        .unwrap_or_else(|| panic!("a failed document has a reason: {document}"))
        .to_owned()
}

async fn chunks(app: &TestApp, user: &Session, id: &str) -> Vec<Chunk> {
    app.store()
        .await
        .list_chunks(user.user_uuid(), Uuid::parse_str(id).unwrap())
        .await
        .unwrap()
}

fn paths(chunks: &[Chunk]) -> Vec<Vec<String>> {
    chunks
        .iter()
        .map(|c| c.position.heading_path.clone())
        .collect()
}

fn blob_path(app: &TestApp, user: &Session, id: &str) -> PathBuf {
    app.data_dir
        .path()
        .join("blobs/users")
        .join(&user.user_id)
        .join("documents")
        .join(id)
}

/// Every file under `<data_dir>/blobs`.
fn blob_files(app: &TestApp) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&app.data_dir.path().join("blobs"), &mut files);
    files
}

async fn listed_ids(app: &TestApp, token: &str) -> Vec<String> {
    let page = app.get_ok("/api/v1/documents?limit=100", token).await;
    page["documents"]
        .as_array()
        .unwrap_or_else(|| panic!("no documents array: {page}"))
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn each_format_is_ingested_with_its_structure() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let token = user.token();

    let md = upload(&app, token, "guide.md", &fixture("guide.md")).await;
    let txt = upload(&app, token, "notes.txt", &fixture("notes.txt")).await;
    let html = upload(&app, token, "page.html", &fixture("page.html")).await;
    let csv = upload(&app, token, "people.csv", &fixture("people.csv")).await;
    let json = upload(&app, token, "records.json", &fixture("records.json")).await;
    let pdf = upload(&app, token, "report.pdf", &fixture("report.pdf")).await;
    let docx = upload(&app, token, "letter.docx", &fixture("letter.docx")).await;

    // Markdown: one chunk per section, headings as paths; `#` inside a code fence is code.
    let doc = ready(&app, token, &md).await;
    assert_eq!(doc["mime"], "text/markdown");
    assert_eq!(doc["chunks"], 3, "{doc}");
    let got = chunks(&app, &user, &md).await;
    assert_eq!(
        paths(&got),
        vec![
            strings(&["Chorus guide"]),
            strings(&["Chorus guide", "Install"]),
            strings(&["Chorus guide", "Use"]),
        ]
    );
    assert!(got[1].text.contains("# not a heading"), "{:?}", got[1].text);
    let source = String::from_utf8(fixture("guide.md")).unwrap();
    for c in &got {
        // Plain text and Markdown positions index the file itself.
        let slice: String = source
            .chars()
            .skip(c.position.char_start as usize)
            .take((c.position.char_end - c.position.char_start) as usize)
            .collect();
        assert_eq!(slice, c.text);
        assert!(c.token_count > 0 && c.embedding.is_none(), "{c:?}");
    }

    // Plain text: `#` is just text.
    let doc = ready(&app, token, &txt).await;
    assert_eq!(
        (doc["mime"].as_str(), doc["chunks"].as_i64()),
        (Some("text/plain"), Some(1))
    );
    let got = chunks(&app, &user, &txt).await;
    assert!(got[0].position.heading_path.is_empty());

    // HTML: text only, headings kept as structure.
    let doc = ready(&app, token, &html).await;
    assert_eq!(doc["chunks"], 2, "{doc}");
    let got = chunks(&app, &user, &html).await;
    assert_eq!(
        paths(&got),
        vec![
            strings(&["Supported formats"]),
            strings(&["Supported formats", "Binary formats"]),
        ]
    );
    assert!(got.iter().all(|c| !c.text.contains("console.log")
        && !c.text.contains("font-family")
        && !c.text.contains('<')));
    assert!(
        got[0].text.contains("Chorus reads HTML pages as text only"),
        "{got:?}"
    );

    // CSV: a readable line per record.
    let doc = ready(&app, token, &csv).await;
    assert_eq!(
        (doc["mime"].as_str(), doc["chunks"].as_i64()),
        (Some("text/csv"), Some(1))
    );
    let got = chunks(&app, &user, &csv).await;
    assert_eq!(
        got[0].text,
        "name: Ada Lovelace; role: engineer; team: analytics\n\n\
         name: Grace Hopper; role: admiral; team: compilers\n\n\
         name: Hopper, Jr.; team: quoted, field"
    );

    // JSON: flattened paths.
    let doc = ready(&app, token, &json).await;
    assert_eq!(doc["chunks"], 1, "{doc}");
    let got = chunks(&app, &user, &json).await;
    for line in [
        "formats[6]: docx",
        "limits.chunk_target_tokens: 400",
        "project: Chorus",
    ] {
        assert!(got[0].text.contains(line), "{line} in {:?}", got[0].text);
    }

    // PDF: the text layer, a chunk per page with its number.
    let doc = ready(&app, token, &pdf).await;
    assert_eq!(doc["mime"], "application/pdf");
    assert_eq!(doc["chunks"], 2, "{doc}");
    let got = chunks(&app, &user, &pdf).await;
    let pages: Vec<Option<u32>> = got.iter().map(|c| c.position.page).collect();
    assert_eq!(pages, vec![Some(1), Some(2)]);
    assert!(
        got[0]
            .text
            .contains("Quarterly report of the Chorus project"),
        "{got:?}"
    );
    assert!(
        got[1].text.contains("Page two lists the supported formats"),
        "{got:?}"
    );

    // DOCX: paragraphs and heading styles (the title joins the first section).
    let doc = ready(&app, token, &docx).await;
    assert_eq!(
        doc["mime"],
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    );
    assert_eq!(doc["chunks"], 2, "{doc}");
    let got = chunks(&app, &user, &docx).await;
    assert_eq!(
        paths(&got),
        vec![strings(&["Welcome"]), strings(&["Welcome", "Next steps"])]
    );
    assert!(
        got[0].text.starts_with("# Letter to the team\n\n# Welcome"),
        "{got:?}"
    );
    assert!(
        got[0]
            .text
            .contains("the Chorus project & its documents work."),
        "{got:?}"
    );

    // Listed newest first, blobs on disk under the data dir.
    let all = [&docx, &pdf, &json, &csv, &html, &txt, &md];
    assert_eq!(listed_ids(&app, token).await, all.map(|s| s.to_string()));
    for id in all {
        assert!(blob_path(&app, &user, id).is_file(), "blob of {id}");
    }
}

#[tokio::test]
async fn lists_page_with_a_cursor() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(upload(&app, user.token(), &format!("n{i}.txt"), b"some text").await);
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut path = "/api/v1/documents?limit=2".to_owned();
    loop {
        let page = app.get_ok(&path, user.token()).await;
        let documents = page["documents"].as_array().unwrap();
        assert!(documents.len() <= 2);
        seen.extend(
            documents
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/documents?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    let bad = app
        .get("/api/v1/documents?cursor=not-a-cursor", user.token())
        .await;
    assert_error(bad, 400, "VALIDATION_ERROR").await;
}

#[tokio::test]
async fn hostile_files_fail_cleanly_and_the_server_keeps_serving() {
    let app = TestApp::builder()
        // Deterministic whether or not this machine has tesseract.
        .env("CHORUS__DOCUMENTS__OCR_TESSERACT", "/nonexistent/tesseract")
        .spawn()
        .await;
    let user = app.register_user().await;
    let token = user.token();

    let truncated = upload(&app, token, "truncated.pdf", &fixture("truncated.pdf")).await;
    let bomb = upload(&app, token, "bomb.docx", &fixture("bomb.docx")).await;
    let scan = upload(&app, token, "scan.png", &fixture("scan.png")).await;
    let scanned = upload(&app, token, "scanned.pdf", &fixture("scanned.pdf")).await;
    let ok = upload(&app, token, "notes.txt", &fixture("notes.txt")).await;

    let reason = failed(&app, token, &truncated).await;
    assert!(reason.starts_with("unreadable PDF"), "{reason}");
    let reason = failed(&app, token, &bomb).await;
    assert!(
        reason.starts_with("rejected as a possible zip bomb"),
        "{reason}"
    );
    let reason = failed(&app, token, &scan).await;
    assert_eq!(
        reason,
        "an image has no text layer; OCR needs tesseract-ocr installed"
    );
    let reason = failed(&app, token, &scanned).await;
    assert_eq!(reason, "no text layer; OCR needs tesseract-ocr installed");
    for id in [&truncated, &bomb, &scan, &scanned] {
        assert!(chunks(&app, &user, id).await.is_empty());
    }
    ready(&app, token, &ok).await;
    let health = app.get_anon("/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);
}

/// Needs `tesseract` and `pdftoppm` on the PATH (`apt-get install tesseract-ocr poppler-utils`;
/// `.ci/run` installs them).
#[tokio::test]
async fn scanned_pdfs_are_read_with_ocr() {
    for tool in ["tesseract", "pdftoppm"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "`{tool}` is not installed: apt-get install tesseract-ocr poppler-utils"
        );
    }
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let id = upload(&app, user.token(), "scanned.pdf", &fixture("scanned.pdf")).await;
    let document = ready(&app, user.token(), &id).await;
    assert_eq!(document["chunks"], 1, "{document}");
    let got = chunks(&app, &user, &id).await;
    assert_eq!(got[0].position.page, Some(1));
    // OCR may differ in white space between versions; the words are what matter.
    let words: Vec<&str> = got[0].text.split_whitespace().collect();
    assert_eq!(
        words.join(" "),
        "Quarterly report of the Chorus project. Page one describes the ingestion pipeline."
    );
}

#[tokio::test]
async fn progress_is_visible_and_chunks_follow_the_configured_size() {
    let app = TestApp::builder()
        .env("CHORUS__DOCUMENTS__CHUNK_TARGET_TOKENS", "64")
        .env("CHORUS__DOCUMENTS__CHUNK_OVERLAP_TOKENS", "0")
        .spawn()
        .await;
    let user = app.register_user().await;
    // 300 paragraphs of 33..=64 tokens each: no two fit one chunk, none needs splitting.
    let paragraphs: Vec<String> = (0..300)
        .map(|i| {
            format!(
                "Paragraph {i} of the progress test talks about chunking, batching and the \
                 progress field that clients poll while the node ingests a document, and it \
                 checks that no chunk ever mixes two of these paragraphs."
            )
        })
        .collect();
    let text = paragraphs.join("\n\n");
    let id = upload(&app, user.token(), "long.txt", text.as_bytes()).await;

    let started = Instant::now();
    let mut seen: Vec<(String, f64)> = Vec::new();
    let document = loop {
        let document = get_document(&app, user.token(), &id).await;
        let status = document["status"].as_str().unwrap().to_owned();
        let progress = document["progress"].as_f64().unwrap();
        seen.push((status.clone(), progress));
        if status == "ready" || status == "failed" {
            break document;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{seen:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(document["status"], "ready", "{document}");
    // Tokenizing 300 paragraphs takes far longer than one poll: the work in progress shows.
    assert!(
        seen.iter()
            .any(|(s, p)| s == "processing" && *p > 0.0 && *p < 1.0),
        "{seen:?}"
    );
    // Statuses move forward only, progress never goes back and stays within 0..=1.
    let rank = |s: &str| match s {
        "pending" => 0,
        "processing" => 1,
        "ready" => 2,
        other => panic!("unexpected status {other}"),
    };
    for pair in seen.windows(2) {
        assert!(rank(&pair[0].0) <= rank(&pair[1].0), "{seen:?}");
        assert!(pair[0].1 <= pair[1].1, "{seen:?}");
    }
    assert!(
        seen.iter().all(|(_, p)| (0.0..=1.0).contains(p)),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|(s, p)| (s == "ready") == (*p == 1.0)),
        "1.0 means ready: {seen:?}"
    );

    assert_eq!(document["chunks"], 300, "{document}");
    let got = chunks(&app, &user, &id).await;
    let texts: Vec<&str> = got.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(
        texts,
        paragraphs.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(
        got.iter().all(|c| (33..=64).contains(&c.token_count)),
        "{got:?}"
    );
    let seqs: Vec<i64> = got.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (0..300).collect::<Vec<_>>());
}

#[tokio::test]
async fn delete_removes_the_row_the_chunks_and_the_blob() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let token = user.token();
    let id = upload(&app, token, "guide.md", &fixture("guide.md")).await;
    let kept = upload(&app, token, "notes.txt", &fixture("notes.txt")).await;
    ready(&app, token, &id).await;
    ready(&app, token, &kept).await;
    let blob = blob_path(&app, &user, &id);
    assert!(blob.is_file());
    assert_eq!(chunks(&app, &user, &id).await.len(), 3);

    let response = app.delete(&format!("/api/v1/documents/{id}"), token).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_error(
        app.get(&format!("/api/v1/documents/{id}"), token).await,
        404,
        "NOT_FOUND",
    )
    .await;
    assert_eq!(listed_ids(&app, token).await, vec![kept.clone()]);
    assert!(chunks(&app, &user, &id).await.is_empty());
    assert!(!blob.exists(), "{} still exists", blob.display());
    // The other document is untouched.
    assert!(blob_path(&app, &user, &kept).is_file());
    assert_eq!(chunks(&app, &user, &kept).await.len(), 1);

    assert_error(
        app.delete(&format!("/api/v1/documents/{id}"), token).await,
        404,
        "NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn delete_during_ingestion_leaves_nothing_behind() {
    let app = TestApp::builder()
        .env("CHORUS__DOCUMENTS__CHUNK_TARGET_TOKENS", "16")
        .env("CHORUS__DOCUMENTS__CHUNK_OVERLAP_TOKENS", "0")
        .spawn()
        .await;
    let user = app.register_user().await;
    let text = "A sentence to chunk into many small pieces. ".repeat(3000);
    let id = upload(&app, user.token(), "big.txt", text.as_bytes()).await;
    let response = app
        .delete(&format!("/api/v1/documents/{id}"), user.token())
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    // Whatever stage the ingestion had reached, nothing of the document remains, and the node
    // still ingests other documents.
    let next = upload(&app, user.token(), "notes.txt", &fixture("notes.txt")).await;
    ready(&app, user.token(), &next).await;
    assert!(chunks(&app, &user, &id).await.is_empty());
    assert!(!blob_path(&app, &user, &id).exists());
    assert_eq!(listed_ids(&app, user.token()).await, vec![next]);
}

#[tokio::test]
async fn other_users_cannot_see_or_delete_a_document() {
    let app = TestApp::spawn().await;
    let alice = app.register_user().await;
    let mallory = app.register_user().await;
    let id = upload(&app, alice.token(), "notes.txt", &fixture("notes.txt")).await;

    assert_error(
        app.get(&format!("/api/v1/documents/{id}"), mallory.token())
            .await,
        404,
        "NOT_FOUND",
    )
    .await;
    assert!(listed_ids(&app, mallory.token()).await.is_empty());
    assert_error(
        app.delete(&format!("/api/v1/documents/{id}"), mallory.token())
            .await,
        404,
        "NOT_FOUND",
    )
    .await;
    assert_error(
        app.get("/api/v1/documents/not-a-uuid", mallory.token())
            .await,
        404,
        "NOT_FOUND",
    )
    .await;
    // Alice still has it, whole.
    ready(&app, alice.token(), &id).await;
    assert!(blob_path(&app, &alice, &id).is_file());
    // And anonymous requests are refused.
    let anon = app
        .send_raw(
            Method::POST,
            "/api/v1/documents",
            None,
            Some(&multipart_type()),
            multipart("file", "a.txt", b"x"),
        )
        .await;
    assert_error(anon, 401, "UNAUTHENTICATED").await;
}

const SMALL_TIERS: &str = r#"
default_tier = "free"

[tiers.free]
name = "Free"
requests_per_minute = 100000
tokens_per_minute = 1000000000
models = ["*"]
files_per_request = 3
upload_max_bytes = 1000

[tiers.pro]
name = "Pro"
requests_per_minute = 100000
tokens_per_minute = 1000000000
models = ["*"]
files_per_request = 10
upload_max_bytes = 3000000
"#;

#[tokio::test]
async fn uploads_beyond_the_tier_limit_are_413() {
    let app = TestApp::builder().tiers_toml(SMALL_TIERS).spawn().await;
    let user = app.register_user().await;
    let token = user.token();

    // Exactly the limit is fine; one byte more is not.
    upload(&app, token, "limit.txt", &[b'a'; 1000]).await;
    let over = upload_raw(&app, token, "over.txt", &[b'a'; 1001]).await;
    let error = assert_error(over, 413, "PAYLOAD_TOO_LARGE").await;
    assert_eq!(error["details"]["limit_bytes"], 1000, "{error}");

    // Far beyond it, refused from Content-Length before reading.
    let huge = upload_raw(&app, token, "huge.txt", &vec![b'a'; 100 * 1024]).await;
    assert_error(huge, 413, "PAYLOAD_TOO_LARGE").await;

    // Without Content-Length (chunked), refused while streaming.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        multipart("file", "chunked.txt", &[b'b'; 3000])
            .chunks(500)
            .map(|c| Ok(c.to_vec()))
            .collect();
    let chunked = app
        .unpooled_request(Method::POST, "/api/v1/documents")
        .bearer_auth(token)
        .header("content-type", multipart_type())
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    assert_error(chunked, 413, "PAYLOAD_TOO_LARGE").await;

    // Nothing of the refused uploads was kept.
    assert_eq!(listed_ids(&app, token).await.len(), 1);
    assert_eq!(blob_files(&app).len(), 1, "{:?}", blob_files(&app));

    // A bigger plan uploads more than the server's JSON body limit (1 MiB).
    let pro = app.register_admin().await;
    let patched = app
        .patch_json(
            &format!("/api/v1/admin/users/{}", user.user_id),
            pro.token(),
            &serde_json::json!({ "tier": "pro" }),
        )
        .await;
    assert_eq!(patched.status(), StatusCode::OK);
    let big = "word ".repeat(250_000);
    upload(&app, token, "big.txt", big.as_bytes()).await;
}

#[tokio::test]
async fn unreadable_or_malformed_uploads_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let token = user.token();

    for (name, bytes, what) in [
        (
            "program",
            &b"\x7fELF\x02\x01\x01\0\0\0\0\0"[..],
            "neither a known binary format",
        ),
        ("report.pdf", &b"just some text"[..], "is not a PDF"),
        (
            "archive.docx",
            &b"PK\x03\x04\x14\0\0\0other.txt"[..],
            "not a Word document",
        ),
        ("latin1.txt", &b"caf\xe9 au lait"[..], "UTF-8"),
        ("sheet.xlsx", &b"a,b"[..], "cannot be read"),
    ] {
        let response = upload_raw(&app, token, name, bytes).await;
        let error = assert_error(response, 415, "UNSUPPORTED_MEDIA_TYPE").await;
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(what), "{name}: {message}");
    }

    // Not multipart at all.
    let json = app
        .post_json("/api/v1/documents", Some(token), &serde_json::json!({}))
        .await;
    assert_error(json, 415, "UNSUPPORTED_MEDIA_TYPE").await;
    // No file, an empty file, a file without a name, two files, another field.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (format!("--{BOUNDARY}--\r\n").into_bytes(), "missing"),
        (multipart("file", "empty.txt", b""), "empty"),
        (multipart("file", "", b"text"), "file name"),
        (
            [
                multipart("file", "a.txt", b"one")
                    .strip_suffix(format!("--{BOUNDARY}--\r\n").as_bytes())
                    .unwrap()
                    .to_vec(),
                multipart("file", "b.txt", b"two"),
            ]
            .concat(),
            "one file",
        ),
        (
            multipart("attachment", "a.txt", b"x"),
            "unexpected multipart field",
        ),
        (b"--wrong-boundary\r\n\r\n".to_vec(), "malformed multipart"),
    ];
    for (body, what) in cases {
        let response = app
            .send_raw(
                Method::POST,
                "/api/v1/documents",
                Some(token),
                Some(&multipart_type()),
                body,
            )
            .await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(what), "{what}: {message}");
    }

    assert!(listed_ids(&app, token).await.is_empty());
    assert!(blob_files(&app).is_empty(), "{:?}", blob_files(&app));
}

/// The all-MiniLM-L6-v2 files `scripts/fetch-minilm` installs (`.ci/run` runs it).
pub(crate) fn minilm_dir() -> String {
    std::env::var("CHORUS_MINILM_DIR").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/data/models/all-MiniLM-L6-v2").to_owned()
    })
}

pub(crate) fn jsonl(name: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/retrieval")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The shipped corpus as one Markdown document, a section per passage (one chunk each, its
/// heading path ending in the passage id).
pub(crate) fn corpus_markdown(passages: &[Value]) -> String {
    let mut markdown = String::from("# Corpus\n\n");
    for p in passages {
        markdown.push_str(&format!(
            "## {}\n\n{}\n\n",
            p["id"].as_str().unwrap(),
            p["text"].as_str().unwrap()
        ));
    }
    markdown
}

async fn search(app: &TestApp, token: &str, body: &Value) -> Response {
    app.post_json("/api/v1/search", Some(token), body).await
}

#[tokio::test]
async fn questions_about_an_uploaded_document_find_their_passage_in_the_top_3() {
    let dir = minilm_dir();
    assert!(
        Path::new(&dir).join("model.safetensors").exists(),
        "the local embedding model is missing in {dir}: run scripts/fetch-minilm"
    );
    let app = TestApp::builder()
        .env("CHORUS__EMBEDDINGS__LOCAL_MODEL_DIR", &dir)
        .spawn()
        .await;
    let owner = app.register_user().await;
    let token = owner.token();

    let passages = jsonl("passages.jsonl");
    let markdown = corpus_markdown(&passages);
    let id = upload(&app, token, "corpus.md", markdown.as_bytes()).await;
    let document = ready(&app, token, &id).await;
    assert_eq!(document["chunks"], passages.len(), "{document}");

    let questions = jsonl("questions.jsonl");
    let mut found = 0;
    for q in &questions {
        let response = search(&app, token, &json!({ "query": q["question"], "top_k": 3 })).await;
        let body = body_json(response).await;
        assert_eq!(body["mode"], "hybrid", "{body}");
        let results = body["results"].as_array().unwrap();
        assert!(!results.is_empty() && results.len() <= 3, "{body}");
        for r in results {
            assert_eq!(r["document_id"], id.as_str());
            assert_eq!(r["document_name"], "corpus.md");
            assert!(!r["text"].as_str().unwrap().is_empty());
        }
        let answer = q["answer"].as_str().unwrap();
        if results.iter().any(|r| {
            r["position"]["heading_path"]
                .as_array()
                .and_then(|path| path.last())
                .is_some_and(|h| h == answer)
        }) {
            found += 1;
        }
    }
    // Every question: score fusion (0.7 × cosine + 0.3 × BM25, each normalised) keeps the
    // vectors' answer on top when a question shares no word with its passage ("money back" /
    // "refund"), where reciprocal rank fusion found 25 of 28 (load-tests/README.md, retrieval);
    // the answers lead the 4th result by at least 0.23 of the fused score.
    assert_eq!(
        found,
        questions.len(),
        "recall@3 {found} of {}",
        questions.len()
    );

    // A search restricted to the document, and the searches counted as RAG queries.
    let response = search(
        &app,
        token,
        &json!({ "query": "espresso pressure", "document_ids": [id] }),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let usage = app.get_ok("/api/v1/me/usage", token).await;
    assert_eq!(usage["used"]["rag_queries"], questions.len() + 1, "{usage}");

    // Another user can neither search it nor see it in their own results.
    let other = app.register_user().await;
    let response = search(
        &app,
        other.token(),
        &json!({ "query": "espresso pressure", "document_ids": [id] }),
    )
    .await;
    assert_error(response, 404, "NOT_FOUND").await;
    let body = body_json(
        search(
            &app,
            other.token(),
            &json!({ "query": "espresso pressure" }),
        )
        .await,
    )
    .await;
    assert_eq!(body["results"], json!([]), "{body}");
    // Bad input changes nothing and says what is wrong.
    let response = search(&app, token, &json!({ "query": "  " })).await;
    assert_error(response, 400, "VALIDATION_ERROR").await;
    let response = search(&app, token, &json!({ "query": "x", "top_k": 0 })).await;
    assert_error(response, 400, "VALIDATION_ERROR").await;
}

#[tokio::test]
async fn without_an_embedder_search_is_lexical_and_says_so() {
    let app = TestApp::builder()
        .env("CHORUS__EMBEDDINGS__KIND", "none")
        .spawn()
        .await;
    let user = app.register_user().await;
    let token = user.token();
    let id = upload(
        &app,
        token,
        "notes.md",
        b"# Notes\n\n## Coffee\n\nEspresso is brewed at nine bar.\n\n## Bread\n\nSourdough needs a starter.\n",
    )
    .await;
    ready(&app, token, &id).await;
    let body = body_json(search(&app, token, &json!({ "query": "sourdough starter" })).await).await;
    assert_eq!(body["mode"], "lexical", "{body}");
    assert_eq!(
        body["results"][0]["position"]["heading_path"],
        json!(["Notes", "Bread"]),
        "{body}"
    );
}

/// A mock model whose window is too small for the shipped corpus whole, and one that fits it.
pub(crate) const RAG_MODELS: &str = r#"
[providers.mock]
kind = "mock"

[[models]]
id = "mock-small"
name = "Mock echo with a small window"
provider = "mock"
upstream = "echo"
context_length = 1000
input_per_mtok = 0.0
output_per_mtok = 0.0
capabilities = ["chat", "stream"]
tiers = ["free", "pro", "enterprise"]
max_output_tokens = 100

[[models]]
id = "mock-large"
name = "Mock echo with a large window"
provider = "mock"
upstream = "echo"
context_length = 100000
input_per_mtok = 0.0
output_per_mtok = 0.0
capabilities = ["chat", "stream"]
tiers = ["free", "pro", "enterprise"]
max_output_tokens = 100
"#;

#[tokio::test]
async fn documents_attached_to_a_message_come_back_as_citations() {
    let app = TestApp::builder()
        .models_toml(RAG_MODELS)
        .env("CHORUS__EMBEDDINGS__LOCAL_MODEL_DIR", &minilm_dir())
        .spawn()
        .await;
    let owner = app.register_user().await;
    let token = owner.token();
    let passages = jsonl("passages.jsonl");
    let markdown = corpus_markdown(&passages);
    let id = upload(&app, token, "corpus.md", markdown.as_bytes()).await;
    ready(&app, token, &id).await;
    let thread = crate::helpers::id_of(&app.create_thread(token, &json!({ "title": "rag" })).await);
    let send = |model: &'static str, ids: Value| {
        let app = &app;
        let thread = thread.clone();
        async move {
            app.post_json(
                &format!("/api/v1/threads/{thread}/messages"),
                Some(token),
                &json!({
                    "content": "How often should I feed my sourdough starter?",
                    "model": model,
                    "document_ids": ids,
                    "stream": false,
                }),
            )
            .await
        }
    };

    // Too big for the small window: the best passages are retrieved, the right one among them.
    let body = body_json(send("mock-small", json!([id])).await).await;
    let answer = &body["assistant_messages"][0];
    assert_eq!(answer["status"], "complete", "{body}");
    assert_corpus_passage_cited(answer, &id);
    // Stored with the message: reading the thread back returns them.
    let messages = app
        .get_ok(&format!("/api/v1/threads/{thread}/messages"), token)
        .await;
    let stored = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == answer["id"])
        .cloned()
        .unwrap();
    assert_eq!(stored["citations"], answer["citations"]);

    // Small enough for the large window: sent whole, every passage in order.
    let body = body_json(send("mock-large", json!([id])).await).await;
    let citations = body["assistant_messages"][0]["citations"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(citations.len(), passages.len(), "{body}");
    assert_eq!(citations[0]["position"]["heading_path"][1], "p01");

    // Both counted against the RAG limit.
    let usage = app.get_ok("/api/v1/me/usage", token).await;
    assert_eq!(usage["used"]["rag_queries"], 2, "{usage}");

    // Another user cannot attach it: 404 naming the document, and nothing stored.
    let other = app.register_user().await;
    let their_thread = crate::helpers::id_of(&app.create_thread(other.token(), &json!({})).await);
    let response = app
        .post_json(
            &format!("/api/v1/threads/{their_thread}/messages"),
            Some(other.token()),
            &json!({ "content": "hi", "model": "mock-small", "document_ids": [id], "stream": false }),
        )
        .await;
    let error = assert_error(response, 404, "NOT_FOUND").await;
    assert!(
        error["message"].as_str().unwrap().contains("document"),
        "{error}"
    );
    let theirs = app
        .get_ok(
            &format!("/api/v1/threads/{their_thread}/messages"),
            other.token(),
        )
        .await;
    assert_eq!(theirs["messages"], json!([]), "{theirs}");
}
