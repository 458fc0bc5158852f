//! A SeaweedFS server (master, volume, filer and S3 gateway in one `weed` process) on free
//! 127.0.0.1 ports in a temporary directory, for `dormouse bench store` and tests/tests/store.rs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use snapshot_store::{RetryPolicy, S3Config};

pub const BUCKET: &str = "dormouse-bench";
pub const ACCESS_KEY: &str = "dormouseBenchAccessKey";
pub const SECRET_KEY: &str = "dormouseBenchSecretKey0123456789";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where deploy/install-seaweedfs.sh puts `weed` (the version it pins).
pub fn installed_binary() -> Option<PathBuf> {
    let cache = match std::env::var_os("DORMOUSE_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/dormouse"),
    };
    let dir = cache.join("seaweedfs-4.48");
    let weed = dir.join("venv/bin/weed");
    (dir.join("installed").exists() && weed.exists()).then_some(weed)
}

/// The running server, killed (and its directory removed) on drop.
pub struct Weed {
    child: Child,
    s3_port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` ports free right now (held together so they differ).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// The status line of an empty-bodied HTTP request.
fn http(port: u16, method: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.lines().next().map(str::to_string)
}

impl Weed {
    /// Starts `weed` with its data in a temporary directory under `parent` and waits until
    /// the bucket [`BUCKET`] exists.
    pub fn start(weed: &Path, parent: &Path) -> anyhow::Result<Weed> {
        let dir = tempfile::Builder::new()
            .prefix("weed-")
            .tempdir_in(parent)
            .context("creating SeaweedFS's directory")?;
        let p = free_ports(9)?;
        let log = std::fs::File::create(dir.path().join("weed.log"))
            .context("creating SeaweedFS's log")?;
        let child = Command::new(weed)
            .current_dir(dir.path())
            .arg("server")
            .arg(format!("-dir={}", dir.path().display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg("-s3")
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .arg(format!("-s3.port.lance={}", p[8]))
            // Small volumes, as many as the disk holds (the default, 8, fills after 512 MiB).
            .args([
                "-s3.port.iceberg=0",
                "-master.volumeSizeLimitMB=64",
                "-volume.max=0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", weed.display()))?;
        let server = Weed {
            child,
            s3_port: p[6],
            dir,
        };
        // Creating the bucket is the readiness check: it needs master, volume, filer and S3.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let status = http(server.s3_port, "PUT", &format!("/{BUCKET}"));
            if status.as_deref().is_some_and(|s| s.contains(" 200 ")) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "SeaweedFS did not come up on 127.0.0.1:{} within {READY_TIMEOUT:?} (last \
                     answer {status:?}); its log is {}",
                    server.s3_port,
                    server.dir.path().join("weed.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Settings for [`snapshot_store::S3Store`] (the default retry policy).
    pub fn config(&self) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
            session_token: None,
            allow_http: true,
            retry: RetryPolicy::default(),
        }
    }

    /// The same settings in the environment of a `dormouse` command.
    pub fn env(&self, cmd: &mut Command) {
        cmd.envs(self.env_pairs());
    }

    /// The `AWS_*` variables that reach this server.
    pub fn env_pairs(&self) -> [(&'static str, String); 5] {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ]
    }
}
