//! Instructions on a page that is trapped for reads (it holds a hidden INT3 of
//! ours) completed by the VMM, so the code that shares the page with a hidden
//! breakpoint costs one exit per instruction instead of a page opened and
//! closed around each (six memslot ioctls and two guest entries).
//!
//! The common forms only — `mov`, `lea`, `movzx`/`movsx`, the two-operand
//! arithmetic and logic with their flags, `inc`/`dec`, `push`/`pop`, `call`,
//! `ret`, `jmp`, `jcc`, `nop`, and `rep stos` (memset) — at CPL0, on registers
//! and on plain memory (RAM no hook watches: an access a hook must see goes the
//! usual way). Anything else,
//! and any fault, is left to the step-over path (None): an instruction either
//! completes here with every effect or has none.

use iced_x86::{ConditionCode, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::kvm_regs;

use super::complete::{
    ARITH_FLAGS, Exec, FLAG_AF, FLAG_CF, FLAG_OF, FLAG_PF, FLAG_RF, FLAG_SF, FLAG_ZF, InsnCpu,
    Outcome, mask, reg_value, set_reg,
};

/// Completes the instruction in `bytes` (at RIP, original bytes under our
/// INT3s) if it is one of the common forms on plain memory; returns whether it
/// did (registers, memory and RIP then hold its result).
pub fn run(cpu: &mut dyn InsnCpu, bytes: &[u8]) -> bool {
    let rip = cpu.regs().rip;
    let insn = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE).decode();
    if insn.has_rep_prefix() && !insn.is_invalid() {
        return rep_stos(cpu, &insn);
    }
    if insn.is_invalid() || insn.has_lock_prefix() {
        return false;
    }
    // General registers only (not AH..DH): a segment, control or debug
    // register operand (`mov ds, ax`, `mov cr3, rax`) has effects beyond a value.
    if (0..insn.op_count()).any(|i| {
        insn.op_kind(i) == OpKind::Register && {
            let r = insn.op_register(i);
            !r.is_gpr() || is_high_byte(r)
        }
    }) {
        return false;
    }
    let mut x = Exec { cpu, insn };
    if !memory_is_plain(&x) {
        return false;
    }
    matches!(step(&mut x), Some(Outcome::Done))
}

/// `rep stos` (the kernel's memset: `clear_bss` at boot, on the page of
/// `start_kernel`). A single-step runs one iteration of a string instruction,
/// so a step-over of a memset of the BSS took an exit per byte and never ended.
/// Done here a page at a time, upward (DF clear), 64-bit addressing, on an
/// aligned destination (no element straddles pages), each page plain RAM; it
/// stops before the first page that is not. Returns whether any of it ran (RCX,
/// RDI and, once RCX is 0, RIP then say how far): the rest faults again.
fn rep_stos(cpu: &mut dyn InsnCpu, insn: &Instruction) -> bool {
    let size = match insn.mnemonic() {
        Mnemonic::Stosb => 1u64,
        Mnemonic::Stosw => 2,
        Mnemonic::Stosd => 4,
        Mnemonic::Stosq => 8,
        _ => return false,
    };
    let mut r = cpu.regs();
    let aligned = r.rdi.is_multiple_of(size);
    if r.rflags & super::complete::FLAG_DF != 0
        || insn.op0_kind() != OpKind::MemoryESRDI
        || !aligned
    {
        return false;
    }
    let Some(total) = r.rcx.checked_mul(size) else {
        return false;
    };
    // Every chunk starts on an element (aligned start, pages a multiple of the
    // size), so one page of the pattern serves them all.
    let pattern = r.rax.to_le_bytes();
    let mut fill = [0u8; PAGE as usize];
    for (i, b) in fill.iter_mut().enumerate() {
        *b = pattern[i % size as usize];
    }
    let mut done = 0u64;
    while done < total {
        let dst = r.rdi.wrapping_add(done);
        let n = (PAGE - (dst & (PAGE - 1))).min(total - done);
        let Ok(gpa) = cpu.translate(dst, true) else {
            break;
        };
        if !cpu.plain_memory(gpa, true) || !cpu.write_phys(gpa, &fill[..n as usize]) {
            break;
        }
        done += n;
    }
    if done == 0 {
        return false;
    }
    r.rdi = r.rdi.wrapping_add(done);
    r.rcx -= done / size;
    if r.rcx == 0 {
        r.rip = insn.next_ip();
    }
    r.rflags &= !FLAG_RF;
    cpu.set_regs(&r);
    true
}

const PAGE: u64 = 4096;

fn is_high_byte(r: Register) -> bool {
    matches!(r, Register::AH | Register::BH | Register::CH | Register::DH)
}

/// Whether the memory operand (if any) is ordinary RAM that no hook watches.
fn memory_is_plain(x: &Exec<'_>) -> bool {
    let i = &x.insn;
    let has_mem = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory);
    let stack = matches!(
        i.mnemonic(),
        Mnemonic::Push | Mnemonic::Pop | Mnemonic::Call | Mnemonic::Ret
    );
    if has_mem && i.mnemonic() != Mnemonic::Lea {
        let write = i.op_count() > 0 && i.op_kind(0) == OpKind::Memory;
        let len = i.memory_size().size().max(1) as u64;
        if !plain(x, x.mem_address(), len, write) {
            return false;
        }
    }
    if stack {
        let rsp = x.cpu.regs().rsp;
        let (at, write) = match i.mnemonic() {
            Mnemonic::Push | Mnemonic::Call => (rsp.wrapping_sub(8), true),
            _ => (rsp, false),
        };
        return plain(x, at, 8, write);
    }
    true
}

fn plain(x: &Exec<'_>, gva: u64, len: u64, write: bool) -> bool {
    [gva, gva.wrapping_add(len - 1)].iter().all(|va| {
        x.cpu
            .translate(*va, write)
            .is_ok_and(|gpa| x.cpu.plain_memory(gpa, write))
    })
}

fn step(x: &mut Exec<'_>) -> Option<Outcome> {
    let i = x.insn;
    match i.mnemonic() {
        Mnemonic::Nop | Mnemonic::Endbr64 => Some(x.done(|_| {})),
        Mnemonic::Mov => mov(x),
        Mnemonic::Lea => {
            let ea = x.mem_address();
            let dst = i.op0_register();
            Some(x.done(|r| set_reg(r, dst, ea)))
        }
        Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd => extend(x),
        Mnemonic::Add
        | Mnemonic::Sub
        | Mnemonic::Cmp
        | Mnemonic::And
        | Mnemonic::Or
        | Mnemonic::Xor
        | Mnemonic::Test => alu(x),
        Mnemonic::Inc | Mnemonic::Dec => inc_dec(x),
        Mnemonic::Push => push(x),
        Mnemonic::Pop => pop(x),
        Mnemonic::Call | Mnemonic::Ret | Mnemonic::Jmp => flow(x),
        _ if i.condition_code() != ConditionCode::None && i.is_jcc_short_or_near() => {
            let taken = condition(x.cpu.regs().rflags, i.condition_code());
            let to = if taken {
                i.near_branch_target()
            } else {
                i.next_ip()
            };
            Some(go_to(x, to, |_| {}))
        }
        _ => None,
    }
}

/// Sets the registers `f` computes and continues at `rip` (a taken branch).
fn go_to(x: &mut Exec<'_>, rip: u64, f: impl FnOnce(&mut kvm_regs)) -> Outcome {
    let mut r = x.cpu.regs();
    f(&mut r);
    r.rflags &= !FLAG_RF;
    r.rip = rip;
    x.cpu.set_regs(&r);
    Outcome::Done
}

/// The value of operand `n` (register, immediate or memory) at `size` bytes.
fn value(x: &Exec<'_>, n: u32, size: usize) -> Option<u64> {
    match x.insn.op_kind(n) {
        OpKind::Register => Some(reg_value(&x.cpu.regs(), x.insn.op_register(n))),
        OpKind::Memory => x.load(size).ok(),
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Some(x.insn.immediate(n) & mask(size)),
        _ => None,
    }
}

/// Operand 0's size in bytes (a register's, or the memory operand's).
fn size0(i: &Instruction) -> usize {
    match i.op0_kind() {
        OpKind::Register => i.op0_register().size(),
        _ => i.memory_size().size(),
    }
}

/// Writes `v` to operand 0 (register or memory) and completes.
fn write0(x: &mut Exec<'_>, v: u64, size: usize, flags: Option<(u64, u64)>) -> Option<Outcome> {
    let set_flags = |r: &mut kvm_regs| {
        if let Some((mask, f)) = flags {
            r.rflags = (r.rflags & !mask) | f;
        }
    };
    match x.insn.op0_kind() {
        OpKind::Register => {
            let reg = x.insn.op0_register();
            Some(x.done(|r| {
                set_reg(r, reg, v);
                set_flags(r);
            }))
        }
        OpKind::Memory => {
            x.store(v, size).ok()?;
            Some(x.done(set_flags))
        }
        _ => None,
    }
}

fn mov(x: &mut Exec<'_>) -> Option<Outcome> {
    let size = size0(&x.insn);
    if !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    let v = value(x, 1, size)?;
    write0(x, v, size, None)
}

fn extend(x: &mut Exec<'_>) -> Option<Outcome> {
    let i = x.insn;
    let from = match i.op1_kind() {
        OpKind::Register => i.op1_register().size(),
        _ => i.memory_size().size(),
    };
    let v = value(x, 1, from)?;
    let v = if i.mnemonic() == Mnemonic::Movzx {
        v
    } else {
        let shift = 64 - 8 * from as u32;
        (((v << shift) as i64) >> shift) as u64
    };
    let dst = i.op0_register();
    Some(x.done(|r| set_reg(r, dst, v)))
}

/// The flags of `result` (at `size` bytes): PF, ZF, SF.
fn szp(result: u64, size: usize) -> u64 {
    let r = result & mask(size);
    let mut f = 0;
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= FLAG_PF;
    }
    if r == 0 {
        f |= FLAG_ZF;
    }
    if r >> (size * 8 - 1) & 1 == 1 {
        f |= FLAG_SF;
    }
    f
}

/// `a op b` at `size` bytes: the result and the arithmetic flags.
pub(super) fn arith(m: Mnemonic, a: u64, b: u64, size: usize) -> (u64, u64) {
    let (a, b) = (a & mask(size), b & mask(size));
    let top = 1u64 << (size * 8 - 1);
    match m {
        Mnemonic::Add => {
            let r = a.wrapping_add(b) & mask(size);
            let mut f = szp(r, size);
            if r < a {
                f |= FLAG_CF;
            }
            if (a ^ r) & (b ^ r) & top != 0 {
                f |= FLAG_OF;
            }
            if (a ^ b ^ r) & 0x10 != 0 {
                f |= FLAG_AF;
            }
            (r, f)
        }
        Mnemonic::Sub | Mnemonic::Cmp => {
            let r = a.wrapping_sub(b) & mask(size);
            let mut f = szp(r, size);
            if b > a {
                f |= FLAG_CF;
            }
            if (a ^ b) & (a ^ r) & top != 0 {
                f |= FLAG_OF;
            }
            if (a ^ b ^ r) & 0x10 != 0 {
                f |= FLAG_AF;
            }
            (r, f)
        }
        Mnemonic::And | Mnemonic::Test => (a & b, szp(a & b, size)),
        Mnemonic::Or => (a | b, szp(a | b, size)),
        _ => (a ^ b, szp(a ^ b, size)),
    }
}

fn alu(x: &mut Exec<'_>) -> Option<Outcome> {
    let i = x.insn;
    let size = size0(&i);
    if !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    let a = value(x, 0, size)?;
    let b = value(x, 1, size)?;
    let (r, f) = arith(i.mnemonic(), a, b, size);
    if matches!(i.mnemonic(), Mnemonic::Cmp | Mnemonic::Test) {
        return Some(x.done(|regs| regs.rflags = (regs.rflags & !ARITH_FLAGS) | f));
    }
    write0(x, r, size, Some((ARITH_FLAGS, f)))
}

fn inc_dec(x: &mut Exec<'_>) -> Option<Outcome> {
    let i = x.insn;
    let size = size0(&i);
    if !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    let a = value(x, 0, size)?;
    let op = if i.mnemonic() == Mnemonic::Inc {
        Mnemonic::Add
    } else {
        Mnemonic::Sub
    };
    // INC and DEC leave CF as it was.
    let (r, f) = arith(op, a, 1, size);
    write0(x, r, size, Some((ARITH_FLAGS & !FLAG_CF, f & !FLAG_CF)))
}

/// Writes 8 bytes at RSP - 8, moves RSP there and continues at `rip`
/// (64-bit pushes only).
fn push_value(x: &mut Exec<'_>, v: u64, rip: u64) -> Option<Outcome> {
    let rsp = x.cpu.regs().rsp.wrapping_sub(8);
    let gpa = x.cpu.translate(rsp, true).ok()?;
    let gpa_end = x.cpu.translate(rsp + 7, true).ok()?;
    if gpa_end != gpa + 7 || !x.cpu.write_phys(gpa, &v.to_le_bytes()) {
        return None;
    }
    Some(go_to(x, rip, |r| r.rsp = rsp))
}

fn pop_value(x: &Exec<'_>) -> Option<u64> {
    let rsp = x.cpu.regs().rsp;
    let gpa = x.cpu.translate(rsp, false).ok()?;
    let gpa_end = x.cpu.translate(rsp + 7, false).ok()?;
    let mut b = [0u8; 8];
    (gpa_end == gpa + 7 && x.cpu.read_phys(gpa, &mut b)).then(|| u64::from_le_bytes(b))
}

fn push(x: &mut Exec<'_>) -> Option<Outcome> {
    if x.insn.op0_kind() == OpKind::Memory {
        return None;
    }
    let size = match x.insn.op0_kind() {
        OpKind::Register => x.insn.op0_register().size(),
        _ => 8,
    };
    if size != 8 {
        return None;
    }
    let v = value(x, 0, 8)?;
    let next = x.insn.next_ip();
    push_value(x, v, next)
}

fn pop(x: &mut Exec<'_>) -> Option<Outcome> {
    if x.insn.op0_kind() != OpKind::Register || x.insn.op0_register().size() != 8 {
        return None;
    }
    let v = pop_value(x)?;
    let dst = x.insn.op0_register();
    Some(x.done(|r| {
        r.rsp = r.rsp.wrapping_add(8);
        set_reg(r, dst, v);
    }))
}

/// Near `call rel`, `ret` (no immediate) and `jmp rel`.
fn flow(x: &mut Exec<'_>) -> Option<Outcome> {
    let i = x.insn;
    let near = matches!(
        i.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    );
    match i.mnemonic() {
        Mnemonic::Jmp if near => Some(go_to(x, i.near_branch_target(), |_| {})),
        Mnemonic::Call if near => push_value(x, i.next_ip(), i.near_branch_target()),
        Mnemonic::Ret if i.op_count() == 0 => {
            let to = pop_value(x)?;
            Some(go_to(x, to, |r| r.rsp = r.rsp.wrapping_add(8)))
        }
        _ => None,
    }
}

/// Whether a Jcc with condition `c` is taken under `rflags`.
pub(super) fn condition(rflags: u64, c: ConditionCode) -> bool {
    let f = |bit: u64| rflags & bit != 0;
    let (cf, zf, sf, of, pf) = (f(FLAG_CF), f(FLAG_ZF), f(FLAG_SF), f(FLAG_OF), f(FLAG_PF));
    match c {
        ConditionCode::o => of,
        ConditionCode::no => !of,
        ConditionCode::b => cf,
        ConditionCode::ae => !cf,
        ConditionCode::e => zf,
        ConditionCode::ne => !zf,
        ConditionCode::be => cf || zf,
        ConditionCode::a => !cf && !zf,
        ConditionCode::s => sf,
        ConditionCode::ns => !sf,
        ConditionCode::p => pf,
        ConditionCode::np => !pf,
        ConditionCode::l => sf != of,
        ConditionCode::ge => sf == of,
        ConditionCode::le => zf || sf != of,
        ConditionCode::g => !zf && sf == of,
        ConditionCode::None => true,
    }
}

#[cfg(test)]
mod tests;
