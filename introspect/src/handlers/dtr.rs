//! `handle_dtr_violation`: IDTR/GDTR loads (LIDT/LGDT). Polled on KVM, like CRs.

use crate::arch::{Dtr, DtrKind};
use crate::engine::Engine;
use crate::event::{Detection, EventInfo};
use crate::glue::Guest;
use crate::hooks::{Class, Target};
use crate::verdict::Verdict;

/// NotAllowed reloads the old base and limit.
pub fn handle_dtr_violation(
    engine: &mut Engine,
    guest: &mut dyn Guest,
    dtr: DtrKind,
    old: Dtr,
    new: Dtr,
    detection: Detection,
) -> Verdict {
    engine.handle(guest, Class::Dtr, |e, g| {
        // HVMI lets the first load (base 0 -> non-zero) through; so do we.
        if old == new || old.base == 0 {
            return Verdict::Allowed;
        }
        let info = EventInfo::Dtr {
            dtr,
            old,
            new,
            detection,
        };
        let v = e.decide(
            g,
            Class::Dtr,
            &info,
            None,
            &|t| matches!(*t, Target::Dtr { dtr: d } if d == dtr),
        );
        if v == Verdict::NotAllowed {
            let mut s = g.sregs();
            dtr.set(&mut s, old);
            g.set_sregs(&s);
        }
        v
    })
}
