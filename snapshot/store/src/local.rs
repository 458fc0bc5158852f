//! A store in a local directory (`file:///abs/path`): the same layout as in S3, one file per
//! object. Writes are atomic (temporary file, then rename) and durable: each written object and
//! its directory are fsynced before `put` returns, so a manifest written after its chunks never
//! outlives them in a crash (object_store's local backend does not sync).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::local::LocalFileSystem;

use crate::backend::ObjectBackend;
use crate::error::{io_err, Result};
use crate::redact::Secrets;

pub struct LocalStore(ObjectBackend);

impl LocalStore {
    /// A store rooted at `root` (absolute). With `create`, a missing root is made 0700: the
    /// objects are guest memory, for nobody else to read.
    pub fn new(root: &Path, create: bool) -> Result<Self> {
        if create && !root.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(io_err("create store directory", root))?;
        }
        let prefix = root.to_string_lossy().trim_matches('/').to_string();
        Ok(LocalStore(ObjectBackend {
            inner: Arc::new(LocalFileSystem::new()),
            prefix,
            label: format!("file://{}", root.display()),
            secrets: Secrets::default(),
        }))
    }

    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/{}", self.0.prefix))
    }
}

impl LocalStore {
    /// fsyncs the object file at `key` and the directory holding it.
    async fn sync(&self, key: &str) -> Result<()> {
        let path = self.root().join(key);
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&path)
                .and_then(|file| file.sync_all())
                .map_err(io_err("sync", &path))?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)
                    .and_then(|dir_file| dir_file.sync_all())
                    .map_err(io_err("sync directory", dir))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| crate::error::StoreError::Task(e.to_string()))?
    }
}

#[async_trait::async_trait]
impl crate::store::Store for LocalStore {
    async fn put(&self, key: &str, bytes: bytes::Bytes) -> Result<()> {
        self.0.put(key, bytes).await?;
        self.sync(key).await
    }
    async fn put_new(&self, key: &str, bytes: bytes::Bytes) -> Result<bool> {
        let written = self.0.put_new(key, bytes).await?;
        if written {
            self.sync(key).await?;
        }
        Ok(written)
    }
    async fn get(&self, key: &str, max_len: u64) -> Result<bytes::Bytes> {
        self.0.get(key, max_len).await
    }
    async fn head(&self, key: &str) -> Result<Option<crate::store::ObjectInfo>> {
        self.0.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<crate::store::ObjectInfo>> {
        self.0.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.0.delete(key).await
    }
    fn describe(&self) -> String {
        self.0.label.clone()
    }
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LocalStore").field(&self.0.label).finish()
    }
}
