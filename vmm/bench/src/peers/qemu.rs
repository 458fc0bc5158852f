//! QEMU as a peer: `-machine microvm` booting the tiny guest's PVH entry with `-kernel`, driven
//! over QMP. Snapshot = `stop` + `migrate` to `exec:cat > FILE` (QEMU 7.2 has no `file:` URI)
//! until `query-migrate` says completed; restore = a new process with `-incoming exec:cat FILE`,
//! then `cont` once the stream is loaded (the stream records that the source was stopped).
//!
//! `-cpu host,-arch-capabilities`: on a PVM host (kvm_pvm) KVM refuses QEMU's write of
//! IA32_ARCH_CAPABILITIES (MSR 0x10a) and QEMU aborts; the tiny guest never reads that MSR, so
//! hiding it changes nothing on hardware KVM either.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::process::{connect_when_listening, shell_quote, wait_for_console, Reaped};
use super::{PeerGuest, PeerVm, PeerVmm, READY_TIMEOUT, STEP_TIMEOUT};

pub struct Qemu;

/// The migration stream: device state and every non-zero page.
const STREAM_FILE: &str = "vmstate";

impl PeerVmm for Qemu {
    type Vm = QemuVm;

    fn name(&self) -> &'static str {
        "qemu"
    }

    fn program(&self) -> &'static str {
        "qemu-system-x86_64"
    }

    fn provenance(&self) -> &'static str {
        "runner tested with QEMU 7.2; snapshot = migrate to a file"
    }

    fn boot(&self, bin: &Path, guest: &PeerGuest, work: &Path) -> anyhow::Result<QemuVm> {
        let sock = work.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let mut child = Reaped::spawn(
            Command::new(bin)
                .args(boot_args(guest, &sock))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )?;
        wait_for_console(&mut child, guest.ready, READY_TIMEOUT)
            .with_context(|| stderr_of(&mut child))?;
        let mut qmp = Qmp::connect(&sock, &mut child, Instant::now() + STEP_TIMEOUT)?;
        // QEMU 7.2 throttles migration to 32 MiB/s by default: a local file should not be.
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 1u64 << 40 })),
        )?;
        Ok(QemuVm { child, qmp })
    }

    fn restore(
        &self,
        bin: &Path,
        guest: &PeerGuest,
        snap_dir: &Path,
        work: &Path,
    ) -> anyhow::Result<QemuVm> {
        let sock = work.join("qmp-restored.sock");
        let _ = std::fs::remove_file(&sock);
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut child = Reaped::spawn(
            Command::new(bin)
                .args(restore_args(guest, &sock, &self.memory_file(snap_dir)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let mut qmp = Qmp::connect(&sock, &mut child, deadline)?;
        loop {
            let status = qmp.status()?;
            match status.as_str() {
                "running" => break,
                "inmigrate" => {}
                "paused" | "postmigrate" | "prelaunch" | "restore-vm" => {
                    if qmp.migration_status()? == "completed" {
                        qmp.execute("cont", None)?;
                    }
                }
                other => bail!("the restored QEMU is {other:?}"),
            }
            if Instant::now() > deadline {
                bail!("not running within {STEP_TIMEOUT:?} (status {status:?})");
            }
            child.check_alive().context("restoring")?;
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(QemuVm { child, qmp })
    }

    fn memory_file(&self, snap_dir: &Path) -> PathBuf {
        snap_dir.join(STREAM_FILE)
    }
}

fn common_args(guest: &PeerGuest, qmp_sock: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "-machine",
        "microvm,accel=kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-m",
        &format!("{}M", guest.mem_mib),
        "-kernel",
        &guest.elf.to_string_lossy(),
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-serial",
        "stdio",
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp_sock.display()),
    ]
    .map(str::to_string)
    .to_vec();
    if let Some(linux) = &guest.linux {
        if let Some(initrd) = &linux.initrd {
            args.push("-initrd".to_string());
            args.push(initrd.to_string_lossy().into_owned());
        }
        args.push("-append".to_string());
        args.push(linux.cmdline.clone());
    }
    args
}

fn boot_args(guest: &PeerGuest, qmp_sock: &Path) -> Vec<String> {
    common_args(guest, qmp_sock)
}

/// The same machine (QEMU needs it identical) waiting for the stream.
fn restore_args(guest: &PeerGuest, qmp_sock: &Path, stream: &Path) -> Vec<String> {
    let mut args = common_args(guest, qmp_sock);
    args.push("-incoming".to_string());
    args.push(format!("exec:cat {}", shell_quote(stream)));
    args
}

fn migrate_uri(stream: &Path) -> String {
    format!("exec:cat > {}", shell_quote(stream))
}

/// Up to the first lines of QEMU's stderr, for an error message (QEMU is killed first).
fn stderr_of(child: &mut Reaped) -> String {
    use std::io::Read;
    let _ = child.0.kill();
    let mut text = String::new();
    if let Some(mut err) = child.0.stderr.take() {
        let _ = err.read_to_string(&mut text);
    }
    let text: String = text.lines().take(5).collect::<Vec<_>>().join("; ");
    if text.is_empty() {
        "QEMU said nothing on stderr".to_string()
    } else {
        format!("QEMU: {text}")
    }
}

pub struct QemuVm {
    child: Reaped,
    qmp: Qmp,
}

impl PeerVm for QemuVm {
    fn pause(&mut self) -> anyhow::Result<()> {
        self.qmp.execute("stop", None).map(drop)
    }

    fn resume(&mut self) -> anyhow::Result<()> {
        self.qmp.execute("cont", None).map(drop)
    }

    fn snapshot(&mut self, dir: &Path) -> anyhow::Result<()> {
        let stream = dir.join(STREAM_FILE);
        self.qmp
            .execute("migrate", Some(json!({ "uri": migrate_uri(&stream) })))?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match self.qmp.migration_status()?.as_str() {
                "completed" => return Ok(()),
                s @ ("failed" | "cancelled") => bail!("migration {s}"),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("migration not completed within {STEP_TIMEOUT:?}");
            }
            self.child.check_alive()?;
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }
}

/// A QMP connection: one JSON object per line, events skipped.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(sock: &Path, child: &mut Reaped, deadline: Instant) -> anyhow::Result<Self> {
        let stream = connect_when_listening(sock, child, deadline)?;
        stream.set_read_timeout(Some(STEP_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message().context("QMP greeting")?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> anyhow::Result<Value> {
        let request = qmp_command(command, arguments);
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .with_context(|| format!("sending QMP {command}"))?;
        loop {
            let reply = self.read_message()?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                bail!("QMP {command}: {err}");
            }
            // Anything else is an asynchronous event (STOP, RESUME, MIGRATION, …).
        }
    }

    fn status(&mut self) -> anyhow::Result<String> {
        let ret = self.execute("query-status", None)?;
        Ok(ret
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    fn migration_status(&mut self) -> anyhow::Result<String> {
        let ret = self.execute("query-migrate", None)?;
        Ok(ret
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string())
    }
}

fn qmp_command(command: &str, arguments: Option<Value>) -> Value {
    match arguments {
        Some(a) => json!({ "execute": command, "arguments": a }),
        None => json!({ "execute": command }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> PeerGuest {
        PeerGuest {
            label: "64 MiB idle".to_string(),
            elf: PathBuf::from("/tmp/tiny.elf"),
            linux: None,
            mem_mib: 64,
            load: crate::plot::Load::Idle,
            ready: b"ready\n",
        }
    }

    #[test]
    fn boot_runs_the_pvh_image_on_microvm_with_qmp() {
        let args = boot_args(&guest(), Path::new("/w/qmp.sock"));
        let pair = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].as_str()
        };
        assert_eq!(pair("-machine"), "microvm,accel=kvm");
        assert_eq!(pair("-m"), "64M");
        assert_eq!(pair("-kernel"), "/tmp/tiny.elf");
        assert_eq!(pair("-serial"), "stdio");
        assert_eq!(pair("-qmp"), "unix:/w/qmp.sock,server=on,wait=off");
        assert!(!args.iter().any(|a| a == "-incoming"));
    }

    #[test]
    fn restore_is_the_same_machine_reading_the_stream() {
        let boot = boot_args(&guest(), Path::new("/w/q.sock"));
        let restore = restore_args(&guest(), Path::new("/w/q.sock"), Path::new("/s/vmstate"));
        assert_eq!(&restore[..boot.len()], &boot[..]);
        assert_eq!(
            &restore[boot.len()..],
            ["-incoming", "exec:cat '/s/vmstate'"]
        );
        assert_eq!(
            migrate_uri(Path::new("/s/vmstate")),
            "exec:cat > '/s/vmstate'"
        );
    }

    #[test]
    fn qmp_commands_are_json_objects() {
        assert_eq!(qmp_command("stop", None), json!({"execute": "stop"}));
        assert_eq!(
            qmp_command("migrate", Some(json!({"uri": "exec:cat > x"}))),
            json!({"execute": "migrate", "arguments": {"uri": "exec:cat > x"}})
        );
    }
}
