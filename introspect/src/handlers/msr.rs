//! `handle_msr_violation`: an intercepted RDMSR/WRMSR.

use crate::engine::Engine;
use crate::event::EventInfo;
use crate::glue::Guest;
use crate::hooks::{Class, Target};
use crate::verdict::Verdict;

/// Every matching hook is called and the verdicts are combined by maximum (HVMI's
/// own MSR handler let the last callback win; that is a bug and is not copied).
/// NotAllowed: the WRMSR has no effect (the instruction completes).
pub fn handle_msr_violation(
    engine: &mut Engine,
    guest: &mut dyn Guest,
    index: u32,
    write: Option<u64>,
) -> Verdict {
    engine.handle(guest, Class::Msr, |e, g| {
        let info = EventInfo::Msr { index, write };
        let is_write = write.is_some();
        let fired = e.dispatch(g, None, &info, &|t| {
            matches!(*t, Target::Msr { index: i, read, write: w } if i == index && if is_write { w } else { read })
        });
        let instr = crate::decode::decode_at(g, g.regs().rip).ok().map(|d| d.text);
        e.conclude(g, Class::Msr, &info, instr.as_deref(), &fired)
    })
}
