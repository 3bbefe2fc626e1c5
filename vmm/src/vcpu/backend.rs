//! The vCPU thread as the exit handler's backend over KVM. Every write into the
//! `kvm_run` area's exit union lives here, each under the exit that makes its
//! member the live one.

use kvm_bindings::kvm_regs;

use super::VcpuThread;
use super::handle::{ExitBackend, FailedInsn, FailureSite, Flow, SlotUse};
use super::state::Catch;
use crate::devices::PortEffect;
use crate::event::{Event, Reply};
use crate::guest;
use crate::slots::Access;
use crate::stats::ExitClass;
use crate::stop::StopReason;
use vmiscope_introspect::paging;

impl ExitBackend for VcpuThread {
    fn id(&self) -> u32 {
        self.id
    }

    fn regs(&self) -> kvm_regs {
        VcpuThread::regs(self)
    }

    fn set_regs(&mut self, regs: &kvm_regs) {
        self.edit_regs(|r| *r = *regs);
    }

    fn cpl(&self) -> u8 {
        VcpuThread::cpl(self)
    }

    fn la57(&self) -> bool {
        self.fd.sync_regs().sregs.cr4 & (1 << 12) != 0
    }

    fn reset_at_shutdown(&self) -> Option<u64> {
        let s = self.fd.sync_regs();
        let init =
            s.regs.rip == 0xfff0 && s.sregs.cs.selector == 0xf000 && s.sregs.cs.base == 0xffff_0000;
        // `run` leaves the shutdown out of `last_rip`.
        init.then(|| {
            self.info()
                .last_rip
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    fn count(&self, class: ExitClass) {
        self.info().stats.bump(class);
    }

    fn ask(&mut self, event: &Event) -> Reply {
        let (mut ctl, handler) = self.ctl_and_handler();
        handler.on_event(&mut ctl, event)
    }

    fn stop(&mut self, reason: StopReason) {
        self.vm.stop(reason);
    }

    fn halt(&mut self) -> bool {
        self.vm
            .set_state(self.id, crate::shared::VcpuState::Stopped);
        self.vm.all_stopped()
    }

    fn port_write(&mut self, port: u16, size: u8, value: u32) -> PortEffect {
        self.vm.port_write(port, size, value)
    }

    fn port_read(&mut self, port: u16, size: u8) -> Option<u32> {
        self.vm.port_read(port, size)
    }

    fn complete_io_in(&mut self, value: u32) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO (direction in), so `io` is the live
        // union member and data_offset points inside the mapped kvm_run area, with
        // room for size * count bytes; one element of at most 4 bytes is written.
        unsafe {
            let io = run.__bindgen_anon_1.io;
            let p = (run as *mut kvm_bindings::kvm_run as *mut u8).add(io.data_offset as usize);
            for (i, b) in value
                .to_le_bytes()
                .iter()
                .take((io.size as usize).min(4))
                .enumerate()
            {
                *p.add(i) = *b;
            }
        }
    }

    fn complete_mmio_read(&mut self, value: u64) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_MMIO (read), so `mmio` is the live union member.
        unsafe {
            let mmio = &mut run.__bindgen_anon_1.mmio;
            let n = (mmio.len as usize).min(8);
            mmio.data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
        }
    }

    fn complete_msr(&mut self, error: bool, data: Option<u64>) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_X86_RDMSR/WRMSR, so `msr` is the live union member.
        unsafe {
            let m = &mut run.__bindgen_anon_1.msr;
            m.error = error as u8;
            if let Some(d) = data {
                m.data = d;
            }
        }
    }

    fn get_msr(&mut self, index: u32) -> Option<u64> {
        self.vm.count_ioctls(1);
        guest::get_msr(&self.fd, index)
    }

    fn set_msr(&mut self, index: u32, value: u64) -> bool {
        self.vm.count_ioctls(1);
        guest::set_msr(&self.fd, index, value)
    }

    fn ram_contains(&self, gpa: u64, len: u64) -> bool {
        self.vm.ram().contains(gpa, len)
    }

    fn page_access(&self, gpa: u64) -> Access {
        self.vm.page_access(gpa)
    }

    fn ram_read(&self, gpa: u64, buf: &mut [u8]) {
        let _ = self.vm.ram().read(gpa, buf);
    }

    fn ram_write(&mut self, gpa: u64, data: &[u8]) {
        let _ = self.vm.ram().write(gpa, data);
    }

    fn slot_use(&self, slot: usize) -> SlotUse {
        if let Some(catch) = self.debug.catches.get(slot).copied().flatten() {
            return SlotUse::Catch(catch);
        }
        match self.vm.register_breakpoint_in(slot) {
            Some(gpa) => SlotUse::HiddenBreakpoint { gpa },
            None => SlotUse::Analyst,
        }
    }

    fn stepped(&mut self, pc: u64) -> Flow {
        VcpuThread::stepped(self, pc)
    }

    fn caught(&mut self, catch: Catch) -> Flow {
        VcpuThread::caught(self, catch)
    }

    fn step_past_hw_breakpoint(&mut self) {
        self.let_guest_handler_run();
    }

    fn sw_breakpoint_at(&self, rip: u64) -> (Option<u64>, bool) {
        let gpa = paging::translate(self.vm.ram(), self.mode(), rip)
            .ok()
            .map(|t| t.gpa);
        let ours = gpa.and_then(|g| self.vm.sw_breakpoint_at(g)).is_some();
        (gpa, ours)
    }

    fn failure_site(&mut self) -> FailureSite {
        VcpuThread::failure_site(self)
    }

    fn failed_instruction(&mut self) -> FailedInsn {
        VcpuThread::failed_instruction(self)
    }

    fn exec_fault(&mut self, gva: u64, gpa: u64, cpl: u8) -> Flow {
        VcpuThread::exec_fault(self, gva, gpa, cpl)
    }

    fn fixup(&mut self, bytes: &[u8]) -> bool {
        VcpuThread::fixup(self, bytes)
    }

    fn kicked_on_hypercall(&mut self) -> Option<u64> {
        VcpuThread::kicked_on_hypercall(self)
    }

    fn kvm_stepping(&self) -> bool {
        self.debug
            .applied
            .is_some_and(|(control, _)| control & kvm_bindings::KVM_GUESTDBG_SINGLESTEP != 0)
    }

    fn finish_deferred(&mut self) {
        if !self.step.deferred.is_empty() {
            let d = std::mem::take(&mut self.step.deferred);
            self.finish_restores(&d);
        }
    }

    fn skip(&mut self, len: u8) {
        self.edit_regs(|r| r.rip = r.rip.wrapping_add(len as u64));
    }

    fn step_over_at(&mut self, gpa: u64) -> Result<(), crate::VmError> {
        VcpuThread::step_over_at(self, gpa)
    }

    fn reinject_breakpoint(&mut self, rip: u64) -> Result<(), crate::VmError> {
        // The guest's own INT3: deliver #BP with RIP after the INT3, as the CPU would.
        self.edit_regs(|r| r.rip = rip + 1);
        self.vm.count_ioctls(2);
        guest::inject(&self.fd, 3, None)
    }
}

impl VcpuThread {
    /// `KVM_EXIT_INTERNAL_ERROR`'s suberror and data words.
    pub(super) fn internal_error_data(&mut self) -> (u32, [u64; 16]) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the live union member.
        unsafe {
            (
                run.__bindgen_anon_1.internal.suberror,
                run.__bindgen_anon_1.internal.data,
            )
        }
    }
}
