//! [`Store`] over an `object_store` client: the code both implementations share (key prefixes,
//! bounded reads, error mapping with credentials redacted).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload};

use crate::error::{Result, StoreError};
use crate::redact::Secrets;
use crate::store::ObjectInfo;

pub(crate) struct ObjectBackend {
    pub inner: Arc<dyn ObjectStore>,
    /// Key prefix inside the object store, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// The store's URL, for messages.
    pub label: String,
    pub secrets: Secrets,
}

impl ObjectBackend {
    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn relative(&self, path: &ObjectPath) -> String {
        let full = path.as_ref();
        if self.prefix.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(&self.prefix)
                .map(|k| k.trim_start_matches('/'))
                .unwrap_or(full)
                .to_string()
        }
    }

    fn err(&self, op: &'static str, key: &str, e: object_store::Error) -> StoreError {
        if let object_store::Error::NotFound { .. } = e {
            return StoreError::NotFound {
                key: key.to_string(),
                store: self.label.clone(),
            };
        }
        StoreError::Backend {
            op,
            key: key.to_string(),
            store: self.label.clone(),
            message: self.secrets.redact(&e.to_string()),
        }
    }

    fn info(&self, meta: &ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            key: self.relative(&meta.location),
            size: meta.size,
            last_modified: meta.last_modified.into(),
        }
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        self.inner
            .put(&self.path(key), PutPayload::from_bytes(bytes))
            .await
            .map(drop)
            .map_err(|e| self.err("write", key, e))
    }

    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<bool> {
        let options = PutOptions::from(PutMode::Create);
        match self
            .inner
            .put_opts(&self.path(key), PutPayload::from_bytes(bytes), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.err("create", key, e)),
        }
    }

    pub async fn get(&self, key: &str, max_len: u64) -> Result<Bytes> {
        let result = self
            .inner
            .get(&self.path(key))
            .await
            .map_err(|e| self.err("read", key, e))?;
        let too_large = |len| StoreError::TooLarge {
            key: key.to_string(),
            store: self.label.clone(),
            len,
            max: max_len,
        };
        if result.meta.size > max_len {
            return Err(too_large(result.meta.size));
        }
        // The size announced may lie: count what actually arrives too.
        let mut buf = BytesMut::with_capacity(usize::try_from(result.meta.size).unwrap_or(0));
        let mut stream = result.into_stream();
        while let Some(piece) = stream
            .try_next()
            .await
            .map_err(|e| self.err("read", key, e))?
        {
            let len = (buf.len() + piece.len()) as u64;
            if len > max_len {
                return Err(too_large(len));
            }
            buf.extend_from_slice(&piece);
        }
        Ok(buf.freeze())
    }

    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        match self.inner.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(self.info(&meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("stat", key, e)),
        }
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let path = self.path(prefix.trim_end_matches('/'));
        self.inner
            .list(Some(&path))
            .map_ok(|meta| self.info(&meta))
            .try_collect()
            .await
            .map_err(|e| self.err("list", prefix, e))
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }
}

/// Implements [`crate::Store`] for a newtype around [`ObjectBackend`].
macro_rules! delegate_store {
    ($ty:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $ty {
            async fn put(&self, key: &str, bytes: bytes::Bytes) -> $crate::error::Result<()> {
                self.0.put(key, bytes).await
            }
            async fn put_new(&self, key: &str, bytes: bytes::Bytes) -> $crate::error::Result<bool> {
                self.0.put_new(key, bytes).await
            }
            async fn get(&self, key: &str, max_len: u64) -> $crate::error::Result<bytes::Bytes> {
                self.0.get(key, max_len).await
            }
            async fn head(
                &self,
                key: &str,
            ) -> $crate::error::Result<Option<$crate::store::ObjectInfo>> {
                self.0.head(key).await
            }
            async fn list(
                &self,
                prefix: &str,
            ) -> $crate::error::Result<Vec<$crate::store::ObjectInfo>> {
                self.0.list(prefix).await
            }
            async fn delete(&self, key: &str) -> $crate::error::Result<()> {
                self.0.delete(key).await
            }
            fn describe(&self) -> String {
                self.0.label.clone()
            }
        }

        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_tuple(stringify!($ty)).field(&self.0.label).finish()
            }
        }
    };
}
pub(crate) use delegate_store;
