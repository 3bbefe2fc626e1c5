//! What every vCPU thread of one VM shares (RAM, memslots, devices, MSR filter,
//! breakpoints, per-vCPU state and the stop reason), and `VcpuCtl`, the view of
//! one vCPU a handler or a task gets. The types are here; their methods are in
//! the children, one file per concern: `memory` (RAM, page rights, the memslot
//! run gate, MSRs, ports), `breakpoints`, `vcpus` (state machine, messages,
//! stop), `ctl` (the handled vCPU).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::Instant;

use kvm_ioctls::{VcpuFd, VmFd};

use crate::devices::{Devices, SerialLog};
use crate::host::Host;
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::msr::MsrIntercepts;
use crate::slots::SlotMap;
use crate::stats::ExitCounters;
use crate::stop::StopReason;

mod breakpoints;
mod ctl;
mod exclusive;
mod memory;
pub use memory::GuestHeld;
mod vcpus;

/// No vCPU (for `VmShared::exclusive`).
const NO_VCPU: u32 = u32::MAX;

/// How long a thread handing work to another spins (yielding its CPU between
/// looks) for the answer before it sleeps. Why spin at all: waking a thread
/// that sleeps on another CPU costs an IPI, and on a virtualised host whose idle
/// CPUs halt at once (this one: `haltpoll.guest_halt_poll_ns=0`) each such
/// wake-up costs 20-50 us, against ~2 us for one on the same CPU. A debugger's
/// exchanges with a held vCPU (gdb's `stepi`: release, one step, stop) come
/// back within tens of microseconds, so a short spin catches them awake; a
/// user at a prompt costs this much CPU once per stop, then the thread sleeps.
pub const HANDOFF_SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// Looks at `ready` until it answers Some or `HANDOFF_SPIN` passes, yielding
/// the CPU between looks (another runnable thread on it goes first).
pub fn spin_for<R>(mut ready: impl FnMut() -> Option<R>) -> Option<R> {
    let start = Instant::now();
    loop {
        if let Some(r) = ready() {
            return Some(r);
        }
        if start.elapsed() >= HANDOFF_SPIN {
            return None;
        }
        std::thread::yield_now();
    }
}

/// Work run on a vCPU's own thread with its `VcpuCtl` (register and memory access
/// for the console while the vCPU is paused or held at a stop).
pub type VcpuTask = Box<dyn FnOnce(&mut VcpuCtl<'_>) + Send>;

/// Messages that drive a vCPU's state machine.
pub enum VcpuMsg {
    Pause,
    Resume,
    Stop,
    /// Run this on the vCPU thread at its next stop point: now, if it is paused or
    /// held; after its next exit (a kick forces one) if it runs.
    With(VcpuTask),
    /// Wakes a held vCPU so that it looks at its hold condition again.
    Wake,
}

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
    /// Entries into the guest (KVM_RUN calls), for turn-taking (see
    /// `begin_exclusive`).
    pub(crate) entries: AtomicU64,
    /// CR0, CR3, CR4, EFER at the last exit: the paging mode for reading guest
    /// memory from another thread.
    pub(crate) paging: [AtomicU64; 4],
    /// The registers when the vCPU's thread ended, for post-mortem reading.
    pub(crate) last_state: Mutex<Option<FinalState>>,
    /// Tasks (`with_vcpu`) this vCPU has started: a holder can tell whether its
    /// registers may have changed since it last read them.
    pub(crate) tasks: AtomicU64,
}

/// A vCPU's registers when its thread ended (the guest exited, triple-faulted or
/// was stopped): what the console shows after the end, as QEMU's `-no-shutdown`.
#[derive(Debug, Clone, Copy)]
pub struct FinalState {
    pub regs: kvm_bindings::kvm_regs,
    pub sregs: kvm_bindings::kvm_sregs,
    pub debugregs: Option<kvm_bindings::kvm_debugregs>,
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
    /// Hidden from the guest's reads: put back for every step over an
    /// instruction on its page (a visible one only for its own instruction).
    pub(crate) hidden: bool,
}

/// What all vCPU threads share; handlers reach it through `VcpuCtl::vm()`.
pub struct VmShared {
    ram: GuestRam,
    vm_fd: VmFd,
    host: Host,
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
    /// Hidden breakpoints held in debug-register slots: gpa -> slot (their
    /// addresses are in `hw_bps`).
    reg_bps: Mutex<HashMap<u64, usize>>,
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
    /// Instructions the VMM completed for KVM's emulator, by kind.
    completed: crate::stats::CompletedCounters,
    /// A commit is waiting for the gate: vCPUs must not re-enter the guest.
    gate_pending: AtomicBool,
    /// The thread holding the gate for writing (`hold_guest`), so a commit
    /// inside that hold does not wait for itself.
    gate_holder: Mutex<Option<std::thread::ThreadId>>,
    /// The vCPU stepping over one of our INT3s alone (`NO_VCPU`: none), and the
    /// other vCPUs' entry counts when the last such step ended (see
    /// `begin_exclusive`).
    exclusive: AtomicU32,
    last_turn: Mutex<Option<(u32, Vec<u64>)>>,
    /// Bumped by every page-rights change and every memslot commit, so a vCPU can
    /// tell that the slots changed between its entry and its handling of the exit.
    slot_gen: AtomicU64,
    /// `run` has started the vCPU threads.
    running: AtomicBool,
    /// KVM ioctls issued while running, other than KVM_RUN (for `bench`).
    ioctls: AtomicU64,
}

/// What an exit handler may do with the vCPU it was called for.
pub struct VcpuCtl<'a> {
    id: u32,
    fd: &'a mut VcpuFd,
    vm: &'a VmShared,
    /// The analyst's single-step is on (the vCPU's debug machinery reads it).
    user_step: &'a mut bool,
    rx: &'a Receiver<VcpuMsg>,
    paused: &'a mut bool,
}

impl<'a> VcpuCtl<'a> {
    pub(crate) fn new(
        id: u32,
        fd: &'a mut VcpuFd,
        vm: &'a VmShared,
        user_step: &'a mut bool,
        rx: &'a Receiver<VcpuMsg>,
        paused: &'a mut bool,
    ) -> Self {
        VcpuCtl {
            id,
            fd,
            vm,
            user_step,
            rx,
            paused,
        }
    }
}

/// The parts a VM's `VmShared` is made of.
pub(crate) struct Parts {
    pub(crate) host: Host,
    pub(crate) ram: GuestRam,
    pub(crate) vm_fd: VmFd,
    pub(crate) serial: Arc<SerialLog>,
    pub(crate) devices: Devices,
    pub(crate) vcpus: u32,
}

impl VmShared {
    /// How many of each instruction the VMM completed for KVM's emulator.
    pub fn completed(&self) -> Vec<(crate::stats::Completed, u64)> {
        self.completed.snapshot()
    }

    pub(crate) fn count_completed(&self, what: crate::stats::Completed) {
        self.completed.bump(what);
    }

    pub(crate) fn new(p: Parts) -> VmShared {
        let vcpus = (0..p.vcpus)
            .map(|_| VcpuInfo {
                thread: OnceLock::new(),
                tx: Mutex::new(None),
                stats: ExitCounters::default(),
                last_exit_ns: AtomicU64::new(0),
                state: AtomicU8::new(VcpuState::Running as u8),
                last_rip: AtomicU64::new(0),
                last_cpl: AtomicU8::new(0),
                entries: AtomicU64::new(0),
                paging: Default::default(),
                last_state: Mutex::new(None),
                tasks: AtomicU64::new(0),
            })
            .collect();
        VmShared {
            slots: Mutex::new(SlotMap::new(p.ram.size() / PAGE_SIZE)),
            ram: p.ram,
            vm_fd: p.vm_fd,
            host: p.host,
            serial: p.serial,
            devices: Mutex::new(p.devices),
            msrs: Mutex::new(MsrIntercepts::default()),
            sw_bps: Mutex::new(HashMap::new()),
            debug_gen: AtomicU64::new(0),
            hw_bps: Mutex::new([None; 4]),
            reg_bps: Mutex::new(HashMap::new()),
            vcpus,
            stop: Mutex::new(None),
            stopping: AtomicBool::new(false),
            started: Instant::now(),
            state_lock: Mutex::new(()),
            state_cv: Condvar::new(),
            run_gate: RwLock::new(()),
            completed: Default::default(),
            gate_pending: AtomicBool::new(false),
            gate_holder: Mutex::new(None),
            slot_gen: AtomicU64::new(0),
            exclusive: AtomicU32::new(NO_VCPU),
            last_turn: Mutex::new(None),
            running: AtomicBool::new(false),
            ioctls: AtomicU64::new(0),
        }
    }

    /// Where vCPU `cpu` is before its first exit: the entry.
    pub(crate) fn set_entry_position(&self, cpu: u32, rip: u64, paging: [u64; 4]) {
        let v = &self.vcpus[cpu as usize];
        v.last_rip.store(rip, Ordering::Relaxed);
        for (slot, x) in v.paging.iter().zip(paging) {
            slot.store(x, Ordering::Relaxed);
        }
    }

    /// Marks the VM running (commits from now on go through the run gate) and
    /// hands vCPU `cpu` its message channel.
    pub(crate) fn attach_vcpu(&self, cpu: u32, tx: Sender<VcpuMsg>) {
        self.running.store(true, Ordering::SeqCst);
        *self.vcpus[cpu as usize].tx.lock().unwrap() = Some(tx);
    }

    /// Records vCPU `cpu`'s thread, so it can be kicked.
    pub(crate) fn set_vcpu_thread(&self, cpu: u32, t: libc::pthread_t) {
        let _ = self.vcpus[cpu as usize].thread.set(t);
    }
}
