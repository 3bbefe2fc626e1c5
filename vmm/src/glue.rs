//! The engine's `Guest` interface: implemented by the vCPU being handled, and
//! its VM-wide half (`VmControl`) by `VmWide`, for edits outside any exit.

use vmiscope_introspect::arch::{Dtr, Regs, SRegs};
use vmiscope_introspect::glue::{BreakpointKind, GlueError, PageRights, VcpuView, VmControl};

use vmiscope_introspect::paging::{self, PagingMode};

use crate::shared::{VcpuCtl, VmShared};
use crate::slots::Access;

fn failed(e: impl std::fmt::Display) -> GlueError {
    GlueError::Failed(e.to_string())
}

impl VcpuView for VcpuCtl<'_> {
    fn vcpu(&self) -> u32 {
        self.id()
    }
    fn vcpu_count(&self) -> u32 {
        self.vm().vcpu_count()
    }
    fn regs(&self) -> Regs {
        let r = VcpuCtl::regs(self);
        Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
    fn set_regs(&mut self, g: &Regs) {
        let mut r = VcpuCtl::regs(self);
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp) =
            (g.rax, g.rbx, g.rcx, g.rdx, g.rsi, g.rdi, g.rsp, g.rbp);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
            (g.r8, g.r9, g.r10, g.r11, g.r12, g.r13, g.r14, g.r15);
        (r.rip, r.rflags) = (g.rip, g.rflags);
        VcpuCtl::set_regs(self, &r);
    }
    fn sregs(&self) -> SRegs {
        let s = VcpuCtl::sregs(self);
        SRegs {
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            idtr: Dtr {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            gdtr: Dtr {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            cs_selector: s.cs.selector,
            cs_base: s.cs.base,
            fs_base: s.fs.base,
            gs_base: s.gs.base,
        }
    }
    fn set_sregs(&mut self, g: &SRegs) {
        let mut s = VcpuCtl::sregs(self);
        (s.cr0, s.cr3, s.cr4) = (g.cr0, g.cr3, g.cr4);
        (s.idt.base, s.idt.limit, s.gdt.base, s.gdt.limit) =
            (g.idtr.base, g.idtr.limit, g.gdtr.base, g.gdtr.limit);
        VcpuCtl::set_sregs(self, &s);
    }
    fn xcr0(&self) -> Option<u64> {
        self.xcr(0)
    }
    fn set_xcr0(&mut self, value: u64) -> Result<(), GlueError> {
        self.set_xcr(0, value).map_err(failed)
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), GlueError> {
        VcpuCtl::inject_exception(self, vector, error_code).map_err(failed)
    }
}

/// The VM-wide controls outside any exit: a hook edit from a front end, made
/// while every vCPU runs on. Nothing waits for a vCPU: page rights are
/// committed with the run gate (`VmShared::commit_access` kicks the vCPUs out
/// of the guest and holds them until the memslots are whole), MSR interception
/// and breakpoints are VM-wide state the vCPUs pick up at their next entry.
/// Guest-virtual targets are resolved with `paging`: a vCPU's at its last exit.
pub struct VmWide<'a> {
    vm: &'a VmShared,
    mode: PagingMode,
}

impl<'a> VmWide<'a> {
    /// The controls, resolving guest-virtual addresses as vCPU `cpu` did at its
    /// last exit (None: no such vCPU).
    pub fn new(vm: &'a VmShared, cpu: u32) -> Option<Self> {
        Some(VmWide {
            vm,
            mode: vm.last_paging(cpu)?,
        })
    }
}

impl VmControl for VmWide<'_> {
    fn ram_size(&self) -> u64 {
        self.vm.ram().size()
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GlueError> {
        self.vm
            .ram()
            .read(gpa, buf)
            .map_err(|_| GlueError::OutsideRam(gpa))
    }
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), GlueError> {
        self.vm
            .ram()
            .write(gpa, data)
            .map_err(|_| GlueError::OutsideRam(gpa))
    }
    fn cmpxchg_phys(&mut self, gpa: u64, expected: &[u8], new: &[u8]) -> Result<bool, GlueError> {
        cmpxchg(self.vm, gpa, expected, new)
    }
    fn set_page_rights(&mut self, gpa: u64, rights: PageRights) -> Result<(), GlueError> {
        let a = match rights {
            PageRights::Full => Access::Full,
            PageRights::WriteTrapped => Access::WriteTrap,
            PageRights::AllTrapped => Access::AllTrap,
        };
        self.vm
            .set_page_access(gpa, a)
            .map(|_| ())
            .map_err(|_| GlueError::OutsideRam(gpa))
    }
    fn commit_rights(&mut self) -> Result<(), GlueError> {
        self.vm.commit_access().map(|_| ()).map_err(failed)
    }
    fn intercept_msr(&mut self, index: u32, read: bool, write: bool) -> Result<(), GlueError> {
        self.vm.intercept_msr(index, read, write).map_err(failed)
    }
    fn set_breakpoint(
        &mut self,
        gpa: u64,
        gva: u64,
        on: bool,
        hidden: bool,
    ) -> Result<BreakpointKind, GlueError> {
        set_breakpoint(self.vm, self.mode, gpa, gva, on, hidden)
    }
    fn paging(&self) -> PagingMode {
        self.mode
    }
    fn polled_baseline(&self) -> Option<(u32, SRegs, Option<u64>)> {
        None
    }
}

/// The handled vCPU's controls: the VM-wide ones, with its own live paging,
/// and its registers as the baseline of a newly polled class.
impl VmControl for VcpuCtl<'_> {
    fn ram_size(&self) -> u64 {
        self.vm_wide().ram_size()
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GlueError> {
        self.vm_wide().read_phys(gpa, buf)
    }
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), GlueError> {
        self.vm_wide().write_phys(gpa, data)
    }
    fn cmpxchg_phys(&mut self, gpa: u64, expected: &[u8], new: &[u8]) -> Result<bool, GlueError> {
        self.vm_wide().cmpxchg_phys(gpa, expected, new)
    }
    fn set_page_rights(&mut self, gpa: u64, rights: PageRights) -> Result<(), GlueError> {
        self.vm_wide().set_page_rights(gpa, rights)
    }
    fn commit_rights(&mut self) -> Result<(), GlueError> {
        self.vm_wide().commit_rights()
    }
    fn intercept_msr(&mut self, index: u32, read: bool, write: bool) -> Result<(), GlueError> {
        self.vm_wide().intercept_msr(index, read, write)
    }
    fn set_breakpoint(
        &mut self,
        gpa: u64,
        gva: u64,
        on: bool,
        hidden: bool,
    ) -> Result<BreakpointKind, GlueError> {
        self.vm_wide().set_breakpoint(gpa, gva, on, hidden)
    }
    fn paging(&self) -> PagingMode {
        self.paging_mode()
    }
    fn polled_baseline(&self) -> Option<(u32, SRegs, Option<u64>)> {
        Some((self.id(), VcpuView::sregs(self), self.xcr(0)))
    }
}

impl VcpuCtl<'_> {
    /// The VM-wide controls, with this vCPU's live paging.
    fn vm_wide(&self) -> VmWide<'_> {
        VmWide {
            vm: self.vm(),
            mode: self.paging_mode(),
        }
    }
}

/// `lock cmpxchg` on guest RAM, for the engine's atomic writes.
fn cmpxchg(vm: &VmShared, gpa: u64, expected: &[u8], new: &[u8]) -> Result<bool, GlueError> {
    let n = expected.len();
    let refused = || GlueError::Failed(format!("cmpxchg of {n} bytes at {gpa:#x}"));
    if n != new.len() || !matches!(n, 1 | 2 | 4 | 8) || !gpa.is_multiple_of(n as u64) {
        return Err(refused());
    }
    let le = |b: &[u8]| {
        let mut a = [0u8; 8];
        a[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(a)
    };
    vm.ram()
        .compare_exchange(gpa, n, le(expected), le(new))
        .map_err(|_| refused())
}

/// Plants or removes a breakpoint (see `VmControl::set_breakpoint`), reading
/// whether user code can run it from the page tables of `mode`.
fn set_breakpoint(
    vm: &VmShared,
    mode: PagingMode,
    gpa: u64,
    gva: u64,
    on: bool,
    hidden: bool,
) -> Result<BreakpointKind, GlueError> {
    if !on {
        if !vm.remove_register_breakpoint(gpa) {
            vm.remove_sw_breakpoint(gpa).map_err(failed)?;
        }
        return Ok(BreakpointKind::Patched);
    }
    // Hidden: a free debug register where it can catch this code costs
    // nothing until hit and hides nothing; else an INT3 (the engine hides it).
    // Whether user code can run it is read from the guest's own tables: the
    // ones the VMM built for the entry map everything as supervisor and say
    // nothing (the guest's code may well be user code later).
    // The slot must fire where the code runs, decided as for `hbreak`
    // (`user_only_code`): a small kernel that runs from user-accessible
    // pages gets a slot too (it took the trapped-page path: 4x a visible hit
    // on 1 vCPU, 14.5 ms a hit on 2).
    if hidden
        && vm.insert_register_breakpoint(gpa, gva, vm.user_only_code(mode, gva) != Some(false))
    {
        return Ok(BreakpointKind::Register);
    }
    let user = mode.cr3 & !0xfff == crate::loader::boot::PML4
        || paging::translate(vm.ram(), mode, gva).is_ok_and(|t| t.user);
    // Code on a user page may run at CPL0 too (small kernels map everything
    // user-accessible): its INT3 must reach the VMM at both, or its fetch.
    let host = vm.host();
    let cpls: &[u8] = if user { &[0, 3] } else { &[0] };
    let caught = cpls.iter().all(|&c| host.int3_caught_at(c));
    let fetch = cpls.iter().all(|&c| host.debug().exec_trap_at(c));
    // A hidden INT3's page is read-trapped, fetches included, anyway.
    if !caught && !fetch {
        return Err(GlueError::Unsupported(
            "this host's KVM reports neither an INT3 nor a fetch from a trapped page (measured at start-up; `caps` shows it): no breakpoint can fire here",
        ));
    }
    vm.insert_sw_breakpoint_as(gpa, Some(gva), hidden)
        .map_err(failed)?;
    Ok(if caught {
        BreakpointKind::Patched
    } else {
        BreakpointKind::Trapped
    })
}
