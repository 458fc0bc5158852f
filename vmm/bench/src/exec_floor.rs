//! The guest's floor under the agent's calls, measured in the same sandbox and run:
//! - agent `Exec` of `/bin/true`, round trip from the host, against a bare fork + exec + wait of
//!   `/bin/true` by the guest's shell (a loop of N minus a loop of 0, per iteration);
//! - agent `WriteFile` and `ReadFile` of 1 MiB against `cat` moving the same MiB through the
//!   guest kernel (an Exec of `cat a > b` minus an Exec of `sh -c true`);
//! - with `strace` in the guest image (`build-rootfs.sh --from debian --packages strace`): the
//!   system calls per `Exec`, the agent's threads apart from the child's.
//!
//! On an emulating host every guest system call and page fault runs the emulator (~0.3 ms a
//! syscall), so these ratios say how much the agent adds to what the guest must do anyway.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use vmm_sandbox::{ExecCommand, SandboxId, SandboxManager, WriteOptions};

use crate::report::{ms, stats, Stats};

const LOOP_ITERATIONS: usize = 10;
/// How long the strace count may take (two traced rounds of Execs).
const STRACE_BOUND: Duration = Duration::from_secs(240);
const MIB: usize = 1 << 20;

pub struct ExecFloor {
    pub exec_true: Stats,
    pub fork_exec: Stats,
    pub write_file: Stats,
    pub read_file: Stats,
    pub cat: Stats,
    /// (agent threads, children) system calls per Exec of /bin/true, when strace is there.
    pub syscalls: Option<(f64, f64)>,
}

pub async fn measure(
    manager: &SandboxManager,
    id: &SandboxId,
    runs: usize,
) -> anyhow::Result<ExecFloor> {
    let runs = runs.max(3);
    let true_command = ExecCommand::new("/bin/true");
    for _ in 0..2 {
        exec_ok(manager, id, &true_command).await?;
    }
    let mut exec_true = Vec::with_capacity(runs);
    let mut fork_exec = Vec::with_capacity(runs);
    let loop_of = |n: usize| {
        ExecCommand::shell(format!(
            "i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done"
        ))
    };
    let (empty_loop, full_loop) = (loop_of(0), loop_of(LOOP_ITERATIONS));
    for _ in 0..runs {
        exec_true.push(exec_ok(manager, id, &true_command).await?);
        let empty = exec_ok(manager, id, &empty_loop).await?;
        let full = exec_ok(manager, id, &full_loop).await?;
        fork_exec.push(full.saturating_sub(empty) / LOOP_ITERATIONS as u32);
    }

    let payload: Vec<u8> = (0..MIB).map(|i| (i * 7 + i / 4096) as u8).collect();
    let mut write_file = Vec::with_capacity(runs);
    let mut read_file = Vec::with_capacity(runs);
    let mut cat = Vec::with_capacity(runs);
    let shell_true = ExecCommand::shell("true");
    let copy = ExecCommand::shell("cat /tmp/floor-1m > /tmp/floor-1m-copy");
    for _ in 0..runs {
        let started = Instant::now();
        manager
            .write_file(id, "/tmp/floor-1m", &payload, WriteOptions::default())
            .await?;
        write_file.push(started.elapsed());
        let started = Instant::now();
        let back = manager.read_file(id, "/tmp/floor-1m").await?;
        read_file.push(started.elapsed());
        if back != payload {
            bail!("ReadFile returned other bytes than WriteFile wrote");
        }
        let empty = exec_ok(manager, id, &shell_true).await?;
        let full = exec_ok(manager, id, &copy).await?;
        cat.push(full.saturating_sub(empty));
    }
    // Tracing PID 1 under an emulated kernel is slow and has hung once (after the agent moved
    // to posix_spawn, not yet explained): bounded, so the rest of the table still prints.
    let syscalls = match tokio::time::timeout(STRACE_BOUND, syscalls_per_exec(manager, id)).await {
        Ok(counted) => counted?,
        Err(_) => {
            eprintln!(
                "exec floor: counting system calls with strace took over {STRACE_BOUND:?}; skipped"
            );
            None
        }
    };
    Ok(ExecFloor {
        exec_true: stats(exec_true).context("no samples")?,
        fork_exec: stats(fork_exec).context("no samples")?,
        write_file: stats(write_file).context("no samples")?,
        read_file: stats(read_file).context("no samples")?,
        cat: stats(cat).context("no samples")?,
        syscalls,
    })
}

async fn exec_ok(
    manager: &SandboxManager,
    id: &SandboxId,
    command: &ExecCommand,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = manager.exec(id, command).await?;
    let took = started.elapsed();
    if !out.success() {
        bail!(
            "{:?} failed in the guest: {:?} {}",
            command.spec(),
            out.status,
            out.stderr_lossy()
        );
    }
    Ok(took)
}

/// strace attached to every thread of PID 1 (and, with -f, what it starts) over a few Execs and
/// over more of them: the difference per Exec, split into the agent's own threads and the rest.
async fn syscalls_per_exec(
    manager: &SandboxManager,
    id: &SandboxId,
) -> anyhow::Result<Option<(f64, f64)>> {
    let probe = manager
        .exec(id, &ExecCommand::shell("command -v strace"))
        .await?;
    if !probe.success() {
        return Ok(None);
    }
    let few = trace_execs(manager, id, 2).await?;
    let many = trace_execs(manager, id, 12).await?;
    let per_exec = |a: usize, b: usize| (b as f64 - a as f64) / 10.0;
    Ok(Some((per_exec(few.0, many.0), per_exec(few.1, many.1))))
}

/// Traces `count` Execs of /bin/true; returns (agent thread syscalls, other syscalls).
async fn trace_execs(
    manager: &SandboxManager,
    id: &SandboxId,
    count: usize,
) -> anyhow::Result<(usize, usize)> {
    let start = ExecCommand::shell(
        "rm -f /tmp/floor.trace; strace -f -qq -o /tmp/floor.trace \
         $(for t in /proc/1/task/*; do printf ' -p %s' ${t##*/}; done) \
         </dev/null >/dev/null 2>&1 & echo $!; sleep 2",
    );
    let out = manager.exec(id, &start).await?;
    let tracer = out.stdout_lossy().trim().to_owned();
    if tracer.is_empty() || !tracer.bytes().all(|b| b.is_ascii_digit()) {
        bail!("strace did not start: {}", out.stderr_lossy());
    }
    let true_command = ExecCommand::new("/bin/true");
    for _ in 0..count {
        exec_ok(manager, id, &true_command).await?;
    }
    exec_ok(
        manager,
        id,
        &ExecCommand::shell(format!(
            "kill -INT {tracer}; while kill -0 {tracer} 2>/dev/null; do sleep 0.2; done"
        )),
    )
    .await?;
    let threads = manager
        .exec(id, &ExecCommand::shell("ls /proc/1/task"))
        .await?
        .stdout_lossy();
    let threads: Vec<&str> = threads.split_whitespace().collect();
    let trace = manager.read_file(id, "/tmp/floor.trace").await?;
    let (mut agent, mut other) = (0, 0);
    for line in String::from_utf8_lossy(&trace).lines() {
        let (pid, call) = line.split_once(' ').unwrap_or((line, ""));
        let call = call.trim_start();
        // A call split by a thread switch is one call; exits and signals are not calls.
        if call.starts_with("<...") || call.starts_with("+++") || call.starts_with("---") {
            continue;
        }
        if threads.contains(&pid) {
            agent += 1;
        } else {
            other += 1;
        }
    }
    Ok((agent, other))
}

pub fn print(floor: &ExecFloor) {
    println!("| guest floor (same sandbox, same run) | median | min | ratio |");
    println!("|---|---|---|---|");
    let ratio = |a: &Stats, b: &Stats| a.median.as_secs_f64() / b.median.as_secs_f64().max(1e-9);
    println!(
        "| agent Exec of /bin/true (host round trip) | {} | {} | {:.2}× the bare fork + exec |",
        ms(floor.exec_true.median),
        ms(floor.exec_true.min),
        ratio(&floor.exec_true, &floor.fork_exec)
    );
    println!(
        "| bare fork + exec + wait of /bin/true by the guest's shell | {} | {} | 1 |",
        ms(floor.fork_exec.median),
        ms(floor.fork_exec.min)
    );
    println!(
        "| agent WriteFile, 1 MiB | {} | {} | {:.2}× cat |",
        ms(floor.write_file.median),
        ms(floor.write_file.min),
        ratio(&floor.write_file, &floor.cat)
    );
    println!(
        "| agent ReadFile, 1 MiB | {} | {} | {:.2}× cat |",
        ms(floor.read_file.median),
        ms(floor.read_file.min),
        ratio(&floor.read_file, &floor.cat)
    );
    println!(
        "| `cat` of 1 MiB file to file in the guest (Exec minus an empty Exec) | {} | {} | 1 |",
        ms(floor.cat.median),
        ms(floor.cat.min)
    );
    match floor.syscalls {
        Some((agent, other)) => println!(
            "\nSystem calls per Exec of /bin/true (strace, 12 Execs minus 2): {agent:.0} by the \
             agent's threads, {other:.0} by the child (its exec and /bin/true itself)."
        ),
        None => println!(
            "\nSystem calls per Exec: not counted (no strace in the guest; build the image with \
             `deploy/build-rootfs.sh --from debian --packages strace`)."
        ),
    }
}
