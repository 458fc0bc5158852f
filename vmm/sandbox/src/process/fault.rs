//! Test builds only: a fault injected into a sandbox process over its control API
//! (`PUT /v1/fault`, served by fault-injection builds of `dormouse`).

use vmm_api::client::{ApiClient, ClientError};

use super::child::SandboxProcess;

impl SandboxProcess {
    /// Sends the fault; the process may die before it answers (a forbidden call on the API
    /// thread), which counts as delivered.
    pub(crate) fn inject_fault(
        &self,
        thread: vmm::fault::FaultThread,
        kind: vmm::fault::FaultKind,
    ) -> std::io::Result<()> {
        match ApiClient::new(self.paths().api_host()).inject_fault(thread, kind) {
            Ok(()) | Err(ClientError::NoAnswer { .. } | ClientError::Io { .. }) => Ok(()),
            Err(e) => Err(std::io::Error::other(format!(
                "the sandbox process refused the fault: {e}"
            ))),
        }
    }
}
