//! One VM: RAM, memslots, devices, MSR filter, breakpoints, vCPU threads and the
//! watchdog; the state every vCPU thread shares.

use std::collections::HashMap;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, kvm_enable_cap, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{Devices, FwCfg, SerialLog, SerialPort};
use crate::error::VmError;
use crate::event::ExitHandler;
use crate::host::{self, HostKind};
use crate::kick;
use crate::loader::{self, Module, Symbols};
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::msr::MsrIntercepts;
use crate::slots::{Access, CommitStats, Slot, SlotMap, SlotSink};
use crate::stats::{ExitClass, ExitCounters};
use crate::stop::StopReason;
use crate::vcpu::{VcpuMsg, VcpuThread};

/// How to build the VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u32,
    pub mem_mib: u64,
    /// In-kernel PIC/IOAPIC/LAPIC and PIT (as a PC has). Without it HLT exits.
    pub irqchip: bool,
    /// Keep KVM's fix-hypercall quirk (then a CPL0 VMCALL livelocks a PVM vCPU and
    /// the watchdog must catch it); by default it is turned off and VMCALL is a #UD.
    pub hypercall_quirk: bool,
    pub timeout: Option<Duration>,
    /// A vCPU that has not exited for this long is kicked (the 1 Hz timer).
    pub tick: Duration,
    pub cmdline: String,
    pub modules: Vec<Module>,
    /// vCPUs wait, paused, before their first instruction (until `resume_all`).
    pub start_paused: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 1,
            mem_mib: 128,
            irqchip: true,
            hypercall_quirk: false,
            timeout: None,
            tick: Duration::from_secs(1),
            cmdline: String::new(),
            modules: vec![],
            start_paused: false,
        }
    }
}

pub const MAX_VCPUS: u32 = 4;
pub const MAX_MEM_MIB: u64 = 3072;

/// Per-vCPU bookkeeping visible to other threads.
pub(crate) struct VcpuInfo {
    pub(crate) thread: OnceLock<libc::pthread_t>,
    pub(crate) tx: Mutex<Option<Sender<VcpuMsg>>>,
    pub(crate) stats: ExitCounters,
    /// Nanoseconds since the VM started, at this vCPU's last exit.
    pub(crate) last_exit_ns: AtomicU64,
    state: AtomicU8,
    /// RIP and CPL at the last exit (for timeout reports).
    pub(crate) last_rip: AtomicU64,
    pub(crate) last_cpl: AtomicU8,
    /// Set at the vCPU's first real exit: it has executed guest code.
    pub(crate) entered: AtomicBool,
    /// CR0, CR3, CR4, EFER at the last exit: the paging mode for reading guest
    /// memory from another thread.
    pub(crate) paging: [AtomicU64; 4],
}

/// Where a vCPU thread is. Transitions are made by the thread itself and
/// announced on `VmShared`'s state condvar, so waiters block instead of polling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    /// In the guest, or handling an exit on the way back into it.
    Running = 0,
    /// Waiting for messages, out of the guest (`pause`, or at entry).
    Paused = 1,
    /// Kept inside its exit handler at a stop (`VcpuCtl::hold`): out of the guest,
    /// serving tasks like a paused vCPU.
    Held = 2,
    /// Its thread has ended (or it halted for good).
    Stopped = 3,
}

impl VcpuState {
    fn from_u8(v: u8) -> VcpuState {
        match v {
            0 => VcpuState::Running,
            1 => VcpuState::Paused,
            2 => VcpuState::Held,
            _ => VcpuState::Stopped,
        }
    }

    /// Out of the guest and not about to enter it on its own.
    pub fn is_quiet(self) -> bool {
        self != VcpuState::Running
    }
}

/// One of our software breakpoints.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SwBp {
    /// The guest's byte under the INT3.
    pub(crate) orig: u8,
    /// Where the guest executes it, if the planter said (None: assume user code
    /// can reach it).
    pub(crate) gva: Option<u64>,
}

/// What all vCPU threads share; handlers reach it through `VcpuCtl::vm()`.
pub struct VmShared {
    ram: GuestRam,
    vm_fd: VmFd,
    host: HostKind,
    symbols: Symbols,
    serial: Arc<SerialLog>,
    devices: Mutex<Devices>,
    slots: Mutex<SlotMap>,
    msrs: Mutex<MsrIntercepts>,
    /// Our software breakpoints, by guest-physical address.
    sw_bps: Mutex<HashMap<u64, SwBp>>,
    /// Bumped when VM-wide debug state changes, so each vCPU re-applies it.
    debug_gen: AtomicU64,
    /// Hardware execute breakpoints (guest-virtual), the same on every vCPU.
    hw_bps: Mutex<[Option<u64>; 4]>,
    vcpus: Vec<VcpuInfo>,
    /// Announces vCPU state changes (with `state_lock`): pause and resume are
    /// acknowledged, not polled.
    state_lock: Mutex<()>,
    state_cv: Condvar,
    stop: Mutex<Option<StopReason>>,
    stopping: AtomicBool,
    started: Instant,
    /// Held for reading by every vCPU while it is inside KVM_RUN; a memslot commit
    /// takes it for writing, so no vCPU runs while a slot is briefly missing.
    run_gate: RwLock<()>,
    /// A commit is waiting for the gate: vCPUs must not re-enter the guest.
    gate_pending: AtomicBool,
    /// Bumped by every page-rights change and every memslot commit, so a vCPU can
    /// tell that the slots changed between its entry and its handling of the exit.
    slot_gen: AtomicU64,
    /// `run` has started the vCPU threads.
    running: AtomicBool,
    /// KVM ioctls issued while running, other than KVM_RUN (for `bench`).
    ioctls: AtomicU64,
}

struct Memslots<'a> {
    vm: &'a VmFd,
    host: u64,
}

impl SlotSink for Memslots<'_> {
    fn create(&mut self, s: &Slot) -> std::io::Result<()> {
        self.set(s, s.pages * PAGE_SIZE)
    }
    fn delete(&mut self, s: &Slot) -> std::io::Result<()> {
        self.set(s, 0)
    }
}

impl Memslots<'_> {
    fn set(&self, s: &Slot, size: u64) -> std::io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: s.id,
            flags: if s.read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: s.first_page * PAGE_SIZE,
            memory_size: size,
            userspace_addr: self.host + s.first_page * PAGE_SIZE,
        };
        // SAFETY: the host range lies inside the guest RAM mapping, which lives as
        // long as the VM (VmShared owns both).
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl VmShared {
    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// What kind of KVM this is (PVM or hardware-virtualised).
    pub fn host(&self) -> HostKind {
        self.host
    }

    /// The loaded image's symbols.
    pub fn symbols(&self) -> &Symbols {
        &self.symbols
    }

    /// The guest's serial output.
    pub fn serial(&self) -> &Arc<SerialLog> {
        &self.serial
    }

    pub(crate) fn vcpu_info(&self, cpu: u32) -> &VcpuInfo {
        &self.vcpus[cpu as usize]
    }

    pub(crate) fn debug_generation(&self) -> u64 {
        self.debug_gen.load(Ordering::SeqCst)
    }

    /// The hardware execute breakpoints, per slot.
    pub(crate) fn hw_breakpoints(&self) -> [Option<u64>; 4] {
        *self.hw_bps.lock().unwrap()
    }

    pub(crate) fn has_sw_breakpoints(&self) -> bool {
        !self.sw_bps.lock().unwrap().is_empty()
    }

    pub(crate) fn port_write(&self, port: u16, size: u8, value: u32) -> crate::devices::PortEffect {
        self.devices.lock().unwrap().write(port, size, value)
    }

    pub(crate) fn port_read(&self, port: u16, size: u8) -> Option<u32> {
        self.devices.lock().unwrap().read(port, size)
    }

    /// Records vCPU `cpu`'s new state and wakes whoever waits for one.
    pub(crate) fn set_state(&self, cpu: u32, state: VcpuState) {
        let v = &self.vcpus[cpu as usize];
        if v.state.swap(state as u8, Ordering::SeqCst) != state as u8 {
            let _g = self.state_lock.lock().unwrap();
            self.state_cv.notify_all();
        }
    }

    /// Whether every vCPU has stopped (halted for good, or its thread ended).
    pub(crate) fn all_stopped(&self) -> bool {
        (0..self.vcpu_count()).all(|c| self.vcpu_state(c) == Some(VcpuState::Stopped))
    }

    /// Waits (blocking on the state condvar) until `done` holds for every vCPU's
    /// state, up to `timeout`; returns whether it did.
    pub fn wait_states(&self, timeout: Duration, done: impl Fn(u32, VcpuState) -> bool) -> bool {
        let t = Instant::now();
        let mut g = self.state_lock.lock().unwrap();
        loop {
            if (0..self.vcpu_count()).all(|c| self.vcpu_state(c).is_some_and(|s| done(c, s))) {
                return true;
            }
            let Some(left) = timeout.checked_sub(t.elapsed()) else {
                return false;
            };
            g = self.state_cv.wait_timeout(g, left).unwrap().0;
        }
    }

    /// The memslot generation (see `slot_gen`).
    pub(crate) fn slot_generation(&self) -> u64 {
        self.slot_gen.load(Ordering::SeqCst)
    }

    /// Takes the run gate for one KVM_RUN: waits while a memslot commit is pending
    /// or in progress (see `commit_access`).
    pub(crate) fn enter_gate(&self) -> RwLockReadGuard<'_, ()> {
        loop {
            let g = self.run_gate.read().unwrap();
            if !self.gate_pending.load(Ordering::SeqCst) {
                return g;
            }
            // A commit waits for the gate: let it have it first.
            drop(g);
            std::thread::yield_now();
        }
    }

    /// KVM ioctls issued while running, other than KVM_RUN.
    pub fn ioctl_count(&self) -> u64 {
        self.ioctls.load(Ordering::Relaxed)
    }

    pub(crate) fn count_ioctls(&self, n: u64) {
        self.ioctls.fetch_add(n, Ordering::Relaxed);
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// Records the wished access of the page holding `gpa` (applied by `commit_access`).
    pub fn set_page_access(&self, gpa: u64, access: Access) -> Result<bool, VmError> {
        if !self.ram.contains(gpa, 1) {
            return Err(VmError::OutsideRam(gpa));
        }
        let changed = self.slots.lock().unwrap().set(gpa / PAGE_SIZE, access);
        if changed {
            self.slot_gen.fetch_add(1, Ordering::SeqCst);
        }
        Ok(changed)
    }

    pub fn page_access(&self, gpa: u64) -> Access {
        self.slots.lock().unwrap().access(gpa / PAGE_SIZE)
    }

    /// Pages that are not `Full`.
    pub fn trapped_pages(&self) -> Vec<(u64, Access)> {
        self.slots
            .lock()
            .unwrap()
            .trapped()
            .map(|(p, a)| (p * PAGE_SIZE, a))
            .collect()
    }

    /// Applies the recorded page-access changes as memslot changes, in one batch.
    /// A split or merge deletes a slot before creating its replacement (KVM has no
    /// atomic replace), so while the VM runs every vCPU is kicked out of the guest
    /// and kept at the run gate (`enter_gate`) until the slots are whole again: a
    /// vCPU in the guest during that window would find its code or page tables
    /// gone (a triple fault on PVM). The committing thread is never inside
    /// KVM_RUN itself (vCPU threads commit while handling an exit).
    pub fn commit_access(&self) -> Result<CommitStats, VmError> {
        let mut slots = self.slots.lock().unwrap();
        if !slots.is_dirty() {
            return Ok(CommitStats::default());
        }
        // Before `run` no vCPU executes, so there is nothing to hold off.
        let _quiet = if self.running.load(Ordering::SeqCst) {
            self.gate_pending.store(true, Ordering::SeqCst);
            for c in 0..self.vcpu_count() {
                self.kick(c);
            }
            let g = self.run_gate.write().unwrap();
            self.gate_pending.store(false, Ordering::SeqCst);
            Some(g)
        } else {
            None
        };
        let mut sink = Memslots {
            vm: &self.vm_fd,
            host: self.ram.host_base(),
        };
        self.slot_gen.fetch_add(1, Ordering::SeqCst);
        let st = slots
            .commit(&mut sink)
            .map_err(|e| VmError::Kvm(format!("KVM_SET_USER_MEMORY_REGION: {e}")))?;
        self.count_ioctls(st.ioctls() as u64);
        Ok(st)
    }

    /// Sets and commits the access of one page.
    pub fn protect_page(&self, gpa: u64, access: Access) -> Result<CommitStats, VmError> {
        self.set_page_access(gpa, access)?;
        self.commit_access()
    }

    /// Intercepts reads and/or writes of an MSR (both false: stop intercepting).
    pub fn intercept_msr(&self, index: u32, read: bool, write: bool) -> Result<(), VmError> {
        let mut m = self.msrs.lock().unwrap();
        let old = m.get(index);
        m.set(index, read, write);
        self.count_ioctls(1);
        m.apply(&self.vm_fd).map_err(|e| {
            m.set(index, old.0, old.1);
            VmError::Config(e)
        })
    }

    pub fn msr_intercepted(&self, index: u32) -> (bool, bool) {
        self.msrs.lock().unwrap().get(index)
    }

    /// Plants a software breakpoint (INT3) at guest-physical `gpa`, executed at
    /// guest-virtual `gva` (None: unknown, so assumed reachable from user code).
    pub fn insert_sw_breakpoint(&self, gpa: u64, gva: Option<u64>) -> Result<(), VmError> {
        let mut bps = self.sw_bps.lock().unwrap();
        if bps.contains_key(&gpa) {
            return Ok(());
        }
        let mut b = [0u8];
        self.ram.read(gpa, &mut b)?;
        self.ram.write(gpa, &[0xcc])?;
        bps.insert(gpa, SwBp { orig: b[0], gva });
        self.debug_gen.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    pub fn remove_sw_breakpoint(&self, gpa: u64) -> Result<bool, VmError> {
        let mut bps = self.sw_bps.lock().unwrap();
        let Some(bp) = bps.remove(&gpa) else {
            return Ok(false);
        };
        self.ram.write(gpa, &[bp.orig])?;
        self.debug_gen.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    /// Writes guest-physical memory for a debugger or the console. Bytes under our
    /// INT3s become those breakpoints' original bytes (restored when they go) and
    /// the INT3s stay, so an edit neither loses a breakpoint nor leaves a stale
    /// byte to be put back later.
    pub fn write_around_breakpoints(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        let mut bps = self.sw_bps.lock().unwrap();
        self.ram.write(gpa, data)?;
        let end = gpa + data.len() as u64;
        for (at, bp) in bps.iter_mut().filter(|(at, _)| (gpa..end).contains(*at)) {
            bp.orig = data[(*at - gpa) as usize];
            self.ram.write(*at, &[0xcc])?;
        }
        Ok(())
    }

    /// Sets hardware execute breakpoint `slot` (0..4) at a guest-virtual address on
    /// every vCPU. On a PVM host these fire for CPL0 code only.
    pub fn set_hw_breakpoint(&self, slot: usize, addr: Option<u64>) {
        self.hw_bps.lock().unwrap()[slot] = addr;
        self.debug_gen.fetch_add(1, Ordering::SeqCst);
        for c in 0..self.vcpu_count() {
            self.kick(c);
        }
    }

    /// Whether a debug-register slot is left for the #DB catch of a CPL3 step
    /// (`hbreak`s may have taken all four).
    pub(crate) fn dr_slot_free(&self) -> bool {
        self.hw_bps.lock().unwrap().iter().any(Option::is_none)
    }

    /// Every software breakpoint: (guest-physical address, original byte).
    pub fn sw_breakpoints(&self) -> Vec<(u64, u8)> {
        self.sw_bps
            .lock()
            .unwrap()
            .iter()
            .map(|(at, bp)| (*at, bp.orig))
            .collect()
    }

    /// Whether user code (CPL3) can reach one of our breakpoints under `mode`'s
    /// page tables: one is on a user page, or was planted without its address.
    pub(crate) fn user_breakpoints(&self, mode: vmiscope_introspect::paging::PagingMode) -> bool {
        self.sw_bps.lock().unwrap().values().any(|bp| match bp.gva {
            None => true,
            Some(v) => {
                vmiscope_introspect::paging::translate(&self.ram, mode, v).is_ok_and(|t| t.user)
            }
        })
    }

    /// The original byte under our breakpoint at `gpa`, if there is one.
    pub fn sw_breakpoint_at(&self, gpa: u64) -> Option<u8> {
        self.sw_bps.lock().unwrap().get(&gpa).map(|bp| bp.orig)
    }

    /// Why the run ended (or is ending), once it is.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop.lock().unwrap().clone()
    }

    /// Ends the run (the first reason wins) and kicks every vCPU out of the guest.
    pub fn stop(&self, reason: StopReason) {
        {
            let mut s = self.stop.lock().unwrap();
            if s.is_none() {
                *s = Some(reason);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        for (i, v) in self.vcpus.iter().enumerate() {
            if let Some(tx) = v.tx.lock().unwrap().as_ref() {
                let _ = tx.send(VcpuMsg::Stop);
            }
            self.kick(i as u32);
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn send(&self, cpu: u32, msg: VcpuMsg) {
        if let Some(tx) = self
            .vcpus
            .get(cpu as usize)
            .and_then(|v| v.tx.lock().unwrap().clone())
        {
            let _ = tx.send(msg);
        }
        self.kick(cpu);
    }

    /// Runs `task` on vCPU `cpu`'s thread at its next stop point: at once when it
    /// is paused or held at a stop, else after its next exit (a kick forces one).
    /// The one path for running something on a vCPU.
    pub fn with_vcpu(&self, cpu: u32, task: crate::vcpu::VcpuTask) -> bool {
        let Some(v) = self.vcpus.get(cpu as usize) else {
            return false;
        };
        let sent =
            v.tx.lock()
                .unwrap()
                .as_ref()
                .is_some_and(|tx| tx.send(VcpuMsg::With(task)).is_ok());
        self.kick(cpu);
        sent
    }

    /// Asks every vCPU to pause (it stops at its next exit; a kick forces one).
    pub fn pause_all(&self) {
        (0..self.vcpu_count()).for_each(|c| self.send(c, VcpuMsg::Pause));
    }

    /// Resumes one paused vCPU.
    pub fn resume_vcpu(&self, cpu: u32) {
        self.send(cpu, VcpuMsg::Resume);
    }

    pub fn resume_all(&self) {
        (0..self.vcpu_count()).for_each(|c| self.send(c, VcpuMsg::Resume));
    }

    /// Waits until no vCPU is in the guest (each paused, held at a stop, or
    /// stopped), blocking on the vCPUs' acknowledgements.
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        self.wait_states(timeout, |_, s| s.is_quiet())
    }

    /// Wakes a held vCPU so that its hold condition is looked at again.
    pub fn wake_vcpu(&self, cpu: u32) {
        if let Some(tx) = self
            .vcpus
            .get(cpu as usize)
            .and_then(|v| v.tx.lock().unwrap().clone())
        {
            let _ = tx.send(VcpuMsg::Wake);
        }
    }

    /// vCPU `cpu`'s state (None: no such vCPU).
    pub fn vcpu_state(&self, cpu: u32) -> Option<VcpuState> {
        let v = self.vcpus.get(cpu as usize)?;
        Some(VcpuState::from_u8(v.state.load(Ordering::SeqCst)))
    }

    /// The paging mode of `cpu` at its last exit (None: no such vCPU).
    pub fn last_paging(&self, cpu: u32) -> Option<vmiscope_introspect::paging::PagingMode> {
        let p = &self.vcpus.get(cpu as usize)?.paging;
        let r = |i: usize| p[i].load(Ordering::Relaxed);
        Some(vmiscope_introspect::paging::PagingMode::from_regs(
            r(0),
            r(1),
            r(2),
            r(3),
        ))
    }

    /// Reads guest-virtual memory as `cpu` saw it at its last exit.
    pub fn read_virt(&self, cpu: u32, gva: u64, buf: &mut [u8]) -> Result<(), VmError> {
        let mode = self.last_paging(cpu).ok_or(VmError::NoVcpu(cpu))?;
        crate::guest::read_virt(self, mode, gva, buf)
    }

    /// RIP and CPL of `cpu` at its last exit (None: no such vCPU).
    pub fn last_position(&self, cpu: u32) -> Option<(u64, u8)> {
        let v = self.vcpus.get(cpu as usize)?;
        Some((
            v.last_rip.load(Ordering::Relaxed),
            v.last_cpl.load(Ordering::Relaxed),
        ))
    }

    /// Kicks `cpu` out of the guest once (it reports `Event::Kicked` and goes on).
    pub fn kick_vcpu(&self, cpu: u32) {
        self.kick(cpu);
    }

    pub(crate) fn kick(&self, cpu: u32) {
        if let Some(t) = self.vcpus.get(cpu as usize).and_then(|v| v.thread.get()) {
            kick::kick(*t);
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Per-class exit counts, summed over vCPUs, and per vCPU.
    pub fn exit_counts(&self) -> (Vec<(ExitClass, u64)>, Vec<u64>) {
        let mut total: Vec<(ExitClass, u64)> = ExitClass::ALL.iter().map(|c| (*c, 0)).collect();
        let mut per = vec![];
        for v in &self.vcpus {
            let snap = v.stats.snapshot();
            per.push(snap.iter().map(|(_, n)| n).sum());
            for (class, n) in snap {
                total[class as usize].1 += n;
            }
        }
        total.retain(|(_, n)| *n > 0);
        (total, per)
    }
}

/// The result of `Vm::run`.
#[derive(Debug)]
pub struct RunOutcome {
    pub reason: StopReason,
    pub elapsed: Duration,
    /// Exits per class, summed over vCPUs.
    pub exits: Vec<(ExitClass, u64)>,
    /// Exits per vCPU.
    pub exits_per_vcpu: Vec<u64>,
    pub serial: String,
}

/// A built VM, ready to run.
pub struct Vm {
    shared: Arc<VmShared>,
    fds: Vec<VcpuFd>,
    pub format: &'static str,
}

impl Vm {
    /// Builds a VM and loads `image` into it.
    pub fn new(cfg: &VmConfig, image: &[u8]) -> Result<Vm, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!("--vcpus must be 1..={MAX_VCPUS}")));
        }
        if cfg.mem_mib < 4 || cfg.mem_mib > MAX_MEM_MIB {
            return Err(VmError::Config(format!(
                "--mem must be 4..={MAX_MEM_MIB} MiB"
            )));
        }
        let kvm = host::open_kvm()?;
        host::check_required(&kvm)?;
        let vm = kvm.create_vm().map_err(VmError::ioctl("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(VmError::ioctl("KVM_SET_TSS_ADDR"))?;
        let serial_irq = if cfg.irqchip {
            vm.create_irq_chip()
                .map_err(VmError::ioctl("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit)
                .map_err(VmError::ioctl("KVM_CREATE_PIT2"))?;
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Kvm(e.to_string()))?;
            vm.register_irqfd(&fd, 4)
                .map_err(VmError::ioctl("KVM_IRQFD"))?;
            Some(fd)
        } else {
            None
        };
        enable_vm_caps(&kvm, &vm, cfg)?;

        let mem = cfg.mem_mib << 20;
        let ram = GuestRam::new(mem)?;
        loader::write_boot_area(&ram)?;
        let loaded = loader::load(&ram, image, &cfg.cmdline, &cfg.modules)?;
        let serial = Arc::new(SerialLog::default());
        let devices = Devices::new(
            SerialPort::new(serial.clone(), serial_irq),
            FwCfg::new(cfg.vcpus as u16, mem),
        );
        if !cfg.irqchip
            && cfg.vcpus > 1
            && matches!(loaded.entry, loader::EntryState::Protected32 { .. })
        {
            return Err(VmError::Config("a multiboot kernel with several vCPUs needs the irqchip (its APs wait for INIT/SIPI)".into()));
        }
        let mut fds = Vec::new();
        let entry = loaded.entry;
        let cpuid = guest_cpuid(&kvm)?;
        for id in 0..cfg.vcpus {
            fds.push(crate::vcpu::create(&vm, id, cfg, &loaded.entry, &cpuid)?);
        }
        let vcpus = (0..cfg.vcpus)
            .map(|_| VcpuInfo {
                thread: OnceLock::new(),
                tx: Mutex::new(None),
                stats: ExitCounters::default(),
                last_exit_ns: AtomicU64::new(0),
                state: AtomicU8::new(VcpuState::Running as u8),
                last_rip: AtomicU64::new(0),
                last_cpl: AtomicU8::new(0),
                entered: AtomicBool::new(false),
                paging: Default::default(),
            })
            .collect();
        let shared = Arc::new(VmShared {
            slots: Mutex::new(SlotMap::new(mem / PAGE_SIZE)),
            ram,
            vm_fd: vm,
            host: HostKind::detect(),
            symbols: loaded.symbols,
            serial,
            devices: Mutex::new(devices),
            msrs: Mutex::new(MsrIntercepts::default()),
            sw_bps: Mutex::new(HashMap::new()),
            debug_gen: AtomicU64::new(0),
            hw_bps: Mutex::new([None; 4]),
            vcpus,
            stop: Mutex::new(None),
            stopping: AtomicBool::new(false),
            started: Instant::now(),
            state_lock: Mutex::new(()),
            state_cv: Condvar::new(),
            run_gate: RwLock::new(()),
            gate_pending: AtomicBool::new(false),
            slot_gen: AtomicU64::new(0),
            running: AtomicBool::new(false),
            ioctls: AtomicU64::new(0),
        });
        // Before the first exit, "last position" is the entry.
        for (c, v) in shared.vcpus.iter().enumerate() {
            let r = loader::regs_for(&entry, c as u32, cfg.vcpus);
            v.last_rip.store(r.rip, Ordering::Relaxed);
            let s = loader::sregs_for(&entry, kvm_bindings::kvm_sregs::default());
            for (slot, x) in v.paging.iter().zip([s.cr0, s.cr3, s.cr4, s.efer]) {
                slot.store(x, Ordering::Relaxed);
            }
        }
        shared.commit_access()?;
        Ok(Vm {
            shared,
            fds,
            format: loaded.format,
        })
    }

    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// The built VM's vCPU file descriptors, for driving KVM_RUN directly (the raw
    /// baseline of `vmiscope bench`). The VMM's exit handling is bypassed.
    pub fn into_raw(self) -> (Arc<VmShared>, Vec<VcpuFd>) {
        (self.shared, self.fds)
    }

    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.shared.symbols.get(name)
    }

    /// Runs every vCPU on its own thread until the run stops; `cfg.timeout` and
    /// `cfg.tick` drive the watchdog.
    pub fn run(self, handler: Arc<dyn ExitHandler>, cfg: &VmConfig) -> RunOutcome {
        kick::install();
        // Ctrl-Cs from before this run belong to earlier runs.
        let interrupts = crate::interrupts();
        let shared = self.shared;
        let start = Instant::now();
        shared.running.store(true, Ordering::SeqCst);
        let mut threads = Vec::new();
        for (id, fd) in self.fds.into_iter().enumerate() {
            let (tx, rx) = channel();
            *shared.vcpus[id].tx.lock().unwrap() = Some(tx);
            if cfg.start_paused {
                shared.set_state(id as u32, VcpuState::Paused);
            }
            let t = VcpuThread::new(
                id as u32,
                fd,
                shared.clone(),
                handler.clone(),
                rx,
                cfg.start_paused,
            );
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || t.run())
            {
                Ok(h) => {
                    let _ = shared.vcpus[id].thread.set(h.as_pthread_t());
                    threads.push(h);
                }
                Err(e) => {
                    shared.stop(StopReason::Error(format!("cannot start vCPU thread: {e}")));
                    break;
                }
            }
        }
        if shared.is_stopping() {
            // A stop that came before the threads existed could not kick them.
            shared.stop(StopReason::User);
        }
        let watchdog = {
            let shared = shared.clone();
            let (timeout, tick) = (cfg.timeout, cfg.tick);
            std::thread::spawn(move || watchdog(&shared, timeout, tick, interrupts))
        };
        for t in threads {
            let _ = t.join();
        }
        if !shared.is_stopping() {
            shared.stop(StopReason::Error(
                "all vCPU threads ended without a stop reason".into(),
            ));
        }
        let _ = watchdog.join();
        let reason = shared
            .stop
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(StopReason::Error("no stop reason".into()));
        let (exits, exits_per_vcpu) = shared.exit_counts();
        RunOutcome {
            reason,
            elapsed: start.elapsed(),
            exits,
            exits_per_vcpu,
            serial: shared.serial.text(),
        }
    }
}

/// Kicks vCPUs that have not exited for a tick (so periodic checks run and
/// livelocks are noticed) and enforces the timeout.
fn watchdog(shared: &VmShared, timeout: Option<Duration>, tick: Duration, interrupts: u64) {
    let start = Instant::now();
    let mut last_tick = Instant::now();
    while !shared.is_stopping() {
        std::thread::sleep(Duration::from_millis(20));
        if crate::interrupts() > interrupts {
            shared.stop(StopReason::User);
            break;
        }
        if let Some(t) = timeout
            && start.elapsed() >= t
        {
            let where_ = (0..shared.vcpu_count())
                .map(|c| {
                    let (rip, cpl) = shared.last_position(c).unwrap_or_default();
                    (c, rip, cpl)
                })
                .collect();
            shared.stop(StopReason::Timeout {
                millis: t.as_millis() as u64,
                where_,
            });
            break;
        }
        if last_tick.elapsed() >= tick {
            last_tick = Instant::now();
            let now = shared.now_ns();
            for (c, v) in shared.vcpus.iter().enumerate() {
                let quiet = now.saturating_sub(v.last_exit_ns.load(Ordering::Relaxed))
                    >= tick.as_nanos() as u64;
                if quiet && v.state.load(Ordering::SeqCst) == VcpuState::Running as u8 {
                    shared.kick(c as u32);
                }
            }
        }
    }
}

fn enable_vm_caps(kvm: &Kvm, vm: &VmFd, cfg: &VmConfig) -> Result<(), VmError> {
    if kvm.check_extension(Cap::X86UserSpaceMsr) {
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            args: [kvm_bindings::KVM_MSR_EXIT_REASON_FILTER as u64, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(VmError::ioctl("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
    }
    const FIX_HYPERCALL_INSN: u64 = 1 << 5;
    const CAP_DISABLE_QUIRKS2: u32 = 213;
    let quirks = vm.check_extension_raw(CAP_DISABLE_QUIRKS2 as libc::c_ulong) as u64;
    if !cfg.hypercall_quirk && quirks & FIX_HYPERCALL_INSN != 0 {
        let cap = kvm_enable_cap {
            cap: CAP_DISABLE_QUIRKS2,
            args: [FIX_HYPERCALL_INSN, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(VmError::ioctl("KVM_ENABLE_CAP(DISABLE_QUIRKS2)"))?;
    }
    Ok(())
}

/// KVM's supported CPUID, plus XSAVE (so the guest may set CR4.OSXSAVE) and SMEP
/// (so the demo's guest may set CR4.SMEP); the APIC id is set per vCPU.
fn guest_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId, VmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match (e.function, e.index) {
            (1, _) => e.ecx |= 1 << 26,
            (7, 0) => e.ebx |= 1 << 7,
            _ => {}
        }
    }
    Ok(cpuid)
}
