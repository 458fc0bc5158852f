//! How a thread kind's rules become one BPF program, kept short: the kernel's cost to install a
//! filter (`seccomp(SET_MODE_FILTER)` checks, converts and JIT-compiles it) grows with its
//! length, about 3 µs per instruction on the development host, and every thread pays it before
//! its first useful call. seccompiler lays out every call as a chain (five instructions for a
//! call allowed with any arguments, five more per ioctl request); here the two simple shapes
//! get one instruction per call or value, and seccompiler builds the rest:
//!
//! ```text
//! ld arch; jeq x86_64 ? +1 : kill        (as seccompiler's own check)
//! ld nr
//! jeq nr_1 ? allow : next …              (calls allowed with any arguments)
//! ja past; allow: ret ALLOW
//! jeq nr ? next : past_set               (a call allowed for a set of argument values)
//!   ld arg; jeq v_1 ? allow : next …; ret MISMATCH; allow: ret ALLOW
//! seccompiler's program for the rest     (re-checks the arch, reloads nr, ends in MISMATCH)
//! ```
//!
//! Every path ends in a return: a number matched above never reaches seccompiler's part, and a
//! number no part lists ends in its final MISMATCH. `tests` checks that the result decides
//! exactly like seccompiler's program of the same rules, call by call.

use seccompiler::{sock_filter, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use super::rules::{Rules, ValueSet};

/// BPF_LD | BPF_W | BPF_ABS (the first two are 0).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JA: u16 = 0x05;
const BPF_RET_K: u16 = 0x06;

const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const SECCOMP_DATA_ARGS: u32 = 16;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// A conditional jump reaches at most 255 instructions ahead.
const MAX_JUMP: usize = 255;

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

/// The program for `rules`: calls outside them get `mismatch`, the others are allowed.
pub fn assemble(
    rules: Rules,
    mismatch: SeccompAction,
) -> Result<BpfProgram, seccompiler::BackendError> {
    let split = rules.split_simple();
    let mismatch_k = u32::from(mismatch.clone());
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
    for chunk in split.any_args.chunks(MAX_JUMP) {
        push_any_args(&mut program, chunk);
    }
    let mut rest = split.rest;
    for set in split.value_sets {
        if !push_value_set(&mut program, &set, mismatch_k) {
            // Too many values for short jumps: seccompiler lays this call out.
            rest = set.values.iter().fold(rest, |rules, &value| {
                rules.allow_if(
                    set.nr,
                    &[(set.arg, seccompiler::SeccompCmpOp::Eq, u64::from(value))],
                )
            });
        }
    }
    let filter = SeccompFilter::new(
        rest.into_map()?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    let tail: BpfProgram = filter.try_into()?;
    program.extend(tail);
    if program.len() >= BPF_MAX_LEN {
        return Err(seccompiler::BackendError::FilterTooLarge(program.len()));
    }
    Ok(program)
}

/// `jeq nr_i ? allow : next` for each number, then `ja +1; allow: ret ALLOW`.
fn push_any_args(program: &mut BpfProgram, nrs: &[i64]) {
    let count = nrs.len();
    for (i, &nr) in nrs.iter().enumerate() {
        // `chunks(MAX_JUMP)` keeps `count - i` within a jump; numbers are small and positive.
        if let (Ok(k), Some(insn)) = (u32::try_from(nr), jeq(0, count - i, 0)) {
            program.push(sock_filter { k, ..insn });
        } else {
            // Unrepresentable (not a real syscall number): a jump that never matches keeps
            // the offsets right.
            program.push(sock_filter {
                code: BPF_JMP_JA,
                jt: 0,
                jf: 0,
                k: 0,
            });
        }
    }
    program.push(stmt(BPF_JMP_JA, 1));
    program.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
}

/// The block of a call allowed for a set of argument values; false (nothing pushed) when it
/// does not fit short jumps.
fn push_value_set(program: &mut BpfProgram, set: &ValueSet, mismatch_k: u32) -> bool {
    let count = set.values.len();
    if set.arg > 5 {
        return false;
    }
    let (Ok(nr), Some(skip)) = (u32::try_from(set.nr), jeq(0, 0, count + 3)) else {
        return false;
    };
    let mut block = Vec::with_capacity(count + 4);
    block.push(sock_filter { k: nr, ..skip });
    block.push(stmt(
        BPF_LD_W_ABS,
        SECCOMP_DATA_ARGS + 8 * u32::from(set.arg),
    ));
    for (i, &value) in set.values.iter().enumerate() {
        match jeq(value, count - i, 0) {
            Some(insn) => block.push(insn),
            None => return false,
        }
    }
    block.push(stmt(BPF_RET_K, mismatch_k));
    block.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
    program.extend(block);
    true
}

#[cfg(test)]
mod tests;
