//! The blob store: uploaded documents' bytes, on [`object_store`].
//!
//! A single node keeps blobs as files under `<data_dir>/blobs` ([`LocalFileSystem`]); a cluster
//! points every node at one S3-compatible bucket (AWS S3, MinIO, R2, …) so that any node can read
//! what another stored. Keys are partitioned by user like the tables:
//! `users/{user_id}/documents/{document_id}` ([`document_key`]).
//!
//! Uploads are streamed: [`BlobStore::writer`] returns a [`BlobWriter`] that sends parts as they
//! fill (a multipart upload on S3, a staged file locally) and makes the object visible only on
//! [`BlobWriter::finish`]. A writer dropped or aborted before that leaves no object behind.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("configuring the blob store: {0}")]
    Config(String),
    #[error("blob `{0}` not found")]
    NotFound(String),
    #[error("blob store error during {op} of `{key}`: {source}")]
    Backend {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
}

/// Where blobs live (`[documents]` in chorus.toml).
#[derive(Debug, Clone, PartialEq)]
pub enum BlobConfig {
    /// Files under `root` (created if missing).
    Local { root: PathBuf },
    /// An S3-compatible bucket.
    S3(S3Config),
}

#[derive(Clone, PartialEq)]
pub struct S3Config {
    pub bucket: String,
    /// e.g. `http://127.0.0.1:9000` for MinIO; `None`: AWS's endpoint for the region.
    pub endpoint: Option<String>,
    pub region: String,
    /// `None`: credentials from the environment / instance metadata, as the AWS SDKs find them.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Path-style URLs (`endpoint/bucket/key`), which MinIO and most S3-compatible stores need.
    pub path_style: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field(
                "access_key_id",
                &self.access_key_id.as_ref().map(|_| "<set>"),
            )
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("path_style", &self.path_style)
            .finish()
    }
}

/// The key of a document's bytes.
pub fn document_key(user_id: Uuid, document_id: Uuid) -> String {
    format!("users/{user_id}/documents/{document_id}")
}

/// Handle on the configured object store. Cheap to clone.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    /// `local` or `s3`, for logs.
    kind: &'static str,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Upload part size: S3's minimum for every part but the last.
const PART_BYTES: usize = 5 * 1024 * 1024;
/// Parts in flight per upload.
const PARTS_IN_FLIGHT: usize = 2;

impl BlobStore {
    /// Builds the store. Local: creates the root directory (blocking, at startup).
    pub fn open(config: &BlobConfig) -> Result<BlobStore, BlobError> {
        match config {
            BlobConfig::Local { root } => {
                std::fs::create_dir_all(root).map_err(|e| {
                    BlobError::Config(format!("creating blob root {}: {e}", root.display()))
                })?;
                let store = LocalFileSystem::new_with_prefix(root)
                    .map_err(|e| BlobError::Config(format!("blob root {}: {e}", root.display())))?
                    .with_automatic_cleanup(true);
                Ok(BlobStore {
                    inner: Arc::new(store),
                    kind: "local",
                })
            }
            BlobConfig::S3(s3) => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_virtual_hosted_style_request(!s3.path_style);
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                if let Some(id) = &s3.access_key_id {
                    builder = builder.with_access_key_id(id);
                }
                if let Some(secret) = &s3.secret_access_key {
                    builder = builder.with_secret_access_key(secret);
                }
                let store = builder
                    .build()
                    .map_err(|e| BlobError::Config(format!("S3 bucket `{}`: {e}", s3.bucket)))?;
                Ok(BlobStore {
                    inner: Arc::new(store),
                    kind: "s3",
                })
            }
        }
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> BlobStore {
        BlobStore {
            inner: Arc::new(object_store::memory::InMemory::new()),
            kind: "memory",
        }
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Stores `bytes` at `key` in one request (small blobs).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        let path = Path::from(key);
        self.inner
            .put(&path, bytes.into())
            .await
            .map(drop)
            .map_err(|source| backend("put", key, source))
    }

    /// Starts a streamed upload to `key`.
    pub async fn writer(&self, key: &str) -> Result<BlobWriter, BlobError> {
        let path = Path::from(key);
        let upload = self
            .inner
            .put_multipart(&path)
            .await
            .map_err(|source| backend("start upload", key, source))?;
        Ok(BlobWriter {
            key: key.to_owned(),
            upload: Some(WriteMultipart::new_with_chunk_size(upload, PART_BYTES)),
            written: 0,
        })
    }

    /// The whole blob.
    pub async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        let path = Path::from(key);
        let result = self.inner.get(&path).await.map_err(|source| match source {
            object_store::Error::NotFound { .. } => BlobError::NotFound(key.to_owned()),
            source => backend("get", key, source),
        })?;
        result
            .bytes()
            .await
            .map_err(|source| backend("read", key, source))
    }

    /// The blob's size in bytes.
    pub async fn size(&self, key: &str) -> Result<u64, BlobError> {
        match self.inner.head(&Path::from(key)).await {
            Ok(meta) => Ok(meta.size),
            Err(object_store::Error::NotFound { .. }) => Err(BlobError::NotFound(key.to_owned())),
            Err(source) => Err(backend("head", key, source)),
        }
    }

    /// Bytes `range` of the blob (one ranged read), so large blobs can be read in pieces.
    pub async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, BlobError> {
        self.inner
            .get_range(&Path::from(key), range)
            .await
            .map_err(|source| match source {
                object_store::Error::NotFound { .. } => BlobError::NotFound(key.to_owned()),
                source => backend("get range", key, source),
            })
    }

    /// Removes the blob; a blob already gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        let path = Path::from(key);
        match self.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(backend("delete", key, source)),
        }
    }

    /// Whether a blob exists at `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, BlobError> {
        match self.inner.head(&Path::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(backend("head", key, source)),
        }
    }
}

fn backend(op: &'static str, key: &str, source: object_store::Error) -> BlobError {
    BlobError::Backend {
        op,
        key: key.to_owned(),
        source,
    }
}

/// A streamed upload in progress. The object appears only on [`BlobWriter::finish`].
pub struct BlobWriter {
    key: String,
    upload: Option<WriteMultipart>,
    written: u64,
}

impl BlobWriter {
    /// Appends bytes, waiting while too many parts are in flight.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        let Some(upload) = self.upload.as_mut() else {
            return Err(BlobError::Config("upload already finished".into()));
        };
        upload
            .wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .map_err(|source| backend("upload", &self.key, source))?;
        upload.write(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Completes the upload; the object is visible from now on.
    pub async fn finish(mut self) -> Result<u64, BlobError> {
        let Some(upload) = self.upload.take() else {
            return Err(BlobError::Config("upload already finished".into()));
        };
        upload
            .finish()
            .await
            .map_err(|source| backend("finish upload", &self.key, source))?;
        Ok(self.written)
    }

    /// Abandons the upload; nothing is left at the key.
    pub async fn abort(mut self) {
        if let Some(upload) = self.upload.take()
            && let Err(e) = upload.abort().await
        {
            tracing::warn!(key = %self.key, error = %e, "aborting a blob upload failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_blobs_stream_in_and_delete_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let store = BlobStore::open(&BlobConfig::Local { root: root.clone() }).unwrap();
        let key = document_key(Uuid::nil(), Uuid::max());

        let mut writer = store.writer(&key).await.unwrap();
        writer.write(b"hello ").await.unwrap();
        writer.write(b"world").await.unwrap();
        assert!(
            !store.exists(&key).await.unwrap(),
            "visible only once finished"
        );
        assert_eq!(writer.finish().await.unwrap(), 11);
        assert_eq!(
            store.get(&key).await.unwrap(),
            Bytes::from_static(b"hello world")
        );
        let file = root.join(&key);
        assert!(file.is_file(), "{}", file.display());

        store.delete(&key).await.unwrap();
        assert!(!file.exists());
        assert!(matches!(store.get(&key).await, Err(BlobError::NotFound(_))));
        // Deleting again is fine.
        store.delete(&key).await.unwrap();
    }

    #[tokio::test]
    async fn an_aborted_upload_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let store = BlobStore::open(&BlobConfig::Local { root: root.clone() }).unwrap();
        let key = document_key(Uuid::nil(), Uuid::nil());
        let mut writer = store.writer(&key).await.unwrap();
        writer.write(&[7u8; 1000]).await.unwrap();
        writer.abort().await;
        assert!(!store.exists(&key).await.unwrap());
        let leftovers: Vec<_> = walk(&root);
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    #[test]
    fn s3_config_needs_no_network_and_hides_secrets() {
        let config = S3Config {
            bucket: "docs".into(),
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: "us-east-1".into(),
            access_key_id: Some("minio".into()),
            secret_access_key: Some("very-secret".into()),
            path_style: true,
        };
        assert!(!format!("{config:?}").contains("very-secret"));
        let store = BlobStore::open(&BlobConfig::S3(config)).unwrap();
        assert_eq!(store.kind(), "s3");
    }
}
