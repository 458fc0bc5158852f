//! The small interface every store offers: whole objects by key, relative to the store's root.

use std::time::SystemTime;

use bytes::Bytes;

use crate::error::Result;

/// One stored object, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Relative to the store's root, `/`-separated.
    pub key: String,
    pub size: u64,
    pub last_modified: SystemTime,
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Writes `key` atomically: readers see the old object, nothing, or all of `bytes`.
    async fn put(&self, key: &str, bytes: Bytes) -> Result<()>;
    /// Writes `key` only if it does not exist (atomically: of two concurrent writers one gets
    /// `false`). Returns whether it was written.
    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<bool>;
    /// Reads `key`, refusing objects longer than `max_len` (a hostile store cannot make us
    /// allocate more).
    async fn get(&self, key: &str, max_len: u64) -> Result<Bytes>;
    /// The object's size and age, or `None` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;
    /// Every object whose key starts with `prefix` (a directory-like prefix ending in `/`).
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Deletes `key`; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
    /// The store's URL, for messages (never credentials).
    fn describe(&self) -> String;
}
