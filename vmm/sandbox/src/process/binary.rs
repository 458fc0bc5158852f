//! Finding the `dormouse` binary a manager starts its sandbox processes with.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

const NAME: &str = "dormouse";

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `$DORMOUSE_BIN`, else `dormouse` next to `exe`, else on `path_var`. On failure, the places
/// looked at, for the error.
pub(crate) fn search(
    env: Option<OsString>,
    exe: Option<PathBuf>,
    path_var: Option<OsString>,
) -> Result<PathBuf, Vec<String>> {
    let mut looked = Vec::new();
    if let Some(bin) = env.filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        if is_executable(&bin) {
            return Ok(bin);
        }
        looked.push(format!(
            "$DORMOUSE_BIN={} (not an executable file)",
            bin.display()
        ));
    } else {
        looked.push("$DORMOUSE_BIN (not set)".into());
    }
    if let Some(dir) = exe.as_deref().and_then(Path::parent) {
        let bin = dir.join(NAME);
        if is_executable(&bin) {
            return Ok(bin);
        }
        looked.push(format!("{} (next to the executable)", bin.display()));
    }
    let mut on_path = Vec::new();
    for dir in path_var.iter().flat_map(std::env::split_paths) {
        let bin = dir.join(NAME);
        if is_executable(&bin) {
            return Ok(bin);
        }
        on_path.push(dir.display().to_string());
    }
    looked.push(format!("PATH ({})", on_path.join(":")));
    Err(looked)
}

/// The binary to use: `explicit` when given (it must be an executable file), else [`search`]
/// in this process's environment.
pub(crate) fn find(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(bin) = explicit {
        return if is_executable(bin) {
            Ok(bin.to_path_buf())
        } else {
            Err(format!(
                "the dormouse binary {} is not an executable file",
                bin.display()
            ))
        };
    }
    search(
        std::env::var_os("DORMOUSE_BIN"),
        std::env::current_exe().ok(),
        std::env::var_os("PATH"),
    )
    .map_err(|looked| {
        format!(
            "no dormouse binary found for Process isolation (set ProcessIsolation::binary or \
             $DORMOUSE_BIN); looked at: {}",
            looked.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn make_exe(path: &Path) {
        std::fs::write(path, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn order_env_then_next_to_exe_then_path() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        for d in [&a, &b, &c] {
            std::fs::create_dir(d).unwrap();
        }
        make_exe(&a.join("custom"));
        make_exe(&b.join(NAME));
        make_exe(&c.join(NAME));
        let exe = Some(b.join("worker"));
        let path = Some(OsString::from(c.as_os_str()));
        assert_eq!(
            search(Some(a.join("custom").into()), exe.clone(), path.clone()).unwrap(),
            a.join("custom")
        );
        assert_eq!(search(None, exe, path.clone()).unwrap(), b.join(NAME));
        assert_eq!(
            search(None, Some(a.join("worker")), path).unwrap(),
            c.join(NAME)
        );
    }

    #[test]
    fn the_error_lists_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let looked = search(
            Some(dir.path().join("missing").into()),
            Some(dir.path().join("worker")),
            Some(OsString::from("/nonexistent-1:/nonexistent-2")),
        )
        .unwrap_err();
        let text = looked.join("; ");
        assert!(text.contains("$DORMOUSE_BIN="), "{text}");
        assert!(text.contains("next to the executable"), "{text}");
        assert!(text.contains("/nonexistent-1:/nonexistent-2"), "{text}");
        let err = find(Some(&dir.path().join("missing"))).unwrap_err();
        assert!(err.contains("not an executable"), "{err}");
    }
}
