//! Runs the agent server in-process on a Unix socket in a temp dir.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agent::listen::{serve, ListenAddr, Listener, ServeError};
use agent::proto::ShutdownAction;
use agent::server::{AgentConfig, AgentService, SystemControl};
use agent_client::AgentClient;
use tokio::task::JoinHandle;

/// Records system calls instead of touching the host.
#[derive(Default)]
pub struct FakeSystem {
    pub times: Mutex<Vec<i64>>,
    pub syncs: Mutex<u32>,
    pub power: Mutex<Vec<ShutdownAction>>,
}

impl SystemControl for FakeSystem {
    fn set_time(&self, unix_nanos: i64) -> std::io::Result<()> {
        self.times.lock().unwrap().push(unix_nanos);
        Ok(())
    }

    fn sync(&self) {
        *self.syncs.lock().unwrap() += 1;
    }

    fn power(&self, action: ShutdownAction) {
        self.power.lock().unwrap().push(action);
    }
}

pub struct TestAgent {
    pub client: AgentClient,
    pub service: AgentService,
    pub system: Arc<FakeSystem>,
    pub socket: PathBuf,
    pub server: JoinHandle<Result<(), ServeError>>,
    /// Scratch directory for file tests (also holds the socket).
    pub dir: tempfile::TempDir,
}

impl TestAgent {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let system = Arc::new(FakeSystem::default());
        let service = AgentService::new(AgentConfig {
            system: system.clone(),
            is_init: false,
        });
        let listener = Listener::bind(&ListenAddr::Unix(socket.clone()))
            .await
            .unwrap();
        let server = tokio::spawn(serve(listener, service.clone()));
        let client = AgentClient::connect_unix(&socket).await.unwrap();
        Self {
            client,
            service,
            system,
            socket,
            server,
            dir,
        }
    }

    /// Absolute path (as a string) of `name` inside the scratch directory.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    pub fn dir_path(&self) -> &Path {
        self.dir.path()
    }
}

/// True once `pid` no longer exists (reaped), polling up to `timeout`.
pub async fn wait_gone(pid: u32, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // SAFETY: signal 0 only checks existence.
        let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
        if !alive {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
