//! What the VMM asks its exit handler about, and the handler's reply.

use crate::shared::VcpuCtl;
use crate::stats::ExitClass;
pub use crate::stop::HandlerStop;

/// A trapped guest-physical access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemAccess {
    pub gpa: u64,
    pub len: u8,
    pub write: bool,
    /// The bytes written (little-endian), for writes.
    pub data: u64,
    /// For writes KVM reports the RIP *after* the instruction (REP: still on it);
    /// for reads, the RIP of the instruction.
    pub rip: u64,
    pub cpl: u8,
}

/// A ring of the introcall doorbell (see `devices::INTROCALL_PORT` for the ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Introcall {
    pub op: u64,
    pub args: [u64; 3],
    pub rip: u64,
    pub cpl: u8,
}

/// One event from one vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An access to a write- or all-trapped RAM page.
    Mem(MemAccess),
    /// An access to guest-physical memory where nothing is (outside RAM).
    Mmio(MemAccess),
    /// An intercepted MSR access: `write` is the value for WRMSR, `None` for RDMSR.
    Msr {
        index: u32,
        write: Option<u64>,
        rip: u64,
    },
    /// Port I/O no device claims.
    Port {
        port: u16,
        size: u8,
        write: Option<u32>,
    },
    /// The introcall doorbell.
    Introcall(Introcall),
    /// An INT3 executed: one of ours (`ours`) or the guest's own.
    Breakpoint {
        rip: u64,
        gpa: Option<u64>,
        ours: bool,
        cpl: u8,
    },
    /// A single-step requested with `VcpuCtl::set_single_step` completed.
    SingleStep { rip: u64 },
    /// A hardware execute breakpoint fired.
    HwBreakpoint { rip: u64, slot: u8 },
    /// An instruction fetch from an all-trapped page.
    ExecFault { gva: u64, gpa: u64, cpl: u8 },
    /// KVM's emulator could not run the instruction at `rip`.
    EmulationFailure {
        rip: u64,
        bytes: [u8; 15],
        len: u8,
        cpl: u8,
    },
    /// HLT (only without the in-kernel irqchip).
    Halt,
    /// The guest triple-faulted.
    Shutdown,
    /// A kick (timer, pause, watchdog) interrupted the vCPU.
    Kicked,
}

impl Event {
    /// The class this event is counted under in statistics.
    pub fn class(&self) -> ExitClass {
        match self {
            Event::Mem(m) if m.write => ExitClass::MemWrite,
            Event::Mem(_) => ExitClass::MemRead,
            Event::Mmio(_) => ExitClass::Mmio,
            Event::Msr { write: Some(_), .. } => ExitClass::MsrWrite,
            Event::Msr { .. } => ExitClass::MsrRead,
            Event::Port { .. } => ExitClass::Port,
            Event::Introcall(_) => ExitClass::Introcall,
            Event::Breakpoint { .. } => ExitClass::Breakpoint,
            Event::SingleStep { .. } => ExitClass::SingleStep,
            Event::HwBreakpoint { .. } => ExitClass::HwBreakpoint,
            Event::ExecFault { .. } => ExitClass::ExecFault,
            Event::EmulationFailure { .. } => ExitClass::EmulationFailure,
            Event::Halt => ExitClass::Halt,
            Event::Shutdown => ExitClass::Shutdown,
            Event::Kicked => ExitClass::Kick,
        }
    }
}

/// The handler's decision. The VMM applies it before the vCPU re-enters the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Do what the hardware would have done without the trap: apply a trapped write,
    /// serve a trapped read from RAM, apply an MSR write / return the real MSR,
    /// execute the instruction on an execute-trapped page once (the trap stays),
    /// step over one of our breakpoints, re-inject the guest's own #BP, ignore an
    /// unclaimed port (reads return all-ones). For `EmulationFailure` and `Shutdown`,
    /// `Continue` ends the run: the guest cannot go on.
    Continue,
    /// The trapped write or MSR write has no effect; the instruction completes.
    Drop,
    /// The MSR access raises #GP in the guest; a trapped memory write is dropped.
    Deny,
    /// The value a trapped read, MSR read or port read returns.
    Data(u64),
    /// Re-enter the guest without doing anything (the handler changed the state,
    /// e.g. lifted the trap, and the instruction must run again).
    Retry,
    /// For one of our breakpoints: do not run the instruction under it; RIP moves
    /// past its `len` bytes (a blocked breakpointed instruction).
    Skip(u8),
    /// End the run with this reason.
    Stop(HandlerStop),
}

/// Receives every event of every vCPU (possibly from several threads at once).
pub trait ExitHandler: Send + Sync {
    fn on_event(&self, cpu: &mut VcpuCtl<'_>, event: &Event) -> Reply;

    /// Called at every exit, before it is handled, with the registers the exit
    /// carries (no ioctl): where CR/DTR changes are caught on hosts that have no
    /// exit for them. Keep it cheap. An error ends the run with that cause.
    fn on_exit(&self, _cpu: &mut VcpuCtl<'_>) -> Result<(), HandlerStop> {
        Ok(())
    }
}

/// The handler that lets everything happen as it would without introspection.
pub struct PassThrough;

impl ExitHandler for PassThrough {
    fn on_event(&self, _cpu: &mut VcpuCtl<'_>, _event: &Event) -> Reply {
        Reply::Continue
    }
}

impl<F: Fn(&mut VcpuCtl<'_>, &Event) -> Reply + Send + Sync> ExitHandler for F {
    fn on_event(&self, cpu: &mut VcpuCtl<'_>, event: &Event) -> Reply {
        self(cpu, event)
    }
}
