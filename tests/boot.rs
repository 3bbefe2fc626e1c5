//! Boots every built-in image on real KVM and checks the exits the VMM delivers
//! and what the guest sees when the handler allows, drops or substitutes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use common::*;
use vmiscope_vmm::{Access, Event, MemAccess, PassThrough, Reply, StopReason, Vm};

fn boot(
    name: &str,
    setup: impl FnOnce(&Vm),
    handler: Arc<dyn vmiscope_vmm::ExitHandler>,
) -> vmiscope_vmm::RunOutcome {
    let img = vmiscope_images::find(name).unwrap();
    let cfg = config(img.vcpus);
    let vm = Vm::new(&cfg, img.elf).unwrap();
    setup(&vm);
    run(vm, handler, &cfg)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn every_image_but_the_misbehaving_ones_passes() {
    if !kvm_available() {
        return;
    }
    for img in vmiscope_images::IMAGES
        .iter()
        .filter(|i| i.kind != vmiscope_images::Kind::Test)
    {
        let out = boot(img.name, |_| {}, Arc::new(PassThrough));
        assert_eq!(
            out.reason,
            StopReason::GuestExit(0),
            "{}: {}",
            img.name,
            out.serial
        );
        assert!(
            out.serial
                .lines()
                .any(|l| l.contains("done") || l.contains("PASS") || l.contains("summary")),
            "{}",
            img.name
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ept_write_exits_once_per_write_and_allow_or_drop_decides_what_the_guest_sees() {
    if !kvm_available() {
        return;
    }
    for allow in [true, false] {
        let target = Arc::new(AtomicU32::new(0));
        let t = target.clone();
        let rec = Recorder::new(move |_, e| match e {
            Event::Mem(_) if allow => Reply::Continue,
            Event::Mem(_) => Reply::Drop,
            _ => Reply::Continue,
        });
        let out = boot(
            "ept-write",
            |vm| {
                let gpa = symbol("ept-write", "ept_target");
                t.store(gpa as u32, Ordering::SeqCst);
                vm.shared().protect_page(gpa, Access::WriteTrap).unwrap();
            },
            rec.clone(),
        );
        assert_eq!(out.reason, StopReason::GuestExit(0));
        let gpa = target.load(Ordering::SeqCst) as u64;
        let writes: Vec<MemAccess> = rec
            .events()
            .into_iter()
            .filter_map(|e| if let Event::Mem(m) = e { Some(m) } else { None })
            .collect();
        assert_eq!(writes.len(), 2, "{writes:x?}");
        assert_eq!(
            (
                writes[0].gpa,
                writes[0].len,
                writes[0].data,
                writes[0].write,
                writes[0].cpl
            ),
            (gpa, 4, 0xc0ffee00, true, 0)
        );
        assert_eq!(
            (writes[1].gpa, writes[1].len, writes[1].data, writes[1].cpl),
            (gpa + 8, 8, 0x1122334455667788, 3)
        );
        if allow {
            assert!(out.serial.contains("reads back c0ffee00"));
            assert!(out.serial.contains("reads back 1122334455667788"));
        } else {
            assert!(
                out.serial.contains("reads back 11111111\n"),
                "dropped u32 write"
            );
            assert!(
                out.serial.contains("reads back 2222222222222222"),
                "dropped u64 write"
            );
        }
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ept_read_trap_lets_the_vmm_supply_the_data() {
    if !kvm_available() {
        return;
    }
    let rec = Recorder::new(|_, e| match e {
        Event::Mem(m) if !m.write => Reply::Data(0xfeed_face_0000_0000 | m.cpl as u64),
        _ => Reply::Continue,
    });
    let out = boot(
        "ept-read",
        |vm| {
            vm.shared()
                .protect_page(symbol("ept-read", "ept_secret"), Access::AllTrap)
                .unwrap();
        },
        rec.clone(),
    );
    assert_eq!(out.reason, StopReason::GuestExit(0));
    assert!(
        out.serial.contains("cpl0 read feedface00000000"),
        "{}",
        out.serial
    );
    assert!(
        out.serial.contains("cpl3 read feedface00000003"),
        "{}",
        out.serial
    );
    let reads = rec
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Mem(m) if !m.write && m.len == 8))
        .count();
    assert_eq!(reads, 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ept_exec_trap_reports_the_fetch_and_the_instruction_still_runs() {
    if !kvm_available() {
        return;
    }
    let target = Arc::new(AtomicU32::new(0));
    let t = target.clone();
    let rec = Recorder::new(|_, _| Reply::Continue);
    let out = boot(
        "ept-exec",
        |vm| {
            let gpa = symbol("ept-exec", "exec_target");
            t.store(gpa as u32, Ordering::SeqCst);
            vm.shared().protect_page(gpa, Access::AllTrap).unwrap();
        },
        rec.clone(),
    );
    assert_eq!(out.reason, StopReason::GuestExit(0), "{}", out.serial);
    assert!(
        out.serial.contains("exec_target(20) = 41") && out.serial.contains("exec_target(30) = 61")
    );
    let gva = target.load(Ordering::SeqCst) as u64;
    let faults: Vec<(u64, u8)> = rec
        .events()
        .iter()
        .filter_map(|e| {
            if let Event::ExecFault { gva, cpl, .. } = e {
                Some((*gva, *cpl))
            } else {
                None
            }
        })
        .collect();
    assert!(faults.contains(&(gva, 0)), "{faults:x?}");
    assert!(faults.contains(&(gva, 3)), "{faults:x?}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn msr_writes_are_seen_then_applied_dropped_or_refused() {
    if !kvm_available() {
        return;
    }
    for (reply, expect) in [
        (
            Reply::Continue,
            "wrmsr ffffffff81c00000: ok, reads back ffffffff81c00000",
        ),
        (Reply::Drop, "wrmsr ffffffff81c00000: ok, reads back 0"),
        (Reply::Deny, "wrmsr ffffffff81c00000: #GP, reads back 0"),
    ] {
        let r = reply.clone();
        let rec = Recorder::new(move |_, e| {
            if matches!(e, Event::Msr { .. }) {
                r.clone()
            } else {
                Reply::Continue
            }
        });
        let out = boot(
            "msr",
            |vm| vm.shared().intercept_msr(0xc000_0082, false, true).unwrap(),
            rec.clone(),
        );
        assert_eq!(out.reason, StopReason::GuestExit(0));
        assert!(out.serial.contains(expect), "{reply:?}: {}", out.serial);
        // SYSENTER_EIP is not intercepted: applied by KVM itself.
        assert!(out.serial.contains("reads back ffffffff81c00100"));
        let msr: Vec<Event> = rec
            .events()
            .into_iter()
            .filter(|e| matches!(e, Event::Msr { .. }))
            .collect();
        assert_eq!(msr.len(), 1, "{msr:x?}");
        assert!(matches!(
            msr[0],
            Event::Msr {
                index: 0xc000_0082,
                write: Some(0xffff_ffff_81c0_0000),
                ..
            }
        ));
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn introcall_reaches_the_handler_from_cpl0_and_cpl3() {
    if !kvm_available() {
        return;
    }
    let rec = Recorder::new(|_, e| match e {
        Event::Introcall(c) => Reply::Data(c.op * 0x1000 + c.args.iter().sum::<u64>()),
        _ => Reply::Continue,
    });
    let out = boot("introcall", |_| {}, rec.clone());
    assert_eq!(out.reason, StopReason::GuestExit(0));
    assert!(
        out.serial.contains("cpl0 op 1 -> status 0 result "),
        "{}",
        out.serial
    );
    assert!(
        out.serial
            .contains(&format!("result {:x}\n", 0x1000 + 0x1234 + 0x5678 + 0x9abc))
    );
    assert!(
        out.serial
            .contains(&format!("cpl3 op 2 -> status 0 result {:x}", 0x2000 + 0x60))
    );
    let cpls: Vec<u8> = rec
        .events()
        .iter()
        .filter_map(|e| {
            if let Event::Introcall(c) = e {
                Some(c.cpl)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(cpls, [0, 3]);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn software_breakpoints_hit_and_the_guests_own_int3_is_reinjected() {
    if !kvm_available() || not_run_here(!host().int3_caught_at(0), NO_INT3_EXITS) {
        return;
    }
    let rec = Recorder::new(|_, _| Reply::Continue);
    let out = boot(
        "int3",
        |vm| {
            vm.shared()
                .insert_sw_breakpoint(symbol("int3", "bp_target"), None)
                .unwrap()
        },
        rec.clone(),
    );
    assert_eq!(out.reason, StopReason::GuestExit(0));
    assert!(
        out.serial.contains("bp_target sum 6"),
        "the breakpointed function still works"
    );
    assert!(out.serial.contains("guest handled 2 #BP"), "{}", out.serial);
    let bps: Vec<(bool, u8)> = rec
        .events()
        .iter()
        .filter_map(|e| {
            if let Event::Breakpoint { ours, cpl, .. } = e {
                Some((*ours, *cpl))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(bps.iter().filter(|b| b.0).count(), 3, "{bps:?}");
    assert!(
        bps.contains(&(false, 0)),
        "the guest's own CPL0 INT3 passes through the VMM: {bps:?}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn hardware_breakpoint_then_single_steps_visit_the_labelled_instructions() {
    if !kvm_available() || not_run_here(!host().dr_breakpoints_at(0), NO_DR_BREAKPOINTS) {
        return;
    }
    let img = vmiscope_images::find("step").unwrap();
    let cfg = config(1);
    let vm = Vm::new(&cfg, img.elf).unwrap();
    let (start, mid, end) = (
        symbol("step", "step_start"),
        symbol("step", "step_mid"),
        symbol("step", "step_end"),
    );
    let steps = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = steps.clone();
    let rec = Recorder::new(move |cpu, e| {
        match e {
            Event::Breakpoint { .. } | Event::Kicked => {}
            Event::HwBreakpoint { rip, .. } => {
                assert_eq!(*rip, start);
                cpu.set_hw_breakpoint(0, None);
                cpu.set_single_step(true);
            }
            Event::SingleStep { rip } => {
                let mut v = s.lock().unwrap();
                v.push(*rip);
                if v.len() == 4 {
                    cpu.set_single_step(false);
                }
            }
            _ => {}
        }
        Reply::Continue
    });
    vm.shared().set_hw_breakpoint(0, Some(start));
    let out = run(vm, rec.clone(), &cfg);
    assert_eq!(out.reason, StopReason::GuestExit(0));
    let v = steps.lock().unwrap().clone();
    assert_eq!(v.len(), 4, "{v:x?}");
    assert_eq!(v[1], mid);
    assert_eq!(v[3], end);
    assert!(
        rec.events()
            .iter()
            .any(|e| matches!(e, Event::HwBreakpoint { .. }))
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn two_vcpus_both_run() {
    if !kvm_available() {
        return;
    }
    let out = boot("smp", |_| {}, Arc::new(PassThrough));
    assert_eq!(out.reason, StopReason::GuestExit(0));
    assert!(out.serial.contains("smp: cpu 1 up") && out.serial.contains("all 2 cpus up"));
    assert_eq!(out.exits_per_vcpu.len(), 2);
    assert!(
        out.exits_per_vcpu.iter().all(|n| *n > 0),
        "{:?}",
        out.exits_per_vcpu
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn pause_and_resume_a_vcpu_spinning_at_cpl3() {
    if !kvm_available() {
        return;
    }
    let cfg = config(1);
    let vm = Vm::new(&cfg, image("hang")).unwrap();
    let shared = vm.shared().clone();
    let t = std::thread::spawn(move || vm.run(Arc::new(PassThrough), &cfg));
    // Paused, again and again, until the guest is in its user loop (its set-up
    // at CPL0 comes first; a pause sent before its thread exists is not seen,
    // so each try is bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        shared.pause_all();
        if shared.wait_paused(std::time::Duration::from_millis(100))
            && shared.last_position(0).unwrap().1 == 3
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never paused at CPL3");
        shared.resume_all();
    }
    // Then resumed and paused in that loop, twice: a CPL3 loop never stops a pause.
    let running = |_, s| s == vmiscope_vmm::VcpuState::Running;
    for _ in 0..2 {
        shared.resume_all();
        assert!(shared.wait_states(std::time::Duration::from_secs(5), running));
        shared.pause_all();
        assert!(
            shared.wait_paused(std::time::Duration::from_secs(5)),
            "a CPL3 loop must not stop a pause"
        );
        let (rip, cpl) = shared.last_position(0).unwrap();
        assert_eq!(cpl, 3, "paused in the user loop at {rip:#x}");
    }
    shared.stop(StopReason::User);
    let out = t.join().unwrap();
    assert_eq!(out.reason, StopReason::User);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dtr_cr_and_xcr_images_see_their_register_writes() {
    if !kvm_available() {
        return;
    }
    let cr = boot("cr", |_| {}, Arc::new(PassThrough));
    assert!(
        cr.serial.contains("cleared CR0.WP (ok), cr0 now 80040033"),
        "{}",
        cr.serial
    );
    let dtr = boot("dtr", |_| {}, Arc::new(PassThrough));
    assert!(
        dtr.serial.contains("lidt 207000 (ok), idtr now 207000")
            || dtr.serial.contains("(ok), idtr now"),
        "{}",
        dtr.serial
    );
    let xcr = boot("xcr", |_| {}, Arc::new(PassThrough));
    if !host().debug().xsetbv {
        // XSAVE is hidden from the guest where KVM never sees XSETBV (the
        // rig): the image, as an OS does, leaves CR4.OSXSAVE alone.
        assert!(
            xcr.serial.contains("(xsave 0)") && xcr.serial.contains("no XSAVE in CPUID"),
            "{}",
            xcr.serial
        );
        return;
    }
    assert!(
        xcr.serial.contains("xsetbv xcr0 <- 3 (ok), xcr0 now 3"),
        "{}",
        xcr.serial
    );
    assert!(
        xcr.serial.contains("xsetbv xcr0 <- 0 (fault)"),
        "XCR0 without x87 is refused"
    );
    // The VMM completes XGETBV at CPL0 on PVM; the CPU's checks come first: it
    // used to answer XCR0 with OSXSAVE clear, and to stop the run on an unknown
    // XCR.
    assert!(
        xcr.serial.contains("xgetbv with OSXSAVE clear: fault 6"),
        "#UD: {}",
        xcr.serial
    );
    assert!(
        xcr.serial.contains("xgetbv of XCR 0x55: fault 13"),
        "#GP: {}",
        xcr.serial
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn without_the_irqchip_a_finished_vcpu_halts_to_the_vmm() {
    if !kvm_available() {
        return;
    }
    let cfg = vmiscope_vmm::VmConfig {
        irqchip: false,
        ..config(2)
    };
    let vm = Vm::new(&cfg, image("smp")).unwrap();
    let rec = Recorder::new(|_, _| Reply::Continue);
    let out = run(vm, rec.clone(), &cfg);
    assert_eq!(out.reason, StopReason::GuestExit(0));
    let halts: Vec<u32> = rec
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| matches!(e, Event::Halt))
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(halts, [1], "vCPU 1 halts after checking in");
}
