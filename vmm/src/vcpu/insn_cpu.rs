//! The vCPU thread as the instruction completer's CPU (`complete::InsnCpu`):
//! registers from the sync area, memory through the guest's page tables.

use kvm_bindings::kvm_regs;
use vmiscope_introspect::paging;

use super::VcpuThread;
use super::complete::{InsnCpu, PageFault};
use crate::guest;

impl InsnCpu for VcpuThread {
    fn regs(&self) -> kvm_regs {
        VcpuThread::regs(self)
    }

    fn set_regs(&mut self, regs: &kvm_regs) {
        self.edit_regs(|r| *r = *regs);
    }

    fn cr0(&self) -> u64 {
        self.fd.sync_regs().sregs.cr0
    }

    fn cr4(&self) -> u64 {
        self.fd.sync_regs().sregs.cr4
    }

    fn segment_base(&self, fs: bool) -> u64 {
        let s = &self.fd.sync_regs().sregs;
        if fs { s.fs.base } else { s.gs.base }
    }

    /// For the VMM's CPL0 completions: the CPU's own checks (CR0.WP, SMAP).
    fn translate(&self, gva: u64, write: bool) -> Result<u64, PageFault> {
        let t = paging::translate(self.vm.ram(), self.mode(), gva)
            .map_err(|_| PageFault { present: false })?;
        let (cr0, cr4, rflags) = (self.cr0(), self.cr4(), VcpuThread::regs(self).rflags);
        match super::complete::supervisor_fault(t.writable, t.user, write, cr0, cr4, rflags) {
            Some(f) => Err(f),
            None => Ok(t.gpa),
        }
    }

    fn plain_memory(&self, gpa: u64, write: bool) -> bool {
        match self.vm.page_access(gpa) {
            crate::slots::Access::Full => self.vm.ram().contains(gpa, 1),
            crate::slots::Access::WriteTrap => !write,
            crate::slots::Access::AllTrap => false,
        }
    }

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.vm.ram().read(gpa, buf).is_ok()
    }

    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> bool {
        self.vm.ram().write(gpa, data).is_ok()
    }

    fn cmpxchg16(&mut self, gpa: u64, expected: u128, new: u128) -> Option<Result<(), u128>> {
        let ram = self.vm.ram();
        if gpa & 15 != 0 || !ram.contains(gpa, 16) {
            return None;
        }
        let ptr = (ram.host_base() + gpa) as *mut u128;
        let (mut lo, mut hi) = (expected as u64, (expected >> 64) as u64);
        let swapped: u8;
        // SAFETY: `ptr` is 16-byte aligned (gpa is, and the mapping is page
        // aligned) and inside the guest RAM mapping, which lives as long as the
        // VM. The instruction is atomic against every other vCPU's access, as
        // the guest's own would be. RBX is reserved by the compiler, so the new
        // low half goes through a scratch register and is swapped in and out.
        unsafe {
            std::arch::asm!(
                "xchg rbx, {new_lo}",
                "lock cmpxchg16b xmmword ptr [{ptr}]",
                "sete {ok}",
                "xchg rbx, {new_lo}",
                ptr = in(reg) ptr,
                new_lo = inout(reg) new as u64 => _,
                ok = out(reg_byte) swapped,
                in("rcx") (new >> 64) as u64,
                inout("rax") lo,
                inout("rdx") hi,
            );
        }
        Some(if swapped != 0 {
            Ok(())
        } else {
            Err((hi as u128) << 64 | lo as u128)
        })
    }

    fn xcr(&self, index: u32) -> Option<u64> {
        self.vm.count_ioctls(1);
        guest::xcr(&self.fd, index)
    }

    fn msr(&self, index: u32) -> Option<u64> {
        self.vm.count_ioctls(1);
        guest::get_msr(&self.fd, index)
    }

    fn mxcsr(&self) -> Option<u32> {
        self.vm.count_ioctls(1);
        self.fd.get_fpu().ok().map(|f| f.mxcsr)
    }

    fn set_mxcsr(&mut self, value: u32) -> bool {
        self.vm.count_ioctls(2);
        let Ok(mut f) = self.fd.get_fpu() else {
            return false;
        };
        f.mxcsr = value;
        self.fd.set_fpu(&f).is_ok()
    }

    fn flush_tlb(&mut self) {
        // Toggling CR4.PGE flushes every translation, global ones too; KVM
        // rebuilds its shadow tables on each change.
        const CR4_PGE: u64 = 1 << 7;
        let Ok(mut s) = self.fd.get_sregs() else {
            return;
        };
        self.vm.count_ioctls(3);
        s.cr4 ^= CR4_PGE;
        let _ = self.fd.set_sregs(&s);
        s.cr4 ^= CR4_PGE;
        let _ = self.fd.set_sregs(&s);
    }
}
