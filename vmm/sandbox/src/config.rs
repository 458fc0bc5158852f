//! What a sandbox is made of: where it starts from (a kernel or a template snapshot), its disks,
//! its network, and how long to wait for its agent.

use std::path::PathBuf;
use std::time::Duration;

use agent_client::AgentClientConfig;

/// How long `create`, `fork` and `wake` wait for the guest agent by default. Generous: a Linux
/// boot under an emulating host takes up to a minute; on hardware KVM it is well under a second.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(180);

/// A new sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub source: SandboxSource,
    /// Boot: the NICs to add, in order (the first is eth0). Template: per saved NIC, in order,
    /// its replacement TAP/MAC; saved NICs beyond this list get a generated TAP and MAC.
    pub network: Vec<NetworkConfig>,
    /// Where the guest's serial console is kept (appended, bounded like the default:
    /// `ManagerConfig::console_log_bytes`, rotated to `<path>.1`). `None` (default):
    /// `<work_dir>/<id>/console.log`, kept after the sandbox stops until its record is removed.
    pub console_log: Option<PathBuf>,
    /// How long to wait for the agent to answer after the VM starts.
    pub agent_timeout: Duration,
    /// Host-side caps on the agent's replies and the timeout of each agent call (the guest is
    /// untrusted: see `ReplyLimits` and docs/sandbox.md for the defaults).
    pub agent_client: AgentClientConfig,
}

impl SandboxConfig {
    /// Boots `kernel` with defaults (1 vCPU, 256 MiB, no disks, no network).
    pub fn boot(kernel: impl Into<PathBuf>) -> Self {
        Self::from_source(SandboxSource::Boot(BootSpec::new(kernel)))
    }

    /// Restores the template snapshot in `dir` (written by `SandboxManager::checkpoint`, or any
    /// dormouse snapshot) as a new sandbox with its own disks, network and vsock identity.
    pub fn template(dir: impl Into<PathBuf>) -> Self {
        Self::from_source(SandboxSource::Template(dir.into()))
    }

    /// Restores the checkpoint at `url` in a snapshot store (`file:///abs/store/NAME`,
    /// `s3://bucket/prefix/NAME`: a template pushed with `dormouse snapshot push`, or a sandbox
    /// hibernated with `SandboxManager::hibernate_to`). In-process its memory is fetched lazily
    /// (on first touch, through the host's chunk cache) while the rest is local; a sandbox
    /// process downloads it whole first.
    pub fn from_store(url: impl Into<String>) -> Self {
        Self::from_source(SandboxSource::Store(url.into()))
    }

    pub fn from_source(source: SandboxSource) -> Self {
        Self {
            source,
            network: Vec::new(),
            console_log: None,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            agent_client: AgentClientConfig::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub enum SandboxSource {
    /// Boot a kernel from scratch.
    Boot(BootSpec),
    /// Restore a snapshot directory. vCPUs, memory and the command line are the snapshot's.
    Template(PathBuf),
    /// Restore a checkpoint from a snapshot store URL (see `SandboxConfig::from_store`).
    Store(String),
}

/// A VM booted from scratch. The guest's init must start the agent (or be the agent).
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The root filesystem: the first disk, booted with `root=/dev/vda rw`.
    pub rootfs: Option<DiskSpec>,
    /// Replaces the default guest command line (`vm::DEFAULT_CMDLINE`).
    pub cmdline: Option<String>,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// More virtio-blk disks, after the rootfs.
    pub disks: Vec<DiskSpec>,
    /// Keep guest RAM in an unnamed file in the sandbox's work directory (`VmConfig::mem_dir`):
    /// the first hibernate or checkpoint into a directory on the same file system then links
    /// that file instead of copying memory (O(1) in memory size). The price: guest writes are
    /// page-cache writes the kernel flushes to that file system in the background.
    pub ram_in_work_dir: bool,
    /// A virtio-balloon device: free page reporting gives memory the guest frees back to the
    /// host, and [`crate::SandboxManager::set_balloon`] sets its target (docs/balloon.md).
    pub balloon: Option<devices::virtio::balloon::BalloonConfig>,
}

impl BootSpec {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            rootfs: None,
            cmdline: None,
            vcpus: 1,
            mem_mib: 256,
            disks: Vec::new(),
            ram_in_work_dir: false,
            balloon: None,
        }
    }
}

/// A disk image attached to a booted sandbox.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    /// Give the sandbox its own copy of the image (a reflink when the filesystem can, a sparse
    /// copy otherwise), deleted with the sandbox; the image itself is never written.
    pub private_copy: bool,
}

impl DiskSpec {
    /// A writable private copy of `path`: the usual choice for a base image.
    pub fn copy_of(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            private_copy: true,
        }
    }

    /// `path` itself, read-only (may be shared by many sandboxes).
    pub fn shared_read_only(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: true,
            private_copy: false,
        }
    }
}

/// One NIC on a host TAP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Host TAP name (created if missing, which needs CAP_NET_ADMIN).
    pub tap: String,
    /// Guest MAC; a random locally administered one when `None`.
    pub mac: Option<[u8; 6]>,
    /// The guest's address, passed on the kernel command line as `dormouse.ip=ADDR,GW` for the
    /// guest agent (PID 1) to configure eth0 (first NIC of a booted sandbox only: a restored guest
    /// keeps the configuration it was snapshotted with).
    pub guest_ip: Option<GuestIp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestIp {
    /// `ADDRESS/PREFIX`, e.g. `172.30.0.2/30`.
    pub address: String,
    pub gateway: Option<String>,
    /// Name servers the guest agent writes to /etc/resolv.conf (`dormouse.dns=`, at most 3);
    /// empty: the image's own file is kept.
    pub nameservers: Vec<String>,
}

impl GuestIp {
    /// The kernel command-line words the guest agent (PID 1) reads.
    pub fn cmdline_word(&self) -> String {
        let mut words = match &self.gateway {
            Some(gw) => format!("dormouse.ip={},{gw}", self.address),
            None => format!("dormouse.ip={}", self.address),
        };
        if !self.nameservers.is_empty() {
            words.push_str(&format!(" dormouse.dns={}", self.nameservers.join(",")));
        }
        words
    }
}

/// A fork of a checkpoint: a new sandbox with its own disk copies, TAPs, MACs and vsock CID.
#[derive(Debug, Clone)]
pub struct ForkConfig {
    /// Per saved NIC, in order: its replacement; missing entries get a generated TAP and MAC.
    pub network: Vec<NetworkConfig>,
    /// As `SandboxConfig::console_log`.
    pub console_log: Option<PathBuf>,
    pub agent_timeout: Duration,
    /// As `SandboxConfig::agent_client`.
    pub agent_client: AgentClientConfig,
}

impl Default for ForkConfig {
    fn default() -> Self {
        Self {
            network: Vec::new(),
            console_log: None,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            agent_client: AgentClientConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ip_word() {
        let ip = GuestIp {
            address: "172.30.0.2/30".into(),
            gateway: Some("172.30.0.1".into()),
            nameservers: Vec::new(),
        };
        assert_eq!(ip.cmdline_word(), "dormouse.ip=172.30.0.2/30,172.30.0.1");
        let ip = GuestIp {
            address: "10.0.0.2/24".into(),
            gateway: None,
            nameservers: vec!["10.0.0.1".into(), "10.0.0.9".into()],
        };
        assert_eq!(
            ip.cmdline_word(),
            "dormouse.ip=10.0.0.2/24 dormouse.dns=10.0.0.1,10.0.0.9"
        );
    }
}

/// How `hibernate_with` and `checkpoint_with` treat their directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Replace a snapshot (for a checkpoint: with its disk copies and `sandbox.json`) already in
    /// the directory. Off: the directory must be missing or empty. A directory holding anything
    /// else is always refused and left untouched.
    pub replace: bool,
}
