//! `VcpuCtl`: what a handler or a task may do with one vCPU (its registers,
//! memory through its page tables, MSRs, FPU, single-step, holding it at a stop).

use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::time::Duration;

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::SyncReg;
use vmiscope_introspect::paging::{self, PagingMode, Translation, WalkError};

use super::{VcpuCtl, VcpuMsg, VcpuState, VmShared};
use crate::error::VmError;
use crate::guest;
use crate::stop::StopReason;

impl<'a> VcpuCtl<'a> {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The VM (borrowed for as long as this handle, not this call: a hold on
    /// the VM may span calls that take the handle mutably).
    pub fn vm(&self) -> &'a VmShared {
        self.vm
    }

    /// General registers at this exit (from kvm_run, no ioctl).
    pub fn regs(&self) -> kvm_regs {
        self.fd.sync_regs().regs
    }

    /// Changes general registers; KVM loads them on the next entry.
    pub fn set_regs(&mut self, regs: &kvm_regs) {
        self.fd.sync_regs_mut().regs = *regs;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
    }

    pub fn sregs(&self) -> kvm_sregs {
        self.fd.sync_regs().sregs
    }

    /// Changes special registers (CR0/CR3/CR4, descriptor tables …) on the next entry.
    pub fn set_sregs(&mut self, sregs: &kvm_sregs) {
        self.fd.sync_regs_mut().sregs = *sregs;
        self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
    }

    /// How many tasks (`VmShared::with_vcpu`) this vCPU has started: unchanged,
    /// its registers are as they were (no task touched them).
    pub fn tasks_run(&self) -> u64 {
        self.vm.tasks_started(self.id)
    }

    /// DR0–DR3, DR6, DR7 (one KVM_GET_DEBUGREGS ioctl).
    pub fn debugregs(&self) -> Option<kvm_bindings::kvm_debugregs> {
        self.vm.count_ioctls(1);
        self.fd.get_debug_regs().ok()
    }

    pub fn cpl(&self) -> u8 {
        guest::cpl_of(&self.sregs())
    }

    pub fn paging_mode(&self) -> PagingMode {
        guest::paging_mode(&self.sregs())
    }

    /// Translates a guest-virtual address with the vCPU's current page tables.
    pub fn translate(&self, gva: u64) -> Result<Translation, WalkError> {
        paging::translate(self.vm.ram(), self.paging_mode(), gva)
    }

    /// Reads guest-virtual memory (page by page through the guest's tables).
    pub fn read_virt(&self, gva: u64, buf: &mut [u8]) -> Result<(), VmError> {
        guest::read_virt(self.vm.ram(), self.paging_mode(), gva, buf)
    }

    /// An extended control register (XCR0 …); one KVM_GET_XCRS ioctl, so poll it
    /// on timer ticks rather than on every exit.
    pub fn xcr(&self, index: u32) -> Option<u64> {
        self.vm.count_ioctls(1);
        guest::xcr(self.fd, index)
    }

    /// Writes an extended control register (KVM_SET_XCRS).
    pub fn set_xcr(&mut self, index: u32, value: u64) -> Result<(), VmError> {
        self.vm.count_ioctls(2);
        let mut x = self.fd.get_xcrs().map_err(VmError::ioctl("KVM_GET_XCRS"))?;
        let n = x.nr_xcrs as usize;
        match x.xcrs[..n].iter_mut().find(|e| e.xcr == index) {
            Some(e) => e.value = value,
            None => return Err(VmError::Config(format!("no XCR{index}"))),
        }
        self.fd.set_xcrs(&x).map_err(VmError::ioctl("KVM_SET_XCRS"))
    }

    /// x87, SSE and MXCSR state (one KVM_GET_FPU).
    pub fn fpu(&self) -> Option<kvm_bindings::kvm_fpu> {
        self.vm.count_ioctls(1);
        self.fd.get_fpu().ok()
    }

    /// Replaces the x87/SSE state (one KVM_SET_FPU).
    pub fn set_fpu(&mut self, fpu: &kvm_bindings::kvm_fpu) -> Result<(), VmError> {
        self.vm.count_ioctls(1);
        self.fd.set_fpu(fpu).map_err(VmError::ioctl("KVM_SET_FPU"))
    }

    /// Reads an MSR (one KVM_GET_MSRS).
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.vm.count_ioctls(1);
        guest::get_msr(self.fd, index)
    }

    /// Whether a single-step from here can work: KVM's where the host steps at this
    /// CPL, else (CPL3 on PVM) RFLAGS.TF caught at the guest's #DB entry, which needs
    /// a present #DB gate in the guest's IDT and a free debug-register slot.
    pub fn can_step(&self) -> bool {
        self.vm.can_step(&self.sregs())
    }

    /// Single-steps this vCPU from here if that can work (`can_step`); returns
    /// whether it will.
    pub fn start_step(&mut self) -> bool {
        let ok = self.can_step();
        self.set_single_step(ok);
        ok
    }

    /// Single-steps this vCPU from now on (each step is a `SingleStep` event).
    pub fn set_single_step(&mut self, on: bool) {
        *self.user_step = on;
    }

    /// Sets hardware execute breakpoint `slot` (0..4) on every vCPU (see
    /// `VmShared::set_hw_breakpoint`).
    pub fn set_hw_breakpoint(&mut self, slot: usize, addr: Option<u64>) {
        self.vm.set_hw_breakpoint(slot, addr);
    }

    /// Injects an exception into the guest on the next entry.
    pub fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), VmError> {
        self.vm.count_ioctls(2);
        guest::inject(self.fd, vector, error_code)
    }

    /// Applies a trapped write now, as `Reply::Continue` would after the handler
    /// returns (then answer `Reply::Drop`: it has landed). For a stop that must
    /// show the written value, as a data breakpoint (gdb's watchpoints) does.
    pub fn apply_write(&mut self, m: &crate::event::MemAccess) {
        if m.write && self.vm.ram().contains(m.gpa, m.len as u64) {
            let _ = self
                .vm
                .ram()
                .write(m.gpa, &m.data.to_le_bytes()[..m.len.min(8) as usize]);
        }
    }

    /// Keeps this vCPU inside its exit handler (state `Held`) while `until`
    /// returns None, serving tasks sent with `VmShared::with_vcpu` meanwhile: the
    /// same path as for a paused vCPU. Wake it with `VmShared::wake_vcpu` when the
    /// condition may have changed. Returns `until`'s answer, or None when the run
    /// ends.
    pub fn hold<R>(&mut self, mut until: impl FnMut(&mut VcpuCtl<'_>) -> Option<R>) -> Option<R> {
        self.vm.set_state(self.id, VcpuState::Held);
        // Spin only while an answer may be on its way: after entering the hold
        // and after each message, not after a quiet timeout.
        let mut spin = true;
        let r = loop {
            if let Some(r) = until(self) {
                break Some(r);
            }
            if self.vm.is_stopping() {
                break None;
            }
            // A release usually follows within microseconds (see HANDOFF_SPIN);
            // then sleep, bounded, so a stop of the whole run is noticed even
            // without a message.
            let spun = spin
                .then(|| {
                    super::spin_for(|| match self.rx.try_recv() {
                        Err(TryRecvError::Empty) => None,
                        Ok(m) => Some(Ok(m)),
                        Err(TryRecvError::Disconnected) => {
                            Some(Err(RecvTimeoutError::Disconnected))
                        }
                    })
                })
                .flatten();
            let got = spun.unwrap_or_else(|| self.rx.recv_timeout(Duration::from_millis(100)));
            spin = got.is_ok();
            match got {
                Ok(msg) => {
                    if !self.take_message(msg) {
                        self.vm.stop(StopReason::User);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break None,
            }
        };
        self.vm.set_state(self.id, VcpuState::Running);
        r
    }

    /// Acts on one message; false for `Stop`.
    pub(crate) fn take_message(&mut self, msg: VcpuMsg) -> bool {
        match msg {
            VcpuMsg::Pause => *self.paused = true,
            VcpuMsg::Resume => *self.paused = false,
            VcpuMsg::With(task) => {
                // Counted before it runs: a task answers its sender from inside,
                // and a copy of the registers taken before it must already read
                // as stale when the sender looks next (a register write, then a
                // read of them all, is how gdb sets one register).
                self.vm
                    .vcpu_info(self.id)
                    .tasks
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                task(self);
            }
            VcpuMsg::Wake => {}
            VcpuMsg::Stop => return false,
        }
        true
    }
}
