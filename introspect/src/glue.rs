//! The engine's view of the hypervisor (HVMI's GLUE_IFACE, reduced to what a
//! user-space KVM VMM provides), as two small traits: the handled vCPU's view
//! (`VcpuView`) and the VM-wide controls (`VmControl`); `Guest` is both. The VMM
//! implements them; `mock::MockGuest` implements them in memory for unit tests.

use thiserror::Error;

use crate::arch::{Regs, SRegs};
use crate::paging::PagingMode;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GlueError {
    #[error("guest-physical {0:#x} is outside RAM")]
    OutsideRam(u64),
    #[error("{0}")]
    Failed(String),
    /// This host cannot deliver what was asked (measured when vmiscope started);
    /// the text says why and what to use instead.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// How the guest may touch a page (the VMM's page access control).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageRights {
    /// Normal memory.
    Full,
    /// Reads and execution run natively, writes exit.
    WriteTrapped,
    /// Every access exits (read, write and execute hooks need this).
    AllTrapped,
}

/// How the VMM placed a breakpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakpointKind {
    /// An INT3 written over the code: a guest read of that byte must be
    /// answered with the original one (the engine read-traps the page when the
    /// breakpoint is hidden).
    Patched,
    /// A debug-register execute breakpoint: nothing in guest memory changes,
    /// so there is nothing to hide and no page to trap.
    Register,
    /// An INT3 written over the code on a host whose KVM does not report INT3s
    /// at the privilege level that runs it (QEMU's emulated SVM, at any CPL):
    /// the engine execute-traps the page (read-traps it too when hidden), so
    /// the fetch of the INT3 is the hit and the INT3 itself never runs.
    Trapped,
}

impl BreakpointKind {
    /// Whether an INT3 stands in guest memory (its original byte is hidden
    /// from reads when the breakpoint is hidden).
    pub fn patches(self) -> bool {
        self != BreakpointKind::Register
    }

    /// The page rights the engine must trap for it: reads for a hidden INT3,
    /// and fetches wherever the host does not report the INT3 itself.
    pub fn trap(self, hidden: bool) -> Option<crate::target::Rights> {
        use crate::target::Rights;
        match self {
            BreakpointKind::Register => None,
            _ if hidden => Some(Rights::R), // no memslot: fetches trap too
            BreakpointKind::Trapped => Some(Rights::X),
            BreakpointKind::Patched => None,
        }
    }
}

/// The vCPU whose event is being handled: its registers and what can be done to it.
pub trait VcpuView {
    /// The vCPU whose event is being handled.
    fn vcpu(&self) -> u32;
    fn vcpu_count(&self) -> u32;
    fn regs(&self) -> Regs;
    fn set_regs(&mut self, regs: &Regs);
    fn sregs(&self) -> SRegs;
    /// Loads CR0/CR3/CR4, IDTR and GDTR (the rest is kept) on the next entry.
    fn set_sregs(&mut self, sregs: &SRegs);
    /// XCR0 (may cost a hypervisor call: poll it on the timer).
    fn xcr0(&self) -> Option<u64>;
    fn set_xcr0(&mut self, value: u64) -> Result<(), GlueError>;
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), GlueError>;
}

/// VM-wide controls: guest-physical memory, page rights, MSR interception and
/// breakpoints, the same whichever vCPU asks.
pub trait VmControl {
    fn ram_size(&self) -> u64;
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GlueError>;
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), GlueError>;
    /// Atomically replaces `expected` by `new` (same length, 1/2/4/8 bytes, not
    /// crossing a page) if memory still holds `expected`; returns whether it did.
    fn cmpxchg_phys(&mut self, gpa: u64, expected: &[u8], new: &[u8]) -> Result<bool, GlueError>;

    /// Records the rights of the page holding `gpa`; applied by `commit_rights`.
    fn set_page_rights(&mut self, gpa: u64, rights: PageRights) -> Result<(), GlueError>;
    fn commit_rights(&mut self) -> Result<(), GlueError>;
    /// Makes RDMSR and/or WRMSR of `index` exit (both false: stop).
    fn intercept_msr(&mut self, index: u32, read: bool, write: bool) -> Result<(), GlueError>;
    /// Plants / removes a breakpoint the VMM steps over. `gva` is where the
    /// guest executes it (the VMM decides from it whether user code can reach
    /// it, which costs more to catch on some hosts). `hidden`: the guest must not
    /// see it; the VMM then uses a free debug register where one can catch this
    /// code (no patch, no trapped page) and says which it did.
    fn set_breakpoint(
        &mut self,
        gpa: u64,
        gva: u64,
        on: bool,
        hidden: bool,
    ) -> Result<BreakpointKind, GlueError>;

    /// The paging a hook's guest-virtual target is resolved with: the handled
    /// vCPU's own, or for an edit made outside any exit (a hook added from the
    /// console while every vCPU runs), the chosen vCPU's at its last exit.
    fn paging(&self) -> PagingMode;
    /// The vCPU a newly polled class (CR, DTR, XCR) takes its first baseline
    /// from (its id, registers and XCR0), when the edit runs on a vCPU. None
    /// outside any exit: each vCPU's next poll takes its own.
    fn polled_baseline(&self) -> Option<(u32, SRegs, Option<u64>)>;
}

/// The hypervisor as seen while handling one event of one vCPU: that vCPU's view
/// and the VM-wide controls (vmi-rs's small capability traits, combined).
pub trait Guest: VcpuView + VmControl {}

impl<T: VcpuView + VmControl + ?Sized> Guest for T {}
