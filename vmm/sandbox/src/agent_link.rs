//! Connecting a sandbox's `AgentClient` over the VM's in-process vsock (no Unix socket), and
//! knowing when the agent is ready.
//!
//! Readiness is one function, `wait_for_agent`. After a boot it waits for the agent's own
//! announcement (`READY <version>` on host vsock port 1023, see `vmm::agent_ready`), polling
//! only slowly meanwhile (in case no announcement can arrive). After a restore the agent was
//! already listening when the snapshot was taken, so it connects at once. Either way the agent
//! must then answer a Ping, retried with a short backoff until the deadline.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_client::{AgentClient, AgentClientConfig, AGENT_VSOCK_PORT};
use devices::virtio::vsock::VsockHandle;

use vmm::vm::VmController;

const FIRST_BACKOFF: Duration = Duration::from_millis(2);
const MAX_BACKOFF: Duration = Duration::from_millis(200);
/// Polling while a guest boots, until its agent announces itself.
const BOOT_BACKOFF: Duration = Duration::from_millis(500);
/// One vsock connect may wait this long for the guest to accept or refuse (an emulated guest
/// kernel is slow to answer, more so with many guests starting at once).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client over `first` (an already connected stream); the channel reconnects through `vsock`
/// when needed.
async fn client_over(
    vsock: &VsockHandle,
    first: tokio::net::UnixStream,
    config: AgentClientConfig,
) -> Result<AgentClient, String> {
    let handle = vsock.clone();
    let first = Arc::new(Mutex::new(Some(first)));
    AgentClient::connect_with(AGENT_VSOCK_PORT, move |port| {
        let first = first.lock().unwrap_or_else(|e| e.into_inner()).take();
        let connect = handle.connect(port);
        async move {
            match first {
                Some(stream) => Ok(stream),
                None => connect.await,
            }
        }
    })
    .await
    .map(|client| client.with_config(config))
    .map_err(|e| format!("{e}: {}", source_chain(&e)))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut next = e.source();
    while let Some(s) = next {
        parts.push(s.to_string());
        next = s.source();
    }
    parts.join(": ")
}

/// How the VM came to run: it decides whether the agent is still starting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    Booted,
    Restored,
}

/// Waits until the agent answers (see the module comment) or `timeout` passes; returns a
/// connected client or the last error.
pub async fn wait_for_agent(
    vm: &VmController,
    vsock: &VsockHandle,
    kind: StartKind,
    timeout: Duration,
    config: AgentClientConfig,
) -> Result<AgentClient, String> {
    let deadline = Instant::now() + timeout;
    if kind == StartKind::Booted {
        // Slow polling covers a guest whose announcement never arrives (an older agent, no
        // readiness listener); the announcement, when it comes, switches to fast polling.
        let announced = async {
            match vm.wait_agent_ready(timeout).await {
                Ok(ready) => tracing::debug!(
                    "agent {} announced itself {:?} after the VM started",
                    ready.version,
                    ready.after_start
                ),
                Err(e) => tracing::debug!("no readiness announcement: {e}"),
            }
        };
        tokio::select! {
            result = ping_until(vsock, deadline, BOOT_BACKOFF, config) => return result,
            () = announced => {}
        }
    }
    ping_until(vsock, deadline, FIRST_BACKOFF, config).await
}

/// Connects and pings until the agent answers or the deadline passes.
async fn ping_until(
    vsock: &VsockHandle,
    deadline: Instant,
    first_backoff: Duration,
    config: AgentClientConfig,
) -> Result<AgentClient, String> {
    let mut backoff = first_backoff;
    let mut last_error = String::from("no attempt made");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last_error);
        }
        // Only the vsock handshake has a per-attempt bound (a request lost in a transport reset
        // must not eat the whole budget); once connected, a slow guest gets all the time left.
        let attempt = async {
            let stream =
                tokio::time::timeout(left.min(CONNECT_TIMEOUT), vsock.connect(AGENT_VSOCK_PORT))
                    .await
                    .map_err(|_| "vsock connect timed out".to_string())?
                    .map_err(|e| format!("vsock connect: {e}"))?;
            let client = client_over(vsock, stream, config).await?;
            client.ping().await.map_err(|e| format!("ping: {e}"))?;
            Ok::<_, String>(client)
        };
        match tokio::time::timeout(left, attempt).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = "no answer before the deadline".into(),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF.max(first_backoff));
    }
}

/// [`wait_for_agent`] for a VM in its own process: the agent is reached through the process's
/// hybrid vsock socket `uds`, and a booting guest's announcement is awaited over its control
/// API socket `api` (`PUT /v1/agent/wait`).
pub async fn wait_for_agent_hybrid(
    uds: &std::path::Path,
    api: &std::path::Path,
    kind: StartKind,
    timeout: Duration,
    config: AgentClientConfig,
) -> Result<AgentClient, String> {
    let deadline = Instant::now() + timeout;
    if kind == StartKind::Booted {
        let api = vmm_api::client::ApiClient::new(api);
        let announced = async {
            match tokio::task::spawn_blocking(move || api.wait_agent(timeout)).await {
                Ok(Ok(ready)) => tracing::debug!("agent {} announced itself", ready.version),
                Ok(Err(e)) => tracing::debug!("no readiness announcement: {e}"),
                Err(_) => {}
            }
        };
        tokio::select! {
            result = ping_hybrid_until(uds, deadline, BOOT_BACKOFF, config) => return result,
            () = announced => {}
        }
    }
    ping_hybrid_until(uds, deadline, FIRST_BACKOFF, config).await
}

async fn ping_hybrid_until(
    uds: &std::path::Path,
    deadline: Instant,
    first_backoff: Duration,
    config: AgentClientConfig,
) -> Result<AgentClient, String> {
    let mut backoff = first_backoff;
    let mut last_error = String::from("no attempt made");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last_error);
        }
        let attempt = async {
            let client = tokio::time::timeout(
                left.min(CONNECT_TIMEOUT),
                AgentClient::connect_hybrid_vsock(uds, AGENT_VSOCK_PORT),
            )
            .await
            .map_err(|_| "hybrid vsock connect timed out".to_string())?
            .map_err(|e| format!("hybrid vsock connect: {e}: {}", source_chain(&e)))?
            .with_config(config);
            client.ping().await.map_err(|e| format!("ping: {e}"))?;
            Ok::<_, String>(client)
        };
        match tokio::time::timeout(left, attempt).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = "no answer before the deadline".into(),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF.max(first_backoff));
    }
}
