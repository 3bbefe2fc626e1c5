//! Debug exits, emulation failures and kicks: where each goes, decided here over
//! the backend's verbs (as io, mmio and msr exits are), so the fake backend
//! checks the routing. What each route then does to the guest (a step-over,
//! popping a caught exception frame, completing an instruction) is the
//! backend's.

use super::contract::{ExitBackend, FailureSite, Flow, SlotUse, ask, stop, stop_or_continue};
use crate::event::{Event, Reply};
use crate::slots::Access;
use crate::stop::StopReason;

/// DR6.BS: the #DB is a single-step's.
const DR6_BS: u64 = 1 << 14;

/// A debug exit: a step's end, a debug-register breakpoint (a catch, one of
/// our hidden breakpoints, or an analyst's), or an INT3.
pub(crate) fn debug(be: &mut dyn ExitBackend, exception: u32, pc: u64, dr6: u64) -> Flow {
    match exception {
        1 if dr6 & DR6_BS != 0 || dr6 & 0xf == 0 => be.stepped(pc),
        1 => {
            let slot = (dr6 & 0xf).trailing_zeros() as usize;
            match be.slot_use(slot) {
                SlotUse::Catch(catch) => be.caught(catch),
                SlotUse::HiddenBreakpoint { gpa } => hidden_hw_breakpoint(be, pc, gpa),
                SlotUse::Analyst => {
                    let ev = Event::HwBreakpoint {
                        rip: pc,
                        slot: slot as u8,
                    };
                    match ask(be, &ev) {
                        Reply::Stop(cause) => stop(be, StopReason::Handler(cause)),
                        Reply::Retry => Flow::Continue,
                        _ => {
                            be.step_past_hw_breakpoint();
                            Flow::Continue
                        }
                    }
                }
            }
        }
        3 => {
            let (gpa, ours) = be.sw_breakpoint_at(pc);
            let cpl = be.cpl();
            breakpoint(be, pc, gpa, ours, cpl)
        }
        _ => {
            let why = format!("vCPU {}: debug exit for exception {exception}", be.id());
            stop(be, StopReason::Error(why))
        }
    }
}

/// One of our hidden breakpoints held in a debug register fired: the same
/// event as an INT3 of ours. Resuming on it would fire it again, so the
/// instruction is stepped over with the debug registers off. Nothing was
/// patched, so nothing is put back, and other vCPUs run on meanwhile.
fn hidden_hw_breakpoint(be: &mut dyn ExitBackend, rip: u64, gpa: u64) -> Flow {
    let ev = Event::Breakpoint {
        rip,
        gpa: Some(gpa),
        ours: true,
        cpl: be.cpl(),
    };
    match ask(be, &ev) {
        Reply::Stop(cause) => stop(be, StopReason::Handler(cause)),
        Reply::Retry => Flow::Continue,
        Reply::Skip(len) => {
            be.skip(len);
            Flow::Continue
        }
        _ => {
            be.step_past_hw_breakpoint();
            Flow::Continue
        }
    }
}

/// An internal error. An emulation failure may be ours: a fetch from an
/// execute-trapped page (no memslot), an INT3 at CPL0 on PVM (KVM's emulator
/// cannot run it), or an instruction the VMM completes itself. Otherwise the
/// handler is asked, and the run ends unless it says to retry.
pub(crate) fn internal_error(be: &mut dyn ExitBackend) -> Flow {
    let site = be.failure_site();
    let FailureSite { rip, cpl, .. } = site;
    if site.emulation {
        // The page rights changed since this vCPU entered (another vCPU opened
        // an execute-trapped page to step over it, say): the fetch may have
        // failed on a page that is there now. Run the instruction again.
        if site.slots_changed {
            return Flow::Continue;
        }
        if let Some((gpa, Access::AllTrap)) = site.page {
            return be.exec_fault(rip, gpa, cpl);
        }
    }
    let insn = be.failed_instruction();
    if site.emulation && insn.int3() {
        let (gpa, ours) = be.sw_breakpoint_at(rip);
        return breakpoint(be, rip, gpa, ours, cpl);
    }
    let len = insn.len.min(15);
    if be.fixup(&insn.bytes[..len as usize]) {
        return Flow::Continue;
    }
    let ev = Event::EmulationFailure {
        rip,
        bytes: insn.bytes,
        len,
        cpl,
    };
    match ask(be, &ev) {
        Reply::Retry => Flow::Continue,
        Reply::Stop(cause) => stop(be, StopReason::Handler(cause)),
        _ => {
            let reason = StopReason::EmulationFailure {
                cpu: be.id(),
                rip,
                cpl,
                bytes: insn.bytes[..len as usize].to_vec(),
            };
            stop(be, reason)
        }
    }
}

/// A kick (another thread wanted this vCPU out of the guest). A vCPU kicked
/// twice on the same CPL0 hypercall with no exit in between sits on it for
/// good (PVM's VMCALL at CPL0): the run ends there instead of spinning.
pub(crate) fn kicked(be: &mut dyn ExitBackend) -> Flow {
    if let Some(rip) = be.kicked_on_hypercall() {
        let cpu = be.id();
        return stop(be, StopReason::Livelock { cpu, rip });
    }
    let reply = ask(be, &Event::Kicked);
    stop_or_continue(be, reply)
}

/// An INT3 executed at `rip`: one of ours (`ours`, planted at `gpa`) or the
/// guest's own.
pub(crate) fn breakpoint(
    be: &mut dyn ExitBackend,
    rip: u64,
    gpa: Option<u64>,
    ours: bool,
    cpl: u8,
) -> Flow {
    let ev = Event::Breakpoint {
        rip,
        gpa,
        ours,
        cpl,
    };
    let done = match ask(be, &ev) {
        Reply::Stop(cause) => return stop(be, StopReason::Handler(cause)),
        Reply::Retry => Ok(()),
        Reply::Skip(len) if ours => {
            be.skip(len);
            Ok(())
        }
        _ => match gpa {
            Some(gpa) if ours => be.step_over_at(gpa),
            _ => be.reinject_breakpoint(rip),
        },
    };
    match done {
        Ok(()) => Flow::Continue,
        Err(e) => stop(be, StopReason::Error(e.to_string())),
    }
}
