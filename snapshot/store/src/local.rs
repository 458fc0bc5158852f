//! A store in a local directory (`file:///abs/path`): the same layout as in S3, one file per
//! object. Writes are atomic (temporary file, then rename).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::local::LocalFileSystem;

use crate::backend::{delegate_store, ObjectBackend};
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

delegate_store!(LocalStore);
