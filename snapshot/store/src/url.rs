//! Snapshot locations: `file:///abs/path/NAME` and `s3://bucket/prefix/NAME`. The last path
//! segment names the snapshot; what comes before it is the store (where chunks are shared).

use crate::error::{Result, StoreError};

/// Where a store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local directory (absolute path).
    File { root: std::path::PathBuf },
    /// A bucket and a key prefix (no leading or trailing `/`; may be empty).
    S3 { bucket: String, prefix: String },
}

/// A snapshot in a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotUrl {
    pub store: StoreUrl,
    pub name: String,
}

const MAX_URL_LEN: usize = 4096;

fn bad(url: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Url {
        url: url.chars().take(200).collect(),
        reason: reason.into(),
    }
}

/// Snapshot names become one key segment: keep them plain.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self> {
        if url.len() > MAX_URL_LEN {
            return Err(bad(url, format!("longer than {MAX_URL_LEN} bytes")));
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(
                    url,
                    "a file URL needs an absolute path: file:///abs/path",
                ));
            }
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            if segments.iter().any(|s| *s == "." || *s == "..") {
                return Err(bad(url, "`.` and `..` are not allowed in the path"));
            }
            if segments.is_empty() {
                return Err(bad(url, "the store cannot be the root directory"));
            }
            return Ok(StoreUrl::File {
                root: std::path::PathBuf::from(format!("/{}", segments.join("/"))),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !bucket_ok {
                return Err(bad(
                    url,
                    "the bucket must be 3 to 63 lowercase letters, digits, `-` or `.` \
                     (s3://bucket/prefix)",
                ));
            }
            let segments: Vec<&str> = prefix.split('/').filter(|s| !s.is_empty()).collect();
            if let Some(seg) = segments.iter().find(|s| !valid_name(s)) {
                return Err(bad(
                    url,
                    format!("prefix segment {seg:?} is not letters, digits, `-`, `_` or `.`"),
                ));
            }
            return Ok(StoreUrl::S3 {
                bucket: bucket.to_string(),
                prefix: segments.join("/"),
            });
        }
        Err(bad(url, "expected file:///abs/path or s3://bucket/prefix"))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::File { root } => write!(f, "file://{}", root.display()),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl SnapshotUrl {
    /// `STORE/NAME`: the last segment is the snapshot's name.
    pub fn parse(url: &str) -> Result<Self> {
        let trimmed = url.trim_end_matches('/');
        let (store, name) = trimmed
            .rsplit_once('/')
            .filter(|(store, _)| !store.ends_with(':') && !store.ends_with(":/"))
            .ok_or_else(|| {
                bad(
                    url,
                    "name the snapshot: STORE/NAME, e.g. s3://bucket/prefix/NAME",
                )
            })?;
        if !valid_name(name) {
            return Err(bad(
                url,
                format!("snapshot name {name:?} must be letters, digits, `-`, `_` or `.`"),
            ));
        }
        if store == "file://" {
            return Err(bad(url, "the store cannot be the root directory"));
        }
        // Errors name the whole URL the user gave, not only its store part.
        let store = StoreUrl::parse(store).map_err(|e| match e {
            StoreError::Url { reason, .. } => bad(url, reason),
            other => other,
        })?;
        Ok(SnapshotUrl {
            store,
            name: name.to_string(),
        })
    }
}

impl std::fmt::Display for SnapshotUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.store, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_and_s3_urls() {
        assert_eq!(
            SnapshotUrl::parse("file:///var/store/snap-1").unwrap(),
            SnapshotUrl {
                store: StoreUrl::File {
                    root: "/var/store".into()
                },
                name: "snap-1".into()
            }
        );
        assert_eq!(
            SnapshotUrl::parse("s3://my-bucket/a/b/tpl/").unwrap(),
            SnapshotUrl {
                store: StoreUrl::S3 {
                    bucket: "my-bucket".into(),
                    prefix: "a/b".into()
                },
                name: "tpl".into()
            }
        );
        assert_eq!(
            SnapshotUrl::parse("s3://bkt/snap").unwrap().store,
            StoreUrl::S3 {
                bucket: "bkt".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://bkt/p").unwrap().to_string(),
            "s3://bkt/p"
        );
    }

    #[test]
    fn refuses_bad_urls_with_a_reason() {
        for (url, needle) in [
            ("http://x/y", "expected file:///"),
            ("file://rel/snap", "absolute path"),
            ("file:///snap", "root directory"),
            ("file:///a/../b/snap", "`..`"),
            ("s3://B/snap", "bucket"),
            ("s3://bucket", "name the snapshot"),
            ("s3://bucket/p/na me", "snapshot name"),
            ("s3://bucket/p q/snap", "prefix segment"),
        ] {
            let err = SnapshotUrl::parse(url).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }
}
