//! One vCPU thread: a small state machine (running / paused / stopped) driven by
//! messages, around KVM_RUN and `handle_exit`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};

use kvm_bindings::{
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
    KVM_INTERNAL_ERROR_EMULATION, KVM_MP_STATE_RUNNABLE, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
    kvm_guest_debug, kvm_mp_state, kvm_regs, kvm_sregs,
};
use kvm_ioctls::{SyncReg, VcpuFd, VmFd};
use vmiscope_introspect::paging::{self, PagingMode, Translation, WalkError};

use crate::devices::{INTROCALL_MAGIC, PortEffect};
use crate::error::VmError;
use crate::event::{Event, ExitHandler, Introcall, MemAccess, Reply};
use crate::exit::{RawExit, decode};
use crate::kick;
use crate::loader::{self, EntryState};
use crate::memory::PAGE_SIZE;
use crate::slots::Access;
use crate::stop::StopReason;
use crate::usertrap::{self, Catch, Frame, RFLAGS_TF};
use crate::vm::{STATE_PAUSED, STATE_RUNNING, STATE_STOPPED, VmConfig, VmShared};

/// Work run on a vCPU's own thread with its `VcpuCtl` (register and memory access
/// for the console while the vCPU is paused).
pub type VcpuTask = Box<dyn FnOnce(&mut VcpuCtl<'_>) + Send>;

/// Messages that drive a vCPU's state machine.
pub enum VcpuMsg {
    Pause,
    Resume,
    Stop,
    /// Run this on the vCPU thread at its next stop point (now, if paused).
    With(VcpuTask),
}

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

/// Debug controls of one vCPU (KVM_SET_GUEST_DEBUG is issued only on change).
#[derive(Debug, Default)]
struct DebugState {
    user_step: bool,
    applied: Option<(u32, [u64; 8])>,
    generation: u64,
    /// Which hardware breakpoint slots watch a guest exception entry (see `usertrap`).
    catches: [Option<Catch>; 4],
    /// We set RFLAGS.TF for a CPL3 step and wait for the #DB catch.
    tf_step: bool,
    /// Whether the #BP catch is needed, for (debug generation, CR3); cleared on
    /// timer kicks so page-table edits without a CR3 load are seen too.
    user_bps: Option<(u64, u64, bool)>,
}

/// What a step-over must put back once the stepped instruction has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restore {
    Page { gpa: u64, access: Access },
    SwBp { gpa: u64 },
    HwBps,
}

#[derive(Debug, Default)]
struct StepOver {
    /// Restores waiting for the single-step exit.
    stepping: Vec<Restore>,
    /// Restores for hosts that cannot step here (PVM at CPL3): applied at the next exit.
    deferred: Vec<Restore>,
    hw_suspended: bool,
}

/// What an exit handler may do with the vCPU it was called for.
pub struct VcpuCtl<'a> {
    id: u32,
    fd: &'a mut VcpuFd,
    vm: &'a VmShared,
    debug: &'a mut DebugState,
}

impl VcpuCtl<'_> {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn vm(&self) -> &VmShared {
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

    pub fn cpl(&self) -> u8 {
        cpl_of(&self.sregs())
    }

    pub fn paging_mode(&self) -> PagingMode {
        let s = self.sregs();
        PagingMode::from_regs(s.cr0, s.cr3, s.cr4, s.efer)
    }

    /// Translates a guest-virtual address with the vCPU's current page tables.
    pub fn translate(&self, gva: u64) -> Result<Translation, WalkError> {
        paging::translate(&self.vm.ram, self.paging_mode(), gva)
    }

    /// Reads guest-virtual memory (page by page through the guest's tables).
    pub fn read_virt(&self, gva: u64, buf: &mut [u8]) -> Result<(), VmError> {
        read_virt(self.vm, self.paging_mode(), gva, buf)
    }

    /// An extended control register (XCR0 …); one KVM_GET_XCRS ioctl, so poll it
    /// on timer ticks rather than on every exit.
    pub fn xcr(&self, index: u32) -> Option<u64> {
        self.vm.count_ioctls(1);
        let x = self.fd.get_xcrs().ok()?;
        x.xcrs[..x.nr_xcrs as usize]
            .iter()
            .find(|e| e.xcr == index)
            .map(|e| e.value)
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
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()?;
        (self.fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
    }

    /// Whether a single-step from here can work: KVM's where the host steps at this
    /// CPL, else (CPL3 on PVM) RFLAGS.TF caught at the guest's #DB entry, which needs
    /// a present #DB gate in the guest's IDT.
    pub fn can_step(&self) -> bool {
        let s = self.sregs();
        self.vm.host.single_step_at(cpl_of(&s))
            || usertrap::handler(
                self.vm,
                Self::mode_of(&s),
                s.idt.base,
                s.idt.limit,
                Catch::Db,
            )
            .is_some()
    }

    /// Single-steps this vCPU from now on (each step is a `SingleStep` event).
    pub fn set_single_step(&mut self, on: bool) {
        self.debug.user_step = on;
    }

    /// Sets hardware execute breakpoint `slot` (0..4) on every vCPU (see
    /// `VmShared::set_hw_breakpoint`).
    pub fn set_hw_breakpoint(&mut self, slot: usize, addr: Option<u64>) {
        self.vm.set_hw_breakpoint(slot, addr);
    }

    /// Injects an exception into the guest on the next entry.
    pub fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), VmError> {
        self.vm.count_ioctls(2);
        inject(self.fd, vector, error_code)
    }
}

fn cpl_of(s: &kvm_sregs) -> u8 {
    if s.cr0 & 1 == 0 {
        0
    } else {
        (s.cs.selector & 3) as u8
    }
}

pub(crate) fn read_virt(
    vm: &VmShared,
    mode: PagingMode,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), VmError> {
    let mut done = 0usize;
    while done < buf.len() {
        let va = gva + done as u64;
        let t = paging::translate(&vm.ram, mode, va).map_err(|e| VmError::Memory(e.to_string()))?;
        let n = ((PAGE_SIZE - (va & (PAGE_SIZE - 1))) as usize).min(buf.len() - done);
        vm.ram.read(t.gpa, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

fn inject(fd: &VcpuFd, vector: u8, error_code: Option<u32>) -> Result<(), VmError> {
    let mut ev = fd
        .get_vcpu_events()
        .map_err(VmError::ioctl("KVM_GET_VCPU_EVENTS"))?;
    ev.exception.injected = 1;
    ev.exception.nr = vector;
    ev.exception.has_error_code = error_code.is_some() as u8;
    ev.exception.error_code = error_code.unwrap_or(0);
    fd.set_vcpu_events(&ev)
        .map_err(VmError::ioctl("KVM_SET_VCPU_EVENTS"))
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
    start_paused: bool,
}

/// What the loop does after an exit.
enum Flow {
    Continue,
    Stop,
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
            start_paused,
            id,
            fd,
            vm,
            handler,
            rx,
            debug: DebugState::default(),
            step: StepOver::default(),
            kick_rip: None,
            exits_since_kick: 0,
        }
    }

    fn info(&self) -> &crate::vm::VcpuInfo {
        &self.vm.vcpus[self.id as usize]
    }

    pub(crate) fn run(mut self) {
        kick::register_thread(self.fd.get_kvm_run());
        let mut paused = self.start_paused;
        loop {
            loop {
                match self.rx.try_recv() {
                    Ok(VcpuMsg::Pause) => paused = true,
                    Ok(VcpuMsg::Resume) => paused = false,
                    Ok(VcpuMsg::With(task)) => self.run_task(task),
                    Ok(VcpuMsg::Stop) | Err(TryRecvError::Disconnected) => {
                        self.vm.stop(StopReason::User);
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            if self.vm.is_stopping() {
                break;
            }
            if paused {
                self.info().state.store(STATE_PAUSED, Ordering::SeqCst);
                match self.rx.recv() {
                    Ok(VcpuMsg::Resume) => {
                        paused = false;
                        self.info().state.store(STATE_RUNNING, Ordering::SeqCst);
                    }
                    Ok(VcpuMsg::Pause) => {}
                    Ok(VcpuMsg::With(task)) => self.run_task(task),
                    Ok(VcpuMsg::Stop) | Err(_) => break,
                }
                continue;
            }
            if let Err(e) = self.apply_debug() {
                self.vm.stop(StopReason::Error(e.to_string()));
                break;
            }
            let raw = match self.fd.run() {
                Ok(exit) => decode(&exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => RawExit::Intr,
                Err(e) => {
                    self.vm
                        .stop(StopReason::Error(format!("vCPU {}: KVM_RUN: {e}", self.id)));
                    break;
                }
            };
            if raw == RawExit::Intr {
                self.fd.set_kvm_immediate_exit(0);
            } else {
                self.info().entered.store(true, Ordering::SeqCst);
            }
            let s = self.fd.sync_regs();
            let info = self.info();
            info.last_exit_ns.store(self.vm.now_ns(), Ordering::Relaxed);
            info.last_rip.store(s.regs.rip, Ordering::Relaxed);
            info.last_cpl.store(cpl_of(&s.sregs), Ordering::Relaxed);
            for (slot, v) in
                info.paging
                    .iter()
                    .zip([s.sregs.cr0, s.sregs.cr3, s.sregs.cr4, s.sregs.efer])
            {
                slot.store(v, Ordering::Relaxed);
            }
            {
                let mut ctl = VcpuCtl {
                    id: self.id,
                    fd: &mut self.fd,
                    vm: &self.vm,
                    debug: &mut self.debug,
                };
                self.handler.on_exit(&mut ctl);
            }
            if let Flow::Stop = self.handle(raw) {
                break;
            }
        }
        self.info().state.store(STATE_STOPPED, Ordering::SeqCst);
        kick::unregister_thread();
    }

    fn run_task(&mut self, task: VcpuTask) {
        let mut ctl = VcpuCtl {
            id: self.id,
            fd: &mut self.fd,
            vm: &self.vm,
            debug: &mut self.debug,
        };
        task(&mut ctl);
    }

    /// Applies the guest-debug controls if they changed (one ioctl, only then).
    fn apply_debug(&mut self) -> Result<(), VmError> {
        let generation = self.vm.debug_gen.load(Ordering::SeqCst);
        let mut control = 0u32;
        let mut regs = [0u64; 8];
        let step = self.debug.user_step || !self.step.stepping.is_empty();
        // KVM's single-step where it works; at CPL3 on PVM, TF and the #DB catch.
        if step && !self.vm.host.single_step_at(self.cpl()) {
            if !self.debug.tf_step {
                self.set_regs(|r| r.rflags |= RFLAGS_TF);
                self.debug.tf_step = true;
            }
        } else if !step && self.debug.tf_step {
            // The step was called off before its #DB (another stop ended it).
            self.set_regs(|r| r.rflags &= !RFLAGS_TF);
            self.debug.tf_step = false;
        } else if step {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        }
        let mut slots = *self.vm.hw_bps.lock().unwrap();
        let mut catches = [None; 4];
        let sw_bps = !self.vm.sw_bps.lock().unwrap().is_empty();
        if !self.step.hw_suspended && !self.vm.host.single_step_at(3) {
            // A DR breakpoint costs every VM entry here (~5 us): catch #BP only
            // while user code can reach one of our INT3s.
            let bp_catch = sw_bps && self.user_breakpoints(generation);
            for (catch, wanted) in [(Catch::Db, self.debug.tf_step), (Catch::Bp, bp_catch)] {
                let free = slots.iter().rposition(Option::is_none);
                if let (true, Some(i), Some(a)) = (wanted, free, self.catch_address(catch)) {
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
        if self.debug.applied == Some((control, regs)) && self.debug.generation == generation {
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

    fn ask(&mut self, event: &Event) -> Reply {
        self.info().stats.bump(event.class());
        let mut ctl = VcpuCtl {
            id: self.id,
            fd: &mut self.fd,
            vm: &self.vm,
            debug: &mut self.debug,
        };
        self.handler.on_event(&mut ctl, event)
    }

    fn regs(&self) -> kvm_regs {
        self.fd.sync_regs().regs
    }

    fn cpl(&self) -> u8 {
        cpl_of(&self.fd.sync_regs().sregs)
    }

    fn set_regs(&mut self, f: impl FnOnce(&mut kvm_regs)) {
        f(&mut self.fd.sync_regs_mut().regs);
        self.fd.set_sync_dirty_reg(SyncReg::Register);
    }

    fn stop(&self, reason: StopReason) -> Flow {
        self.vm.stop(reason);
        Flow::Stop
    }

    fn handle(&mut self, raw: RawExit) -> Flow {
        if raw != RawExit::Intr {
            self.exits_since_kick += 1;
        }
        // A step-over that could not single-step finishes at the next exit.
        if !self.step.deferred.is_empty() && !matches!(raw, RawExit::Debug { .. }) {
            let d = std::mem::take(&mut self.step.deferred);
            self.finish_restores(&d);
        }
        match raw {
            RawExit::IoOut { port, size, value } => self.io_out(port, size, value),
            RawExit::IoIn { port, size } => self.io_in(port, size),
            RawExit::MmioRead { gpa, len } => self.mmio_read(gpa, len),
            RawExit::MmioWrite { gpa, len, data } => self.mmio_write(gpa, len, data),
            RawExit::RdMsr { index } => self.msr(index, None),
            RawExit::WrMsr { index, value } => self.msr(index, Some(value)),
            RawExit::Debug { exception, pc, dr6 } => self.debug_exit(exception, pc, dr6),
            RawExit::InternalError => self.internal_error(),
            RawExit::Hlt => match self.ask(&Event::Halt) {
                Reply::Stop(m) => self.stop(StopReason::Handler(m)),
                _ => {
                    self.info().state.store(STATE_STOPPED, Ordering::SeqCst);
                    if self
                        .vm
                        .vcpus
                        .iter()
                        .all(|v| v.state.load(Ordering::SeqCst) == STATE_STOPPED)
                    {
                        self.vm.stop(StopReason::AllHalted);
                    }
                    Flow::Stop
                }
            },
            RawExit::Shutdown => {
                let _ = self.ask(&Event::Shutdown);
                self.stop(StopReason::TripleFault {
                    cpu: self.id,
                    rip: self.regs().rip,
                })
            }
            RawExit::Intr => self.kicked(),
            RawExit::FailEntry { reason } => self.stop(StopReason::Error(format!(
                "vCPU {}: VM entry failed (reason {reason:#x})",
                self.id
            ))),
            RawExit::SystemEvent { kind } => self.stop(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
                _ => StopReason::GuestExit(0),
            }),
            RawExit::Other(what) => {
                self.stop(StopReason::Error(format!("vCPU {}: {what}", self.id)))
            }
        }
    }

    fn kicked(&mut self) -> Flow {
        self.debug.user_bps = None;
        let rip = self.regs().rip;
        let quiet = self.exits_since_kick == 0;
        self.exits_since_kick = 0;
        if quiet && self.cpl() == 0 && self.is_hypercall_at(rip) {
            if self.kick_rip == Some(rip) {
                return self.stop(StopReason::Livelock { cpu: self.id, rip });
            }
            self.kick_rip = Some(rip);
        } else {
            self.kick_rip = None;
        }
        match self.ask(&Event::Kicked) {
            Reply::Stop(m) => self.stop(StopReason::Handler(m)),
            _ => Flow::Continue,
        }
    }

    fn is_hypercall_at(&self, rip: u64) -> bool {
        let mut b = [0u8; 3];
        let mode = VcpuCtl::mode_of(&self.fd.sync_regs().sregs);
        read_virt(&self.vm, mode, rip, &mut b).is_ok()
            && (b == [0x0f, 0x01, 0xc1] || b == [0x0f, 0x01, 0xd9])
    }

    fn io_out(&mut self, port: u16, size: u8, value: u32) -> Flow {
        self.info().stats.bump("io");
        let effect = self.vm.devices.lock().unwrap().write(port, size, value);
        match effect {
            PortEffect::None => Flow::Continue,
            PortEffect::Exit(status) => self.stop(StopReason::GuestExit(status)),
            PortEffect::Reset => self.stop(StopReason::Reset),
            PortEffect::Doorbell if self.regs().rax == INTROCALL_MAGIC => {
                let r = self.regs();
                let call = Introcall {
                    op: r.rdi,
                    args: [r.rsi, r.rdx, r.rbx],
                    rip: r.rip,
                    cpl: self.cpl(),
                };
                match self.ask(&Event::Introcall(call)) {
                    Reply::Data(v) => self.set_regs(|r| {
                        r.rax = 0;
                        r.rbx = v;
                    }),
                    Reply::Stop(m) => return self.stop(StopReason::Handler(m)),
                    _ => self.set_regs(|r| r.rax = u64::MAX),
                }
                Flow::Continue
            }
            PortEffect::Doorbell | PortEffect::Unclaimed => {
                match self.ask(&Event::Port {
                    port,
                    size,
                    write: Some(value),
                }) {
                    Reply::Stop(m) => self.stop(StopReason::Handler(m)),
                    _ => Flow::Continue,
                }
            }
        }
    }

    fn io_in(&mut self, port: u16, size: u8) -> Flow {
        self.info().stats.bump("io");
        let claimed = self.vm.devices.lock().unwrap().read(port, size);
        let value = match claimed {
            Some(v) => v,
            None => match self.ask(&Event::Port {
                port,
                size,
                write: None,
            }) {
                Reply::Data(v) => v as u32,
                Reply::Stop(m) => return self.stop(StopReason::Handler(m)),
                _ => u32::MAX,
            },
        };
        self.complete_io_in(value);
        Flow::Continue
    }

    fn complete_io_in(&mut self, value: u32) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO (direction in), so `io` is the live
        // union member and data_offset points inside the mapped kvm_run area, with
        // room for size * count bytes.
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

    fn mem_access(&self, gpa: u64, len: u8, write: bool, data: u64) -> MemAccess {
        MemAccess {
            gpa,
            len,
            write,
            data,
            rip: self.regs().rip,
            cpl: self.cpl(),
        }
    }

    fn mmio_read(&mut self, gpa: u64, len: u8) -> Flow {
        let in_ram = self.vm.ram.contains(gpa, len as u64);
        let acc = self.mem_access(gpa, len, false, 0);
        let vm = self.vm.clone();
        let ram_value = move || {
            let mut b = [0u8; 8];
            let _ = vm.ram.read(gpa, &mut b[..len.min(8) as usize]);
            u64::from_le_bytes(b)
        };
        // A read of a page that is no longer trapped (a commit raced with this exit)
        // is served silently.
        let value = if in_ram && self.vm.page_access(gpa) != Access::AllTrap {
            ram_value()
        } else {
            let ev = if in_ram {
                Event::Mem(acc)
            } else {
                Event::Mmio(acc)
            };
            match self.ask(&ev) {
                Reply::Data(v) => v,
                Reply::Stop(m) => return self.stop(StopReason::Handler(m)),
                _ if in_ram => ram_value(),
                _ => u64::MAX,
            }
        };
        self.complete_mmio_read(value);
        Flow::Continue
    }

    fn mmio_write(&mut self, gpa: u64, len: u8, data: u64) -> Flow {
        let in_ram = self.vm.ram.contains(gpa, len as u64);
        let apply = |vm: &VmShared| {
            let _ = vm
                .ram
                .write(gpa, &data.to_le_bytes()[..len.min(8) as usize]);
        };
        if in_ram && self.vm.page_access(gpa) == Access::Full {
            apply(&self.vm);
            return Flow::Continue;
        }
        let acc = self.mem_access(gpa, len, true, data);
        let ev = if in_ram {
            Event::Mem(acc)
        } else {
            Event::Mmio(acc)
        };
        match self.ask(&ev) {
            Reply::Continue if in_ram => apply(&self.vm),
            Reply::Stop(m) => return self.stop(StopReason::Handler(m)),
            _ => {}
        }
        Flow::Continue
    }

    fn msr(&mut self, index: u32, write: Option<u64>) -> Flow {
        let rip = self.regs().rip;
        let reply = self.ask(&Event::Msr { index, write, rip });
        let (error, data) = match (reply, write) {
            (Reply::Stop(m), _) => return self.stop(StopReason::Handler(m)),
            (Reply::Deny, _) => (1u8, 0u64),
            (Reply::Data(v), None) => (0, v),
            (_, None) => match self.get_msr(index) {
                Some(v) => (0, v),
                None => (1, 0),
            },
            (Reply::Continue, Some(v)) => (!self.set_msr(index, v) as u8, 0),
            (_, Some(_)) => (0, 0),
        };
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_X86_RDMSR/WRMSR, so `msr` is the live union member.
        unsafe {
            let m = &mut run.__bindgen_anon_1.msr;
            m.error = error;
            if write.is_none() {
                m.data = data;
            }
        }
        Flow::Continue
    }

    fn get_msr(&self, index: u32) -> Option<u64> {
        self.vm.count_ioctls(1);
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()?;
        (self.fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
    }

    /// KVM does not apply a write it handed to user space: the VMM must.
    fn set_msr(&self, index: u32, data: u64) -> bool {
        self.vm.count_ioctls(1);
        kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .ok()
        .and_then(|m| self.fd.set_msrs(&m).ok())
            == Some(1)
    }

    fn debug_exit(&mut self, exception: u32, pc: u64, dr6: u64) -> Flow {
        const DR6_BS: u64 = 1 << 14;
        match exception {
            1 if dr6 & DR6_BS != 0 || dr6 & 0xf == 0 => self.stepped(pc),
            1 => {
                let slot = (dr6 & 0xf).trailing_zeros() as usize;
                if let Some(catch) = self.debug.catches.get(slot).copied().flatten() {
                    return self.caught(catch);
                }
                match self.ask(&Event::HwBreakpoint {
                    rip: pc,
                    slot: slot as u8,
                }) {
                    Reply::Stop(m) => self.stop(StopReason::Handler(m)),
                    Reply::Retry => Flow::Continue,
                    _ => {
                        self.let_guest_handler_run();
                        Flow::Continue
                    }
                }
            }
            3 => self.breakpoint(pc),
            _ => self.stop(StopReason::Error(format!(
                "vCPU {}: debug exit for exception {exception}",
                self.id
            ))),
        }
    }

    /// One instruction ran under a step (KVM's, or a TF step caught at #DB).
    fn stepped(&mut self, pc: u64) -> Flow {
        let ours = !self.step.stepping.is_empty();
        if ours {
            let r = std::mem::take(&mut self.step.stepping);
            self.finish_restores(&r);
        }
        if (self.debug.user_step || !ours)
            && let Reply::Stop(m) = self.ask(&Event::SingleStep { rip: pc })
        {
            return self.stop(StopReason::Handler(m));
        }
        Flow::Continue
    }

    /// Resuming on an execute breakpoint would fire it again: step over the
    /// instruction with the hardware breakpoints (and catches) off.
    fn let_guest_handler_run(&mut self) {
        self.step.hw_suspended = true;
        self.begin_step_over(vec![Restore::HwBps]);
    }

    /// A guest exception entry we watch was reached (see `usertrap`). If the
    /// exception is ours (a TF step, or an INT3 at CPL3), pop its frame and go back
    /// to user mode; otherwise it is the guest's own and its handler runs.
    fn caught(&mut self, catch: Catch) -> Flow {
        let s = self.fd.sync_regs().sregs;
        let mode = VcpuCtl::mode_of(&s);
        let frame = Frame::read(&self.vm, mode, self.regs().rsp).filter(Frame::came_from_user);
        match (catch, frame) {
            (Catch::Db, Some(f)) if self.debug.tf_step => {
                self.debug.tf_step = false;
                if !self.undo_frame(&f, f.rip, f.rflags & !RFLAGS_TF) {
                    return self.stop(StopReason::Error("cannot return from #DB to CPL3".into()));
                }
                self.stepped(f.rip)
            }
            (Catch::Bp, Some(f)) => {
                let rip = f.rip.wrapping_sub(1);
                let ours = paging::translate(&self.vm.ram, mode, rip)
                    .ok()
                    .is_some_and(|t| self.vm.sw_breakpoint_at(t.gpa).is_some());
                if ours {
                    if !self.undo_frame(&f, rip, f.rflags) {
                        return self
                            .stop(StopReason::Error("cannot return from #BP to CPL3".into()));
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
                if let Reply::Stop(m) = self.ask(&ev) {
                    return self.stop(StopReason::Handler(m));
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

    /// Returns from an exception to CPL3 as IRETQ would, without running guest code.
    fn undo_frame(&mut self, f: &Frame, rip: u64, rflags: u64) -> bool {
        let mut s = self.fd.sync_regs().sregs;
        let mode = VcpuCtl::mode_of(&s);
        let seg = |sel: u64| usertrap::segment(&self.vm, mode, s.gdt.base, s.gdt.limit, sel as u16);
        let (Some(cs), Some(ss)) = (seg(f.cs), seg(f.ss)) else {
            return false;
        };
        (s.cs, s.ss) = (cs, ss);
        self.fd.sync_regs_mut().sregs = s;
        self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
        self.set_regs(|r| {
            r.rip = rip;
            r.rsp = f.rsp;
            r.rflags = rflags;
        });
        true
    }

    fn internal_error(&mut self) -> Flow {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the live union member.
        let (suberror, data) = unsafe {
            (
                run.__bindgen_anon_1.internal.suberror,
                run.__bindgen_anon_1.internal.data,
            )
        };
        let rip = self.regs().rip;
        let cpl = self.cpl();
        let mode = VcpuCtl::mode_of(&self.fd.sync_regs().sregs);
        let gpa = paging::translate(&self.vm.ram, mode, rip)
            .ok()
            .map(|t| t.gpa);
        if suberror == KVM_INTERNAL_ERROR_EMULATION {
            // An instruction fetch from a page with no memslot: our execute trap.
            if let Some(gpa) = gpa
                && self.vm.page_access(gpa) == Access::AllTrap
            {
                return self.exec_fault(rip, gpa, cpl);
            }
            // INT3 at CPL0 on a PVM host: KVM's emulator cannot run it.
            let mut b = [0u8];
            if read_virt(&self.vm, mode, rip, &mut b).is_ok() && b[0] == 0xcc {
                return self.breakpoint(rip);
            }
        }
        let mut bytes = [0u8; 15];
        let len = match read_virt(&self.vm, mode, rip, &mut bytes) {
            Ok(()) => 15,
            // The kernel's copy: data[1] = insn_size | bytes…
            Err(_) => {
                let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
                bytes.copy_from_slice(&raw[1..16]);
                raw[0].min(15)
            }
        };
        if self.fixup(&bytes[..len as usize]) {
            return Flow::Continue;
        }
        match self.ask(&Event::EmulationFailure {
            rip,
            bytes,
            len,
            cpl,
        }) {
            Reply::Retry => Flow::Continue,
            Reply::Stop(m) => self.stop(StopReason::Handler(m)),
            _ => self.stop(StopReason::EmulationFailure {
                cpu: self.id,
                rip,
                cpl,
                bytes: bytes[..len as usize].to_vec(),
            }),
        }
    }

    /// Instructions KVM's emulator cannot run at CPL0 on a PVM host but the VMM can
    /// complete itself. Returns whether it did.
    fn fixup(&mut self, bytes: &[u8]) -> bool {
        // XGETBV: read the XCR through KVM_GET_XCRS.
        if bytes.starts_with(&[0x0f, 0x01, 0xd0]) {
            let index = self.regs().rcx as u32;
            self.vm.count_ioctls(1);
            let Ok(xcrs) = self.fd.get_xcrs() else {
                return false;
            };
            let Some(x) = xcrs.xcrs[..xcrs.nr_xcrs as usize]
                .iter()
                .find(|x| x.xcr == index)
            else {
                return false;
            };
            let v = x.value;
            self.set_regs(|r| {
                r.rax = v & 0xffff_ffff;
                r.rdx = v >> 32;
                r.rip += 3;
            });
            self.info().stats.bump("fixup");
            return true;
        }
        false
    }

    fn exec_fault(&mut self, gva: u64, gpa: u64, cpl: u8) -> Flow {
        // A fetch at one of our breakpoints is that breakpoint.
        if self.vm.sw_breakpoint_at(gpa).is_some() {
            return self.breakpoint(gva);
        }
        match self.ask(&Event::ExecFault { gva, gpa, cpl }) {
            Reply::Stop(m) => self.stop(StopReason::Handler(m)),
            Reply::Retry => Flow::Continue,
            _ => {
                if let Err(e) = self.step_over_at(gpa) {
                    return self.stop(StopReason::Error(e.to_string()));
                }
                Flow::Continue
            }
        }
    }

    fn breakpoint(&mut self, rip: u64) -> Flow {
        let mode = VcpuCtl::mode_of(&self.fd.sync_regs().sregs);
        let gpa = paging::translate(&self.vm.ram, mode, rip)
            .ok()
            .map(|t| t.gpa);
        let ours = gpa.and_then(|g| self.vm.sw_breakpoint_at(g)).is_some();
        let cpl = self.cpl();
        match self.ask(&Event::Breakpoint {
            rip,
            gpa,
            ours,
            cpl,
        }) {
            Reply::Stop(m) => self.stop(StopReason::Handler(m)),
            Reply::Retry => Flow::Continue,
            _ if ours => match self.step_over_at(gpa.expect("ours implies a translation")) {
                Ok(()) => Flow::Continue,
                Err(e) => self.stop(StopReason::Error(e.to_string())),
            },
            _ => {
                // The guest's own INT3: deliver #BP with RIP after the INT3, as the CPU would.
                self.set_regs(|r| r.rip = rip + 1);
                self.vm.count_ioctls(2);
                match inject(&self.fd, 3, None) {
                    Ok(()) => Flow::Continue,
                    Err(e) => self.stop(StopReason::Error(e.to_string())),
                }
            }
        }
    }

    /// Steps over the instruction at `gpa`: opens its page if it is execute-trapped,
    /// and puts the original bytes under our INT3s on that page back for the step
    /// (so the instruction neither traps again nor reads an INT3); all of it is
    /// undone after the step.
    fn step_over_at(&mut self, gpa: u64) -> Result<(), VmError> {
        let page = gpa & !(PAGE_SIZE - 1);
        let access = self.vm.page_access(page);
        let mut restores = Vec::new();
        if access == Access::AllTrap {
            self.vm.protect_page(page, Access::Full)?;
            restores.push(Restore::Page { gpa: page, access });
        }
        let bps: Vec<(u64, u8)> = self
            .vm
            .sw_bps
            .lock()
            .unwrap()
            .iter()
            .filter(|(g, _)| *g & !(PAGE_SIZE - 1) == page)
            .map(|(g, b)| (*g, *b))
            .collect();
        for (g, orig) in bps {
            self.vm.ram.write(g, &[orig])?;
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

    /// Whether CPL3 code can reach one of our breakpoints now (cached; see
    /// `DebugState::user_bps`).
    fn user_breakpoints(&mut self, generation: u64) -> bool {
        let s = self.fd.sync_regs().sregs;
        if let Some((g, cr3, v)) = self.debug.user_bps
            && (g, cr3) == (generation, s.cr3)
        {
            return v;
        }
        let v = self.vm.user_breakpoints(VcpuCtl::mode_of(&s));
        self.debug.user_bps = Some((generation, s.cr3, v));
        v
    }

    /// Whether a step from the current instruction can end in a debug exit: KVM's
    /// single-step, or at CPL3 on PVM a TF step caught at the guest's #DB entry.
    fn can_step_here(&self) -> bool {
        self.vm.host.single_step_at(self.cpl()) || self.catch_address(Catch::Db).is_some()
    }

    /// The guest's entry point for `catch`, read from its IDT now.
    fn catch_address(&self, catch: Catch) -> Option<u64> {
        let s = self.fd.sync_regs().sregs;
        usertrap::handler(
            &self.vm,
            VcpuCtl::mode_of(&s),
            s.idt.base,
            s.idt.limit,
            catch,
        )
    }

    fn finish_restores(&mut self, restores: &[Restore]) {
        for r in restores {
            match *r {
                Restore::Page { gpa, access } => {
                    if let Err(e) = self.vm.protect_page(gpa, access) {
                        self.vm.stop(StopReason::Error(e.to_string()));
                    }
                }
                Restore::SwBp { gpa } => {
                    if self.vm.sw_breakpoint_at(gpa).is_some() {
                        let _ = self.vm.ram.write(gpa, &[0xcc]);
                    }
                }
                Restore::HwBps => self.step.hw_suspended = false,
            }
        }
    }
}

impl VcpuCtl<'_> {
    fn mode_of(s: &kvm_sregs) -> PagingMode {
        PagingMode::from_regs(s.cr0, s.cr3, s.cr4, s.efer)
    }
}

/// Marks for the compiler that the sync-register flags are the ones KVM uses.
const _: () = assert!(KVM_SYNC_X86_REGS == 1 && KVM_SYNC_X86_SREGS == 2);

#[allow(dead_code)]
fn _running_state_is_zero() -> bool {
    STATE_RUNNING == 0
}
