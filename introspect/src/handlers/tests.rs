//! Handler unit tests against the recording mock: no hypervisor involved.

use std::sync::{Arc, Mutex};

use crate::arch::{Cr, Dtr, DtrKind};
use crate::engine::{Engine, HookError};
use crate::event::{AccessKind, Detection, EventInfo};
use crate::glue::PageRights;
use crate::handlers::*;
use crate::hooks::{Class, Rights, Target};
use crate::mock::{Call, MockGuest};
use crate::verdict::{Outcome, Verdict};

fn gpa_hook(gpa: u64, len: u64, rights: Rights) -> Target {
    Target::Gpa { gpa, len, rights }
}

fn answer(v: Verdict) -> crate::hooks::Callback {
    Box::new(move |_| Outcome::verdict(v))
}

/// A callback that logs its name into `log` and answers `v`.
fn logged(log: &Arc<Mutex<Vec<String>>>, name: &str, v: Verdict) -> crate::hooks::Callback {
    let (log, name) = (log.clone(), name.to_string());
    Box::new(move |_| {
        log.lock().unwrap().push(name.clone());
        Outcome::verdict(v)
    })
}

fn write_exit(gpa: u64, len: u64, data: u64, rip: u64) -> MemExit {
    MemExit {
        gpa,
        len,
        access: AccessKind::Write,
        data: Some(data),
        rip,
    }
}

fn read_exit(gpa: u64, len: u64, rip: u64) -> MemExit {
    MemExit {
        gpa,
        len,
        access: AccessKind::Read,
        data: None,
        rip,
    }
}

#[test]
fn verdicts_combine_by_maximum_in_every_handler() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    for v in [
        Verdict::Allowed,
        Verdict::NotAllowed,
        Verdict::AllowedVirtual,
    ] {
        e.add_hook(&mut g, gpa_hook(0x10000, 8, Rights::W), "w", answer(v))
            .unwrap();
        e.add_hook(
            &mut g,
            Target::Msr {
                index: 0xc000_0082,
                read: false,
                write: true,
            },
            "m",
            answer(v),
        )
        .unwrap();
        e.add_hook(
            &mut g,
            Target::Cr {
                cr: Cr::Cr4,
                mask: 1 << 20,
            },
            "c",
            answer(v),
        )
        .unwrap();
    }
    // mov [rax], ecx at 0x20000 (2 bytes: 89 08) writing 0x10000.
    g.put(0x20000, &[0x89, 0x08]);
    g.regs.rax = 0x10000;
    let (v, a) = handle_ept_violation(&mut e, &mut g, &write_exit(0x10000, 4, 7, 0x20002));
    assert_eq!((v, a), (Verdict::NotAllowed, MemAction::Drop));
    // The last MSR callback says AllowedVirtual; HVMI would let it win. We do not.
    assert_eq!(
        handle_msr_violation(&mut e, &mut g, 0xc000_0082, Some(1)),
        Verdict::NotAllowed
    );
    g.sregs.cr4 = 0x620;
    assert_eq!(
        handle_cr_write(
            &mut e,
            &mut g,
            Cr::Cr4,
            0x620 | 1 << 20,
            0x620,
            Detection::Polled
        ),
        Verdict::NotAllowed
    );
    assert_eq!(
        g.sregs.cr4,
        0x620 | 1 << 20,
        "NotAllowed restores the old CR4"
    );
    assert_eq!(e.alerts().len(), 3, "one alert per event");
    assert_eq!(e.alerts()[0].instruction.as_deref(), Some("mov [rax],ecx"));
}

#[test]
fn a_callback_may_remove_its_own_hook_and_skip_the_rest() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    let log = Arc::new(Mutex::new(vec![]));
    let l = log.clone();
    let first = e
        .add_hook(
            &mut g,
            Target::Msr {
                index: 0x176,
                read: false,
                write: true,
            },
            "once",
            Box::new(move |_| {
                l.lock().unwrap().push("once".into());
                Outcome::allow().and_remove()
            }),
        )
        .unwrap();
    e.add_hook(
        &mut g,
        Target::Msr {
            index: 0x176,
            read: false,
            write: true,
        },
        "always",
        logged(&log, "always", Verdict::Allowed),
    )
    .unwrap();
    handle_msr_violation(&mut e, &mut g, 0x176, Some(1));
    handle_msr_violation(&mut e, &mut g, 0x176, Some(2));
    assert_eq!(*log.lock().unwrap(), ["once", "always", "always"]);
    assert!(
        e.hooks().get(first).is_none(),
        "committed at the end of the handler"
    );
    assert_eq!(
        g.msrs.get(&0x176),
        Some(&(false, true)),
        "the other hook keeps the MSR intercepted"
    );
    // Skip others.
    e.add_hook(
        &mut g,
        Target::Msr {
            index: 0x10,
            read: false,
            write: true,
        },
        "skip",
        Box::new(|_| Outcome::allow().and_skip_others()),
    )
    .unwrap();
    e.add_hook(
        &mut g,
        Target::Msr {
            index: 0x10,
            read: false,
            write: true,
        },
        "never",
        logged(&log, "never", Verdict::Allowed),
    )
    .unwrap();
    handle_msr_violation(&mut e, &mut g, 0x10, Some(0));
    assert!(!log.lock().unwrap().contains(&"never".to_string()));
}

#[test]
fn hooks_added_during_a_dispatch_are_called_by_it() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = log.clone();
    e.add_hook(
        &mut g,
        Target::Introcall { op: Some(7) },
        "adder",
        Box::new(move |ctx| {
            let l2 = l.clone();
            ctx.add_hook(
                Target::Introcall { op: Some(7) },
                "added",
                Box::new(move |_| {
                    l2.lock().unwrap().push("added".into());
                    Outcome::allow()
                }),
            );
            Outcome::allow().and_remove()
        }),
    )
    .unwrap();
    // Introcalls stop at the first claimant, so use a class that calls everyone: CR.
    let l = log.clone();
    e.add_hook(
        &mut g,
        Target::Cr {
            cr: Cr::Cr0,
            mask: !0,
        },
        "adder",
        Box::new(move |ctx| {
            let l2 = l.clone();
            ctx.add_hook(
                Target::Cr {
                    cr: Cr::Cr0,
                    mask: !0,
                },
                "added",
                Box::new(move |_| {
                    l2.lock().unwrap().push("added-cr".into());
                    Outcome::allow()
                }),
            );
            Outcome::allow().and_remove()
        }),
    )
    .unwrap();
    handle_cr_write(&mut e, &mut g, Cr::Cr0, 1, 3, Detection::Polled);
    assert_eq!(*log.lock().unwrap(), ["added-cr"]);
    assert_eq!(e.hooks().iter().filter(|h| h.name == "added").count(), 1);
}

#[test]
fn each_class_is_switched_on_by_its_first_hook_and_off_by_its_last() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    // EPT: page rights change on 0 <-> 1 only, committed in one batch.
    let a = e
        .add_hook(
            &mut g,
            gpa_hook(0x10000, 8, Rights::W),
            "a",
            answer(Verdict::Allowed),
        )
        .unwrap();
    let b = e
        .add_hook(
            &mut g,
            gpa_hook(0x10100, 8, Rights::W),
            "b",
            answer(Verdict::Allowed),
        )
        .unwrap();
    assert_eq!(
        g.take_calls(),
        [Call::SetRights(0x10000, PageRights::WriteTrapped)]
    );
    let r = e
        .add_hook(
            &mut g,
            gpa_hook(0x10200, 8, Rights::R),
            "r",
            answer(Verdict::Allowed),
        )
        .unwrap();
    assert_eq!(
        g.take_calls(),
        [Call::SetRights(0x10000, PageRights::AllTrapped)]
    );
    assert!(e.class_enabled(Class::Ept));
    for id in [a, b, r] {
        e.remove_hook(id).unwrap();
    }
    assert!(g.take_calls().is_empty(), "removal only flags");
    e.commit(&mut g).unwrap();
    let calls = g.take_calls();
    assert_eq!(calls.last(), Some(&Call::CommitRights));
    assert!(calls.contains(&Call::SetRights(0x10000, PageRights::Full)));
    assert!(!e.class_enabled(Class::Ept));
    // MSR: intercepted with the first hook of an index, released with the last.
    let m1 = e
        .add_hook(
            &mut g,
            Target::Msr {
                index: 0x176,
                read: false,
                write: true,
            },
            "m1",
            answer(Verdict::Allowed),
        )
        .unwrap();
    let m2 = e
        .add_hook(
            &mut g,
            Target::Msr {
                index: 0x176,
                read: true,
                write: false,
            },
            "m2",
            answer(Verdict::Allowed),
        )
        .unwrap();
    assert_eq!(
        g.take_calls(),
        [
            Call::InterceptMsr(0x176, false, true),
            Call::InterceptMsr(0x176, true, true)
        ]
    );
    e.remove_hook(m1).unwrap();
    e.remove_hook(m2).unwrap();
    e.commit(&mut g).unwrap();
    assert_eq!(
        g.take_calls(),
        [
            Call::InterceptMsr(0x176, true, false),
            Call::InterceptMsr(0x176, false, false)
        ]
    );
    // CR/DTR: polling runs only while a hook exists.
    assert!(!e.class_enabled(Class::Cr));
    let c = e
        .add_hook(
            &mut g,
            Target::Cr {
                cr: Cr::Cr4,
                mask: !0,
            },
            "c",
            answer(Verdict::Allowed),
        )
        .unwrap();
    assert!(e.class_enabled(Class::Cr));
    e.remove_hook(c).unwrap();
    e.commit(&mut g).unwrap();
    assert!(!e.class_enabled(Class::Cr));
    // Breakpoints: planted with the hook, removed with it.
    g.put(0x30000, &[0x55]);
    let bp = e
        .add_hook(
            &mut g,
            Target::Breakpoint {
                gva: 0x30000,
                gpa: 0,
                hidden: true,
            },
            "bp",
            answer(Verdict::Allowed),
        )
        .unwrap();
    assert!(g.breakpoints.contains(&0x30000));
    e.remove_hook(bp).unwrap();
    e.commit(&mut g).unwrap();
    assert!(g.breakpoints.is_empty());
}

#[test]
fn push_mem_dispatches_the_read_and_the_stack_write_once() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    let log = Arc::new(Mutex::new(vec![]));
    e.add_hook(
        &mut g,
        gpa_hook(0x10000, 8, Rights::R),
        "operand",
        logged(&log, "read", Verdict::Allowed),
    )
    .unwrap();
    e.add_hook(
        &mut g,
        gpa_hook(0x11ff8, 8, Rights::W),
        "stack",
        logged(&log, "write", Verdict::NotAllowed),
    )
    .unwrap();
    g.put(0x20000, &[0xff, 0x30]); // push qword [rax]
    g.regs.rax = 0x10000;
    g.regs.rsp = 0x12000;
    g.regs.rip = 0x20000;
    g.put_u64(0x10000, 0xabcd);
    e.note_exit(0);
    // First exit: the read of [rax] (RIP at the instruction). Both hooks run.
    let (v, a) = handle_ept_violation(
        &mut e,
        &mut g,
        &MemExit {
            gpa: 0x10000,
            len: 8,
            access: AccessKind::Read,
            data: None,
            rip: 0x20000,
        },
    );
    assert_eq!(
        *log.lock().unwrap(),
        ["read", "write"],
        "the implicit stack write is analysed with the read"
    );
    assert_eq!((v, a), (Verdict::NotAllowed, MemAction::Data(0)));
    // Second exit of the same instruction: the stack write, RIP after it. Cached.
    e.note_exit(0);
    g.regs.rsp = 0x11ff8;
    let (v, a) = handle_ept_violation(&mut e, &mut g, &write_exit(0x11ff8, 8, 0xabcd, 0x20002));
    assert_eq!((v, a), (Verdict::NotAllowed, MemAction::Drop));
    assert_eq!(log.lock().unwrap().len(), 2, "not asked twice");
    assert_eq!(e.alerts().len(), 1);
}

#[test]
fn rep_movs_and_page_crossing_reach_every_hooked_page() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    let log = Arc::new(Mutex::new(vec![]));
    // Destination spans 0x12ffc..0x13004: hooks on both pages.
    e.add_hook(
        &mut g,
        gpa_hook(0x12ff0, 0x10, Rights::W),
        "low",
        logged(&log, "low", Verdict::Allowed),
    )
    .unwrap();
    e.add_hook(
        &mut g,
        gpa_hook(0x13000, 0x10, Rights::W),
        "high",
        logged(&log, "high", Verdict::Allowed),
    )
    .unwrap();
    g.put(0x20000, &[0xf3, 0xa4]); // rep movsb
    (g.regs.rsi, g.regs.rdi, g.regs.rcx, g.regs.rip) = (0x15000, 0x12ffc, 8, 0x20000);
    e.note_exit(0);
    let (v, a) = handle_ept_violation(&mut e, &mut g, &write_exit(0x12ffc, 1, 0x41, 0x20000));
    assert_eq!((v, a), (Verdict::Allowed, MemAction::Apply));
    assert_eq!(*log.lock().unwrap(), ["low", "high"]);
}

#[test]
fn reads_of_a_hidden_breakpoint_return_the_original_byte() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    g.put(0x30010, &[0x55, 0x48, 0x89, 0xe5]);
    e.add_hook(
        &mut g,
        Target::Breakpoint {
            gva: 0x30010,
            gpa: 0,
            hidden: true,
        },
        "bp",
        answer(Verdict::Allowed),
    )
    .unwrap();
    g.put(0x30010, &[0xcc]); // what the VMM planted
    assert_eq!(
        g.rights.get(&0x30000),
        Some(&PageRights::AllTrapped),
        "reads of the page trap"
    );
    g.put(0x20000, &[0x8b, 0x00]); // mov eax, [rax]
    (g.regs.rax, g.regs.rip) = (0x30010, 0x20000);
    let (v, a) = handle_ept_violation(&mut e, &mut g, &read_exit(0x30010, 4, 0x20000));
    assert_eq!(v, Verdict::Allowed);
    assert_eq!(
        a,
        MemAction::Data(u32::from_le_bytes([0x55, 0x48, 0x89, 0xe5]) as u64)
    );
    assert_eq!(
        handle_breakpoint(&mut e, &mut g, 0x30010, 0x30010),
        BreakpointAction::StepOver
    );
    assert_eq!(
        handle_breakpoint(&mut e, &mut g, 0x40000, 0x40000),
        BreakpointAction::Reinject
    );
}

#[test]
fn toctou_the_decision_follows_the_reported_effect_not_rewritten_bytes() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    e.add_hook(
        &mut g,
        gpa_hook(0x10000, 8, Rights::W),
        "guard",
        Box::new(|ctx| match ctx.event {
            EventInfo::Mem {
                data: Some(0xbad), ..
            } => Outcome::block("bad value"),
            _ => Outcome::allow(),
        }),
    )
    .unwrap();
    // KVM executed `mov [rax], ecx` writing 0xbad, but another vCPU has already
    // replaced the bytes with NOPs by the time the engine looks.
    g.put(0x20000, &[0x90, 0x90]);
    g.regs.rax = 0x10000;
    let (v, a) = handle_ept_violation(&mut e, &mut g, &write_exit(0x10000, 4, 0xbad, 0x20002));
    assert_eq!(
        (v, a),
        (Verdict::NotAllowed, MemAction::Drop),
        "the bad write does not slip through"
    );
    assert_eq!(
        e.alerts()[0].instruction.as_deref(),
        Some("(instruction unverified)")
    );
    let (v, _) = handle_ept_violation(&mut e, &mut g, &write_exit(0x10000, 4, 0x600d, 0x20002));
    assert_eq!(v, Verdict::Allowed);
}

#[test]
fn dtr_xcr_introcall_and_timer() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    e.add_hook(
        &mut g,
        Target::Dtr { dtr: DtrKind::Idtr },
        "idtr",
        Box::new(|_| Outcome::block("IDTR moved")),
    )
    .unwrap();
    let (old, new) = (
        Dtr {
            base: 0x5000,
            limit: 0xfff,
        },
        Dtr {
            base: 0x6000,
            limit: 0xfff,
        },
    );
    g.sregs.idtr = new;
    assert_eq!(
        handle_dtr_violation(&mut e, &mut g, DtrKind::Idtr, old, new, Detection::Polled),
        Verdict::NotAllowed
    );
    assert_eq!(g.sregs.idtr, old);
    // The first load (base 0) is allowed without asking.
    assert_eq!(
        handle_dtr_violation(
            &mut e,
            &mut g,
            DtrKind::Idtr,
            Dtr::default(),
            new,
            Detection::Polled
        ),
        Verdict::Allowed
    );
    // Polling finds a CR4 change at the next exit and restores it; the baseline is
    // taken when the first CR hook is added.
    g.sregs.cr4 = 0x620 | 1 << 20;
    e.add_hook(
        &mut g,
        Target::Cr {
            cr: Cr::Cr4,
            mask: 1 << 20,
        },
        "smep",
        Box::new(|_| Outcome::block("SMEP off")),
    )
    .unwrap();
    g.sregs.cr4 = 0x620;
    poll_registers(&mut e, &mut g);
    assert_eq!(g.sregs.cr4, 0x620 | 1 << 20);
    let a = e.alerts().last().unwrap();
    assert!(matches!(
        a.event,
        EventInfo::Cr {
            detection: Detection::Polled,
            ..
        }
    ));
    assert!(
        a.instruction.is_none(),
        "a polled change has no known writer"
    );
    // XCR0 on the timer.
    e.add_hook(
        &mut g,
        Target::Xcr { index: 0 },
        "xcr",
        Box::new(|_| Outcome::block("no AVX")),
    )
    .unwrap();
    handle_timer(&mut e, &mut g);
    g.xcr0 = 7;
    handle_timer(&mut e, &mut g);
    assert_eq!(g.xcr0, 1);
    // Introcall: the first claimant answers.
    e.add_hook(
        &mut g,
        Target::Introcall { op: Some(5) },
        "ic",
        Box::new(|ctx| {
            ctx.answer_introcall(0x1234);
            Outcome::allow()
        }),
    )
    .unwrap();
    assert_eq!(handle_introcall(&mut e, &mut g, 5, [0; 3]), Some(0x1234));
    assert_eq!(handle_introcall(&mut e, &mut g, 6, [0; 3]), None);
}

#[test]
fn bad_hooks_are_refused() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    let err = |t| e_add(&mut Engine::new(), &mut MockGuest::new(), t);
    assert_eq!(
        err(gpa_hook(0x1000_0000, 8, Rights::W)),
        Err(crate::HookError::OutsideRam(0x1000_0000))
    );
    // A physical hook may span pages (one hook over many); past RAM it may not.
    assert!(err(gpa_hook(0x10ff8, 16, Rights::W)).is_ok());
    assert_eq!(
        err(gpa_hook(0x3ff000, 0x2000, Rights::W)),
        Err(crate::HookError::OutsideRam(0x3ff000))
    );
    assert_eq!(
        err(gpa_hook(0x10000, 0, Rights::W)),
        Err(crate::HookError::Empty)
    );
    assert_eq!(
        err(Target::Gva {
            gva: 0x7000_0000,
            len: 8,
            rights: Rights::W,
            cr3: 0,
            gpa: None
        }),
        Err(crate::HookError::Unmapped(0x7000_0000))
    );
    assert!(e.remove_hook(crate::HookId(99)).is_err());
    // A GVA hook follows its page when the guest remaps it (checked on the timer).
    let id = e
        .add_hook(
            &mut g,
            Target::Gva {
                gva: 0x50000,
                len: 8,
                rights: Rights::W,
                cr3: 0,
                gpa: None,
            },
            "gva",
            answer(Verdict::Allowed),
        )
        .unwrap();
    assert_eq!(g.rights.get(&0x50000), Some(&PageRights::WriteTrapped));
    g.map(0x50000, 0x60000);
    handle_timer(&mut e, &mut g);
    assert_eq!(g.rights.get(&0x60000), Some(&PageRights::WriteTrapped));
    assert_eq!(g.rights.get(&0x50000), None);
    assert!(matches!(
        e.hooks().get(id).unwrap().target,
        Target::Gva {
            gpa: Some(0x60000),
            ..
        }
    ));
}

fn e_add(e: &mut Engine, g: &mut MockGuest, t: Target) -> Result<crate::HookId, crate::HookError> {
    e.add_hook(g, t, "x", answer(Verdict::Allowed))
}

#[test]
fn locked_rmw_is_applied_atomically_against_a_concurrent_write() {
    // KVM read 5 and computed its result; meanwhile another vCPU stored 10.
    let cases: [(&[u8], u64, u64, u64, u64); 3] = [
        // lock add dword [rax], 1: KVM wrote 6 -> must become 11.
        (&[0xf0, 0x83, 0x00, 0x01], 6, 11, 0, 0),
        // lock xadd [rax], ecx with ecx = 3: KVM wrote 8 and set ecx = 5 -> 13, ecx = 10.
        (&[0xf0, 0x0f, 0xc1, 0x08], 8, 13, 5, 10),
        // lock cmpxchg [rax], ecx with eax = 5 (matched 5), ecx = 7: KVM wrote 7 ->
        // against 10 the compare fails: memory stays 10, eax = 10.
        (&[0xf0, 0x0f, 0xb1, 0x08], 7, 10, 7, 7),
    ];
    for (bytes, data, want_mem, rcx_before, want_rcx) in cases {
        let (mut e, mut g) = (Engine::new(), MockGuest::new());
        e.add_hook(
            &mut g,
            gpa_hook(0x10000, 4, Rights::W),
            "w",
            answer(Verdict::Allowed),
        )
        .unwrap();
        g.put(0x20000, bytes);
        (g.regs.rax, g.regs.rcx) = (0x10000, rcx_before);
        if bytes[2] == 0xb1 {
            g.regs.rax = 0x10000; // address in rax would clash with cmpxchg's eax
        }
        g.put(0x10000, &10u32.to_le_bytes());
        let x = write_exit(0x10000, 4, data, 0x20000 + bytes.len() as u64);
        if bytes[2] == 0xb1 {
            // cmpxchg uses rax as the comparand: address the memory through rbx instead.
            g.put(0x20000, &[0xf0, 0x0f, 0xb1, 0x0b]); // lock cmpxchg [rbx], ecx
            (g.regs.rbx, g.regs.rax, g.regs.rflags) = (0x10000, 5, 1 << 6);
        }
        let (_, a) = handle_ept_violation(&mut e, &mut g, &x);
        assert_eq!(a, MemAction::Drop, "the engine applied it itself");
        assert_eq!(
            u32::from_le_bytes(g.ram[0x10000..0x10004].try_into().unwrap()) as u64,
            want_mem,
            "{bytes:x?}"
        );
        assert_eq!(g.regs.rcx & 0xffff_ffff, want_rcx, "{bytes:x?}");
        if bytes[2] == 0xb1 {
            assert_eq!(g.regs.rax, 10, "cmpxchg reports the value it found");
            assert_eq!(
                g.regs.rflags & (1 << 6),
                0,
                "ZF cleared: the compare failed"
            );
        }
    }
}

#[test]
fn a_store_executed_again_is_a_new_event_for_its_hooks() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    let log = Arc::new(Mutex::new(vec![]));
    e.add_hook(
        &mut g,
        gpa_hook(0x10000, 8, Rights::W),
        "w",
        logged(&log, "w", Verdict::Allowed),
    )
    .unwrap();
    g.put(0x20000, &[0x89, 0x08]); // mov [rax], ecx, run three times in a loop
    g.regs.rax = 0x10000;
    for i in 0..3 {
        e.note_exit(0);
        handle_ept_violation(&mut e, &mut g, &write_exit(0x10000, 4, i, 0x20002));
    }
    assert_eq!(log.lock().unwrap().len(), 3, "each execution asks the hook");
    assert_eq!(e.recent().len(), 3);
}

#[test]
fn a_blocked_breakpoint_skips_the_original_instruction() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    // mov eax, [rax] (2 bytes) under the breakpoint, then push rbp.
    g.put(0x30010, &[0x8b, 0x00, 0x55]);
    e.add_hook(
        &mut g,
        Target::Breakpoint {
            gva: 0x30010,
            gpa: 0,
            hidden: false,
        },
        "bp",
        answer(Verdict::NotAllowed),
    )
    .unwrap();
    g.put(0x30010, &[0xcc]); // what the VMM planted
    g.regs.rip = 0x30010;
    assert_eq!(
        handle_breakpoint(&mut e, &mut g, 0x30010, 0x30010),
        BreakpointAction::Skip(2),
        "the length of the original instruction, not of the INT3"
    );
}

#[test]
fn each_handler_call_yields_its_own_record_with_two_vcpus() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    e.add_hook(
        &mut g,
        Target::Msr {
            index: 0x10,
            read: false,
            write: true,
        },
        "m",
        answer(Verdict::NotAllowed),
    )
    .unwrap();
    // vCPU 1's event is concluded between vCPU 0's call and the moment vCPU 0's
    // stop handler looks: `recent`'s newest record is vCPU 1's by then.
    g.vcpu = 0;
    handle_msr_violation(&mut e, &mut g, 0x10, Some(1));
    let mine = e.take_handled().expect("a hook fired");
    g.vcpu = 1;
    handle_msr_violation(&mut e, &mut g, 0x10, Some(2));
    assert_eq!(mine.vcpu, 0);
    assert_eq!(
        e.recent().back().unwrap().vcpu,
        1,
        "what the old re-read saw"
    );
    assert_eq!(e.take_handled().unwrap().vcpu, 1);
    // A call that concludes nothing (the guest's own INT3) yields nothing, not an
    // older record.
    handle_msr_violation(&mut e, &mut g, 0x10, Some(3));
    handle_breakpoint(&mut e, &mut g, 0x40000, 0x40000);
    e.take_handled();
    handle_breakpoint(&mut e, &mut g, 0x40000, 0x40000);
    assert!(e.take_handled().is_none());
}

#[test]
fn a_length_near_2_pow_64_does_not_wrap_into_a_small_range() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    let t = Target::Gpa {
        gpa: 0x20_0001,
        len: u64::MAX,
        rights: Rights::W,
    };
    let err = e
        .add_hook(&mut g, t, "wrap", answer(Verdict::Allowed))
        .unwrap_err();
    assert!(matches!(err, HookError::TooLarge(..)), "{err}");
    assert!(e.hooks().is_empty());
}

#[test]
fn one_hook_spans_many_pages_and_fires_on_any_of_them() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    let hits = std::sync::Arc::new(std::sync::Mutex::new(0));
    let h2 = hits.clone();
    let id = e
        .add_hook(
            &mut g,
            gpa_hook(0x10800, 0x3000, Rights::W),
            "wide",
            Box::new(move |_| {
                *h2.lock().unwrap() += 1;
                Outcome::allow()
            }),
        )
        .unwrap();
    e.commit(&mut g).unwrap();
    // Four pages trapped, each once; the page after the range is not.
    for p in [0x10000, 0x11000, 0x12000, 0x13000] {
        assert_eq!(g.rights.get(&p), Some(&PageRights::WriteTrapped), "{p:#x}");
    }
    assert_eq!(g.rights.get(&0x14000), None);
    // A write in the third page fires it; one below the range's start does not.
    g.put(0x20000, &[0x89, 0x08]); // mov [rax], ecx
    for (at, fires) in [(0x12010u64, true), (0x10400, false)] {
        (g.regs.rax, g.regs.rip) = (at, 0x20000);
        e.note_exit(0);
        let before = *hits.lock().unwrap();
        let _ = handle_ept_violation(&mut e, &mut g, &write_exit(at, 4, 0, 0x20000));
        assert_eq!(*hits.lock().unwrap() > before, fires, "{at:#x}");
    }
    e.remove_hook(id).unwrap();
    e.commit(&mut g).unwrap();
    assert!(g.rights.values().all(|r| *r == PageRights::Full) || g.rights.is_empty());
}

/// `--protect all` on a kernel that starts its second vCPU with INIT/SIPI: the
/// AP's reset state, its way through real and protected mode and its own LGDT and
/// LIDT are the kernel's set-up, not tampering (they used to be reverted and the
/// AP died); once it is set up, a rogue LIDT on it is denied as on vCPU 0.
#[test]
fn each_vcpu_is_judged_from_its_own_set_up() {
    let mut e = Engine::new();
    let mut g = MockGuest::new();
    g.vcpus = 2;
    let kernel_idt = Dtr {
        base: 0x20_0000,
        limit: 0xfff,
    };
    let kernel_gdt = Dtr {
        base: 0x20_1000,
        limit: 0x3f,
    };
    // vCPU 0 is set up when the policies arm.
    g.sregs.idtr = kernel_idt;
    g.sregs.gdtr = kernel_gdt;
    let bsp = g.sregs;
    for dtr in [DtrKind::Idtr, DtrKind::Gdtr] {
        e.add_hook(
            &mut g,
            Target::Dtr { dtr },
            "dtr",
            Box::new(|_| Outcome::block("reloaded")),
        )
        .unwrap();
    }
    e.add_hook(
        &mut g,
        Target::Cr {
            cr: Cr::Cr0,
            mask: 1 << 16,
        },
        "wp",
        Box::new(|_| Outcome::block("WP cleared")),
    )
    .unwrap();
    // vCPU 1 from its reset state to its own tables, polled at each step.
    g.vcpu = 1;
    let reset = crate::arch::SRegs {
        cr0: 0x6000_0010,
        idtr: Dtr {
            base: 0,
            limit: 0xffff,
        },
        ..Default::default()
    };
    let protected = crate::arch::SRegs {
        cr0: 0x11,
        gdtr: Dtr {
            base: 0x8100,
            limit: 0x17,
        },
        ..reset
    };
    let long = crate::arch::SRegs {
        cr0: 0x8005_0033,
        cr4: 0x620,
        efer: 0xd01,
        cr3: bsp.cr3,
        ..protected
    };
    let own_gdt = crate::arch::SRegs {
        gdtr: kernel_gdt,
        ..long
    };
    let done = crate::arch::SRegs {
        idtr: kernel_idt,
        ..own_gdt
    };
    for step in [reset, protected, long, own_gdt, done, done] {
        g.sregs = step;
        poll_registers(&mut e, &mut g);
        assert_eq!(g.sregs, step, "the AP's own set-up is left alone");
    }
    assert!(e.alerts().is_empty(), "no alert: {:?}", e.alerts());
    // Set up now: a rogue IDT on vCPU 1 is denied and put back.
    g.sregs.idtr = Dtr {
        base: 0x30_0000,
        limit: 0xfff,
    };
    poll_registers(&mut e, &mut g);
    assert_eq!(g.sregs.idtr, kernel_idt, "reverted");
    assert_eq!(e.alerts().len(), 1);
    assert_eq!(e.alerts()[0].vcpu, 1);
}

#[test]
fn a_hidden_breakpoint_in_a_debug_register_traps_no_page_and_is_still_ours() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    g.register_breakpoints = true;
    g.put(0x30010, &[0x55, 0x48, 0x89, 0xe5]);
    let target = Target::Breakpoint {
        gva: 0x30010,
        gpa: 0,
        hidden: true,
    };
    let id = e
        .add_hook(&mut g, target, "bp", answer(Verdict::Allowed))
        .unwrap();
    assert_eq!(
        g.rights.get(&0x30000),
        None,
        "no trapped page: nothing is patched"
    );
    assert!(g.breakpoints.contains(&0x30010));
    // Its hit is ours (not the guest's own INT3), and the code byte is what
    // memory holds.
    g.regs.rip = 0x30010;
    let act = handle_breakpoint(&mut e, &mut g, 0x30010, 0x30010);
    assert_eq!(act, BreakpointAction::StepOver);
    e.remove_hook(id).unwrap();
    e.commit(&mut g).unwrap();
    assert!(!g.breakpoints.contains(&0x30010));
    assert_eq!(g.rights.get(&0x30000), None);
}

#[test]
fn a_fetch_from_a_page_no_hook_executes_on_is_no_event() {
    // The page is trapped for a hidden INT3 (reads), not for execution.
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    g.put(0x30010, &[0x55]);
    e.add_hook(
        &mut g,
        Target::Breakpoint {
            gva: 0x30010,
            gpa: 0,
            hidden: true,
        },
        "bp",
        answer(Verdict::Allowed),
    )
    .unwrap();
    let fetch = MemExit {
        gpa: 0x30000,
        len: 1,
        access: AccessKind::Exec,
        data: None,
        rip: 0x30000,
    };
    let before = e.event_count();
    assert_eq!(
        handle_ept_violation(&mut e, &mut g, &fetch),
        (Verdict::Allowed, MemAction::Apply)
    );
    assert_eq!(e.event_count(), before, "no handler ran");
    assert!(e.take_handled().is_none());
    // With an execute hook on the page the fetch is an event again.
    e.add_hook(
        &mut g,
        gpa_hook(0x30000, 16, Rights::X),
        "x",
        answer(Verdict::Allowed),
    )
    .unwrap();
    handle_ept_violation(&mut e, &mut g, &fetch);
    assert_eq!(e.event_count(), before + 1);
}

/// Where the host reports no INT3, a visible breakpoint's page is
/// execute-trapped (no memslot: reads exit too), and a read of the INT3 still
/// sees the INT3; a hidden one's reads see the original byte, as everywhere.
#[test]
fn a_breakpoint_the_host_cannot_report_traps_its_page_and_stays_visible_if_asked() {
    for hidden in [false, true] {
        let (mut e, mut g) = (Engine::new(), MockGuest::new());
        g.int3_unreported = true;
        g.put(0x30010, &[0x55, 0x48, 0x89, 0xe5]);
        let target = Target::Breakpoint {
            gva: 0x30010,
            gpa: 0,
            hidden,
        };
        let id = e
            .add_hook(&mut g, target, "bp", answer(Verdict::Allowed))
            .unwrap();
        g.put(0x30010, &[0xcc]); // what the VMM planted
        assert_eq!(
            g.rights.get(&0x30000),
            Some(&PageRights::AllTrapped),
            "the fetch of the INT3 must exit (hidden: {hidden})"
        );
        g.put(0x20000, &[0x8b, 0x00]); // mov eax, [rax]
        (g.regs.rax, g.regs.rip) = (0x30010, 0x20000);
        let (_, a) = handle_ept_violation(&mut e, &mut g, &read_exit(0x30010, 1, 0x20000));
        let want = if hidden {
            MemAction::Data(0x55)
        } else {
            MemAction::Apply // the INT3 in memory
        };
        assert_eq!(a, want, "hidden: {hidden}");
        // The hit decodes the original instruction under the INT3.
        g.regs.rip = 0x30010;
        let act = handle_breakpoint(&mut e, &mut g, 0x30010, 0x30010);
        assert_eq!(act, BreakpointAction::StepOver);
        e.remove_hook(id).unwrap();
        e.commit(&mut g).unwrap();
        assert_eq!(g.rights.get(&0x30000), None, "the trap goes with it");
    }
}

/// The same act again folds into its first alert even when other acts come
/// between (a hot page cycled through 7 writers and gave 165 lines), and the
/// ids of the alerts listed stay 1, 2, 3.
#[test]
fn a_repeated_act_folds_into_its_alert_across_other_acts() {
    let (mut e, mut g) = (Engine::new(), MockGuest::new());
    e.add_hook(
        &mut g,
        gpa_hook(0x10000, 8, Rights::W),
        "w",
        answer(Verdict::NotAllowed),
    )
    .unwrap();
    e.add_hook(
        &mut g,
        Target::Msr {
            index: 0xc000_0082,
            read: false,
            write: true,
        },
        "m",
        answer(Verdict::NotAllowed),
    )
    .unwrap();
    g.put(0x20000, &[0x89, 0x08]);
    g.regs.rax = 0x10000;
    for _ in 0..3 {
        g.regs.rip = 0x20000;
        handle_ept_violation(&mut e, &mut g, &write_exit(0x10000, 4, 7, 0x20002));
        g.regs.rip = 0x30000;
        handle_msr_violation(&mut e, &mut g, 0xc000_0082, Some(1));
    }
    g.regs.rip = 0x40000;
    handle_msr_violation(&mut e, &mut g, 0xc000_0082, Some(2));
    let a = e.alerts();
    assert_eq!(a.len(), 3, "{a:?}");
    assert_eq!(a.iter().map(|a| a.id).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!((a[0].repeats, a[1].repeats, a[2].repeats), (2, 2, 0));
}
