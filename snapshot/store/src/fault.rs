//! Test support: a store whose writes start failing after a number of them, to check that an
//! interrupted push leaves no visible snapshot (`fault-injection` feature, and unit tests).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Result, StoreError};
use crate::store::{ObjectInfo, Store};

#[derive(Debug)]
pub struct FailingWrites {
    inner: Arc<dyn Store>,
    remaining: AtomicUsize,
}

impl FailingWrites {
    /// Lets `allowed` writes through, then fails every write.
    pub fn new(inner: Arc<dyn Store>, allowed: usize) -> Self {
        FailingWrites {
            inner,
            remaining: AtomicUsize::new(allowed),
        }
    }
}

#[async_trait::async_trait]
impl Store for FailingWrites {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        let allowed = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !allowed {
            return Err(StoreError::Injected);
        }
        self.inner.put(key, bytes).await
    }
    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<bool> {
        if self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            return Err(StoreError::Injected);
        }
        self.inner.put_new(key, bytes).await
    }
    async fn get(&self, key: &str, max_len: u64) -> Result<Bytes> {
        self.inner.get(key, max_len).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}
