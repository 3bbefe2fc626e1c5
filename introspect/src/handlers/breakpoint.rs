//! `handle_breakpoint`: an INT3 executed.

use crate::engine::Engine;
use crate::event::EventInfo;
use crate::glue::Guest;
use crate::hooks::{Class, Target};
use crate::verdict::Verdict;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakpointAction {
    /// One of ours: the VMM steps over it (original byte) and re-arms it.
    StepOver,
    /// Ours, blocked: the instruction under it (this many bytes) does not run;
    /// the VMM moves RIP past it.
    Skip(u8),
    /// Not ours: the guest's own INT3, to re-inject (HVMI's INT_STATUS_NOT_FOUND).
    Reinject,
}

pub fn handle_breakpoint(
    engine: &mut Engine,
    guest: &mut dyn Guest,
    gva: u64,
    gpa: u64,
) -> BreakpointAction {
    engine.handle(guest, Class::Breakpoint, |e, g| {
        if !e.is_our_breakpoint(gpa) {
            return BreakpointAction::Reinject;
        }
        let info = EventInfo::Breakpoint { gva, gpa };
        let fired = e.dispatch(
            g,
            None,
            &info,
            &|t| matches!(*t, Target::Breakpoint { gpa: p, .. } if p == gpa),
        );
        match e.conclude(g, Class::Breakpoint, &info, None, &fired) {
            Verdict::NotAllowed => match original_len(e, g, gva, gpa) {
                Some(len) => BreakpointAction::Skip(len),
                // Undecodable: nothing to skip safely; the instruction runs.
                None => BreakpointAction::StepOver,
            },
            _ => BreakpointAction::StepOver,
        }
    })
}

/// The length of the guest's own instruction under our INT3 at `gva` (its first
/// byte is the hidden original one).
/// Read from the breakpoint's page only: an instruction that crosses into the
/// next page and cannot be decoded from this one is not skipped.
fn original_len(e: &Engine, g: &dyn Guest, gva: u64, gpa: u64) -> Option<u8> {
    let mut bytes = vec![0u8; (0x1000 - (gpa & 0xfff)).min(15) as usize];
    g.read_phys(gpa, &mut bytes).ok()?;
    // Under an INT3 the first byte is the hidden original one.
    if let Some(orig) = e.original_byte(gpa) {
        *bytes.first_mut()? = orig;
    }
    let d = crate::decode::decode_bytes(&bytes, gva, &g.regs(), &g.sregs()).ok()?;
    u8::try_from(d.len()).ok()
}
