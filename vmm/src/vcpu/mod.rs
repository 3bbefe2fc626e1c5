//! One vCPU thread: a small state machine (running / paused / stopped) driven by
//! messages, around KVM_RUN and `handle_exit`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_MP_STATE_RUNNABLE, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
    kvm_mp_state, kvm_regs, kvm_sregs,
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
use crate::usertrap;
use crate::vm::{STATE_PAUSED, STATE_RUNNING, STATE_STOPPED, VmConfig, VmShared};

mod debug;
use debug::{DebugState, StepOver};

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
        get_msr(self.vm, self.fd, index)
    }

    /// Whether a single-step from here can work: KVM's where the host steps at this
    /// CPL, else (CPL3 on PVM) RFLAGS.TF caught at the guest's #DB entry, which needs
    /// a present #DB gate in the guest's IDT and a free debug-register slot.
    pub fn can_step(&self) -> bool {
        usertrap::can_step(self.vm, &self.sregs())
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

pub(crate) fn cpl_of(s: &kvm_sregs) -> u8 {
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

/// One MSR through KVM_GET_MSRS.
fn get_msr(vm: &VmShared, fd: &VcpuFd, index: u32) -> Option<u64> {
    vm.count_ioctls(1);
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    (fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
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
        self.debug.plan = None;
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
        get_msr(&self.vm, &self.fd, index)
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
