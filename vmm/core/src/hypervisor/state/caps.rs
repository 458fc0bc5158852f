//! What this host's KVM can save, learned once per process: the capabilities decide which
//! optional ioctls exist and how large the XSAVE buffer must be.

use std::sync::OnceLock;

use kvm_bindings::kvm_xsave;
use kvm_ioctls::{Cap, Kvm};

use super::StateError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HostCaps {
    /// Bytes KVM_GET_XSAVE2 writes and KVM_SET_XSAVE reads (at least `size_of::<kvm_xsave>()`);
    /// `None` without KVM_CAP_XSAVE.
    pub xsave_size: Option<usize>,
    pub xcrs: bool,
    pub get_tsc_khz: bool,
    pub tsc_control: bool,
    pub kvmclock_ctrl: bool,
}

impl HostCaps {
    fn probe(kvm: &Kvm) -> Self {
        let legacy = std::mem::size_of::<kvm_xsave>();
        let xsave_size = kvm.check_extension(Cap::Xsave).then(|| {
            // KVM_CAP_XSAVE2 answers with the whole buffer size; 0 means a pre-5.17 kernel,
            // whose buffer is the fixed 4 KiB struct.
            usize::try_from(kvm.check_extension_int(Cap::Xsave2))
                .unwrap_or(0)
                .max(legacy)
        });
        Self {
            xsave_size,
            xcrs: kvm.check_extension(Cap::Xcrs),
            get_tsc_khz: kvm.check_extension(Cap::GetTscKhz),
            tsc_control: kvm.check_extension(Cap::TscControl),
            kvmclock_ctrl: kvm.check_extension(Cap::KvmclockCtrl),
        }
    }
}

/// The capabilities are per host and per process (XSAVE2's size follows the process's XSTATE
/// permissions), so one probe serves every VM this process makes.
pub(super) fn host_caps() -> Result<&'static HostCaps, StateError> {
    if let Some(caps) = static_caps().get() {
        return Ok(caps);
    }
    let kvm = Kvm::new().map_err(StateError::OpenKvm)?;
    Ok(static_caps().get_or_init(|| HostCaps::probe(&kvm)))
}

fn static_caps() -> &'static OnceLock<HostCaps> {
    static CAPS: OnceLock<HostCaps> = OnceLock::new();
    &CAPS
}

/// Fills the process's capabilities from an open /dev/kvm, unless known already.
pub(super) fn probe_with(kvm: &Kvm) {
    static_caps().get_or_init(|| HostCaps::probe(kvm));
}
