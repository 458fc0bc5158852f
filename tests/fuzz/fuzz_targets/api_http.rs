//! The control API's HTTP layer (`vmm_api::http`) and router (`vmm_api::router`) on arbitrary
//! bytes, without a socket: the one-shot request parser, the incremental head search the server
//! uses (chunked reads, 3-byte look-back), routing to a fake VM, the response renderer and the
//! client's response parser.

#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmm_api::http::{self, HttpError, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use vmm_api::{router, AgentInfo, ApiError, SnapshotInfo, SnapshotRequest, VmControl, VmInfo};
use vmm_api::{VmState, VsockConnectRequest};

/// A VM that answers at once (never sleeps, whatever timeout it is given).
#[derive(Default)]
struct FakeVm {
    paused: AtomicBool,
}

impl VmControl for FakeVm {
    fn pause(&self) -> Result<(), ApiError> {
        if self.paused.swap(true, Ordering::SeqCst) {
            return Err(ApiError::wrong_state("already paused"));
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        if !self.paused.swap(false, Ordering::SeqCst) {
            return Err(ApiError::wrong_state("not paused"));
        }
        Ok(())
    }

    fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, ApiError> {
        // The router promised an absolute, non-empty directory.
        assert!(req.dir.is_absolute(), "router passed {:?}", req.dir);
        Ok(SnapshotInfo {
            dir: req.dir,
            diff: req.diff,
            snapshot_id: "fuzz".into(),
            parent_id: None,
            pages_written: 1,
            memory: "written".into(),
            duration_ms: 0,
            paused_us: 0,
            live: req.live,
            live_unavailable: None,
        })
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        Ok(())
    }

    fn info(&self) -> Result<VmInfo, ApiError> {
        Ok(VmInfo {
            state: if self.paused.load(Ordering::SeqCst) {
                VmState::Paused
            } else {
                VmState::Running
            },
            vcpus: 1,
            mem_mib: 128,
            host: "fuzz".into(),
            cmdline: "console=ttyS0".into(),
            devices: Vec::new(),
            uptime_ms: 0,
            agent: None,
            balloon: None,
        })
    }

    fn wait_agent(&self, timeout: Duration) -> Result<AgentInfo, ApiError> {
        assert!(timeout <= router::MAX_AGENT_WAIT);
        Ok(AgentInfo {
            version: "fuzz".into(),
            ready_after_ms: 0,
        })
    }
}

/// The server's read loop: the head end is searched in chunks with a 3-byte look-back. It must
/// find exactly what a search of the whole buffer finds.
fn incremental_head_end(data: &[u8], chunk_sizes: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    let mut scanned = 0usize;
    let mut sizes = chunk_sizes.iter().cycle();
    while len < data.len() {
        let step = sizes.next().map_or(data.len(), |&s| usize::from(s).max(1));
        len = len.saturating_add(step).min(data.len());
        let buf = &data[..len];
        if let Some(found) = http::find_head_end(buf, scanned.saturating_sub(3)) {
            return Some(found);
        }
        scanned = len;
    }
    None
}

fuzz_target!(|data: &[u8]| {
    // First byte: how the incremental reader splits the input; the rest is the request.
    let (chunking, request) = match data.split_first() {
        Some((&n, rest)) => (usize::from(n % 8), rest),
        None => (0, data),
    };
    let (chunk_sizes, request) = request.split_at(chunking.min(request.len()));

    let whole = http::find_head_end(request, 0);
    assert_eq!(incremental_head_end(request, chunk_sizes), whole);
    if let Some((head_len, body_start)) = whole {
        assert!(head_len < body_start && body_start <= request.len());
    }

    match http::parse_request(request) {
        Ok(Some(req)) => {
            assert!(req.path.starts_with('/') && !req.path.contains('?'));
            assert!(!req.method.is_empty() && req.method.is_ascii());
            assert!(req.body.len() <= MAX_BODY_BYTES);
            let (_, body_start) = whole.expect("a parsed request has a head");
            assert!(body_start <= MAX_HEAD_BYTES);
            assert_eq!(
                &request[body_start..body_start + req.body.len()],
                &req.body[..]
            );

            let vm = FakeVm::default();
            let response = router::route(&vm, &req);
            if (200..300).contains(&response.status) {
                assert!(matches!(req.method.as_str(), "GET" | "PUT"));
            }
            if router::is_vsock_connect(&req) {
                // The server parses this body itself before the upgrade.
                let _: Result<VsockConnectRequest, _> = router::vsock_connect_request(&req.body);
            }
            // What the server sends, the client reads back.
            let bytes = response.to_bytes();
            let parsed = http::parse_response(&bytes).expect("our own response parses");
            assert_eq!(parsed.status, response.status);
            assert_eq!(parsed.body, response.body.unwrap_or_default());
        }
        // More bytes needed: only when the head or body is incomplete.
        Ok(None) => assert!(whole.is_none() || request.len() < MAX_HEAD_BYTES + MAX_BODY_BYTES),
        Err(e) => {
            let status = e.status();
            assert!((400..600).contains(&status));
            if e == HttpError::Timeout {
                unreachable!("a byte-slice parse cannot time out");
            }
        }
    }

    // The client's side on the same bytes: errors, never panics.
    let _ = http::parse_response(request);
});
