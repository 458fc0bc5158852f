//! `bench boot`'s comparison with the peer VMMs: the same portable tiny guest image (PVH note
//! and 64-bit entry, idle once it has printed its line) booted by dormouse and by every peer
//! found on PATH, `runs` times each, interleaved by round so all see the same host: process start
//! → the guest's ready line on the console, with each VMM's control API up (dormouse's socket,
//! Firecracker's configuration calls and `InstanceStart`, Cloud Hypervisor's and QEMU's command
//! lines).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use vmm::tiny_guest::{self, TinyGuestEnd};

use crate::peers::{self, PeerMode};
use crate::plot;
use crate::report::{ms, stats, Stats};
use crate::snapshot::{boot, Case};

const MEM_MIB: u64 = 256;
const READY: &str = "dormouse-tiny-guest\n";

/// Boots the tiny guest with dormouse and each peer found, and prints the table. Never fails
/// for a peer: its row says what went wrong.
pub(crate) fn bench(mode: PeerMode, runs: usize, scratch: &Path) -> anyhow::Result<()> {
    let elf = scratch.join("tiny-idle-portable.elf");
    tiny_guest::write_portable_to(&elf, TinyGuestEnd::Idle)?;
    let case = Case {
        label: "tiny 256 MiB idle".into(),
        kernel: elf.clone(),
        initrd: None,
        mem_mib: MEM_MIB,
        ready: READY,
        settle: Duration::ZERO,
        tiny: true,
        touched: false,
        mem_dir: false,
    };
    let guest = peers::PeerGuest {
        label: "256 MiB idle".into(),
        elf,
        linux: None,
        mem_mib: MEM_MIB,
        load: plot::Load::Idle,
        ready: READY.as_bytes(),
    };
    let found = peers::boot_peers_found(mode);
    let mut ours = Vec::with_capacity(runs);
    let mut theirs: Vec<(String, Vec<Duration>, Option<anyhow::Error>)> = found
        .iter()
        .map(|peer| (peer.name().to_string(), Vec::new(), None))
        .collect();
    for round in 0..runs {
        let work = scratch.join(format!("boot-{round}"));
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let vm = boot(&case, &work).context("dormouse run of the tiny guest")?;
        ours.push(vm.ready_after);
        drop(vm);
        for (peer, (_, times, failed)) in found.iter().zip(theirs.iter_mut()) {
            if failed.is_some() {
                continue;
            }
            let peer_work = work.join(peer.name());
            let booted = std::fs::create_dir_all(&peer_work)
                .with_context(|| format!("creating {}", peer_work.display()))
                .and_then(|()| peer.boot_time(&guest, &peer_work));
            match booted {
                Ok(took) => times.push(took),
                Err(e) => *failed = Some(e),
            }
        }
        let _ = std::fs::remove_dir_all(&work);
    }
    let ours = stats(ours).context("no dormouse boots")?;
    print(runs, &ours, &theirs);
    for line in peers::boot_peer_lines(mode) {
        println!("{line}");
    }
    Ok(())
}

fn print(runs: usize, ours: &Stats, theirs: &[(String, Vec<Duration>, Option<anyhow::Error>)]) {
    println!();
    println!(
        "| boot, same portable tiny guest ({MEM_MIB} MiB, idle; {runs} runs, interleaved) | process start → guest's ready line, min | median | peer ÷ dormouse (median) |"
    );
    println!("|---|---|---|---|");
    println!("| dormouse | {} | {} | 1 |", ms(ours.min), ms(ours.median));
    for (name, times, failed) in theirs {
        if let Some(e) = failed {
            let text = format!("{e:#}").replace('|', "/").replace('\n', " ");
            println!("| {name} | failed: {text} | | |");
            continue;
        }
        match stats(times.clone()) {
            Some(s) => println!(
                "| {name} | {} | {} | {:.1}× |",
                ms(s.min),
                ms(s.median),
                s.median.as_secs_f64() / ours.median.as_secs_f64().max(1e-9)
            ),
            None => println!("| {name} | no samples | | |"),
        }
    }
}
