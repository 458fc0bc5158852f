//! The jail around one VMM process (`dormouse jail`), modelled on Firecracker's jailer.
//!
//! A root supervisor validates a [`JailSpec`], creates `<base>/<id>/root` and the cgroups,
//! and forks the jailed child (no `exec`: the child goes on to run the VMM code of the same
//! binary). The child enters new mount, IPC and UTS namespaces (and PID, and joins a network
//! namespace when asked), bind-mounts its inputs, `pivot_root`s into the jail, sets rlimits,
//! closes every other descriptor, clears its environment, sets `no_new_privs` and drops to an
//! unprivileged uid/gid. The supervisor waits, forwards SIGINT/SIGTERM/SIGHUP, and removes
//! everything it created, keeping what the VM produced (snapshots, console files).
//! See docs/security.md ("Jail").
//!
//! - [`spec`]: what is asked (id, uid/gid, cgroup settings, rlimits) and its validation;
//! - [`cgroup`]: the cgroup v1 and v2 writer (roots injectable, so tests use fake trees);
//! - [`layout`]: the directory tree, the inputs brought in, the lock, and the cleanup;
//! - [`sys`]: the system calls, one safe wrapper each;
//! - [`launch`]: the supervisor and the jailed child.

// Paths and settings come from the command line: nothing here may unwrap or expect on them.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cgroup;
pub mod launch;
pub mod layout;
pub mod spec;
pub mod sys;

use std::io;
use std::path::PathBuf;

pub use cgroup::{CgroupFs, Cgroups};
pub use launch::{prepare, Prepared};
pub use layout::{DeviceNode, InputPlan, JailDirs};
pub use spec::{
    parse_cgroup_setting, parse_rlimits, validate_cgroup_parent, validate_id, CgroupSetting,
    CgroupVersion, JailSpec, Rlimits, DEFAULT_CGROUP_PARENT, DEFAULT_CHROOT_BASE,
};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "invalid jail id {0:?}: 1 to 64 characters of A-Z, a-z, 0-9 and '-', not starting with '-'"
    )]
    InvalidId(String),
    #[error("--{0} 0 is refused: the VMM must run unprivileged (give a non-zero id)")]
    RootId(&'static str),
    #[error("invalid --cgroup {setting:?}: {why}")]
    BadCgroup { setting: String, why: &'static str },
    #[error("invalid --cgroup-parent {name:?}: {why}")]
    BadCgroupParent { name: String, why: &'static str },
    #[error("invalid --rlimit {item:?}: {why}")]
    BadRlimit { item: String, why: &'static str },
    #[error("invalid path {path}: {why}")]
    BadPath { path: PathBuf, why: &'static str },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("a jail with id {id} is running (its directory {dir} is locked by pid {pid})")]
    Running {
        id: String,
        dir: PathBuf,
        pid: String,
    },
    #[error(
        "{dir} exists but no jail holds it: files a previous jail kept (snapshots, console) or \
         the leftovers of a supervisor that was killed; move what you need out of it and \
         remove it (`rm -r {dir}`), or use another id"
    )]
    Stale { dir: PathBuf },
    #[error("cgroup {path} exists: a jail with this id runs, or a killed one left it; rmdir it if no jail uses it")]
    CgroupExists { path: PathBuf },
    #[error("cgroup controller {controller:?} {why}")]
    CgroupController { controller: String, why: String },
    #[error("privileges could be regained after the drop ({0}): refusing to run the VMM")]
    PrivilegesKept(&'static str),
}

impl JailError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| JailError::Io { what, path, source }
    }

    pub(crate) fn sys(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| JailError::Sys { what, source }
    }
}

pub type Result<T, E = JailError> = std::result::Result<T, E>;
