//! Instructions KVM's emulator refuses at CPL0 on a PVM host, completed by the
//! VMM with their architectural result: executed, or the exception the CPU would
//! raise. On a hardware VMX/SVM host the CPU runs them and none reaches here.
//!
//! A free function over a small trait (`InsnCpu`), so each instruction is
//! unit-tested against a synthetic vCPU; `VcpuThread` implements the trait.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::kvm_regs;

pub use crate::stats::{Completed, CompletedCounters};

/// What the instruction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Executed: registers and memory hold its result, RIP is past it.
    Done,
    /// Deliver `vector` with the registers as they are now: RIP at the
    /// instruction for a fault, past it for `int n`; `cr2` is set first for a #PF.
    Fault {
        vector: u8,
        error_code: Option<u32>,
        cr2: Option<u64>,
    },
}

/// A #PF for an access to `gva`: the error code's bits as the CPU sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    pub present: bool,
}

/// Whether a CPL0 data access to a page mapped `writable`/`user` faults, as
/// the CPU decides it: a write to a read-only page with CR0.WP set, and (SMAP)
/// any access to a user page with CR4.SMAP set and RFLAGS.AC clear.
pub fn supervisor_fault(
    writable: bool,
    user: bool,
    write: bool,
    cr0: u64,
    cr4: u64,
    rflags: u64,
) -> Option<PageFault> {
    const CR0_WP: u64 = 1 << 16;
    const CR4_SMAP: u64 = 1 << 21;
    let wp = write && !writable && cr0 & CR0_WP != 0;
    let smap = user && cr4 & CR4_SMAP != 0 && rflags & RFLAGS_AC == 0;
    (wp || smap).then_some(PageFault { present: true })
}

/// What completing an instruction needs from a vCPU.
pub trait InsnCpu {
    fn regs(&self) -> kvm_regs;
    fn set_regs(&mut self, regs: &kvm_regs);
    fn cr0(&self) -> u64;
    fn cr4(&self) -> u64;
    /// The base of FS or GS (other segments are flat in 64-bit mode).
    fn segment_base(&self, fs: bool) -> u64;
    /// The guest-physical address `gva` maps to for a read or a write.
    fn translate(&self, gva: u64, write: bool) -> Result<u64, PageFault>;
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool;
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> bool;
    /// `lock cmpxchg16b` on guest-physical `gpa` (16-byte aligned): Ok if it
    /// held `expected` (now `new`), else Err(what it holds). None outside RAM.
    fn cmpxchg16(&mut self, gpa: u64, expected: u128, new: u128) -> Option<Result<(), u128>>;
    fn xcr(&self, index: u32) -> Option<u64>;
    fn msr(&self, index: u32) -> Option<u64>;
    /// The SSE control/status register (KVM_GET_FPU / KVM_SET_FPU).
    fn mxcsr(&self) -> Option<u32>;
    fn set_mxcsr(&mut self, value: u32) -> bool;
    /// Drops every cached translation, global ones included.
    fn flush_tlb(&mut self);
    /// Whether guest-physical `gpa` is RAM no hook watches for this kind of
    /// access (the page is not trapped for it): an access the VMM may make
    /// itself without hiding it from the engine.
    fn plain_memory(&self, gpa: u64, write: bool) -> bool;
}

const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_PCIDE: u64 = 1 << 17;
const RFLAGS_AC: u64 = 1 << 18;
pub(super) const FLAG_CF: u64 = 1;
pub(super) const FLAG_PF: u64 = 1 << 2;
pub(super) const FLAG_AF: u64 = 1 << 4;
pub(super) const FLAG_ZF: u64 = 1 << 6;
pub(super) const FLAG_SF: u64 = 1 << 7;
pub(super) const FLAG_DF: u64 = 1 << 10;
pub(super) const FLAG_OF: u64 = 1 << 11;
/// The resume flag: an instruction that completes clears it (the CPU does, for
/// all but IRET, POPF and task switches), so the next one's code breakpoint is
/// not suppressed.
pub(super) const FLAG_RF: u64 = 1 << 16;
pub(super) const ARITH_FLAGS: u64 = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF;

const UD: Outcome = Outcome::Fault {
    vector: 6,
    error_code: None,
    cr2: None,
};
const GP0: Outcome = Outcome::Fault {
    vector: 13,
    error_code: Some(0),
    cr2: None,
};

/// Completes the 64-bit-mode instruction in `bytes` (at the vCPU's RIP), if it
/// is one the VMM knows; None leaves it to the caller (an emulation failure).
pub fn complete(cpu: &mut dyn InsnCpu, bytes: &[u8]) -> Option<(Completed, Outcome)> {
    let rip = cpu.regs().rip;
    let mut d = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        return None;
    }
    let what = match insn.mnemonic() {
        Mnemonic::Xgetbv => Completed::Xgetbv,
        Mnemonic::Cmpxchg16b => Completed::Cmpxchg16b,
        Mnemonic::Clac => Completed::Clac,
        Mnemonic::Stac => Completed::Stac,
        Mnemonic::Popcnt => Completed::Popcnt,
        Mnemonic::Lzcnt => Completed::Lzcnt,
        Mnemonic::Tzcnt => Completed::Tzcnt,
        Mnemonic::Wait => Completed::Fwait,
        Mnemonic::Movbe => Completed::Movbe,
        Mnemonic::Clwb => Completed::Clwb,
        Mnemonic::Invpcid => Completed::Invpcid,
        Mnemonic::Rdpru => Completed::Rdpru,
        Mnemonic::Ldmxcsr => Completed::Ldmxcsr,
        Mnemonic::Stmxcsr => Completed::Stmxcsr,
        // Vectors above 31 have no slot in KVM's exception injection: such an
        // `int n` is left an emulation failure (a stop that says so) rather
        // than delivered as something the CPU would not raise.
        Mnemonic::Int if insn.code() == Code::Int_imm8 && insn.immediate8() < 32 => Completed::IntN,
        _ => return None,
    };
    let mut x = Exec { cpu, insn };
    let outcome = match what {
        Completed::Xgetbv => x.xgetbv(),
        Completed::Cmpxchg16b => x.cmpxchg16b(),
        Completed::Clac | Completed::Stac => x.ac(what == Completed::Stac),
        Completed::Popcnt | Completed::Lzcnt | Completed::Tzcnt => x.count_bits(what),
        Completed::Fwait => x.fwait(),
        Completed::Movbe => x.movbe(),
        Completed::Clwb => x.done(|_| {}),
        Completed::Invpcid => x.invpcid(),
        Completed::Rdpru => x.rdpru(),
        Completed::Ldmxcsr | Completed::Stmxcsr => x.mxcsr(what == Completed::Ldmxcsr),
        Completed::IntN => x.int_n(),
    };
    Some((what, outcome))
}

pub(super) struct Exec<'a> {
    pub(super) cpu: &'a mut dyn InsnCpu,
    pub(super) insn: Instruction,
}

pub(super) fn page_fault(gva: u64, f: PageFault, write: bool) -> Outcome {
    Outcome::Fault {
        vector: 14,
        error_code: Some(f.present as u32 | (write as u32) << 1),
        cr2: Some(gva),
    }
}

impl Exec<'_> {
    /// Sets the registers `f` computes and moves RIP past the instruction.
    pub(super) fn done(&mut self, f: impl FnOnce(&mut kvm_regs)) -> Outcome {
        let mut r = self.cpu.regs();
        f(&mut r);
        r.rflags &= !FLAG_RF;
        r.rip = self.insn.next_ip();
        self.cpu.set_regs(&r);
        Outcome::Done
    }

    pub(super) fn mem_address(&self) -> u64 {
        let r = self.cpu.regs();
        let seg = match self.insn.memory_segment() {
            Register::FS => self.cpu.segment_base(true),
            Register::GS => self.cpu.segment_base(false),
            _ => 0,
        };
        let operand = (0..self.insn.op_count())
            .find(|i| self.insn.op_kind(*i) == OpKind::Memory)
            .unwrap_or(0);
        let ea = self
            .insn
            .virtual_address(operand, 0, |reg, _, _| Some(reg_value(&r, reg)))
            .unwrap_or(0);
        // virtual_address already adds the FS/GS base it is given: it is given 0.
        ea.wrapping_add(seg)
    }

    /// Reads `len` bytes of the memory operand (one page or two).
    pub(super) fn load(&self, len: usize) -> Result<u64, Outcome> {
        let gva = self.mem_address();
        let mut buf = [0u8; 8];
        for i in 0..len {
            let va = gva.wrapping_add(i as u64);
            let gpa = self
                .cpu
                .translate(va, false)
                .map_err(|f| page_fault(va, f, false))?;
            if !self.cpu.read_phys(gpa, &mut buf[i..i + 1]) {
                return Err(GP0);
            }
        }
        Ok(u64::from_le_bytes(buf))
    }

    pub(super) fn store(&mut self, value: u64, len: usize) -> Result<(), Outcome> {
        let gva = self.mem_address();
        // Translate every byte before writing any: a fault leaves memory as it was.
        let mut gpas = [0u64; 8];
        for (i, g) in gpas.iter_mut().enumerate().take(len) {
            let va = gva.wrapping_add(i as u64);
            *g = self
                .cpu
                .translate(va, true)
                .map_err(|f| page_fault(va, f, true))?;
        }
        for (i, g) in gpas.iter().enumerate().take(len) {
            if !self.cpu.write_phys(*g, &value.to_le_bytes()[i..i + 1]) {
                return Err(GP0);
            }
        }
        Ok(())
    }

    pub(super) fn operand(&self, n: u32, len: usize) -> Result<u64, Outcome> {
        match self.insn.op_kind(n) {
            OpKind::Register => Ok(reg_value(&self.cpu.regs(), self.insn.op_register(n))),
            OpKind::Memory => self.load(len),
            _ => Err(UD),
        }
    }

    fn xgetbv(&mut self) -> Outcome {
        if self.cpu.cr4() & CR4_OSXSAVE == 0 {
            return UD;
        }
        let index = self.cpu.regs().rcx as u32;
        let Some(v) = self.cpu.xcr(index) else {
            return GP0;
        };
        self.done(|r| {
            r.rax = v & 0xffff_ffff;
            r.rdx = v >> 32;
        })
    }

    fn cmpxchg16b(&mut self) -> Outcome {
        let gva = self.mem_address();
        if gva & 15 != 0 {
            return GP0;
        }
        let gpa = match self.cpu.translate(gva, true) {
            Ok(g) => g,
            Err(f) => return page_fault(gva, f, true),
        };
        let r = self.cpu.regs();
        let expected = (r.rdx as u128) << 64 | r.rax as u128;
        let new = (r.rcx as u128) << 64 | r.rbx as u128;
        match self.cpu.cmpxchg16(gpa, expected, new) {
            None => GP0,
            Some(Ok(())) => self.done(|r| r.rflags |= FLAG_ZF),
            Some(Err(old)) => self.done(|r| {
                r.rflags &= !FLAG_ZF;
                r.rax = old as u64;
                r.rdx = (old >> 64) as u64;
            }),
        }
    }

    fn ac(&mut self, set: bool) -> Outcome {
        self.done(|r| {
            if set {
                r.rflags |= RFLAGS_AC
            } else {
                r.rflags &= !RFLAGS_AC
            }
        })
    }

    fn count_bits(&mut self, what: Completed) -> Outcome {
        let dst = self.insn.op0_register();
        let size = dst.size();
        let src = match self.operand(1, size) {
            Ok(v) => v & mask(size),
            Err(f) => return f,
        };
        let bits = size as u32 * 8;
        let (value, mut flags) = match what {
            Completed::Popcnt => (src.count_ones() as u64, 0),
            Completed::Lzcnt => {
                let n = (src.leading_zeros() - (64 - bits)) as u64;
                (n, if src == 0 { FLAG_CF } else { 0 })
            }
            _ => {
                let n = if src == 0 { bits } else { src.trailing_zeros() } as u64;
                (n, if src == 0 { FLAG_CF } else { 0 })
            }
        };
        let zero = match what {
            Completed::Popcnt => src == 0,
            _ => value == 0,
        };
        if zero {
            flags |= FLAG_ZF;
        }
        self.done(|r| {
            set_reg(r, dst, value);
            r.rflags = (r.rflags & !ARITH_FLAGS) | flags;
        })
    }

    fn fwait(&mut self) -> Outcome {
        // #NM when the FPU state belongs to another task (CR0.TS with CR0.MP).
        // A pending unmasked x87 exception would raise #MF: KVM keeps no x87
        // state we could read here without the FPU ioctl, and the kernel masks
        // them all, so none is pending.
        if self.cpu.cr0() & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
            return Outcome::Fault {
                vector: 7,
                error_code: None,
                cr2: None,
            };
        }
        self.done(|_| {})
    }

    fn movbe(&mut self) -> Outcome {
        let size = self.insn.memory_size().size();
        if self.insn.op0_kind() == OpKind::Register {
            let dst = self.insn.op0_register();
            match self.load(size) {
                Ok(v) => self.done(|r| set_reg(r, dst, swap(v, size))),
                Err(f) => f,
            }
        } else {
            let v = reg_value(&self.cpu.regs(), self.insn.op1_register());
            match self.store(swap(v, size), size) {
                Ok(()) => self.done(|_| {}),
                Err(f) => f,
            }
        }
    }

    fn mxcsr(&mut self, load: bool) -> Outcome {
        const CR0_EM: u64 = 1 << 2;
        const CR4_OSFXSR: u64 = 1 << 9;
        // Only DAZ, the flags, the masks, the rounding control and FZ exist.
        const MXCSR_VALID: u64 = 0xffff;
        if self.cpu.cr0() & CR0_EM != 0 || self.cpu.cr4() & CR4_OSFXSR == 0 {
            return UD;
        }
        if self.cpu.cr0() & CR0_TS != 0 {
            return Outcome::Fault {
                vector: 7,
                error_code: None,
                cr2: None,
            };
        }
        if load {
            let v = match self.load(4) {
                Ok(v) => v,
                Err(f) => return f,
            };
            if v & !MXCSR_VALID != 0 || !self.cpu.set_mxcsr(v as u32) {
                return GP0;
            }
            return self.done(|_| {});
        }
        let Some(v) = self.cpu.mxcsr() else {
            return GP0;
        };
        match self.store(v as u64, 4) {
            Ok(()) => self.done(|_| {}),
            Err(f) => f,
        }
    }

    fn invpcid(&mut self) -> Outcome {
        let r = self.cpu.regs();
        let kind = reg_value(&r, self.insn.op0_register());
        let desc = match self.load(8) {
            Ok(v) => v,
            Err(f) => return f,
        };
        let pcid = desc & 0xfff;
        // The CPU's checks: an unknown type, a PCID with PCIDE off, reserved bits.
        if kind > 3 || desc >> 12 != 0 || (pcid != 0 && self.cpu.cr4() & CR4_PCIDE == 0) {
            return GP0;
        }
        // Shadow paging keeps no per-PCID entries we could name: dropping all of
        // them is more than any type asks and never less.
        self.cpu.flush_tlb();
        self.done(|_| {})
    }

    fn rdpru(&mut self) -> Outcome {
        const MPERF: u32 = 0xe7;
        const APERF: u32 = 0xe8;
        let which = match self.cpu.regs().rcx as u32 {
            0 => Some(MPERF),
            1 => Some(APERF),
            _ => None,
        };
        let value = which.map(|m| self.cpu.msr(m).unwrap_or(0));
        self.done(|r| {
            let v = value.unwrap_or(0);
            r.rax = v & 0xffff_ffff;
            r.rdx = v >> 32;
            r.rflags = (r.rflags & !ARITH_FLAGS) | if value.is_some() { FLAG_CF } else { 0 };
        })
    }

    fn int_n(&mut self) -> Outcome {
        let vector = self.insn.immediate8();
        // Through the guest's IDT with RIP after the instruction, as a software
        // interrupt is delivered (never with an error code).
        self.done(|_| {});
        Outcome::Fault {
            vector,
            error_code: None,
            cr2: None,
        }
    }
}

pub(super) fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

fn swap(v: u64, size: usize) -> u64 {
    match size {
        2 => (v as u16).swap_bytes() as u64,
        4 => (v as u32).swap_bytes() as u64,
        _ => v.swap_bytes(),
    }
}

fn slot(r: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut r.rax,
        Register::RBX => &mut r.rbx,
        Register::RCX => &mut r.rcx,
        Register::RDX => &mut r.rdx,
        Register::RSI => &mut r.rsi,
        Register::RDI => &mut r.rdi,
        Register::RSP => &mut r.rsp,
        Register::RBP => &mut r.rbp,
        Register::R8 => &mut r.r8,
        Register::R9 => &mut r.r9,
        Register::R10 => &mut r.r10,
        Register::R11 => &mut r.r11,
        Register::R12 => &mut r.r12,
        Register::R13 => &mut r.r13,
        Register::R14 => &mut r.r14,
        Register::R15 => &mut r.r15,
        Register::RIP => &mut r.rip,
        _ => return None,
    })
}

/// A general register's value at its own width (AH and friends not needed:
/// none of the completed instructions takes an 8-bit register).
pub(super) fn reg_value(r: &kvm_regs, reg: Register) -> u64 {
    let mut copy = *r;
    let v = slot(&mut copy, reg.full_register()).map_or(0, |v| *v);
    v & mask(reg.size())
}

/// Writes a general register as the CPU does: a 32-bit write zero-extends, a
/// 16-bit one keeps the upper bits.
pub(super) fn set_reg(r: &mut kvm_regs, reg: Register, value: u64) {
    let size = reg.size();
    if let Some(v) = slot(r, reg.full_register()) {
        *v = match size {
            8 => value,
            4 => value & 0xffff_ffff,
            _ => (*v & !mask(size)) | (value & mask(size)),
        };
    }
}

#[cfg(test)]
pub(super) mod tests;
