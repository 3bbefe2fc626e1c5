//! Applying a LOCKed read-modify-write atomically.
//!
//! On a write-trapped page KVM's emulator reads the old value, computes the result
//! and hands the VMM only the write: applied as is, another vCPU's update made in
//! between would be lost. So the engine recomputes the operation from the value in
//! memory now and commits it with a compare-exchange loop, and for XADD/XCHG/CMPXCHG
//! puts the value it really replaced in the register KVM filled from its stale read.
//! (Arithmetic flags set by KVM from that stale read are not recomputed.)

use iced_x86::{Mnemonic, OpKind};

use crate::arch::Regs;
use crate::decode::Decoded;
use crate::glue::Guest;

/// The operation of a locked instruction, with its source operand resolved.
enum Op {
    Add(u64),
    Sub(u64),
    And(u64),
    Or(u64),
    Xor(u64),
    Inc,
    Dec,
    Not,
    Neg,
    Bts(u64),
    Btr(u64),
    Btc(u64),
    /// XADD: source, and the register that receives the old value.
    Xadd(u64, iced_x86::Register),
    Xchg(u64, iced_x86::Register),
    /// CMPXCHG: expected (RAX as KVM left it), replacement.
    Cmpxchg(u64, u64),
}

fn reg(regs: &Regs, r: iced_x86::Register) -> Option<u64> {
    regs.gpr(r)
}

fn set_reg(regs: &mut Regs, r: iced_x86::Register, v: u64, size: u64) {
    let Some(slot) = regs.gpr_mut(r) else { return };
    *slot = match size {
        8 => v,
        4 => v & 0xffff_ffff, // a 32-bit write zero-extends
        n => (*slot & !mask(n)) | (v & mask(n)),
    };
}

fn mask(size: u64) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size)) - 1
    }
}

fn op_of(d: &Decoded, regs: &Regs, data: u64, size: u64) -> Option<Op> {
    let i = &d.instr;
    let src = || -> Option<u64> {
        match i.op1_kind() {
            OpKind::Register => reg(regs, i.op1_register()),
            OpKind::Immediate8
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate32to64 => Some(i.immediate(1)),
            _ => Option::None,
        }
    };
    let m = mask(size);
    Some(match i.mnemonic() {
        Mnemonic::Add => Op::Add(src()?),
        Mnemonic::Sub => Op::Sub(src()?),
        Mnemonic::And => Op::And(src()?),
        Mnemonic::Or => Op::Or(src()?),
        Mnemonic::Xor => Op::Xor(src()?),
        Mnemonic::Inc => Op::Inc,
        Mnemonic::Dec => Op::Dec,
        Mnemonic::Not => Op::Not,
        Mnemonic::Neg => Op::Neg,
        Mnemonic::Bts => Op::Bts(src()? % (8 * size)),
        Mnemonic::Btr => Op::Btr(src()? % (8 * size)),
        Mnemonic::Btc => Op::Btc(src()? % (8 * size)),
        // KVM already put the old memory value in the register: the source it
        // added was data - old, and for XCHG the source is the data written.
        Mnemonic::Xadd => {
            let r = i.op1_register();
            Op::Xadd(data.wrapping_sub(reg(regs, r)?) & m, r)
        }
        Mnemonic::Xchg => {
            let r = if i.op0_kind() == OpKind::Register {
                i.op0_register()
            } else {
                i.op1_register()
            };
            Op::Xchg(data & m, r)
        }
        Mnemonic::Cmpxchg => Op::Cmpxchg(regs.rax & m, reg(regs, i.op1_register())? & m),
        _ => return Option::None,
    })
}

/// Applies the locked RMW `d` (whose write KVM reported as `data` at `gpa`)
/// atomically. Returns false when the instruction is not one it knows (the caller
/// then applies `data` as a plain write).
pub(crate) fn apply(g: &mut dyn Guest, d: &Decoded, gpa: u64, size: u64, data: u64) -> bool {
    if !matches!(size, 1 | 2 | 4 | 8) || !gpa.is_multiple_of(size) {
        return false;
    }
    let mut regs = g.regs();
    let Some(op) = op_of(d, &regs, data, size) else {
        return false;
    };
    let m = mask(size);
    let bytes = |v: u64| v.to_le_bytes()[..size as usize].to_vec();
    for _ in 0..1000 {
        let mut cur = [0u8; 8];
        if g.read_phys(gpa, &mut cur[..size as usize]).is_err() {
            return false;
        }
        let cur = u64::from_le_bytes(cur);
        let new = match op {
            Op::Add(s) | Op::Xadd(s, _) => cur.wrapping_add(s),
            Op::Sub(s) => cur.wrapping_sub(s),
            Op::And(s) => cur & s,
            Op::Or(s) => cur | s,
            Op::Xor(s) => cur ^ s,
            Op::Inc => cur.wrapping_add(1),
            Op::Dec => cur.wrapping_sub(1),
            Op::Not => !cur,
            Op::Neg => cur.wrapping_neg(),
            Op::Bts(b) => cur | 1 << b,
            Op::Btr(b) => cur & !(1 << b),
            Op::Btc(b) => cur ^ 1 << b,
            Op::Xchg(s, _) => s,
            Op::Cmpxchg(expected, replacement) => {
                if cur & m == expected {
                    replacement
                } else {
                    cur
                }
            }
        } & m;
        match g.cmpxchg_phys(gpa, &bytes(cur), &bytes(new)) {
            Ok(true) => {
                match op {
                    Op::Xadd(_, r) | Op::Xchg(_, r) => set_reg(&mut regs, r, cur, size),
                    Op::Cmpxchg(expected, _) if cur & m != expected => {
                        set_reg(&mut regs, iced_x86::Register::RAX, cur, size);
                        regs.rflags &= !(1 << 6); // ZF: the compare failed
                    }
                    _ => {}
                }
                if regs != g.regs() {
                    g.set_regs(&regs);
                }
                return true;
            }
            Ok(false) => continue, // another vCPU wrote meanwhile: recompute
            Err(_) => return false,
        }
    }
    false
}
