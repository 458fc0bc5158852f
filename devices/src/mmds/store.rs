//! The MMDS data store: one JSON document the host puts and patches, the guest reads by path.
//! Sizes, formats and errors follow Firecracker's `mmds/data_store.rs`.

use serde_json::{Map, Value};

/// Firecracker's default `--mmds-size-limit`: the store's serialised size, in bytes.
pub const DEFAULT_SIZE_LIMIT: usize = 51200;

/// Which protocol the guest speaks: V1 (no token needed) or V2 (session tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MmdsVersion {
    #[default]
    V1,
    V2,
}

/// How a value is rendered for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Json,
    /// EC2 IMDS text: an object's keys one per line (objects with a trailing `/`), a string bare.
    Imds,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// Firecracker's message for both PUT and PATCH over the limit.
    #[error("The MMDS patch request doesn't fit.")]
    LimitExceeded,
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    #[error("The MMDS resource does not exist.")]
    NotFound,
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
}

/// The document and how it is served. `Default` is Firecracker's: V1, empty, 51200 bytes.
#[derive(Clone, Debug)]
pub struct DataStore {
    data: Value,
    initialized: bool,
    limit: usize,
    version: MmdsVersion,
    imds_compat: bool,
}

impl Default for DataStore {
    fn default() -> Self {
        Self::with_limit(DEFAULT_SIZE_LIMIT)
    }
}

fn serialized_len(value: &Value) -> usize {
    // Serialising a `Value` cannot fail (its map keys are strings); count it as too big if it
    // ever did.
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

/// RFC 7396 JSON merge patch (Firecracker's `json_patch`): null removes a key, an object merges,
/// anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(doc) = target {
        for (key, value) in patch {
            if value.is_null() {
                doc.remove(key);
            } else {
                merge_patch(doc.entry(key.as_str()).or_insert(Value::Null), value);
            }
        }
    }
}

impl DataStore {
    pub fn with_limit(limit: usize) -> Self {
        Self {
            data: Value::Null,
            initialized: false,
            limit,
            version: MmdsVersion::default(),
            imds_compat: false,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    pub fn set_version(&mut self, version: MmdsVersion, imds_compat: bool) {
        self.version = version;
        self.imds_compat = imds_compat;
    }

    /// Replaces the document (`PUT /mmds`).
    pub fn put(&mut self, data: Value) -> Result<(), StoreError> {
        if serialized_len(&data) > self.limit {
            return Err(StoreError::LimitExceeded);
        }
        self.data = data;
        self.initialized = true;
        Ok(())
    }

    /// Merges `patch` into the document (`PATCH /mmds`); only after a PUT, as Firecracker.
    pub fn patch(&mut self, patch: &Value) -> Result<(), StoreError> {
        if !self.initialized {
            return Err(StoreError::NotInitialized);
        }
        let mut next = self.data.clone();
        merge_patch(&mut next, patch);
        if serialized_len(&next) > self.limit {
            return Err(StoreError::LimitExceeded);
        }
        self.data = next;
        Ok(())
    }

    /// The whole document (`GET /mmds`): `{}` before the first PUT, as Firecracker.
    pub fn value(&self) -> Value {
        if self.data.is_null() {
            Value::Object(Map::new())
        } else {
            self.data.clone()
        }
    }

    /// The value at a guest's path (`/a/b`, a trailing `/` allowed), rendered.
    pub fn get(&self, path: &str, format: OutputFormat) -> Result<String, StoreError> {
        let pointer = path.strip_suffix('/').unwrap_or(path);
        let value = self.data.pointer(pointer).ok_or(StoreError::NotFound)?;
        match (format, self.imds_compat) {
            (OutputFormat::Json, false) => Ok(value.to_string()),
            _ => format_imds(value),
        }
    }
}

fn format_imds(value: &Value) -> Result<String, StoreError> {
    match value {
        Value::Object(map) => Ok(map
            .iter()
            .map(|(key, v)| {
                if v.is_object() {
                    format!("{key}/")
                } else {
                    key.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")),
        Value::String(s) => Ok(s.clone()),
        _ => Err(StoreError::UnsupportedValueType),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> DataStore {
        let mut s = DataStore::default();
        s.put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 3}}, "name": "x"}))
            .unwrap();
        s
    }

    #[test]
    fn get_renders_imds_and_json() {
        let s = store();
        assert_eq!(s.get("/latest", OutputFormat::Imds).unwrap(), "meta-data/");
        assert_eq!(
            s.get("/latest/meta-data/", OutputFormat::Imds).unwrap(),
            "ami-id\nn"
        );
        assert_eq!(
            s.get("/latest/meta-data/ami-id", OutputFormat::Imds)
                .unwrap(),
            "ami-1"
        );
        assert_eq!(
            s.get("/latest/meta-data/ami-id", OutputFormat::Json)
                .unwrap(),
            "\"ami-1\""
        );
        assert_eq!(
            s.get("/latest/meta-data/n", OutputFormat::Imds),
            Err(StoreError::UnsupportedValueType)
        );
        assert_eq!(
            s.get("/latest/nope", OutputFormat::Json),
            Err(StoreError::NotFound)
        );
    }

    #[test]
    fn imds_compat_ignores_accept_json() {
        let mut s = store();
        s.set_version(MmdsVersion::V2, true);
        assert_eq!(s.get("/name", OutputFormat::Json).unwrap(), "x");
    }

    #[test]
    fn patch_merges_per_rfc7396_and_needs_a_put_first() {
        let mut empty = DataStore::default();
        assert_eq!(
            empty.patch(&json!({"a": 1})),
            Err(StoreError::NotInitialized)
        );
        assert_eq!(empty.value(), json!({}));
        let mut s = store();
        s.patch(&json!({"name": null, "latest": {"meta-data": {"n": 4, "new": "y"}}, "k": [1]}))
            .unwrap();
        assert_eq!(
            s.value(),
            json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 4, "new": "y"}}, "k": [1]})
        );
    }

    #[test]
    fn put_and_patch_over_the_limit_are_refused_and_change_nothing() {
        let mut s = DataStore::with_limit(20);
        s.put(json!({"a": "0123456789"})).unwrap();
        assert_eq!(
            s.put(json!({"a": "0123456789abcdef"})),
            Err(StoreError::LimitExceeded)
        );
        assert_eq!(
            s.patch(&json!({"b": "0123456789"})),
            Err(StoreError::LimitExceeded)
        );
        assert_eq!(s.value(), json!({"a": "0123456789"}));
    }
}
