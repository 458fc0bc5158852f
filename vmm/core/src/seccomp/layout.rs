//! How a thread kind's rules become one BPF program, laid out for the kernel's cost of
//! installing it. `seccomp(SET_MODE_FILTER)` checks, converts and JIT-compiles the program, and
//! then (since Linux 5.11) runs it once per system call number to find the calls it always
//! allows (its action cache): that pass costs the number of calls times the length of the path
//! each takes, and dominated the install time of seccompiler's layout, a linear chain of five
//! instructions per call (0.1–0.3 ms per filter measured on the development host, on every
//! thread before its first useful call). Here the numbers are a search tree, so each number's
//! path is a dozen instructions, and the simple shapes cost one instruction per call or value:
//!
//! ```text
//! ld arch; jeq x86_64 ? +1 : kill        (as seccompiler's own check)
//! ld nr
//! tree: jge pivot ? (ja right) : left …  (internal nodes)
//!       jeq nr_i ? target_i : next …     (leaves of a few numbers)
//!       ret MISMATCH; ret ALLOW          (each leaf: no number matched / allowed outright)
//!       ja block_j …                     (each leaf: to a block further down)
//! blocks: ld arg; jeq v_1 ? allow : next …; ret MISMATCH; ret ALLOW
//!                                        (a call allowed for a set of argument values)
//! seccompiler's program for the rest     (calls checking several arguments or masks: it
//!                                         re-checks the arch, reloads nr, ends in MISMATCH)
//! ```
//!
//! Every path ends in a return, and every jump goes forward. `tests` checks that the result
//! decides exactly like seccompiler's program of the same rules, call by call.

use seccompiler::{sock_filter, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use super::rules::{Rules, ValueSet};

/// BPF_LD | BPF_W | BPF_ABS (the first two are 0).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_JMP_JA: u16 = 0x05;
const BPF_RET_K: u16 = 0x06;

const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const SECCOMP_DATA_ARGS: u32 = 16;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// The kernel refuses longer filters (`BPF_MAXINSNS`).
const BPF_MAX_LEN: usize = 4096;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: usize, jf: usize) -> Option<sock_filter> {
    Some(sock_filter {
        code: BPF_JMP_JEQ_K,
        jt: u8::try_from(jt).ok()?,
        jf: u8::try_from(jf).ok()?,
        k,
    })
}

/// Numbers per leaf of the search tree: a leaf is a linear scan, an internal node two
/// instructions.
const LEAF_SIZE: usize = 6;

/// What the tree does with a number it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Allow,
    /// The block of the value set at this index.
    Block(usize),
    /// seccompiler's part.
    Rest,
}

/// A jump to patch once the blocks' places are known: (instruction index, target).
type Fixup = (usize, Target);

/// The program for `rules`: calls outside them get `mismatch`, the others are allowed.
pub fn assemble(
    rules: Rules,
    mismatch: SeccompAction,
) -> Result<BpfProgram, seccompiler::BackendError> {
    let split = rules.split_simple();
    let mismatch_k = u32::from(mismatch.clone());
    let mut rest = split.rest;
    let mut targets: Vec<(u32, Target)> = Vec::new();
    let mut blocks: Vec<Vec<sock_filter>> = Vec::new();
    for nr in split.any_args {
        if let Ok(nr) = u32::try_from(nr) {
            targets.push((nr, Target::Allow));
        }
    }
    for set in split.value_sets {
        match (u32::try_from(set.nr), value_set_block(&set, mismatch_k)) {
            (Ok(nr), Some(block)) => {
                targets.push((nr, Target::Block(blocks.len())));
                blocks.push(block);
            }
            // Too many values for short jumps: seccompiler lays this call out.
            _ => {
                rest = set.values.iter().fold(rest, |rules, &value| {
                    rules.allow_if(
                        set.nr,
                        &[(set.arg, seccompiler::SeccompCmpOp::Eq, u64::from(value))],
                    )
                });
            }
        }
    }
    targets.extend(
        rest.numbers()
            .filter_map(|nr| u32::try_from(nr).ok())
            .map(|nr| (nr, Target::Rest)),
    );
    targets.sort_unstable_by_key(|(nr, _)| *nr);
    targets.dedup_by_key(|(nr, _)| *nr);

    let mut program = vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        sock_filter {
            code: BPF_JMP_JEQ_K,
            jt: 1,
            jf: 0,
            k: AUDIT_ARCH_X86_64,
        },
        stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
    ];
    let mut fixups = Vec::new();
    emit_tree(&targets, mismatch_k, &mut program, &mut fixups);
    let mut block_starts = Vec::with_capacity(blocks.len());
    for block in blocks {
        block_starts.push(program.len());
        program.extend(block);
    }
    let rest_start = program.len();
    let filter = SeccompFilter::new(
        rest.into_map()?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    let tail: BpfProgram = filter.try_into()?;
    program.extend(tail);
    for (at, target) in fixups {
        let to = match target {
            Target::Block(i) => block_starts[i],
            Target::Rest => rest_start,
            Target::Allow => continue,
        };
        program[at].k = u32::try_from(to - at - 1)
            .map_err(|_| seccompiler::BackendError::FilterTooLarge(program.len()))?;
    }
    if program.len() >= BPF_MAX_LEN {
        return Err(seccompiler::BackendError::FilterTooLarge(program.len()));
    }
    Ok(program)
}

/// The search tree over `targets` (sorted by number) at the end of `program`; the `ja`s to
/// blocks and to seccompiler's part go into `fixups`.
fn emit_tree(
    targets: &[(u32, Target)],
    mismatch_k: u32,
    program: &mut BpfProgram,
    fixups: &mut Vec<Fixup>,
) {
    if targets.len() <= LEAF_SIZE {
        emit_leaf(targets, mismatch_k, program, fixups);
        return;
    }
    let (left, right) = targets.split_at(targets.len() / 2);
    // `nr >= first of right` ? the `ja` to the right half : skip it into the left half.
    program.push(sock_filter {
        code: BPF_JMP_JGE_K,
        jt: 0,
        jf: 1,
        k: right[0].0,
    });
    let over_left = program.len();
    program.push(stmt(BPF_JMP_JA, 0));
    emit_tree(left, mismatch_k, program, fixups);
    // Both halves come after the `ja`, the right one after the left: a forward jump.
    program[over_left].k = (program.len() - over_left - 1) as u32;
    emit_tree(right, mismatch_k, program, fixups);
}

/// `jeq nr_i ? target : next` for each number, then `ret MISMATCH; ret ALLOW` and a `ja` per
/// number whose target is further down.
fn emit_leaf(
    targets: &[(u32, Target)],
    mismatch_k: u32,
    program: &mut BpfProgram,
    fixups: &mut Vec<Fixup>,
) {
    let count = targets.len();
    let mut trampolines = 0;
    for (i, &(nr, target)) in targets.iter().enumerate() {
        // Offsets from this `jeq` (at i) to: the leaf's `ret ALLOW` (at count + 1), or its
        // trampoline (at count + 2 + j). Leaves are a handful of numbers: always in range.
        let jt = match target {
            Target::Allow => count - i,
            Target::Block(_) | Target::Rest => {
                trampolines += 1;
                count + trampolines - i
            }
        };
        program.push(sock_filter {
            code: BPF_JMP_JEQ_K,
            jt: jt as u8,
            jf: 0,
            k: nr,
        });
    }
    program.push(stmt(BPF_RET_K, mismatch_k));
    program.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
    for &(_, target) in targets {
        if target != Target::Allow {
            fixups.push((program.len(), target));
            program.push(stmt(BPF_JMP_JA, 0));
        }
    }
}

/// The block of a call allowed for a set of argument values: `ld arg`, a `jeq` per value to the
/// block's `ret ALLOW`, `ret MISMATCH`. None when it would not fit short jumps.
fn value_set_block(set: &ValueSet, mismatch_k: u32) -> Option<Vec<sock_filter>> {
    let count = set.values.len();
    // More than 255 values do not fit a conditional jump: `jeq` refuses them below.
    if set.arg > 5 || count == 0 {
        return None;
    }
    let mut block = Vec::with_capacity(count + 3);
    block.push(stmt(
        BPF_LD_W_ABS,
        SECCOMP_DATA_ARGS + 8 * u32::from(set.arg),
    ));
    for (i, &value) in set.values.iter().enumerate() {
        block.push(jeq(value, count - i, 0)?);
    }
    block.push(stmt(BPF_RET_K, mismatch_k));
    block.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
    Some(block)
}

#[cfg(test)]
mod tests;
