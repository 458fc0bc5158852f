//! The Firecracker-compatible API (`vmm_fc_api::router`) on arbitrary requests: whatever the
//! method, path and body, a Firecracker path gets 200, 204 or 400, a 400 carries a JSON
//! `fault_message`, and nothing panics. The launcher builds no VM (each start or load is
//! refused), so the requests exercise parsing, the checks of what dormouse cannot honour and
//! the pre-boot state machine. One input is a sequence of requests against one instance, so
//! the fuzzer reaches states that need several calls (configured, then started or loaded).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_api::http;
use vmm_fc_api::{FcSettings, FcVmm, Launcher};

/// Refuses every VM: the state machine stays pre-boot, as after a failed `InstanceStart`.
struct NoVm;

impl Launcher for NoVm {
    fn start(&self, _: vmm::VmConfig) -> Result<vmm::VmController, String> {
        Err("fuzzing builds no VM".into())
    }

    fn restore(&self, _: vmm::RestoreOptions) -> Result<vmm::VmController, String> {
        Err("fuzzing restores no VM".into())
    }
}

fuzz_target!(|data: &[u8]| {
    let vmm = FcVmm::new(FcSettings::default(), Box::new(NoVm)).expect("metrics registry");
    // Requests separated by a NUL byte (never valid inside a request head).
    for piece in data.split(|&b| b == 0).take(16) {
        let Ok(Some(request)) = http::parse_request(piece) else {
            continue;
        };
        if request.path.starts_with("/v1/") {
            continue;
        }
        let response = vmm_fc_api::router::route(&vmm, &request);
        assert!(
            matches!(response.status, 200 | 204 | 400),
            "{} {} answered {}",
            request.method,
            request.path,
            response.status
        );
        if response.status == 400 {
            let body = response.body.as_deref().unwrap_or_default();
            let value: serde_json::Value =
                serde_json::from_slice(body).expect("a 400 body is JSON");
            assert!(value.get("fault_message").is_some(), "{value}");
        }
        // What the server sends, a client reads back.
        let bytes = response.to_bytes();
        let parsed = http::parse_response(&bytes).expect("our own response parses");
        assert_eq!(parsed.status, response.status);
    }
});
