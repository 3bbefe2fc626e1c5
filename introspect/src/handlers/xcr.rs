//! `handle_xcr_write`: XSETBV. No KVM exit: XCR0 is compared on timer ticks.

use crate::engine::Engine;
use crate::event::{Detection, EventInfo};
use crate::glue::Guest;
use crate::hooks::{Class, Target};
use crate::verdict::Verdict;

/// NotAllowed writes the old XCR0 back.
pub fn handle_xcr_write(
    engine: &mut Engine,
    guest: &mut dyn Guest,
    index: u32,
    old: u64,
    new: u64,
    detection: Detection,
) -> Verdict {
    engine.handle(guest, Class::Xcr, |e, g| {
        let info = EventInfo::Xcr {
            index,
            old,
            new,
            detection,
        };
        let v = e.decide(
            g,
            Class::Xcr,
            &info,
            None,
            &|t| matches!(*t, Target::Xcr { index: i } if i == index),
        );
        if v == Verdict::NotAllowed && g.set_xcr0(old).is_err() {
            e.set_fatal("cannot restore XCR0".into());
        }
        v
    })
}
