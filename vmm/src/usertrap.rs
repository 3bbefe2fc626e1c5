//! Debugging CPL3 code on a host whose guest-debug controls stop at CPL0 (PVM).
//!
//! There, KVM's single-step and INT3 interception do not reach user code: the
//! CPU delivers #DB and #BP straight into the guest's IDT. But the guest's
//! handlers run at CPL0, in KVM's emulator, where hardware execute breakpoints
//! do work. So the VMM puts a DR execute breakpoint on the guest's vector-1 and
//! vector-3 entry points; when one fires with an exception frame that came from
//! CPL3, the VMM pops that frame itself (RIP, CS, RFLAGS, RSP, SS) and the vCPU is
//! back in user mode as if the exception had never been delivered. A step at CPL3
//! is then RFLAGS.TF plus the #DB catch; an INT3 at CPL3 is the #BP catch.
//!
//! What the guest could notice: the frame bytes written below its kernel stack
//! (or IST stack), and DR6.BS after a step. Nothing else of its state changes.

use kvm_bindings::{kvm_segment, kvm_sregs};
use vmiscope_introspect::paging::PagingMode;

use crate::guest::{cpl_of, paging_mode as mode, read_virt};
use crate::shared::VmShared;
use crate::vcpu::state::{Catch, Plan};

/// RFLAGS.TF: trap after the next instruction.
pub(crate) const RFLAGS_TF: u64 = 1 << 8;

impl Catch {
    fn vector(self) -> u64 {
        match self {
            Catch::Db => 1,
            Catch::Bp => 3,
        }
    }
}

/// The entry point of the guest's handler for `catch` under the vCPU's `s`, if its
/// IDT gate is a present 64-bit interrupt or trap gate that we can read.
pub(crate) fn entry(vm: &VmShared, s: &kvm_sregs, catch: Catch) -> Option<u64> {
    let off = catch.vector() * 16;
    if off + 15 > s.idt.limit as u64 {
        return None;
    }
    let mut g = [0u8; 16];
    read_virt(vm.ram(), mode(s), s.idt.base.wrapping_add(off), &mut g).ok()?;
    let present = g[5] & 0x80 != 0;
    let gate = g[5] & 0xf;
    if !present || !(gate == 0xe || gate == 0xf) {
        return None;
    }
    let lo = u16::from_le_bytes([g[0], g[1]]) as u64;
    let mid = u16::from_le_bytes([g[6], g[7]]) as u64;
    let hi = u32::from_le_bytes([g[8], g[9], g[10], g[11]]) as u64;
    Some(lo | mid << 16 | hi << 32)
}

/// Whether a single-step from the state `s` can end in a debug exit: KVM's where
/// the host steps at this CPL, else (CPL3 on PVM) RFLAGS.TF caught at the guest's
/// #DB entry, which needs a present #DB gate and a free debug-register slot.
impl VmShared {
    /// Whether a single-step from the state `s` can end in a debug exit: KVM's
    /// where the host steps at this CPL, else (CPL3 on PVM) RFLAGS.TF caught at
    /// the guest's #DB entry, which needs a present #DB gate and a free
    /// debug-register slot.
    pub(crate) fn can_step(&self, s: &kvm_sregs) -> bool {
        self.host().single_step_at(cpl_of(s))
            || (self.host().user_catches()
                && self.dr_slot_free()
                && entry(self, s, Catch::Db).is_some())
    }
}

impl Plan {
    /// The plan for `s` at debug generation `generation`, reusing `old` if it
    /// still holds.
    pub(crate) fn for_state(
        vm: &VmShared,
        s: &kvm_sregs,
        generation: u64,
        old: Option<Plan>,
    ) -> Plan {
        let key = (generation, s.cr3, s.idt.base, s.idt.limit);
        if let Some(p) = old.filter(|p| p.key == key) {
            return p;
        }
        Plan {
            key,
            user_bps: vm.user_breakpoints(mode(s)),
            db: entry(vm, s, Catch::Db),
            bp: entry(vm, s, Catch::Bp),
        }
    }
}

/// Whether `b` starts with PUSHF/PUSHFQ (operand-size and REX prefixes allowed).
pub(crate) fn is_pushf(b: &[u8]) -> bool {
    b.iter()
        .find(|&&x| x != 0x66 && !(0x40..=0x4f).contains(&x))
        .is_some_and(|&x| x == 0x9c)
}

/// Whether `b` starts with SYSRET (REX prefixes allowed: SYSRETQ is `48 0f 07`).
pub(crate) fn is_sysret(b: &[u8]) -> bool {
    let op = b.iter().position(|x| !(0x40..=0x4f).contains(x));
    op.is_some_and(|i| b[i..].starts_with(&[0x0f, 0x07]))
}

/// The frame a 64-bit exception without an error code pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl Frame {
    /// Reads the frame at the handler's first instruction (RSP points at it).
    pub(crate) fn read(vm: &VmShared, mode: PagingMode, rsp: u64) -> Option<Frame> {
        let mut b = [0u8; 40];
        read_virt(vm.ram(), mode, rsp, &mut b).ok()?;
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        Some(Frame {
            rip: w(0),
            cs: w(1),
            rflags: w(2),
            rsp: w(3),
            ss: w(4),
        })
    }

    pub(crate) fn came_from_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

/// The segment register a load of `selector` gives, from the guest's GDT in `s`.
pub(crate) fn segment(vm: &VmShared, s: &kvm_sregs, selector: u16) -> Option<kvm_segment> {
    let off = (selector as u64 & !7) as u16;
    if selector & 4 != 0 || off == 0 || off as u64 + 7 > s.gdt.limit as u64 {
        return None; // LDT selectors and null selectors are not for CS/SS in user mode
    }
    let mut d = [0u8; 8];
    read_virt(
        vm.ram(),
        mode(s),
        s.gdt.base.wrapping_add(off as u64),
        &mut d,
    )
    .ok()?;
    Some(decode_descriptor(d, selector))
}

fn decode_descriptor(d: [u8; 8], selector: u16) -> kvm_segment {
    let raw_limit = u16::from_le_bytes([d[0], d[1]]) as u32 | ((d[6] as u32 & 0xf) << 16);
    let base = d[2] as u64 | (d[3] as u64) << 8 | (d[4] as u64) << 16 | (d[7] as u64) << 24;
    let access = d[5];
    let flags = d[6] >> 4;
    let g = flags >> 3 & 1;
    kvm_segment {
        base,
        limit: if g == 1 {
            raw_limit << 12 | 0xfff
        } else {
            raw_limit
        },
        selector,
        // A load sets the accessed bit (and VMX entry checks insist on it).
        type_: access & 0xf | 1,
        present: access >> 7,
        dpl: access >> 5 & 3,
        db: flags >> 2 & 1,
        s: access >> 4 & 1,
        l: flags >> 1 & 1,
        g,
        avl: flags & 1,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushf_with_and_without_prefixes() {
        assert!(is_pushf(&[0x9c, 0x58, 0, 0]));
        assert!(is_pushf(&[0x66, 0x9c, 0, 0]));
        assert!(is_pushf(&[0x48, 0x9c, 0, 0]));
        assert!(!is_pushf(&[0x9d, 0, 0, 0]), "popf");
        assert!(!is_pushf(&[0x50, 0x9c, 0, 0]), "push rax first");
    }

    #[test]
    fn sysret_in_both_operand_sizes_and_nothing_else() {
        assert!(is_sysret(&[0x48, 0x0f, 0x07]), "sysretq");
        assert!(is_sysret(&[0x0f, 0x07, 0x90]), "sysretl");
        assert!(!is_sysret(&[0x0f, 0x05, 0x90]), "syscall");
        assert!(!is_sysret(&[0x48, 0xcf, 0x90]), "iretq");
        assert!(!is_sysret(&[0x48, 0x48, 0x48]), "prefixes only");
    }

    #[test]
    fn user_code_and_data_descriptors_decode_as_a_load_would() {
        // 64-bit user code (0x00af_fb00_0000_ffff) and user data (0x00cf_f300_0000_ffff).
        let cs = decode_descriptor(0x00af_fb00_0000_ffffu64.to_le_bytes(), 0x23);
        assert_eq!(
            (cs.type_, cs.dpl, cs.l, cs.db, cs.s, cs.present, cs.g),
            (0xb, 3, 1, 0, 1, 1, 1)
        );
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 0x23));
        let ss = decode_descriptor(0x00cf_f200_0000_ffffu64.to_le_bytes(), 0x1b);
        assert_eq!((ss.type_, ss.dpl, ss.l, ss.db), (0x3, 3, 0, 1));
    }
}
