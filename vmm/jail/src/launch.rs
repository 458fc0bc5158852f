//! The supervisor (root, outside) and the jailed child it forks.
//!
//! ```text
//! dormouse jail (supervisor, root)            jailed child (becomes the VMM)
//!   validate, create <base>/<id>/root,
//!   cgroups; [daemonize]; [unshare PID]
//!   fork ───────────────────────────────────► waits on a pipe
//!   write its pid to every cgroup.procs
//!   release it ─────────────────────────────► unshare mount, IPC, UTS; [setns net]
//!                                             open privileged handles (TAPs) as root
//!                                             make mounts private; bind root, inputs;
//!                                             mount proc; pivot_root; detach old root
//!                                             rlimits; close other fds; clear env;
//!                                             no_new_privs; setgroups([]); setresgid;
//!                                             setresuid; check they cannot come back;
//!                                             PR_SET_PDEATHSIG(SIGKILL)
//!   forward SIGINT/SIGTERM/SIGHUP ─────────►  run the VMM (seccomp on its threads)
//!   wait; remove cgroups and what it made     exits with the VMM's status
//!   exit with the child's status (or 128+signal)
//! ```

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cgroup::{CgroupFs, Cgroups};
use crate::layout::{DeviceNode, InputPlan, JailDirs};
use crate::spec::JailSpec;
use crate::{sys, JailError, Result};

/// How long the supervisor waits for the kernel to empty the jail's cgroups after the VMM ended
/// (its teardown helper may still be exiting).
const CGROUP_REMOVE_PATIENCE: Duration = Duration::from_secs(5);

/// A jail ready to start: directories, device nodes and cgroups exist.
#[derive(Debug)]
pub struct Prepared {
    spec: JailSpec,
    plan: InputPlan,
    dirs: JailDirs,
    cgroups: Option<Cgroups>,
}

/// Validates `spec` and creates the jail's directories, device nodes and (when `spec.cgroups`
/// names settings) cgroups in `cgroupfs`. Undone on failure.
pub fn prepare(
    spec: JailSpec,
    plan: InputPlan,
    devices: &[DeviceNode],
    cgroupfs: Option<&CgroupFs>,
) -> Result<Prepared> {
    spec.validate()?;
    let mut dirs = JailDirs::create(&spec, &plan, devices)?;
    let cgroups = match (spec.cgroups.is_empty(), cgroupfs) {
        (true, _) => None,
        (false, None) => {
            dirs.cleanup();
            return Err(JailError::CgroupController {
                controller: "any".into(),
                why: "settings were given without a cgroup hierarchy".into(),
            });
        }
        (false, Some(fs)) => match fs.create(&spec.cgroup_parent, &spec.id, &spec.cgroups) {
            Ok(c) => Some(c),
            Err(e) => {
                dirs.cleanup();
                return Err(e);
            }
        },
    };
    Ok(Prepared {
        spec,
        plan,
        dirs,
        cgroups,
    })
}

impl Prepared {
    /// `<base>/<id>/root` on the host.
    pub fn root(&self) -> &Path {
        self.dirs.root()
    }

    /// The jail's cgroup directories.
    pub fn cgroup_dirs(&self) -> &[PathBuf] {
        self.cgroups.as_ref().map_or(&[], |c| c.dirs())
    }

    /// Starts the jailed child and supervises it until it ends; then cleans up and returns its
    /// exit status (its code, or 128 + the signal that ended it).
    ///
    /// In the child, `open_handles` runs as root after the network namespace was joined and
    /// before the mounts: it opens what the VMM may not open itself (TAP devices) and returns
    /// them with the descriptors to keep open. `vmm` then runs unprivileged inside the jail;
    /// its return value is the child's exit status. Must be called while the process has a
    /// single thread.
    pub fn run<H>(
        mut self,
        open_handles: impl FnOnce() -> std::result::Result<(H, Vec<RawFd>), String>,
        vmm: impl FnOnce(H) -> i32,
    ) -> Result<i32> {
        match self.start() {
            Ok((pid, signals)) => {
                let status = supervise(pid, &signals);
                self.finish();
                Ok(sys::exit_code(status))
            }
            Err(Started::Child) => {
                let err = match child(&self.spec, self.dirs.root(), &self.plan, open_handles) {
                    Ok(handles) => {
                        let code = vmm(handles);
                        std::process::exit(code)
                    }
                    Err(e) => e,
                };
                eprintln!("dormouse: jail {}: {err}", self.spec.id);
                sys::exit_now(1)
            }
            Err(Started::Failed(e)) => {
                self.finish();
                Err(e)
            }
        }
    }

    /// Forks the child; in the parent returns its pid once it is in the cgroups.
    fn start(&mut self) -> std::result::Result<(libc::pid_t, libc::sigset_t), Started> {
        if self.spec.daemonize {
            sys::daemonize().map_err(|e| Started::Failed(JailError::sys("daemonizing")(e)))?;
            self.dirs.record_supervisor_pid();
        }
        let netns = match &self.spec.netns {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(path)
                    .map_err(|e| Started::Failed(JailError::io("opening netns", path)(e)))?,
            ),
            None => None,
        };
        let signals = sys::sigset(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD]);
        sys::sigmask(libc::SIG_BLOCK, &signals);
        if self.spec.new_pid_ns {
            // The supervisor stays where it is; its next child is PID 1 of a new namespace.
            sys::unshare(libc::CLONE_NEWPID)
                .map_err(|e| Started::Failed(JailError::sys("new PID namespace")(e)))?;
        }
        let (release_rx, release_tx) =
            sys::pipe().map_err(|e| Started::Failed(JailError::sys("pipe")(e)))?;
        let pid = sys::fork().map_err(|e| Started::Failed(JailError::sys("fork")(e)))?;
        if pid == 0 {
            sys::close(release_tx);
            // The supervisor writes a byte once this process is in its cgroups; end of file
            // means it failed (and is cleaning up).
            if !sys::read_byte(release_rx) {
                sys::exit_now(1);
            }
            sys::close(release_rx);
            sys::sigmask(libc::SIG_UNBLOCK, &sys::sigset(&[libc::SIGCHLD]));
            if let Some(netns) = &netns {
                if let Err(e) = sys::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) {
                    eprintln!(
                        "dormouse: jail {}: joining the network namespace: {e}",
                        self.spec.id
                    );
                    sys::exit_now(1);
                }
            }
            drop(netns);
            return Err(Started::Child);
        }
        drop(netns);
        sys::close(release_rx);
        if let Some(cgroups) = &self.cgroups {
            if let Err(e) = cgroups.join(pid) {
                sys::close(release_tx);
                sys::kill(pid, libc::SIGKILL);
                while let Ok(None) = sys::try_wait(pid) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return Err(Started::Failed(e));
            }
        }
        let released = sys::write_byte(release_tx);
        sys::close(release_tx);
        if let Err(e) = released {
            sys::kill(pid, libc::SIGKILL);
            return Err(Started::Failed(JailError::sys(
                "releasing the jailed child",
            )(e)));
        }
        if let Some(name) = self.spec.pid_file.clone() {
            // Clients find the VMM by it: without it the jail is not what was asked for.
            if let Err(e) = self.dirs.write_file(&name, &pid.to_string()) {
                sys::kill(pid, libc::SIGKILL);
                return Err(Started::Failed(e));
            }
        }
        tracing::info!(
            "jail {}: VMM pid {pid}, root {} (sockets and snapshots the VMM makes at /PATH are at {}/PATH)",
            self.spec.id,
            self.dirs.root().display(),
            self.dirs.root().display()
        );
        for dir in self.cgroup_dirs() {
            tracing::info!("jail {}: cgroup {}", self.spec.id, dir.display());
        }
        Ok((pid, signals))
    }

    fn finish(&mut self) {
        if let Some(cgroups) = self.cgroups.take() {
            if let Err(e) = cgroups.remove(CGROUP_REMOVE_PATIENCE) {
                tracing::warn!("jail {}: {e}", self.spec.id);
            }
        }
        self.dirs.cleanup();
    }
}

enum Started {
    /// This is the jailed child.
    Child,
    Failed(JailError),
}

/// Forwards termination signals to the child until it ends; returns its wait status.
fn supervise(pid: libc::pid_t, signals: &libc::sigset_t) -> libc::c_int {
    loop {
        if let Some(sig @ (libc::SIGINT | libc::SIGTERM | libc::SIGHUP)) =
            sys::sigtimedwait(signals, 500)
        {
            tracing::info!("signal {sig}: passed to the jailed VMM (pid {pid})");
            sys::kill(pid, sig);
        }
        match sys::try_wait(pid) {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            Err(e) => {
                tracing::error!("waiting for the jailed VMM: {e}");
                return 1 << 8;
            }
        }
    }
}

/// The child's side, up to the moment it runs the VMM.
fn child<H>(
    spec: &JailSpec,
    root: &Path,
    plan: &InputPlan,
    open_handles: impl FnOnce() -> std::result::Result<(H, Vec<RawFd>), String>,
) -> std::result::Result<H, String> {
    let step = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    sys::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS)
        .map_err(step("new mount, IPC and UTS namespaces"))?;
    sys::sethostname(&spec.id).map_err(step("sethostname"))?;
    let (handles, keep) = open_handles()?;
    enter_root(root, plan)?;
    set_rlimits(spec)?;
    sys::close_fds_except(&keep).map_err(step("closing inherited descriptors"))?;
    clear_environment();
    drop_privileges(spec.uid, spec.gid).map_err(|e| e.to_string())?;
    // A supervisor that dies (SIGKILL: it cannot clean up) takes the VMM with it. Set after the
    // drop: changing credentials clears it.
    sys::set_parent_death_signal(libc::SIGKILL).map_err(step("PR_SET_PDEATHSIG"))?;
    Ok(handles)
}

fn enter_root(root: &Path, plan: &InputPlan) -> std::result::Result<(), String> {
    let fail =
        |what: &str, path: &Path, e: std::io::Error| format!("{what} {}: {e}", path.display());
    // Nothing mounted here propagates back to the host (or anywhere else).
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(|e| fail("making mounts private under", Path::new("/"), e))?;
    // pivot_root wants the new root to be a mount point.
    sys::mount(Some(root), root, None, libc::MS_BIND | libc::MS_REC, None)
        .map_err(|e| fail("bind-mounting", root, e))?;
    sys::mount(
        None,
        root,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )
    .map_err(|e| fail("remounting nosuid,noexec", root, e))?;
    for input in plan.inputs() {
        let rel = input.in_jail.strip_prefix("/").unwrap_or(&input.in_jail);
        let target = root.join(rel);
        sys::mount(Some(&input.host), &target, None, libc::MS_BIND, None)
            .map_err(|e| fail("bind-mounting", &input.host, e))?;
        let mut flags =
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if input.read_only {
            flags |= libc::MS_RDONLY;
        }
        sys::mount(None, &target, None, flags, None).map_err(|e| fail("remounting", &target, e))?;
    }
    // A procfs of this PID namespace (only the jail's processes with --new-pid-ns; with
    // hidepid=2 only the VMM's uid's otherwise), read-only: the VMM reads /proc/cpuinfo,
    // /proc/self/{smaps,pagemap,fd}.
    let proc_dir = root.join("proc");
    sys::mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
        Some("hidepid=2"),
    )
    .map_err(|e| fail("mounting proc on", &proc_dir, e))?;
    sys::chdir(root).map_err(|e| fail("chdir", root, e))?;
    sys::pivot_root(Path::new("."), Path::new("."))
        .map_err(|e| fail("pivot_root into", root, e))?;
    // The old root now sits on top of the new one: detach it, and with it every host mount.
    sys::umount_detach(Path::new("."))
        .map_err(|e| fail("detaching the old root", Path::new("/"), e))?;
    sys::chdir(Path::new("/")).map_err(|e| fail("chdir", Path::new("/"), e))?;
    Ok(())
}

fn set_rlimits(spec: &JailSpec) -> std::result::Result<(), String> {
    if let Some(n) = spec.rlimits.nofile {
        sys::setrlimit(libc::RLIMIT_NOFILE, n).map_err(|e| format!("rlimit nofile={n}: {e}"))?;
    }
    if let Some(n) = spec.rlimits.fsize {
        sys::setrlimit(libc::RLIMIT_FSIZE, n).map_err(|e| format!("rlimit fsize={n}: {e}"))?;
        // A write beyond the limit then fails with EFBIG instead of killing the VMM.
        sys::ignore_signal(libc::SIGXFSZ);
    }
    Ok(())
}

/// The VMM runs with an empty environment. Logging was set up by the supervisor before the fork
/// (its filter, from --log-level or DORMOUSE_LOG, carries over), so nothing needs to be kept.
fn clear_environment() {
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
}

/// no_new_privs, no supplementary groups, then gid and uid (real, effective, saved); checks
/// that neither root id can be regained.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    sys::set_no_new_privs().map_err(JailError::sys("PR_SET_NO_NEW_PRIVS"))?;
    sys::clear_groups().map_err(JailError::sys("setgroups([])"))?;
    sys::setresgid(gid).map_err(JailError::sys("setresgid"))?;
    sys::setresuid(uid).map_err(JailError::sys("setresuid"))?;
    let (u, g) = sys::ids();
    if u != [uid; 3] || g != [gid; 3] {
        return Err(JailError::PrivilegesKept("ids differ from those asked for"));
    }
    if sys::setresuid(0).is_ok() || sys::setresgid(0).is_ok() {
        return Err(JailError::PrivilegesKept(
            "setresuid/setresgid(0) succeeded",
        ));
    }
    if sys::clear_groups().is_ok() {
        return Err(JailError::PrivilegesKept(
            "setgroups succeeded (CAP_SETGID kept)",
        ));
    }
    if !sys::no_new_privs() {
        return Err(JailError::PrivilegesKept("no_new_privs is not set"));
    }
    Ok(())
}
