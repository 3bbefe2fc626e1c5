//! The vCPU's debug machinery: KVM's guest-debug controls, software and hardware
//! breakpoints, single-steps and step-overs, and (on PVM) the catches that make
//! steps and INT3s work in user code (see `usertrap`).

use kvm_bindings::{
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
    KVM_SYNC_X86_REGS, kvm_guest_debug,
};
use kvm_ioctls::SyncReg;
use vmiscope_introspect::paging;

use super::VcpuThread;
use super::handle::{self, ExitBackend, Flow};
use super::state::{Catch, Plan, Restore};
use crate::error::VmError;
use crate::event::{Event, Reply};
use crate::guest;
use crate::memory::PAGE_SIZE;
use crate::shared::VmShared;
use crate::slots::Access;
use crate::stop::StopReason;
use crate::usertrap::{self, Frame, RFLAGS_TF};

impl VcpuThread {
    /// Applies the guest-debug controls if they changed (one ioctl, only then).
    pub(super) fn apply_debug(&mut self) -> Result<(), VmError> {
        let generation = self.vm.debug_generation();
        let mut regs = [0u64; 8];
        let step = self.debug.user_step || !self.step.stepping.is_empty();
        let mut control = self.step_controls(step);
        let mut slots = self.vm.hw_breakpoints();
        let mut catches = [None; 4];
        let sw_bps = self.vm.has_sw_breakpoints();
        let int3_at_3 = self.vm.host().debug().int3_at(3).reaches_vmm();
        if !self.step.hw_suspended && self.vm.host().user_catches() {
            let s = self.fd.sync_regs().sregs;
            let plan = Plan::for_state(&self.vm, &s, generation, self.debug.plan);
            self.debug.plan = Some(plan);
            // A DR breakpoint makes every VM entry dearer here (bench: "I/O exit,
            // CPL0, breakpoint on a user page"): catch #BP only while user code
            // can reach one of our INT3s.
            let wanted = [
                (Catch::Db, self.debug.tf_step, plan.db),
                (Catch::Bp, sw_bps && plan.user_bps && !int3_at_3, plan.bp),
            ];
            for (catch, _, at) in wanted.into_iter().filter(|w| w.1) {
                let free = slots.iter().rposition(Option::is_none);
                if let (Some(i), Some(a)) = (free, at) {
                    slots[i] = Some(a);
                    catches[i] = Some(catch);
                }
            }
        }
        self.debug.catches = catches;
        if !self.step.hw_suspended && slots.iter().any(Option::is_some) {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            regs[7] = 0x600; // GE and the always-one bit 10
            for (i, a) in slots.iter().enumerate() {
                if let Some(a) = a {
                    regs[i] = *a;
                    regs[7] |= 1 << (2 * i); // local enable, execute, length 1
                }
            }
        }
        // With KVM_GUESTDBG_USE_SW_BP a hardware-virtualised host reports every INT3
        // as a debug exit; on PVM INT3 at CPL0 is an emulation failure anyway.
        if sw_bps {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
        }
        // KVM notes where a single-step starts when the controls are set
        // (`singlestep_rip`, x86.c) and puts RFLAGS.TF back only while RIP is
        // there; nothing re-arms it once TF is gone. The guest clears it
        // itself with a POPF or IRET of flags without TF (measured on the SVM
        // rig: the step after verify_cpu's `push $0; popf` ran free), and
        // KVM's emulator drops it after an MMIO write (`handle_exit`). So
        // every step sets the controls again, at the RIP it starts from.
        // Registers the VMM edited in this exit reach KVM only with the next
        // KVM_RUN, after the controls, so they go first: a step started where
        // the VMM had just moved RIP (an instruction completed on a trapped
        // page) would otherwise start at the old RIP and run free.
        let step_armed = control & KVM_GUESTDBG_SINGLESTEP != 0;
        let regs_edited = self.fd.get_kvm_run().kvm_dirty_regs & u64::from(KVM_SYNC_X86_REGS) != 0;
        if step_armed && regs_edited {
            let r = self.fd.sync_regs().regs;
            self.vm.count_ioctls(1);
            self.fd
                .set_regs(&r)
                .map_err(VmError::ioctl("KVM_SET_REGS"))?;
            self.fd.clear_sync_dirty_reg(SyncReg::Register);
        }
        if !step_armed
            && self.debug.applied == Some((control, regs))
            && self.debug.generation == generation
        {
            return Ok(());
        }
        self.vm.count_ioctls(1);
        let mut dbg = kvm_guest_debug {
            control,
            ..Default::default()
        };
        dbg.arch.debugreg = regs;
        self.fd
            .set_guest_debug(&dbg)
            .map_err(VmError::ioctl("KVM_SET_GUEST_DEBUG"))?;
        self.debug.applied = Some((control, regs));
        self.debug.generation = generation;
        Ok(())
    }

    /// How a wanted step is made: KVM's single-step where it works (the
    /// controls returned); at CPL3 on PVM, TF and the #DB catch (no controls).
    fn step_controls(&mut self, step: bool) -> u32 {
        let mut control = 0;
        if step && !self.vm.host().single_step_at(self.cpl()) {
            if !self.debug.tf_step {
                self.debug.tf_pushf = self.pushf_here();
                self.edit_regs(|r| r.rflags |= RFLAGS_TF);
                self.debug.tf_step = true;
            }
        } else if !step && self.debug.tf_step {
            // The step was called off before its #DB (another stop ended it).
            self.edit_regs(|r| r.rflags &= !RFLAGS_TF);
            self.debug.tf_step = false;
        } else if step {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
            // KVM steps with RFLAGS.TF in the guest's own flags (VMX and SVM
            // alike), so a stepped PUSHF pushes it: taken out after the step
            // unless the guest had set TF itself (KVM hides ours from `regs`).
            self.debug.tf_pushf = self.regs().rflags & RFLAGS_TF == 0 && self.pushf_here();
            self.step_through_sysret();
        } else if !self.debug.tf_step {
            self.debug.tf_pushf = false;
        }
        if !step {
            self.take_tf_out_of_r11();
        }
        control
    }

    /// A single step over ENDBR64/ENDBR32 at CPL0 on PVM: KVM's emulator runs
    /// the instruction after it too before the step's trap (measured: a `stepi`
    /// moved two instructions). Without CET these are NOPs, so the VMM completes
    /// the step itself: RIP moves past the 4 bytes and the step ends there, with
    /// no guest entry. None when the step goes to KVM as usual.
    pub(super) fn step_in_vmm(&mut self) -> Option<Flow> {
        const ENDBR: [u8; 3] = [0xf3, 0x0f, 0x1e];
        const CR4_CET: u64 = 1 << 23;
        let step = self.debug.user_step || !self.step.stepping.is_empty();
        if !step || self.vm.host().kind() != crate::HostKind::Pvm || self.cpl() != 0 {
            return None;
        }
        let s = self.fd.sync_regs().sregs;
        if s.cr4 & CR4_CET != 0 {
            return None; // an ENDBR then has work to do: leave it to KVM
        }
        let rip = self.regs().rip;
        let mut b = [0u8; 4];
        guest::read_virt(self.vm.ram(), guest::paging_mode(&s), rip, &mut b).ok()?;
        if b[..3] != ENDBR || !matches!(b[3], 0xfa | 0xfb) {
            return None;
        }
        self.edit_regs(|r| r.rip = rip.wrapping_add(4));
        self.info().stats.bump(crate::ExitClass::Fixup);
        Some(self.stepped(rip.wrapping_add(4)))
    }

    /// One instruction ran under a step (KVM's, or a TF step caught at #DB).
    pub(super) fn stepped(&mut self, pc: u64) -> Flow {
        if std::mem::take(&mut self.debug.tf_pushf) {
            self.clear_pushed_tf(self.regs().rsp);
        }
        self.take_tf_out_of_r11();
        let ours = !self.step.stepping.is_empty();
        if ours {
            let r = std::mem::take(&mut self.step.stepping);
            self.finish_restores(&r);
        }
        if self.debug.user_step || !ours {
            let reply = handle::ask(self, &Event::SingleStep { rip: pc });
            return handle::stop_or_continue(self, reply);
        }
        Flow::Continue
    }

    /// Resuming on an execute breakpoint would fire it again: step over the
    /// instruction with the hardware breakpoints (and catches) off.
    pub(super) fn let_guest_handler_run(&mut self) {
        self.step.hw_suspended = true;
        self.begin_step_over(vec![Restore::HwBps]);
    }

    /// A guest exception entry we watch was reached (see `usertrap`). If the
    /// exception is ours (a TF step, or an INT3 at CPL3), pop its frame and go back
    /// to user mode; otherwise it is the guest's own and its handler runs.
    pub(super) fn caught(&mut self, catch: Catch) -> Flow {
        let s = self.fd.sync_regs().sregs;
        let mode = guest::paging_mode(&s);
        let frame = Frame::read(&self.vm, mode, self.regs().rsp).filter(Frame::came_from_user);
        match (catch, frame) {
            (Catch::Db, Some(f)) if self.debug.tf_step => {
                self.debug.tf_step = false;
                if !self.undo_frame(&f, f.rip, f.rflags & !RFLAGS_TF) {
                    let why = "cannot return from #DB to CPL3".into();
                    return handle::stop(self, StopReason::Error(why));
                }
                // A stepped PUSHF pushed our TF: take it out of the guest's copy,
                // as the CPU would not have had it set.
                if std::mem::take(&mut self.debug.tf_pushf) {
                    self.clear_pushed_tf(f.rsp);
                }
                self.stepped(f.rip)
            }
            (Catch::Bp, Some(f)) => {
                let rip = f.rip.wrapping_sub(1);
                let ours = paging::translate(self.vm.ram(), mode, rip)
                    .ok()
                    .is_some_and(|t| self.vm.sw_breakpoint_at(t.gpa).is_some());
                if ours {
                    if !self.undo_frame(&f, rip, f.rflags) {
                        let why = "cannot return from #BP to CPL3".into();
                        return handle::stop(self, StopReason::Error(why));
                    }
                    return self.breakpoint(rip);
                }
                // The guest's own INT3: seen, then delivered as it already is.
                let ev = Event::Breakpoint {
                    rip,
                    gpa: None,
                    ours: false,
                    cpl: 3,
                };
                if let Reply::Stop(cause) = handle::ask(self, &ev) {
                    return handle::stop(self, StopReason::Handler(cause));
                }
                self.let_guest_handler_run();
                Flow::Continue
            }
            _ => {
                self.let_guest_handler_run();
                Flow::Continue
            }
        }
    }

    /// SYSRET loads RFLAGS from R11, and the step's trap follows the TF it
    /// loads, not the TF it started with (Linux's entry_64.S: "restoring TF
    /// results in a trap from userspace immediately after SYSRET"; QEMU's
    /// translate.c rechecks TF after it). So KVM's step, TF in the guest's own
    /// flags, ran free into user space: a step-over of the kernel's SYSRET
    /// left its page open, and a breakpoint on `entry_SYSCALL_64` never fired.
    /// TF goes into R11 for the step, where the host can step the user
    /// code it lands in (else the trap would be the guest's), and out of R11
    /// after it. Not on PVM, whose CPL0 runs in KVM's emulator: that ends a
    /// step after each instruction whatever TF says.
    fn step_through_sysret(&mut self) {
        let host = self.vm.host();
        if self.debug.tf_r11 || host.kind() == crate::HostKind::Pvm || !host.single_step_at(3) {
            return;
        }
        if self.regs().r11 & RFLAGS_TF == 0 && self.sysret_here() {
            self.edit_regs(|r| r.r11 |= RFLAGS_TF);
            self.debug.tf_r11 = true;
        }
    }

    /// Undoes `step_through_sysret` once the step is over (or called off).
    fn take_tf_out_of_r11(&mut self) {
        if std::mem::take(&mut self.debug.tf_r11) {
            self.edit_regs(|r| r.r11 &= !RFLAGS_TF);
        }
    }

    /// Whether a step from RIP can end in a debug exit once SYSRET has taken the
    /// vCPU to CPL3 (`step_through_sysret`).
    pub(super) fn sysret_steppable(&self) -> bool {
        !self.sysret_here() || self.vm.host().single_step_at(3)
    }

    /// Whether the instruction at RIP is SYSRET.
    fn sysret_here(&self) -> bool {
        self.insn_prefix_here::<3>()
            .is_some_and(|b| usertrap::is_sysret(&b))
    }

    /// The first N bytes at RIP (as the guest's RAM holds them).
    fn insn_prefix_here<const N: usize>(&self) -> Option<[u8; N]> {
        let s = self.fd.sync_regs();
        let mut b = [0u8; N];
        let mode = guest::paging_mode(&s.sregs);
        guest::read_virt(self.vm.ram(), mode, s.regs.rip, &mut b).ok()?;
        Some(b)
    }

    /// Whether the instruction at RIP is PUSHF (prefixes allowed).
    fn pushf_here(&self) -> bool {
        self.insn_prefix_here::<4>()
            .is_some_and(|b| usertrap::is_pushf(&b))
    }

    /// Clears TF (bit 8: bit 0 of the second byte) in the flags image at `rsp`.
    fn clear_pushed_tf(&mut self, rsp: u64) {
        if let Ok(t) = paging::translate(self.vm.ram(), self.mode(), rsp + 1) {
            let mut b = [0u8];
            if self.vm.ram().read(t.gpa, &mut b).is_ok() {
                let _ = self.vm.ram().write(t.gpa, &[b[0] & !1]);
            }
        }
    }

    /// Returns from an exception to CPL3 as IRETQ would, without running guest code.
    fn undo_frame(&mut self, f: &Frame, rip: u64, rflags: u64) -> bool {
        let mut s = self.fd.sync_regs().sregs;
        let vm: &VmShared = &self.vm;
        let seg = |sel: u64| usertrap::segment(vm, &s, sel as u16);
        let (Some(cs), Some(ss)) = (seg(f.cs), seg(f.ss)) else {
            return false;
        };
        (s.cs, s.ss) = (cs, ss);
        self.fd.sync_regs_mut().sregs = s;
        self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
        self.edit_regs(|r| {
            r.rip = rip;
            r.rsp = f.rsp;
            r.rflags = rflags;
        });
        true
    }

    /// A fetch from a page with no memslot (ours: read-trapped for a hidden
    /// INT3, or execute-hooked). The instruction is the engine's event, then is
    /// completed here or stepped over with the page opened. Those completed
    /// here are followed by the next ones on the same page, each exactly as if
    /// it had faulted in turn (its event, in order), as long as nothing would
    /// have stopped it before its fetch (`next_on_trapped_page`), up to
    /// `TRAPPED_RUN` instructions: a loop that shares its page with a hidden
    /// breakpoint then costs one exit per run of instructions, not one each.
    pub(super) fn exec_fault(&mut self, gva: u64, gpa: u64, cpl: u8) -> Flow {
        let (mut gva, mut gpa) = (gva, gpa);
        let mut guest_drs = None;
        for n in 0..TRAPPED_RUN {
            // A fetch at one of our breakpoints is that breakpoint.
            if self.vm.sw_breakpoint_at(gpa).is_some() {
                return if n == 0 {
                    self.breakpoint(gva)
                } else {
                    Flow::Continue
                };
            }
            match handle::ask(self, &Event::ExecFault { gva, gpa, cpl }) {
                Reply::Stop(cause) => return handle::stop(self, StopReason::Handler(cause)),
                Reply::Retry => return Flow::Continue,
                _ if self.run_on_trapped_page(gva, gpa, cpl) => {}
                _ => {
                    return match self.step_over_at(gpa) {
                        Ok(()) => Flow::Continue,
                        Err(e) => handle::stop(self, StopReason::Error(e.to_string())),
                    };
                }
            }
            match self.next_on_trapped_page(gpa, &mut guest_drs) {
                Some(next) => (gva, gpa) = next,
                None => break,
            }
        }
        Flow::Continue
    }

    /// Where the instruction after one completed at `gpa` would fault next,
    /// without entering the guest: its fetch is on the same read-trapped page,
    /// and no breakpoint (ours in a debug register, or the guest's own: KVM's
    /// emulator checks both before each instruction) is at it. None sends the
    /// vCPU back to the guest. Pending interrupts wait for that: at most
    /// `TRAPPED_RUN` instructions, each quicker here than one guest entry.
    fn next_on_trapped_page(
        &mut self,
        gpa: u64,
        guest_drs: &mut Option<Option<kvm_bindings::kvm_debugregs>>,
    ) -> Option<(u64, u64)> {
        let rip = self.regs().rip;
        let next = paging::translate(self.vm.ram(), self.mode(), rip).ok()?.gpa;
        let same_page = next & !(PAGE_SIZE - 1) == gpa & !(PAGE_SIZE - 1);
        if !same_page || self.vm.page_access(next) != Access::AllTrap {
            return None;
        }
        // The guest's own debug registers: one ioctl per run, read only once
        // the run goes on.
        let guest = (*guest_drs.get_or_insert_with(|| {
            self.vm.count_ioctls(1);
            self.fd.get_debug_regs().ok()
        }))?;
        let ours = self
            .debug
            .applied
            .map(|(_, r)| ([r[0], r[1], r[2], r[3]], r[7]));
        let armed = [ours, Some((guest.db, guest.dr7))]
            .into_iter()
            .flatten()
            .any(|(db, dr7)| code_breakpoint_at(&db, dr7, rip));
        (!armed).then_some((rip, next))
    }

    /// Completes the instruction at `gva` (a fetch from a read-trapped page)
    /// in the VMM when it is a common form on plain memory (`page_exec`): one
    /// exit, no page opened and closed. Only at CPL0 and with no step pending
    /// (a step must end in a debug exit); the original bytes stand in for our
    /// INT3s.
    fn run_on_trapped_page(&mut self, gva: u64, gpa: u64, cpl: u8) -> bool {
        let stepping = !self.step.stepping.is_empty() || self.debug.user_step || self.debug.tf_step;
        if cpl != 0 || stepping || self.regs().rflags & RFLAGS_TF != 0 {
            return false;
        }
        let mode = self.mode();
        let mut bytes = [0u8; 15];
        // What lies on this page (an instruction that crosses into the next
        // one is left to the step-over).
        let n = (PAGE_SIZE - (gpa & (PAGE_SIZE - 1))).min(15) as usize;
        if guest::read_virt(self.vm.ram(), mode, gva, &mut bytes[..n]).is_err() {
            return false;
        }
        for (i, b) in bytes[..n].iter_mut().enumerate() {
            if let Some(orig) = self.vm.sw_breakpoint_at(gpa + i as u64) {
                *b = orig;
            }
        }
        if !super::page_exec::run(self, &bytes[..n]) {
            return false;
        }
        self.info().stats.bump(crate::ExitClass::Fixup);
        true
    }

    /// The INT3 at `rip` (see `handle::breakpoint`).
    pub(super) fn breakpoint(&mut self, rip: u64) -> Flow {
        let (gpa, ours) = ExitBackend::sw_breakpoint_at(self, rip);
        let cpl = self.cpl();
        handle::breakpoint(self, rip, gpa, ours, cpl)
    }

    /// Steps over the instruction at `gpa`: opens its page if it is execute-trapped,
    /// and puts the original bytes under our INT3s on that page back for the step
    /// (so the instruction neither traps again nor reads an INT3); all of it is
    /// undone after the step.
    pub(super) fn step_over_at(&mut self, gpa: u64) -> Result<(), VmError> {
        let page = gpa & !(PAGE_SIZE - 1);
        let on_page = self.vm.sw_breakpoints_for_step(gpa);
        // With the INT3s of this page holding their original bytes for the step,
        // another vCPU there would pass them unseen: step alone.
        if !on_page.is_empty() {
            self.vm.begin_exclusive(self.id);
            self.step.exclusive = true;
        }
        let mut restores = Vec::new();
        if self.vm.page_access(page) == Access::AllTrap {
            self.vm.open_page(page)?;
            restores.push(Restore::Page { gpa: page });
        }
        for (g, orig) in on_page {
            self.vm.ram().write(g, &[orig])?;
            restores.push(Restore::SwBp { gpa: g });
        }
        self.begin_step_over(restores);
        Ok(())
    }

    /// Runs one instruction with `restores` pending: single-step where this host
    /// can, else put things back at the next exit.
    fn begin_step_over(&mut self, restores: Vec<Restore>) {
        if self.can_step_here() {
            self.step.stepping.extend(restores);
        } else {
            self.step.deferred.extend(restores);
        }
    }

    /// Whether a step from the current instruction can end in a debug exit.
    fn can_step_here(&self) -> bool {
        self.vm.can_step(&self.fd.sync_regs().sregs) && self.sysret_steppable()
    }

    pub(super) fn finish_restores(&mut self, restores: &[Restore]) {
        self.put_back(restores);
        if std::mem::take(&mut self.step.exclusive) {
            self.vm.end_exclusive(self.id);
        }
    }

    fn put_back(&mut self, restores: &[Restore]) {
        for r in restores {
            match *r {
                Restore::Page { gpa } => {
                    if let Err(e) = self.vm.close_page(gpa) {
                        self.vm.stop(StopReason::Error(e.to_string()));
                    }
                }
                Restore::SwBp { gpa } => {
                    if self.vm.sw_breakpoint_at(gpa).is_some() {
                        let _ = self.vm.ram().write(gpa, &[0xcc]);
                    }
                }
                Restore::HwBps => self.step.hw_suspended = false,
            }
        }
    }
}

/// Instructions of a read-trapped page completed in a row in the VMM, at most,
/// before the vCPU goes back to the guest (see `exec_fault`).
const TRAPPED_RUN: usize = 16;

/// Whether an enabled execute breakpoint of `dr7` is at `rip`.
fn code_breakpoint_at(db: &[u64; 4], dr7: u64, rip: u64) -> bool {
    (0..4).any(|i| {
        let enabled = dr7 & (3 << (2 * i)) != 0;
        let execute = (dr7 >> (16 + 4 * i)) & 3 == 0;
        enabled && execute && db[i] == rip
    })
}

#[cfg(test)]
mod tests {
    use super::code_breakpoint_at;

    #[test]
    fn only_enabled_execute_breakpoints_stop_a_run() {
        let db = [0x1000, 0x2000, 0x3000, 0x4000];
        // DR1 locally enabled, execute (R/W1 = 00, LEN1 = 00).
        assert!(code_breakpoint_at(&db, 1 << 2, 0x2000));
        assert!(
            !code_breakpoint_at(&db, 1 << 2, 0x1000),
            "DR0 is not enabled"
        );
        // DR2 globally enabled, but a write watchpoint (R/W2 = 01).
        assert!(!code_breakpoint_at(&db, 2 << 4 | 1 << 24, 0x3000));
        assert!(!code_breakpoint_at(&db, 0, 0x4000));
    }
}
