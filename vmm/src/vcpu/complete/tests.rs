//! Each completed instruction against a synthetic vCPU: identity-mapped memory,
//! with one unmapped page to fault on.

use super::*;

const UNMAPPED: u64 = 0x5000;
/// A page a hook watches (`plain_memory` says no).
pub(in crate::vcpu) const TRAPPED: u64 = 0x6000;

pub(in crate::vcpu) struct Cpu {
    pub(in crate::vcpu) regs: kvm_regs,
    cr0: u64,
    cr4: u64,
    pub(in crate::vcpu) mem: Vec<u8>,
    flushed: bool,
    mxcsr: u32,
}

impl Cpu {
    pub(in crate::vcpu) fn new() -> Cpu {
        Cpu {
            regs: kvm_regs {
                rip: 0x1000,
                rflags: 2,
                ..Default::default()
            },
            cr0: 0x8005_0033,
            cr4: 0x6f0 | CR4_OSXSAVE,
            mem: vec![0; 0x8000],
            flushed: false,
            mxcsr: 0x1f80,
        }
    }

    fn run(&mut self, bytes: &[u8]) -> (Completed, Outcome) {
        complete(self, bytes).expect("completed")
    }
}

impl InsnCpu for Cpu {
    fn regs(&self) -> kvm_regs {
        self.regs
    }
    fn set_regs(&mut self, regs: &kvm_regs) {
        self.regs = *regs;
    }
    fn cr0(&self) -> u64 {
        self.cr0
    }
    fn cr4(&self) -> u64 {
        self.cr4
    }
    fn segment_base(&self, fs: bool) -> u64 {
        if fs { 0x100 } else { 0x200 }
    }
    fn translate(&self, gva: u64, _write: bool) -> Result<u64, PageFault> {
        if gva & !0xfff == UNMAPPED {
            return Err(PageFault { present: false });
        }
        Ok(gva)
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let at = gpa as usize;
        match self.mem.get(at..at + buf.len()) {
            Some(s) => {
                buf.copy_from_slice(s);
                true
            }
            None => false,
        }
    }
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> bool {
        let at = gpa as usize;
        match self.mem.get_mut(at..at + data.len()) {
            Some(s) => {
                s.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
    fn plain_memory(&self, gpa: u64, _write: bool) -> bool {
        gpa & !0xfff != TRAPPED
    }
    fn cmpxchg16(&mut self, gpa: u64, expected: u128, new: u128) -> Option<Result<(), u128>> {
        let at = gpa as usize;
        let cur = u128::from_le_bytes(self.mem.get(at..at + 16)?.try_into().ok()?);
        if cur == expected {
            self.mem[at..at + 16].copy_from_slice(&new.to_le_bytes());
            Some(Ok(()))
        } else {
            Some(Err(cur))
        }
    }
    fn xcr(&self, index: u32) -> Option<u64> {
        (index == 0).then_some(7)
    }
    fn msr(&self, index: u32) -> Option<u64> {
        (index == 0xe7).then_some(0x1_0000_0002)
    }
    fn mxcsr(&self) -> Option<u32> {
        Some(self.mxcsr)
    }
    fn set_mxcsr(&mut self, value: u32) -> bool {
        self.mxcsr = value;
        true
    }
    fn flush_tlb(&mut self) {
        self.flushed = true;
    }
}

fn zf(c: &Cpu) -> bool {
    c.regs.rflags & FLAG_ZF != 0
}

#[test]
fn cmpxchg16b_swaps_when_equal_and_loads_when_not() {
    let mut c = Cpu::new();
    // lock cmpxchg16b [rdi]
    let insn = [0xf0, 0x48, 0x0f, 0xc7, 0x0f];
    c.regs.rdi = 0x2000;
    c.mem[0x2000..0x2010].copy_from_slice(&(5u128 << 64 | 4).to_le_bytes());
    (c.regs.rax, c.regs.rdx, c.regs.rbx, c.regs.rcx) = (4, 5, 6, 7);
    assert_eq!(c.run(&insn), (Completed::Cmpxchg16b, Outcome::Done));
    assert!(zf(&c));
    assert_eq!(c.regs.rip, 0x1005);
    assert_eq!(&c.mem[0x2000..0x2010], &(7u128 << 64 | 6).to_le_bytes());
    c.regs.rip = 0x1000;
    (c.regs.rax, c.regs.rdx) = (0, 0);
    assert_eq!(c.run(&insn).1, Outcome::Done);
    assert!(!zf(&c));
    assert_eq!((c.regs.rax, c.regs.rdx), (6, 7));
    // Misaligned: #GP(0), nothing moves.
    c.regs.rip = 0x1000;
    c.regs.rdi = 0x2008;
    assert_eq!(c.run(&insn).1, GP0);
    assert_eq!(c.regs.rip, 0x1000);
    // Unmapped: #PF with CR2 and the write bit.
    c.regs.rdi = UNMAPPED;
    assert_eq!(
        c.run(&insn).1,
        Outcome::Fault {
            vector: 14,
            error_code: Some(2),
            cr2: Some(UNMAPPED)
        }
    );
}

#[test]
fn clac_and_stac_flip_ac_only() {
    let mut c = Cpu::new();
    assert_eq!(c.run(&[0x0f, 0x01, 0xcb]).0, Completed::Stac);
    assert_eq!(c.regs.rflags, 2 | RFLAGS_AC);
    assert_eq!(c.regs.rip, 0x1003);
    assert_eq!(c.run(&[0x0f, 0x01, 0xca]).0, Completed::Clac);
    assert_eq!(c.regs.rflags, 2);
}

#[test]
fn bit_counts_set_result_and_flags_at_each_width() {
    let mut c = Cpu::new();
    // popcnt rax, rbx
    c.regs.rbx = 0xf0f0;
    c.regs.rax = u64::MAX;
    c.regs.rflags = 2 | FLAG_CF | FLAG_SF;
    c.run(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3]);
    assert_eq!(c.regs.rax, 8);
    assert_eq!(c.regs.rflags, 2);
    // popcnt eax, ebx of 0: ZF, upper half of rax cleared.
    c.regs.rbx = 0xffff_ffff_0000_0000;
    c.regs.rax = u64::MAX;
    c.run(&[0xf3, 0x0f, 0xb8, 0xc3]);
    assert_eq!(c.regs.rax, 0);
    assert!(zf(&c));
    // lzcnt ecx, edx = 1 -> 31; tzcnt of 0 -> operand size, CF.
    c.regs.rdx = 1;
    c.run(&[0xf3, 0x0f, 0xbd, 0xca]);
    assert_eq!(c.regs.rcx, 31);
    c.regs.rdx = 0;
    c.run(&[0xf3, 0x0f, 0xbc, 0xca]);
    assert_eq!(c.regs.rcx, 32);
    assert_ne!(c.regs.rflags & FLAG_CF, 0);
    // tzcnt ax, [rdi] (16-bit keeps the upper bits of rax).
    c.regs.rax = 0xffff_0000;
    c.regs.rdi = 0x3000;
    c.mem[0x3000] = 0x80;
    c.run(&[0x66, 0xf3, 0x0f, 0xbc, 0x07]);
    assert_eq!(c.regs.rax, 0xffff_0007);
}

#[test]
fn fwait_raises_nm_only_when_ts_and_mp_are_set() {
    let mut c = Cpu::new();
    assert_eq!(c.run(&[0x9b]), (Completed::Fwait, Outcome::Done));
    assert_eq!(c.regs.rip, 0x1001);
    c.cr0 |= CR0_TS;
    assert!(matches!(c.run(&[0x9b]).1, Outcome::Fault { vector: 7, .. }));
}

#[test]
fn movbe_loads_and_stores_byte_swapped_through_fs() {
    let mut c = Cpu::new();
    // movbe eax, fs:[rbx]
    c.regs.rbx = 0x3000;
    c.mem[0x3100..0x3104].copy_from_slice(&[1, 2, 3, 4]);
    c.run(&[0x64, 0x0f, 0x38, 0xf0, 0x03]);
    assert_eq!(c.regs.rax, 0x0102_0304);
    // movbe [rbx], rax
    c.run(&[0x48, 0x0f, 0x38, 0xf1, 0x03]);
    assert_eq!(&c.mem[0x3000..0x3008], &[0, 0, 0, 0, 1, 2, 3, 4]);
}

#[test]
fn xgetbv_invpcid_rdpru_and_int_n() {
    let mut c = Cpu::new();
    c.run(&[0x0f, 0x01, 0xd0]);
    assert_eq!((c.regs.rax, c.regs.rdx), (7, 0));
    c.regs.rcx = 1;
    assert_eq!(c.run(&[0x0f, 0x01, 0xd0]).1, GP0);
    c.cr4 &= !CR4_OSXSAVE;
    assert_eq!(c.run(&[0x0f, 0x01, 0xd0]).1, UD);
    // invpcid rax, [rdi]: type 3 (all but global) flushes; type 4 is #GP.
    c.regs.rdi = 0x3000;
    c.regs.rax = 3;
    c.regs.rip = 0x1000;
    assert_eq!(c.run(&[0x66, 0x0f, 0x38, 0x82, 0x07]).1, Outcome::Done);
    assert!(c.flushed);
    c.regs.rax = 4;
    assert_eq!(c.run(&[0x66, 0x0f, 0x38, 0x82, 0x07]).1, GP0);
    // rdpru: ECX 0 = MPERF, CF set; ECX 7 = unsupported, 0 and CF clear.
    c.regs.rcx = 0;
    c.run(&[0x0f, 0x01, 0xfd]);
    assert_eq!((c.regs.rax, c.regs.rdx), (2, 1));
    assert_ne!(c.regs.rflags & FLAG_CF, 0);
    c.regs.rcx = 7;
    c.run(&[0x0f, 0x01, 0xfd]);
    assert_eq!((c.regs.rax, c.regs.rflags & FLAG_CF), (0, 0));
    // int 0x10: delivered through the IDT with RIP past it.
    c.regs.rip = 0x1000;
    let (what, out) = c.run(&[0xcd, 0x10]);
    assert_eq!(what, Completed::IntN);
    assert!(matches!(out, Outcome::Fault { vector: 0x10, .. }));
    assert_eq!(c.regs.rip, 0x1002);
    // int 0x80 cannot be injected as an exception: not completed (the run
    // stops on it) rather than raising a fault the CPU would not.
    c.regs.rip = 0x1000;
    assert!(complete(&mut c, &[0xcd, 0x80]).is_none());
    assert_eq!(c.regs.rip, 0x1000);
    // Something else is not ours.
    assert!(complete(&mut c, &[0x90]).is_none());
}

#[test]
fn ldmxcsr_and_stmxcsr_move_mxcsr_and_check_reserved_bits() {
    let mut c = Cpu::new();
    // stmxcsr [rsp+4]; ldmxcsr [rsp+4]
    c.regs.rsp = 0x3000;
    assert_eq!(c.run(&[0x0f, 0xae, 0x5c, 0x24, 0x04]).0, Completed::Stmxcsr);
    assert_eq!(&c.mem[0x3004..0x3008], &0x1f80u32.to_le_bytes());
    c.mem[0x3004..0x3008].copy_from_slice(&0x9fc0u32.to_le_bytes());
    assert_eq!(c.run(&[0x0f, 0xae, 0x54, 0x24, 0x04]).1, Outcome::Done);
    assert_eq!(c.mxcsr, 0x9fc0);
    c.mem[0x3004..0x3008].copy_from_slice(&0x1_0000u32.to_le_bytes());
    assert_eq!(c.run(&[0x0f, 0xae, 0x54, 0x24, 0x04]).1, GP0);
    assert_eq!(c.mxcsr, 0x9fc0);
}

#[test]
fn cpl0_accesses_fault_as_the_cpu_decides() {
    const WP: u64 = 1 << 16;
    const SMAP: u64 = 1 << 21;
    // CR0.WP: a write to a read-only page faults only with it set.
    assert!(supervisor_fault(false, false, true, WP, 0, 0).is_some());
    assert!(supervisor_fault(false, false, true, 0, 0, 0).is_none());
    assert!(supervisor_fault(false, false, false, WP, 0, 0).is_none());
    // SMAP: a user page faults unless RFLAGS.AC is set (stac).
    assert!(supervisor_fault(true, true, false, 0, SMAP, 0).is_some());
    assert!(supervisor_fault(true, true, false, 0, SMAP, RFLAGS_AC).is_none());
    assert!(supervisor_fault(true, true, true, 0, 0, 0).is_none());
}
