//! Validation of guest paths received in requests.

use std::path::{Component, Path, PathBuf};

use tonic::Status;

use super::status::invalid;

/// Accepts only absolute paths without NUL bytes; `field` names the request
/// field in error messages.
pub fn guest_path(field: &str, raw: &str) -> Result<PathBuf, Status> {
    if raw.is_empty() {
        return Err(invalid(format!("{field} is empty")));
    }
    if raw.contains('\0') {
        return Err(invalid(format!("{field} contains a NUL byte")));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(invalid(format!("{field} `{raw}` is not an absolute path")));
    }
    Ok(path.to_path_buf())
}

/// True for `/`, `//`, `/.`, `/..` and friends: paths naming the root.
pub fn is_root(path: &Path) -> bool {
    let mut depth: usize = 0;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth = depth.saturating_add(1),
            Component::ParentDir => depth = depth.saturating_sub(1),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    depth == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_relative_empty_and_nul() {
        assert!(guest_path("path", "").is_err());
        assert!(guest_path("path", "etc/passwd").is_err());
        assert!(guest_path("path", "/tmp/a\0b").is_err());
        assert_eq!(
            guest_path("path", "/tmp/x").unwrap(),
            PathBuf::from("/tmp/x")
        );
    }

    #[test]
    fn root_detection() {
        for root in ["/", "//", "/.", "/..", "/tmp/..", "/a/b/../.."] {
            assert!(is_root(Path::new(root)), "{root}");
        }
        for other in ["/tmp", "/a/b/..", "/tmp/."] {
            assert!(!is_root(Path::new(other)), "{other}");
        }
    }
}
