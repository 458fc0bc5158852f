//! The tree layout decides exactly like seccompiler's layout of the same rules: both programs
//! run in a small classic-BPF interpreter over every system call number (native, x32 and
//! another architecture) with argument values taken from the programs' own constants. And the
//! kernel's action-cache pass (one run per number) takes short paths through it.

use std::collections::BTreeSet;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use super::super::{allowlist, FilterOptions, SeccompLevel, ThreadKind};
use super::*;

/// What the kernel's seccomp_data holds for one call.
#[derive(Clone, Copy)]
struct Call {
    nr: u32,
    arch: u32,
    args: [u64; 6],
}

fn load(call: &Call, offset: u32) -> u32 {
    match offset {
        0 => call.nr,
        4 => call.arch,
        o if (16..64).contains(&o) && o % 4 == 0 => {
            let arg = call.args[((o - 16) / 8) as usize];
            if (o - 16) % 8 == 0 {
                arg as u32
            } else {
                (arg >> 32) as u32
            }
        }
        o => panic!("load from offset {o}"),
    }
}

/// How a run of a program ended.
enum End {
    Return(u32),
    /// The kernel's action-cache pass stops here: the decision depends on the arguments.
    NeedsArguments,
}

/// Runs `program` on `call` as the kernel would (the subset seccomp filters use). With
/// `cache_pass` it stops, as `seccomp_is_const_allow` does, at the first instruction that
/// reads an argument or computes. Returns how it ended and the instructions it ran.
fn execute(program: &BpfProgram, call: &Call, cache_pass: bool) -> (End, usize) {
    let mut acc = 0u32;
    let mut pc = 0usize;
    for steps in 1..=program.len() {
        let insn = program
            .get(pc)
            .unwrap_or_else(|| panic!("ran off the end at {pc}"));
        let (jt, jf) = (usize::from(insn.jt), usize::from(insn.jf));
        let branch = |taken: bool| pc + 1 + if taken { jt } else { jf };
        let computes_on_arguments = insn.code == 0x54 || (insn.code == 0x20 && insn.k >= 16);
        if cache_pass && computes_on_arguments {
            return (End::NeedsArguments, steps);
        }
        pc = match insn.code {
            0x20 => {
                acc = load(call, insn.k);
                pc + 1
            }
            0x54 => {
                acc &= insn.k;
                pc + 1
            }
            0x05 => pc + 1 + insn.k as usize,
            0x15 => branch(acc == insn.k),
            0x25 => branch(acc > insn.k),
            0x35 => branch(acc >= insn.k),
            0x45 => branch(acc & insn.k != 0),
            0x06 => return (End::Return(insn.k), steps),
            code => panic!("instruction {code:#x}"),
        };
    }
    panic!("no progress")
}

/// The action `program` returns for `call`.
fn run(program: &BpfProgram, call: &Call) -> u32 {
    match execute(program, call, false) {
        (End::Return(action), _) => action,
        (End::NeedsArguments, _) => unreachable!("only the cache pass stops early"),
    }
}

fn seccompiler_layout(rules: Rules, mismatch: SeccompAction) -> BpfProgram {
    SeccompFilter::new(
        rules.into_map().unwrap(),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .unwrap()
    .try_into()
    .unwrap()
}

/// Argument values worth trying: every constant either program compares with, its neighbours,
/// and the same in the high half.
fn interesting_values(programs: &[&BpfProgram]) -> Vec<u64> {
    let mut values = BTreeSet::from([0, 1, u64::MAX, u64::from(u32::MAX)]);
    for insn in programs.iter().flat_map(|p| p.iter()) {
        let k = u64::from(insn.k);
        for v in [k, k.wrapping_sub(1), k + 1, k << 32, (k << 32) | k, !k] {
            values.insert(v);
        }
    }
    values.into_iter().collect()
}

fn assert_same_decisions(rules: &Rules, what: &str) {
    // Calls allowed with any arguments need no argument sweep.
    let any_args: BTreeSet<i64> = rules.clone().split_simple().any_args.into_iter().collect();
    for mismatch in [SeccompAction::Trap, SeccompAction::Log] {
        let short = assemble(rules.clone(), mismatch.clone()).unwrap();
        let reference = seccompiler_layout(rules.clone(), mismatch.clone());
        let values = interesting_values(&[&short, &reference]);
        let mut calls = 0u64;
        for arch in [AUDIT_ARCH_X86_64, 0x4000_0003 /* i386 */] {
            for base in [0u32, 0x4000_0000 /* x32 */] {
                for nr in (0..=470).chain([999, u32::MAX >> 2]) {
                    let mut call = Call {
                        nr: base | nr,
                        arch,
                        args: [0; 6],
                    };
                    let mut check = |call: &Call| {
                        calls += 1;
                        assert_eq!(
                            run(&short, call),
                            run(&reference, call),
                            "{what}: nr {:#x} arch {arch:#x} args {:x?}",
                            call.nr,
                            call.args
                        );
                    };
                    check(&call);
                    if rules.allows(i64::from(nr)) && !any_args.contains(&i64::from(nr)) {
                        for arg in 0..6 {
                            for &v in &values {
                                call.args = [0; 6];
                                call.args[arg] = v;
                                check(&call);
                            }
                        }
                        // Two conditions on different arguments hold together.
                        for &v in values.iter().step_by(7) {
                            call.args = [v; 6];
                            check(&call);
                        }
                    }
                }
            }
        }
        assert!(calls > 1000, "{what}: only {calls} calls tried");
    }
}

#[test]
fn every_kind_decides_like_seccompiler() {
    for kind in ThreadKind::ALL {
        for options in [
            FilterOptions::default(),
            FilterOptions { vhost_vsock: true },
        ] {
            let rules = allowlist(kind, options);
            assert_same_decisions(&rules, kind.name());
            assert_same_decisions(&rules.clone().backtraces(), kind.name());
        }
    }
}

#[test]
fn long_lists_and_large_sets_keep_their_jumps_in_range() {
    // 300 calls with any arguments (more than one jump reaches), past ioctl's and socket's
    // numbers.
    let many: Vec<i64> = (120..420).collect();
    let rules = Rules::default()
        .allow_all(&many)
        .allow_if(libc::SYS_socket, &[(0, seccompiler::SeccompCmpOp::Eq, 1)]);
    let requests: Vec<u32> = (0..200).map(|i| 0xae00 + i).collect();
    assert_same_decisions(&rules.clone().ioctls(&requests), "200 requests");
    // More values than one jump reaches: seccompiler lays that call out.
    let requests: Vec<u32> = (0..300).map(|i| 0xae00 + i).collect();
    assert_same_decisions(&rules.ioctls(&requests), "300 requests");
}

/// Instructions the kernel's action-cache pass runs for `nr` (native arch): up to a return,
/// or up to where the decision needs the arguments (where it gives up on that number).
fn cache_pass_steps(program: &BpfProgram, nr: u32) -> usize {
    let call = Call {
        nr,
        arch: AUDIT_ARCH_X86_64,
        args: [0; 6],
    };
    execute(program, &call, true).1
}

#[test]
fn every_number_takes_a_short_path() {
    for kind in ThreadKind::ALL {
        for options in [
            FilterOptions::default(),
            FilterOptions { vhost_vsock: true },
        ] {
            let rules = allowlist(kind, options);
            let short = assemble(rules.clone(), SeccompAction::Trap).unwrap();
            let reference = seccompiler_layout(rules, SeccompAction::Trap);
            let (mut total, mut reference_total, mut longest) = (0, 0, 0);
            for nr in 0..=470 {
                let steps = cache_pass_steps(&short, nr);
                longest = longest.max(steps);
                total += steps;
                reference_total += cache_pass_steps(&reference, nr);
            }
            let name = kind.name();
            assert!(longest <= 32, "{name}: a path of {longest} instructions");
            assert!(
                total * 2 < reference_total,
                "{name}: {total} steps for all numbers, seccompiler's layout {reference_total}"
            );
            assert!(
                short.len() < reference.len(),
                "{name}: {} instructions, seccompiler's {}",
                short.len(),
                reference.len()
            );
        }
    }
    // And what `program` builds is this layout.
    let built = super::super::program(
        ThreadKind::Vcpu,
        SeccompLevel::Enforce,
        FilterOptions::default(),
    )
    .unwrap();
    let laid_out = assemble(
        allowlist(ThreadKind::Vcpu, FilterOptions::default()),
        SeccompAction::Trap,
    )
    .unwrap();
    assert_eq!(built.len(), laid_out.len());
}
