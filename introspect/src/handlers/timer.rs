//! `handle_timer` (once a second) and the register poll that stands in for the CR,
//! DTR and XCR exits KVM does not have.

use crate::arch::{Cr, DtrKind};
use crate::engine::Engine;
use crate::event::Detection;
use crate::glue::Guest;
use crate::hooks::{Class, HookId, Target};
use crate::verdict::Verdict;

/// Compares the vCPU's CR0/CR3/CR4 and IDTR/GDTR with what it had at its previous
/// exit and runs the CR/DTR handlers for changes. Uses only registers the exit
/// already carries, so it is cheap enough for every exit; it does nothing while no
/// CR or DTR hook exists.
pub fn poll_registers(engine: &mut Engine, guest: &mut dyn Guest) {
    if !engine.class_enabled(Class::Cr) && !engine.class_enabled(Class::Dtr) {
        return;
    }
    let vcpu = guest.vcpu();
    let now = guest.sregs();
    if !now.set_up() {
        // A vCPU still setting itself up (an AP from its INIT/SIPI reset state
        // through real and protected mode to its own LGDT/LIDT) is the kernel's
        // own doing, not tampering: its baseline is taken once it is done.
        engine.vcpu(vcpu).last = None;
        return;
    }
    let Some(last) = engine.vcpu(vcpu).last.replace(now) else {
        return;
    };
    if engine.class_enabled(Class::Cr) {
        for cr in Cr::ALL {
            let (old, new) = (cr.get(&last), cr.get(&now));
            if old != new
                && super::handle_cr_write(engine, guest, cr, old, new, Detection::Polled)
                    == Verdict::NotAllowed
            {
                let mut s = engine.vcpu(vcpu).last.expect("set above");
                cr.set(&mut s, old);
                engine.vcpu(vcpu).last = Some(s);
            }
        }
    }
    if engine.class_enabled(Class::Dtr) {
        for d in DtrKind::ALL {
            let (old, new) = (d.get(&last), d.get(&now));
            if old != new
                && super::handle_dtr_violation(engine, guest, d, old, new, Detection::Polled)
                    == Verdict::NotAllowed
            {
                let mut s = engine.vcpu(vcpu).last.expect("set above");
                d.set(&mut s, old);
                engine.vcpu(vcpu).last = Some(s);
            }
        }
    }
}

/// Once a second, from whichever vCPU the host timer interrupted: the register
/// polls (XCR0 too, which costs a hypervisor call), integrity regions, GVA hooks
/// whose page moved (re-checked here rather than by hooking page tables), and the
/// commit of removed hooks.
pub fn handle_timer(engine: &mut Engine, guest: &mut dyn Guest) {
    poll_registers(engine, guest);
    engine.handle(guest, Class::Timer, |e, g| {
        if e.class_enabled(Class::Xcr)
            && let Some(now) = g.xcr0()
        {
            let vcpu = g.vcpu();
            let last = e.vcpu(vcpu).last_xcr0.replace(now);
            if let Some(old) = last
                && old != now
                && super::handle_xcr_write(e, g, 0, old, now, Detection::Polled)
                    == Verdict::NotAllowed
            {
                e.vcpu(vcpu).last_xcr0 = Some(old);
            }
        }
        e.check_integrity(g);
        follow_remaps(e, g);
    });
}

fn follow_remaps(e: &mut Engine, g: &mut dyn Guest) {
    let gva_hooks: Vec<(HookId, u64, u64, Option<u64>)> = e
        .hooks()
        .iter()
        .filter_map(|h| match h.target {
            Target::Gva { gva, cr3, gpa, .. } => Some((h.id, gva, cr3, gpa)),
            _ => None,
        })
        .collect();
    for (id, gva, cr3, gpa) in gva_hooks {
        let mut s = g.sregs();
        s.cr3 = cr3;
        let now = crate::paging::translate(&crate::decode::phys(g), s.paging(), gva)
            .ok()
            .map(|t| t.gpa);
        if now != gpa && e.repage(g, id, now).is_err() {
            e.set_fatal(format!("cannot move hook {id}"));
        }
    }
}
