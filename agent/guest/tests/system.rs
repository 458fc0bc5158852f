//! Ping, clock, sync, shutdown, and the hybrid-vsock connection path.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent::listen::{serve, ListenAddr, Listener};
use agent::proto::ShutdownAction;
use agent::server::{AgentConfig, AgentService};
use agent_client::{AgentClient, ClientError};
use common::TestAgent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tonic::Code;

#[tokio::test]
async fn ping_reports_version() {
    let agent = TestAgent::start().await;
    let ping = agent.client.ping().await.unwrap();
    assert_eq!(ping.version, env!("CARGO_PKG_VERSION"));
    assert!(!ping.is_init);
    assert_eq!(ping.running_processes, 0);
}

#[tokio::test]
async fn set_time_and_sync_reach_the_system() {
    let agent = TestAgent::start().await;
    let when = UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_nanos(123);
    agent.client.set_time(when).await.unwrap();
    assert_eq!(
        *agent.system.times.lock().unwrap(),
        [1_800_000_000_000_000_123]
    );
    let before_epoch = agent.client.set_time(UNIX_EPOCH).await.unwrap_err();
    assert_eq!(before_epoch.code(), Some(Code::InvalidArgument));

    agent.client.sync_fs().await.unwrap();
    assert_eq!(*agent.system.syncs.lock().unwrap(), 1);
}

#[tokio::test]
async fn shutdown_syncs_powers_off_and_stops_serving() {
    let agent = TestAgent::start().await;
    agent.client.shutdown(ShutdownAction::Reboot).await.unwrap();
    assert_eq!(*agent.system.syncs.lock().unwrap(), 1);
    let served = tokio::time::timeout(Duration::from_secs(5), agent.server)
        .await
        .expect("server did not stop");
    served.unwrap().unwrap();
    assert_eq!(
        *agent.system.power.lock().unwrap(),
        [ShutdownAction::Reboot]
    );
    assert!(AgentClient::connect_unix(&agent.socket).await.is_err());
}

/// A stand-in for the VMM's hybrid vsock socket: checks the CONNECT line,
/// answers, then splices the connection to the agent's Unix socket.
async fn fake_hybrid_vsock(
    listener: UnixListener,
    agent_socket: std::path::PathBuf,
    reply: &'static [u8],
) {
    loop {
        let Ok((mut host, _)) = listener.accept().await else {
            return;
        };
        let agent_socket = agent_socket.clone();
        tokio::spawn(async move {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while host.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            if line != b"CONNECT 1024" {
                return;
            }
            let mut guest = UnixStream::connect(agent_socket).await.unwrap();
            host.write_all(reply).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
        });
    }
}

#[tokio::test]
async fn hybrid_vsock_connect_handshake() {
    let agent = TestAgent::start().await;
    let hybrid = agent.dir_path().join("v.sock");
    let listener = UnixListener::bind(&hybrid).unwrap();
    tokio::spawn(fake_hybrid_vsock(
        listener,
        agent.socket.clone(),
        b"OK 1073741824\n",
    ));

    let client = AgentClient::connect_hybrid_vsock(&hybrid, 1024)
        .await
        .unwrap();
    assert_eq!(
        client.ping().await.unwrap().version,
        env!("CARGO_PKG_VERSION")
    );
    let output = client
        .exec(&agent_client::ExecCommand::new("echo").arg("via vsock"))
        .await
        .unwrap();
    assert_eq!(output.stdout, b"via vsock\n");
}

#[tokio::test]
async fn hybrid_vsock_bad_reply_and_wrong_port() {
    let agent = TestAgent::start().await;
    let hybrid = agent.dir_path().join("bad.sock");
    let listener = UnixListener::bind(&hybrid).unwrap();
    tokio::spawn(fake_hybrid_vsock(
        listener,
        agent.socket.clone(),
        b"ERR nope\n",
    ));
    let bad = AgentClient::connect_hybrid_vsock(&hybrid, 1024)
        .await
        .unwrap_err();
    assert!(matches!(bad, ClientError::Handshake(_)), "{bad}");
    // The fake only knows port 1024: it hangs up on others.
    let closed = AgentClient::connect_hybrid_vsock(&hybrid, 7)
        .await
        .unwrap_err();
    assert!(matches!(closed, ClientError::Handshake(_)), "{closed}");
    let missing = AgentClient::connect_hybrid_vsock(agent.dir_path().join("none"), 1024)
        .await
        .unwrap_err();
    assert!(matches!(missing, ClientError::Handshake(_)), "{missing}");
}

#[tokio::test]
async fn connect_with_custom_stream_factory() {
    let agent = TestAgent::start().await;
    let socket = agent.socket.clone();
    let seen_port = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let recorder = seen_port.clone();
    let client = AgentClient::connect_with(1024, move |port| {
        recorder.store(port, std::sync::atomic::Ordering::SeqCst);
        let socket = socket.clone();
        async move { UnixStream::connect(socket).await }
    })
    .await
    .unwrap();
    assert!(client.ping().await.is_ok());
    assert_eq!(seen_port.load(std::sync::atomic::Ordering::SeqCst), 1024);
}

#[tokio::test]
async fn serves_over_tcp() {
    let service = AgentService::new(AgentConfig {
        system: std::sync::Arc::new(common::FakeSystem::default()),
        is_init: false,
    });
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let addr = listener.tcp_addr().unwrap();
    let server = tokio::spawn(serve(listener, service.clone()));
    let client = AgentClient::connect_tcp(addr).await.unwrap();
    let now = SystemTime::now();
    assert!(client.ping().await.unwrap().uptime_ms < 60_000);
    service.request_stop();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(now.elapsed().unwrap() < Duration::from_secs(5));
}
