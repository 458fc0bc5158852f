//! From a URL to a store.

use std::sync::Arc;

use crate::error::Result;
use crate::local::LocalStore;
use crate::s3::{S3Config, S3Store};
use crate::store::Store;
use crate::url::StoreUrl;

/// Whether the caller will write (a missing local store directory is then created).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Opens the store at `url`; S3 settings come from the environment ([`S3Config::from_env`]).
pub fn open_store(url: &StoreUrl, access: Access) -> Result<Arc<dyn Store>> {
    Ok(match url {
        StoreUrl::File { root } => Arc::new(LocalStore::new(root, access == Access::Write)?),
        StoreUrl::S3 { bucket, prefix } => {
            Arc::new(S3Store::new(bucket, prefix, &S3Config::from_env())?)
        }
    })
}
