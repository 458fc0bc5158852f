//! Same-run baselines for the boot figures, so a reader can tell what dormouse adds from what
//! the host charges anyone:
//! - the process floor: spawn → exit of this very binary told to do nothing (exec, libc
//!   start-up; see [`PROCESS_FLOOR_ENV`]);
//! - the KVM floor: in this process, with no process start, threads, devices or logging,
//!   build a VM the way `dormouse run` does (VM, memory, irqchip, boot structures, one vCPU
//!   with normalised CPUID) and run the tiny guest to its first serial output.
//!
//! On a host that is itself a VM, both floors are dominated by traps to the outer hypervisor
//! (every CPUID instruction glibc and KVM execute, every KVM ioctl's MSR accesses).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kvm_ioctls::VcpuExit;

use crate::report::{stats, Stats};
use vmm::boot::{self, BootSetup};
use vmm::hypervisor::{vcpu, Hypervisor, VmSetup};

/// With this variable set, `dormouse` returns from `main` at once: spawning it measures what
/// starting the binary costs before it does anything.
pub const PROCESS_FLOOR_ENV: &str = "DORMOUSE_BENCH_PROCESS_FLOOR";

/// The serial port the tiny guest prints on.
const SERIAL_PORT: u16 = 0x3f8;
/// Guest exits before the first output that a sane tiny guest could need.
const MAX_EXITS: usize = 1000;

pub struct Floors {
    pub process: Stats,
    pub kvm: Stats,
}

pub fn measure(tiny_guest: &Path, runs: usize) -> anyhow::Result<Floors> {
    let mut process = Vec::with_capacity(runs);
    let mut kvm = Vec::with_capacity(runs);
    let exe = std::env::current_exe().context("locating the dormouse binary")?;
    spawn_idle(&exe)?; // warm the page cache
    for _ in 0..runs {
        process.push(spawn_idle(&exe)?);
        kvm.push(kvm_first_output(tiny_guest)?);
    }
    Ok(Floors {
        process: stats(process).context("no samples")?,
        kvm: stats(kvm).context("no samples")?,
    })
}

fn spawn_idle(exe: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let status = Command::new(exe)
        .env(PROCESS_FLOOR_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("running dormouse as a process baseline")?;
    let took = start.elapsed();
    if !status.success() {
        bail!("dormouse as a process baseline failed: {status}");
    }
    Ok(took)
}

/// Builds a VM for `kernel` and runs vCPU 0 on this thread until the guest's first byte on the
/// serial port; the time covers everything from opening /dev/kvm.
fn kvm_first_output(kernel: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let hv = Hypervisor::open()?;
    let mem_mib = 128;
    let memory = vmm::memory::create_guest_memory(mem_mib)?;
    let vm = hv.create_vm(
        &memory,
        VmSetup {
            pit: false,
            dirty_log: false,
        },
    )?;
    let loaded = boot::setup_memory(
        &memory,
        &BootSetup {
            kernel,
            initrd: None,
            cmdline: "",
            vcpus: 1,
            mem_size: mem_mib << 20,
        },
    )?;
    let mut fd = vcpu::create_boot_vcpu(&hv, &vm, 0, 1, loaded.entry)?;
    for _ in 0..MAX_EXITS {
        match fd.run().context("KVM_RUN")? {
            VcpuExit::IoOut(SERIAL_PORT, _) => return Ok(start.elapsed()),
            // Status reads (line status: transmitter empty) and other port writes.
            VcpuExit::IoIn(_, data) => data.fill(0xff),
            VcpuExit::IoOut(..) | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
            other => bail!("the tiny guest ended before printing: {other:?}"),
        }
    }
    bail!("no serial output after {MAX_EXITS} guest exits")
}
