//! `handle_cr_write`: a change of CR0/CR3/CR4. KVM has no exit for MOV CR, so on
//! KVM this runs from `poll_registers` (detection = Polled, writer unknown); a host
//! that delivers an exit calls it with Detection::Exit.

use crate::arch::Cr;
use crate::engine::Engine;
use crate::event::{Detection, EventInfo};
use crate::glue::Guest;
use crate::hooks::{Class, Target};
use crate::verdict::Verdict;

/// Calls the hooks whose mask covers a changed bit; NotAllowed puts the old value
/// back (for a polled change, the new value was in effect until now).
pub fn handle_cr_write(
    engine: &mut Engine,
    guest: &mut dyn Guest,
    cr: Cr,
    old: u64,
    new: u64,
    detection: Detection,
) -> Verdict {
    engine.handle(guest, Class::Cr, |e, g| {
        let info = EventInfo::Cr {
            cr,
            old,
            new,
            detection,
        };
        let changed = old ^ new;
        // Only an exiting host knows the writer; a polled change has none.
        let instr = match detection {
            Detection::Exit => crate::decode::decode_at(g, g.regs().rip)
                .ok()
                .map(|d| d.text),
            Detection::Polled => None,
        };
        let matches =
            |t: &Target| matches!(*t, Target::Cr { cr: c, mask } if c == cr && mask & changed != 0);
        let v = e.decide(g, Class::Cr, &info, instr.as_deref(), &matches);
        if v == Verdict::NotAllowed {
            let mut s = g.sregs();
            cr.set(&mut s, old);
            g.set_sregs(&s);
        }
        v
    })
}
