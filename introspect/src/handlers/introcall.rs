//! `handle_introcall`: the guest rang the introcall doorbell (HVMI's VMCALL).

use crate::engine::Engine;
use crate::event::EventInfo;
use crate::glue::Guest;
use crate::hooks::{Class, Target};

/// The first hook for `op` claims the call (HVMI's order of claimants); its
/// `Ctx::answer_introcall` is what the guest gets in RBX (0 if it gave none). `None`: nobody
/// claimed it (the guest sees RAX = -1).
pub fn handle_introcall(
    engine: &mut Engine,
    guest: &mut dyn Guest,
    op: u64,
    args: [u64; 3],
) -> Option<u64> {
    engine.handle(guest, Class::Introcall, |e, g| {
        let info = EventInfo::Introcall { op, args };
        e.take_introcall_answer();
        let fired = e.dispatch(
            g,
            None,
            &info,
            &|t| matches!(*t, Target::Introcall { op: o } if o.is_none_or(|o| o == op)),
        );
        if fired.is_empty() {
            return None;
        }
        e.conclude(g, Class::Introcall, &info, None, &fired[..1]);
        Some(e.take_introcall_answer().unwrap_or(0))
    })
}
