//! What exit handling needs from the vCPU and its VM (`ExitBackend`), and the
//! three steps every route shares: count and ask, stop, stop or go on.

use kvm_bindings::kvm_regs;

use crate::devices::PortEffect;
use crate::error::VmError;
use crate::event::{Event, Reply};
use crate::slots::Access;
use crate::stats::ExitClass;
use crate::stop::StopReason;
use crate::vcpu::state::Catch;

/// What a debug-register slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotUse {
    /// A guest exception entry watched for user-mode stepping (see `usertrap`).
    Catch(Catch),
    /// One of our hidden breakpoints, on the code at `gpa`.
    HiddenBreakpoint { gpa: u64 },
    /// An analyst's hardware breakpoint (gdb's `hbreak`).
    Analyst,
}

/// Where an internal error (KVM_EXIT_INTERNAL_ERROR) happened, read once:
/// enough to route an execute trap (the common case, on a hot loop's page)
/// without reading the instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FailureSite {
    /// The suberror is KVM's emulation failure (else: another internal error).
    pub emulation: bool,
    pub rip: u64,
    pub cpl: u8,
    /// RIP's page, through the guest's page tables, and its access then.
    pub page: Option<(u64, Access)>,
    /// The memslots changed since the vCPU entered (read after `page`).
    pub slots_changed: bool,
}

/// The instruction an internal error happened at: its bytes from guest
/// memory, else KVM's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FailedInsn {
    pub bytes: [u8; 15],
    pub len: u8,
}

impl FailedInsn {
    /// The instruction is an INT3.
    pub(crate) fn int3(&self) -> bool {
        self.len > 0 && self.bytes[0] == 0xcc
    }
}

/// What the loop does after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Stop,
}

/// What exit handling needs from the vCPU and its VM.
pub(crate) trait ExitBackend {
    fn id(&self) -> u32;
    fn regs(&self) -> kvm_regs;
    /// Changes general registers (loaded on the next entry).
    fn set_regs(&mut self, regs: &kvm_regs);
    fn cpl(&self) -> u8;
    /// CR4.LA57: addresses are 57-bit canonical instead of 48-bit.
    fn la57(&self) -> bool;
    /// After a shutdown: when the vCPU holds the state INIT gives it (CS F000
    /// based at FFFF0000, RIP FFF0; KVM on SVM resets a vCPU that shut down),
    /// the RIP of its exit before the shutdown, the last place known; else None.
    fn reset_at_shutdown(&self) -> Option<u64>;
    /// Counts an exit of `class` (for `stats` and `bench`).
    fn count(&self, class: ExitClass);
    /// Asks the exit handler (the engine, in a session) about `event`.
    fn ask(&mut self, event: &Event) -> Reply;
    /// Ends the run with `reason` (the first reason wins).
    fn stop(&mut self, reason: StopReason);
    /// Marks this vCPU halted; returns whether every vCPU now is.
    fn halt(&mut self) -> bool;

    fn port_write(&mut self, port: u16, size: u8, value: u32) -> PortEffect;
    fn port_read(&mut self, port: u16, size: u8) -> Option<u32>;
    /// Completes an IN: the value the guest's register receives.
    fn complete_io_in(&mut self, value: u32);
    /// Completes an MMIO read: the value the guest's load receives.
    fn complete_mmio_read(&mut self, value: u64);
    /// Completes RDMSR/WRMSR: `error` raises #GP; `data` is what RDMSR returns.
    fn complete_msr(&mut self, error: bool, data: Option<u64>);
    fn get_msr(&mut self, index: u32) -> Option<u64>;
    /// Applies an MSR write KVM handed to user space; returns whether KVM took it.
    fn set_msr(&mut self, index: u32, value: u64) -> bool;

    fn ram_contains(&self, gpa: u64, len: u64) -> bool;
    fn page_access(&self, gpa: u64) -> Access;
    fn ram_read(&self, gpa: u64, buf: &mut [u8]);
    fn ram_write(&mut self, gpa: u64, data: &[u8]);

    // Debug exits, emulation failures and kicks (routed in `faults`).
    /// What debug-register slot `slot` (0-3) holds.
    fn slot_use(&self, slot: usize) -> SlotUse;
    /// One instruction ran under a step (KVM's, or a TF step caught at #DB)
    /// and ended at `pc`: a step-over's restores are put back; an analyst's
    /// step (or one nobody asked for) is reported.
    fn stepped(&mut self, pc: u64) -> Flow;
    /// A watched guest exception entry was reached: ours (a TF step, an INT3
    /// at CPL3) is undone and handled, the guest's own runs its handler.
    fn caught(&mut self, catch: Catch) -> Flow;
    /// Resumes past an execute breakpoint that fired (resuming on it would
    /// fire it again): a step over the instruction with debug registers off.
    fn step_past_hw_breakpoint(&mut self);
    /// The INT3 at `rip`: its guest-physical address, and whether it is ours.
    fn sw_breakpoint_at(&self, rip: u64) -> (Option<u64>, bool);
    /// Where an internal error happened (see `FailureSite`).
    fn failure_site(&mut self) -> FailureSite;
    /// The instruction it happened at (read only when the site does not
    /// route it).
    fn failed_instruction(&mut self) -> FailedInsn;
    /// A fetch at `gva` from the execute-trapped page at `gpa`: its event,
    /// then the instruction completed here or stepped over.
    fn exec_fault(&mut self, gva: u64, gpa: u64, cpl: u8) -> Flow;
    /// Completes an instruction KVM's emulator cannot run (on PVM) if the VMM
    /// can; returns whether it did.
    fn fixup(&mut self, bytes: &[u8]) -> bool;
    /// After a kick: Some(RIP) when the vCPU was kicked on the same CPL0
    /// hypercall the previous time too, with no exit in between (livelock).
    fn kicked_on_hypercall(&mut self) -> Option<u64>;
    /// Whether KVM's single-step (KVM_GUESTDBG_SINGLESTEP) is armed for the
    /// instruction that exited.
    fn kvm_stepping(&self) -> bool;
    /// Called before every exit but a debug one: a step-over that could not
    /// single-step finishes here.
    fn finish_deferred(&mut self);
    /// Moves RIP past an instruction of `len` bytes without running it.
    fn skip(&mut self, len: u8);
    /// Runs the instruction under our breakpoint at `gpa` once (original byte,
    /// page opened if execute-trapped), then re-arms everything.
    fn step_over_at(&mut self, gpa: u64) -> Result<(), VmError>;
    /// Delivers the guest's own #BP for the INT3 at `rip`.
    fn reinject_breakpoint(&mut self, rip: u64) -> Result<(), VmError>;
}

/// Counts the event's class, then asks the handler.
pub(crate) fn ask(be: &mut dyn ExitBackend, event: &Event) -> Reply {
    be.count(event.class());
    be.ask(event)
}

pub(crate) fn stop(be: &mut dyn ExitBackend, reason: StopReason) -> Flow {
    be.stop(reason);
    Flow::Stop
}

/// `Reply::Stop` ends the run; any other reply goes on.
pub(crate) fn stop_or_continue(be: &mut dyn ExitBackend, reply: Reply) -> Flow {
    match reply {
        Reply::Stop(cause) => stop(be, StopReason::Handler(cause)),
        _ => Flow::Continue,
    }
}
