//! dormouse's own `/v1/…` API on the same socket: [`VmControl`] on an [`FcVmm`] forwards to the
//! VM once it is started (409 before), and hands every other path to the Firecracker router.

use std::time::Duration;

use vmm_api::http::{Request, Response};
use vmm_api::{
    AgentInfo, ApiError, DriveUpdate, NetUpdate, SnapshotInfo, SnapshotRequest, VmControl, VmInfo,
    VsockAnswer,
};

use super::front::FcVmm;
use super::router;

impl FcVmm {
    fn vm(&self) -> Result<vmm::VmController, ApiError> {
        self.controller().ok_or_else(|| {
            ApiError::wrong_state("no VM yet: configure it and PUT /actions InstanceStart")
        })
    }
}

impl VmControl for FcVmm {
    fn pause(&self) -> Result<(), ApiError> {
        VmControl::pause(&self.vm()?)
    }

    fn resume(&self) -> Result<(), ApiError> {
        VmControl::resume(&self.vm()?)
    }

    fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, ApiError> {
        VmControl::snapshot(&self.vm()?, req)
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        VmControl::shutdown(&self.vm()?)
    }

    fn info(&self) -> Result<VmInfo, ApiError> {
        VmControl::info(&self.vm()?)
    }

    fn metrics(&self) -> Option<vmm_metrics::VmMetrics> {
        Some(FcVmm::metrics(self).clone())
    }

    fn route_foreign(&self, request: &Request) -> Option<Response> {
        Some(router::route(self, request))
    }

    fn report_failure(&self, reason: String) {
        match self.controller() {
            Some(vm) => VmControl::report_failure(&vm, reason),
            None => tracing::error!("{reason}"),
        }
    }

    #[cfg(feature = "fault-injection")]
    fn inject_fault(
        &self,
        thread: vmm::fault::FaultThread,
        kind: vmm::fault::FaultKind,
    ) -> Result<(), ApiError> {
        VmControl::inject_fault(&self.vm()?, thread, kind)
    }

    fn seccomp_level(&self) -> vmm::SeccompLevel {
        self.settings().seccomp
    }

    fn wait_agent(&self, timeout: Duration) -> Result<AgentInfo, ApiError> {
        VmControl::wait_agent(&self.vm()?, timeout)
    }

    fn update_drive(&self, index: usize, update: DriveUpdate) -> Result<DriveUpdate, ApiError> {
        VmControl::update_drive(&self.vm()?, index, update)
    }

    fn update_net(&self, index: usize, update: NetUpdate) -> Result<NetUpdate, ApiError> {
        VmControl::update_net(&self.vm()?, index, update)
    }

    fn vsock_connect(
        &self,
        stream: std::os::unix::net::UnixStream,
        port: u32,
        on_answer: VsockAnswer,
    ) -> Result<(), ApiError> {
        VmControl::vsock_connect(&self.vm()?, stream, port, on_answer)
    }
}
