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
    /// Ours, blocked: skip the instruction under it.
    Skip,
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
        if !e.hidden.contains_key(&gpa) {
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
            Verdict::NotAllowed => BreakpointAction::Skip,
            _ => BreakpointAction::StepOver,
        }
    })
}
