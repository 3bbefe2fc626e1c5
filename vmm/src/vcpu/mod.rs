//! One vCPU thread: a small state machine (running / paused / held / stopped)
//! driven by messages, around KVM_RUN and `handle::handle_exit`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Duration;

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_MP_STATE_RUNNABLE, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
    kvm_mp_state, kvm_regs,
};
use kvm_ioctls::{SyncReg, VcpuFd, VmFd};
use vmiscope_introspect::paging::{self, PagingMode};

use crate::config::VmConfig;
use crate::error::VmError;
use crate::event::ExitHandler;
use crate::exit::{RawExit, decode};
use crate::guest;
use crate::kick;
use crate::loader::{self, EntryState};
use crate::shared::{VcpuCtl, VcpuMsg, VcpuState, VmShared};

use crate::stats::ExitClass;
use crate::stop::StopReason;

mod backend;
pub mod complete;
mod debug;
pub(crate) mod handle;
mod insn_cpu;
mod page_exec;
pub(crate) mod state;
use handle::{FailedInsn, FailureSite, Flow};
use state::{DebugState, StepOver};

/// Creates and initialises vCPU `id` for `entry`.
pub(crate) fn create(
    vm: &VmFd,
    id: u32,
    cfg: &VmConfig,
    entry: &EntryState,
    cpuid: &kvm_bindings::CpuId,
) -> Result<VcpuFd, VmError> {
    let mut fd = vm
        .create_vcpu(id as u64)
        .map_err(VmError::ioctl("KVM_CREATE_VCPU"))?;
    let mut cpuid = cpuid.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    fd.set_cpuid2(&cpuid)
        .map_err(VmError::ioctl("KVM_SET_CPUID2"))?;
    let sregs = fd.get_sregs().map_err(VmError::ioctl("KVM_GET_SREGS"))?;
    fd.set_sregs(&loader::sregs_for(entry, sregs))
        .map_err(VmError::ioctl("KVM_SET_SREGS"))?;
    fd.set_regs(&loader::regs_for(entry, id, cfg.vcpus))
        .map_err(VmError::ioctl("KVM_SET_REGS"))?;
    if cfg.irqchip && id > 0 && matches!(entry, EntryState::Long64 { .. }) {
        // Our boot protocol starts every vCPU at the entry, not through INIT/SIPI.
        // Multiboot kernels get their APs the PC way: waiting for INIT/SIPI.
        fd.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(VmError::ioctl("KVM_SET_MP_STATE"))?;
    }
    // Registers come back in kvm_run on every exit: no GET_REGS/GET_SREGS per exit.
    fd.set_sync_valid_reg(SyncReg::Register);
    fd.set_sync_valid_reg(SyncReg::SystemRegister);
    // Until the first exit fills it, the sync area shows the entry state (so a vCPU
    // paused before its first instruction can be inspected). Not marked dirty: KVM
    // already has these values.
    let (r, sr) = (
        fd.get_regs().map_err(VmError::ioctl("KVM_GET_REGS"))?,
        fd.get_sregs().map_err(VmError::ioctl("KVM_GET_SREGS"))?,
    );
    fd.sync_regs_mut().regs = r;
    fd.sync_regs_mut().sregs = sr;
    Ok(fd)
}

pub(crate) struct VcpuThread {
    id: u32,
    fd: VcpuFd,
    vm: Arc<VmShared>,
    handler: Arc<dyn ExitHandler>,
    rx: Receiver<VcpuMsg>,
    debug: DebugState,
    step: StepOver,
    /// RIP at the last kick that found no exit since the one before.
    kick_rip: Option<u64>,
    exits_since_kick: u64,
    /// The memslot generation when the vCPU last entered the guest.
    entered_slots: u64,
    /// Paused: the loop waits for messages instead of entering the guest (also
    /// set by a pause that arrives while the vCPU is held at a stop).
    paused: bool,
}

impl VcpuThread {
    pub(crate) fn new(
        id: u32,
        fd: VcpuFd,
        vm: Arc<VmShared>,
        handler: Arc<dyn ExitHandler>,
        rx: Receiver<VcpuMsg>,
        start_paused: bool,
    ) -> Self {
        VcpuThread {
            paused: start_paused,
            id,
            fd,
            vm,
            handler,
            rx,
            debug: DebugState::default(),
            step: StepOver::default(),
            kick_rip: None,
            exits_since_kick: 0,
            entered_slots: 0,
        }
    }

    fn info(&self) -> &crate::shared::VcpuInfo {
        self.vm.vcpu_info(self.id)
    }

    fn ctl(&mut self) -> VcpuCtl<'_> {
        self.ctl_and_handler().0
    }

    /// The vCPU's `VcpuCtl` and its exit handler, borrowed side by side (no
    /// reference count touched per exit).
    fn ctl_and_handler(&mut self) -> (VcpuCtl<'_>, &dyn ExitHandler) {
        let ctl = VcpuCtl::new(
            self.id,
            &mut self.fd,
            &self.vm,
            &mut self.debug.user_step,
            &self.rx,
            &mut self.paused,
        );
        (ctl, &*self.handler)
    }

    pub(crate) fn run(mut self) {
        kick::register_thread(self.fd.get_kvm_run());
        // Whether the last exit was a write to a port or MMIO (see `complete_pending_io`).
        let mut last_out = false;
        while self.serve_messages() {
            if self.pause_now() {
                continue;
            }
            if let Err(e) = self.apply_debug() {
                self.vm.stop(StopReason::Error(e.to_string()));
                break;
            }
            match self.step_in_vmm() {
                Some(Flow::Stop) => break,
                Some(Flow::Continue) => continue,
                None => {}
            }
            let raw = self.enter_guest();
            let Some(raw) = raw else { break };
            last_out = matches!(raw, RawExit::IoOut { .. } | RawExit::MmioWrite { .. });
            // A shutdown on SVM comes back in the INIT state (see
            // `reset_at_shutdown`): the exit before it stays the last position.
            if raw != RawExit::Shutdown {
                self.note_exit();
            }
            let (mut ctl, handler) = self.ctl_and_handler();
            if let Err(cause) = handler.on_exit(&mut ctl) {
                self.vm.stop(StopReason::Handler(cause));
                break;
            }
            if let Flow::Stop = handle::handle_exit(&mut self, raw) {
                break;
            }
        }
        if last_out {
            self.complete_pending_io();
        }
        // Kept for post-mortem reading: the registers at the last exit (kvm_run's
        // synced copy) and the debug registers.
        let state = crate::shared::FinalState {
            regs: self.fd.sync_regs().regs,
            sregs: self.fd.sync_regs().sregs,
            debugregs: self.fd.get_debug_regs().ok(),
        };
        *self.info().last_state.lock().unwrap() = Some(state);
        self.vm.set_state(self.id, VcpuState::Stopped);
        kick::unregister_thread();
    }

    /// Completes the port or MMIO write the last exit left to us, without
    /// entering the guest: KVM finishes such an instruction (RIP past it) only
    /// at the next KVM_RUN, and with `immediate_exit` set that KVM_RUN does just
    /// that and returns EINTR (KVM's API for saving a vCPU's state). Without it
    /// the final registers of a guest that ended on its power-off port showed
    /// RIP still on the OUT on VMX and SVM hosts. (A read is not completed: its
    /// value may never have been supplied.)
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Drains the message queue (blocking while paused); false once the run ends.
    /// Whether a pause takes effect now. Not in the middle of a step-over that
    /// runs alone (`begin_exclusive`): a vCPU paused there would keep every
    /// other vCPU out of the guest until it is resumed. gdb pauses every vCPU
    /// when one stops, then steps that one alone, which then waited for good
    /// (half the `stepi`s after `break ap_main` on `smp`). The step is one
    /// instruction; the pause takes effect right after it.
    fn pause_now(&self) -> bool {
        self.paused && !self.step.exclusive
    }

    fn serve_messages(&mut self) -> bool {
        loop {
            if self.vm.is_stopping() {
                return false;
            }
            let msg = if self.pause_now() {
                self.vm.set_state(self.id, VcpuState::Paused);
                match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => return false,
                }
            } else if self.vm.excluded(self.id) {
                // Another vCPU steps over one of our INT3s alone: wait out of the
                // guest, serving messages as if paused (its state stays Running:
                // it will go on by itself).
                match self.rx.recv_timeout(Duration::from_micros(100)) {
                    Ok(m) => m,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(_) => return false,
                }
            } else {
                // Marked running before the last look at the queue: a sender that
                // saw another state queued its message before this look (and
                // did not kick); one that sees Running kicks (`kick_if_running`).
                self.vm.set_state(self.id, VcpuState::Running);
                std::sync::atomic::fence(Ordering::SeqCst);
                match self.rx.try_recv() {
                    Ok(m) => m,
                    Err(TryRecvError::Empty) => return true,
                    Err(TryRecvError::Disconnected) => return false,
                }
            };
            if !self.ctl().take_message(msg) {
                self.vm.stop(StopReason::User);
                return false;
            }
        }
    }

    /// One KVM_RUN, inside the memslot run gate (see `VmShared::commit_access`):
    /// a slot split or merge never happens while this vCPU is in the guest.
    fn enter_guest(&mut self) -> Option<RawExit> {
        let raw = {
            let _gate = self.vm.enter_gate();
            self.entered_slots = self.vm.slot_generation();
            match self.fd.run() {
                Ok(exit) => decode(&exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => RawExit::Intr,
                Err(e) => {
                    self.vm
                        .stop(StopReason::Error(format!("vCPU {}: KVM_RUN: {e}", self.id)));
                    return None;
                }
            }
        };
        if raw == RawExit::Intr {
            // An entry that a kick (or a signal) cut short: counted, since each
            // is wasted work (`stats` shows them as `kick` exits).
            self.info().stats.bump(crate::ExitClass::Kick);
            self.fd.set_kvm_immediate_exit(0);
        } else {
            self.info().entries.fetch_add(1, Ordering::SeqCst);
            self.exits_since_kick += 1;
        }
        Some(raw)
    }

    /// Publishes where the vCPU is, for other threads (timeouts, the console).
    fn note_exit(&self) {
        let s = self.fd.sync_regs();
        let info = self.info();
        info.last_exit_ns.store(self.vm.now_ns(), Ordering::Relaxed);
        info.last_rip.store(s.regs.rip, Ordering::Relaxed);
        info.last_cpl
            .store(guest::cpl_of(&s.sregs), Ordering::Relaxed);
        for (slot, v) in
            info.paging
                .iter()
                .zip([s.sregs.cr0, s.sregs.cr3, s.sregs.cr4, s.sregs.efer])
        {
            slot.store(v, Ordering::Relaxed);
        }
    }

    fn regs(&self) -> kvm_regs {
        self.fd.sync_regs().regs
    }

    fn cpl(&self) -> u8 {
        guest::cpl_of(&self.fd.sync_regs().sregs)
    }

    fn mode(&self) -> PagingMode {
        guest::paging_mode(&self.fd.sync_regs().sregs)
    }

    fn edit_regs(&mut self, f: impl FnOnce(&mut kvm_regs)) {
        f(&mut self.fd.sync_regs_mut().regs);
        self.fd.set_sync_dirty_reg(SyncReg::Register);
    }

    /// See `ExitBackend::kicked_on_hypercall`.
    fn kicked_on_hypercall(&mut self) -> Option<u64> {
        self.debug.plan = None;
        let rip = self.regs().rip;
        let quiet = self.exits_since_kick == 0;
        self.exits_since_kick = 0;
        if quiet && self.cpl() == 0 && self.is_hypercall_at(rip) {
            if self.kick_rip == Some(rip) {
                return Some(rip);
            }
            self.kick_rip = Some(rip);
        } else {
            self.kick_rip = None;
        }
        None
    }

    fn is_hypercall_at(&self, rip: u64) -> bool {
        let mut b = [0u8; 3];
        guest::read_virt(self.vm.ram(), self.mode(), rip, &mut b).is_ok()
            && (b == [0x0f, 0x01, 0xc1] || b == [0x0f, 0x01, 0xd9])
    }

    /// See `ExitBackend::failure_site`.
    fn failure_site(&mut self) -> FailureSite {
        let (suberror, _) = self.internal_error_data();
        let rip = self.regs().rip;
        let cpl = self.cpl();
        let gpa = paging::translate(self.vm.ram(), self.mode(), rip)
            .ok()
            .map(|t| t.gpa);
        let page = gpa.map(|g| (g, self.vm.page_access(g)));
        // Read after `page`: a change that `page` missed shows here.
        let slots_changed = self.vm.slot_generation() != self.entered_slots;
        FailureSite {
            emulation: suberror == KVM_INTERNAL_ERROR_EMULATION,
            rip,
            cpl,
            page,
            slots_changed,
        }
    }

    /// See `ExitBackend::failed_instruction`.
    fn failed_instruction(&mut self) -> FailedInsn {
        let (_, data) = self.internal_error_data();
        let rip = self.regs().rip;
        let mut bytes = [0u8; 15];
        let len = match guest::read_virt(self.vm.ram(), self.mode(), rip, &mut bytes) {
            Ok(()) => 15,
            // The kernel's copy: data[1] = insn_size | bytes…
            Err(_) => {
                let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
                bytes.copy_from_slice(&raw[1..16]);
                raw[0].min(15)
            }
        };
        FailedInsn { bytes, len }
    }

    /// Instructions KVM's emulator cannot run at CPL0 on a PVM host but the VMM can
    /// complete itself (`complete.rs`). Returns whether it did.
    pub(super) fn fixup(&mut self, bytes: &[u8]) -> bool {
        let Some((what, outcome)) = complete::complete(self, bytes) else {
            return false;
        };
        self.info().stats.bump(ExitClass::Fixup);
        self.vm.count_completed(what);
        match outcome {
            complete::Outcome::Done => true,
            complete::Outcome::Fault {
                vector,
                error_code,
                cr2,
            } => {
                if let Some(cr2) = cr2 {
                    self.fd.sync_regs_mut().sregs.cr2 = cr2;
                    self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
                }
                self.raise(vector, error_code)
            }
        }
    }

    /// Delivers exception `vector` to the guest at the current instruction (as
    /// the CPU would have); false if KVM refused, so the run stops instead.
    fn raise(&mut self, vector: u8, error_code: Option<u32>) -> bool {
        self.ctl().inject_exception(vector, error_code).is_ok()
    }
}

/// Marks for the compiler that the sync-register flags are the ones KVM uses.
const _: () = assert!(KVM_SYNC_X86_REGS == 1 && KVM_SYNC_X86_SREGS == 2);
