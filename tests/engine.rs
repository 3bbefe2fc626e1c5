//! The introspection engine on real KVM: every HVMI handler with its alert and the
//! guest-visible outcome; the demo end to end; exceptions; TOCTOU across vCPUs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{host, kvm_available, not_run_here, symbol};
use vmiscope_introspect::policy::PolicyEnv;
use vmiscope_introspect::{Alert, Class, Cr, Engine, EventInfo, Guest, Outcome, Rights, Target};
use vmiscope_monitor::Introspection;
use vmiscope_vmm::{StopReason, Vm, VmConfig};

fn cfg(vcpus: u32) -> VmConfig {
    VmConfig {
        vcpus,
        timeout: Some(Duration::from_secs(60)),
        tick: Duration::from_millis(50),
        ..VmConfig::default()
    }
}

/// Runs `image` with an engine whose setup `ready` runs once the guest is up.
fn run(
    image: &str,
    patch: &[(&str, u64)],
    ready: impl FnOnce(&mut Engine, &mut dyn Guest) + Send + 'static,
) -> (String, Vec<Alert>, StopReason) {
    let img = vmiscope_images::find(image).unwrap();
    let c = cfg(img.vcpus);
    let vm = Vm::new(&c, img.elf).unwrap();
    for (sym, v) in patch {
        vm.shared()
            .ram()
            .write(symbol(image, sym), &v.to_le_bytes())
            .unwrap();
    }
    let mut intro = Introspection::new(Engine::new(), vec![], PolicyEnv::default());
    intro.timer_period = Duration::from_millis(50);
    intro.on_ready(Box::new(ready));
    let intro = Arc::new(intro);
    let out = vm.run(intro.clone(), &c);
    eprintln!("--- serial ---\n{}--- {} ---", out.serial, out.reason);
    (out.serial, intro.alerts(), out.reason)
}

fn block(why: &'static str) -> vmiscope_introspect::Callback {
    Box::new(move |_| Outcome::block(why))
}

fn sym(image: &str, name: &str) -> u64 {
    vmiscope_monitor::Symbols::parse(vmiscope_images::find(image).unwrap().elf)
        .get(name)
        .unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ept_violation_blocks_one_write_and_allows_another() {
    if !kvm_available() {
        return;
    }
    let target = sym("ept-write", "ept_target");
    let (serial, alerts, reason) = run("ept-write", &[], move |e, g| {
        let cb = Box::new(|ctx: &mut vmiscope_introspect::Ctx<'_>| match ctx.event {
            EventInfo::Mem {
                data: Some(0xc0ffee00),
                ..
            } => Outcome::block("magic value"),
            _ => Outcome::allow(),
        });
        e.add_hook(
            g,
            Target::Gpa {
                gpa: target,
                len: 16,
                rights: Rights::W,
            },
            "guard",
            cb,
        )
        .unwrap();
    });
    assert_eq!(reason, StopReason::GuestExit(0));
    assert!(
        serial.contains("reads back 11111111\n"),
        "blocked u32 write"
    );
    assert!(
        serial.contains("reads back 1122334455667788"),
        "allowed u64 write"
    );
    assert_eq!(alerts.len(), 1);
    let a = &alerts[0];
    assert_eq!((a.class, a.cpl), (Class::Ept, 0));
    assert!(matches!(a.event, EventInfo::Mem { gpa, size: 4, .. } if gpa == target));
    assert!(
        a.instruction
            .as_deref()
            .unwrap()
            .starts_with("mov dword ptr"),
        "{:?}",
        a.instruction
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn msr_violation_drops_a_write_and_alerts() {
    if !kvm_available() {
        return;
    }
    let (serial, alerts, _) = run("msr", &[], |e, g| {
        e.add_hook(
            g,
            Target::Msr {
                index: 0x176,
                read: false,
                write: true,
            },
            "sysenter",
            block("SYSENTER_EIP"),
        )
        .unwrap();
    });
    assert!(
        serial.contains("wrmsr ffffffff81c00100: ok, reads back 0"),
        "dropped"
    );
    assert!(
        serial.contains("reads back ffffffff81c00000"),
        "LSTAR untouched by the hook"
    );
    assert_eq!(alerts.len(), 1);
    assert!(matches!(
        alerts[0].event,
        EventInfo::Msr {
            index: 0x176,
            write: Some(0xffff_ffff_81c0_0100)
        }
    ));
    assert_eq!(alerts[0].instruction.as_deref(), Some("wrmsr"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn cr_write_is_polled_and_restored() {
    if !kvm_available() {
        return;
    }
    let (serial, alerts, _) = run("cr", &[], |e, g| {
        vmiscope_introspect::policy::enable(
            e,
            g,
            &[vmiscope_introspect::Policy::Cr0Wp],
            &PolicyEnv::default(),
        )
        .unwrap();
    });
    assert!(serial.contains("cr0 after an exit 80050033"), "WP put back");
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert!(matches!(
        alerts[0].event,
        EventInfo::Cr {
            cr: Cr::Cr0,
            detection: vmiscope_introspect::Detection::Polled,
            ..
        }
    ));
    assert!(
        alerts[0].instruction.is_none(),
        "polled: the writer is unknown"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dtr_load_is_polled_and_restored() {
    if !kvm_available() {
        return;
    }
    let (serial, alerts, _) = run("dtr", &[], |e, g| {
        e.add_hook(
            g,
            Target::Dtr {
                dtr: vmiscope_introspect::DtrKind::Idtr,
            },
            "idtr",
            block("IDTR"),
        )
        .unwrap();
    });
    let line = serial
        .lines()
        .find(|l| l.contains("idtr after an exit"))
        .unwrap();
    assert!(
        !line.ends_with("207000"),
        "the rogue IDTR was undone: {line}"
    );
    assert_eq!(
        alerts.iter().filter(|a| a.class == Class::Dtr).count(),
        1,
        "{alerts:#?}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn xcr_write_is_caught_on_the_timer() {
    if !kvm_available() || not_run_here(!host().debug().xsetbv, common::NO_XSETBV) {
        return;
    }
    let (serial, alerts, _) = run("xcr", &[("xcr_spin", 8_000_000_000)], |e, g| {
        e.add_hook(g, Target::Xcr { index: 0 }, "xcr0", block("XCR0 changed"))
            .unwrap();
    });
    assert!(
        serial.contains("xcr0 after a timer tick 1\n"),
        "XCR0 put back by the timer"
    );
    assert!(
        alerts
            .iter()
            .any(|a| matches!(a.event, EventInfo::Xcr { old: 1, new: 3, .. })),
        "{alerts:#?}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn introcall_is_answered_by_its_hook() {
    if !kvm_available() {
        return;
    }
    let (serial, alerts, _) = run("introcall", &[], |e, g| {
        e.add_hook(
            g,
            Target::Introcall { op: Some(1) },
            "op1",
            Box::new(|ctx| {
                if let EventInfo::Introcall { args, .. } = ctx.event {
                    ctx.answer_introcall(args[0] + args[1]);
                }
                Outcome::allow()
            }),
        )
        .unwrap();
        e.add_hook(
            g,
            Target::Introcall { op: Some(2) },
            "op2",
            block("op 2 refused"),
        )
        .unwrap();
    });
    assert!(
        serial.contains(&format!(
            "cpl0 op 1 -> status 0 result {:x}",
            0x1234 + 0x5678
        )),
        "{serial}"
    );
    assert!(serial.contains("cpl3 op 2 -> status 0 result 0"));
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].cpl, 3);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_blocked_breakpoint_skips_the_instruction_under_it() {
    if !kvm_available() {
        return;
    }
    // bp_target is `lea rax, [rdi+1]; ret`: with the LEA skipped each call returns
    // whatever RAX held, so the guest's sum is not 1+2+3 and it exits with 1.
    let target = sym("int3", "bp_target");
    let (serial, alerts, reason) = run("int3", &[], move |e, g| {
        let t = Target::Breakpoint {
            gva: target,
            gpa: 0,
            hidden: true,
        };
        e.add_hook(g, t, "bp", block("bp_target blocked")).unwrap();
    });
    assert!(!serial.contains("bp_target sum 6"), "the LEA ran: {serial}");
    assert_eq!(reason, StopReason::GuestExit((1 << 1) | 1));
    // The same act three times: one alert, folded with a count.
    let acts: u64 = alerts.iter().map(|a| a.repeats + 1).sum();
    assert_eq!(acts, 3, "one act per blocked call");
    assert!(alerts.iter().all(|a| a.reason == "bp_target blocked"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn breakpoint_hook_fires_and_hides_its_int3() {
    if !kvm_available() {
        return;
    }
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let target = sym("int3", "bp_target");
    let (serial, _, reason) = run("int3", &[], move |e, g| {
        e.add_hook(
            g,
            Target::Breakpoint {
                gva: target,
                gpa: 0,
                hidden: true,
            },
            "bp",
            Box::new(move |_| {
                h.fetch_add(1, Ordering::SeqCst);
                Outcome::allow()
            }),
        )
        .unwrap();
    });
    assert_eq!(reason, StopReason::GuestExit(0));
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert!(serial.contains("bp_target sum 6"));
    assert!(
        serial.contains("first byte of bp_target 48"),
        "the guest reads the original byte, not 0xcc"
    );
    assert!(
        serial.contains("guest handled 2 #BP"),
        "the guest's own INT3s still reach it"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn timer_finds_an_integrity_violation_and_restores_it() {
    if !kvm_available() {
        return;
    }
    let img = vmiscope_images::find("hang").unwrap();
    let c = cfg(1);
    let vm = Vm::new(&c, img.elf).unwrap();
    let gdt = symbol("hang", "rt_gdt");
    let shared = vm.shared().clone();
    let mut intro = Introspection::new(Engine::new(), vec![], PolicyEnv::default());
    intro.timer_period = Duration::from_millis(50);
    intro.on_ready(Box::new(move |e, g| {
        e.add_integrity_region(g, "gdt", gdt, 40, true, block("GDT modified"))
            .unwrap();
    }));
    let intro = Arc::new(intro);
    let i2 = intro.clone();
    let t = std::thread::spawn(move || vm.run(i2, &c));
    // The region is armed once the guest runs on its own IDT.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while intro.armed() > 0 {
        assert!(std::time::Instant::now() < deadline, "never armed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut orig = [0u8; 8];
    shared.ram().read(gdt + 8, &mut orig).unwrap();
    shared.ram().write(gdt + 8, &[0xee; 8]).unwrap(); // a "rootkit" patches the GDT
    let mut found = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(20));
        if !intro.alerts().is_empty() {
            found = true;
            break;
        }
    }
    let mut now = [0u8; 8];
    shared.ram().read(gdt + 8, &mut now).unwrap();
    shared.stop(StopReason::User);
    t.join().unwrap();
    assert!(found, "no integrity alert");
    assert!(matches!(intro.alerts()[0].event, EventInfo::Integrity { gva, .. } if gva == gdt));
    assert_eq!(now, orig, "restored");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_store_rewritten_by_another_vcpu_never_reaches_the_guarded_page() {
    if !kvm_available() {
        return;
    }
    let guarded = sym("toctou", "guarded");
    let (serial, alerts, reason) = run("toctou", &[], move |e, g| {
        e.add_hook(
            g,
            Target::Gpa {
                gpa: guarded,
                len: 4,
                rights: Rights::W,
            },
            "guard",
            block("guarded page"),
        )
        .unwrap();
    });
    assert_eq!(reason, StopReason::GuestExit(0));
    assert!(
        serial.contains("guarded 600d after"),
        "a write slipped through: {serial}"
    );
    assert!(
        !alerts.is_empty(),
        "the race never hit the guarded page (vCPU 1 flips too slowly?)"
    );
    assert!(
        alerts
            .iter()
            .all(|a| matches!(a.event, EventInfo::Mem { gpa, .. } if gpa == guarded))
    );
    // Each alert names an instruction that really writes there, or says it cannot.
    for a in &alerts {
        let i = a.instruction.as_deref().unwrap();
        assert!(
            i == "mov [rdi],edx" || i == "(instruction unverified)",
            "{i}"
        );
    }
}

fn vmiscope(args: &[&str]) -> (Option<i32>, String, String) {
    common::vmiscope_cli(env!("CARGO_BIN_EXE_vmiscope"), args)
}

fn journal_alerts(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every journal line is JSON"))
        .filter(|v| v["type"] == "alert")
        .collect()
}

const ACTS: [(&str, &str); 6] = [
    ("idt-entry", "ept"),
    ("syscall-table", "ept"),
    ("lstar", "msr"),
    ("cr4-smep", "cr"),
    ("idtr", "dtr"),
    ("user-page", "ept"),
];

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn demo_every_act_blocked_with_one_alert_or_allowed_in_log_only_mode() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmiscope-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for log_only in [false, true] {
        let j = dir.join(format!("j{log_only}.jsonl"));
        let mut args = vec![
            "run",
            "demo",
            "--batch",
            "--protect",
            "all",
            "--journal",
            j.to_str().unwrap(),
        ];
        if log_only {
            args.push("--log-only");
        }
        let (code, out, _) = vmiscope(&args);
        assert_eq!(code, Some(0));
        let alerts = journal_alerts(&j);
        let classes: Vec<&str> = alerts
            .iter()
            .map(|a| a["class"].as_str().unwrap())
            .collect();
        assert_eq!(classes, ACTS.map(|a| a.1), "one alert per act, in order");
        for (act, _) in ACTS {
            let want = if log_only { "succeeded" } else { "blocked" };
            assert!(
                out.contains(&format!("demo: act {act}: {want}")),
                "{act} {want}"
            );
        }
        assert!(alerts.iter().all(|a| a["enforced"] == !log_only));
    }
    // An exception for the LSTAR write lets that act through, silently.
    let ex = dir.join("ex.json");
    std::fs::write(
        &ex,
        r#"{"rules": [{"class": "msr", "msr": 3221225602, "comment": "allow LSTAR"}]}"#,
    )
    .unwrap();
    let j = dir.join("jex.jsonl");
    let (code, out, _) = vmiscope(&[
        "run",
        "demo",
        "--batch",
        "--protect",
        "all",
        "--exceptions",
        ex.to_str().unwrap(),
        "--journal",
        j.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("demo: act lstar: succeeded"));
    assert!(out.contains("summary: 1 succeeded, 5 blocked"));
    let classes: Vec<String> = journal_alerts(&j)
        .iter()
        .map(|a| a["class"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(classes, ["ept", "ept", "cr", "dtr", "ept"]);
    // Malformed exception files are refused before the guest starts.
    for (text, want) in [
        ("{\"rules\": [", "line 1"),
        (
            "{\"rules\": [{\"class\": \"msr\", \"msrr\": 1}]}",
            "unknown field",
        ),
    ] {
        std::fs::write(&ex, text).unwrap();
        let (code, _, err) = vmiscope(&[
            "run",
            "demo",
            "--batch",
            "--exceptions",
            ex.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(2));
        assert!(err.contains(want), "{err}");
    }
    let (code, _, err) = vmiscope(&["run", "demo", "--batch", "--protect", "idt,bogus"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown policy `bogus`"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Counts the guest's exits and the fetch faults of read-trapped pages.
struct CountingExits {
    intro: Arc<Introspection>,
    exits: std::sync::atomic::AtomicU64,
    fetches: std::sync::atomic::AtomicU64,
}

impl vmiscope_vmm::ExitHandler for CountingExits {
    fn on_event(
        &self,
        cpu: &mut vmiscope_vmm::VcpuCtl<'_>,
        e: &vmiscope_vmm::Event,
    ) -> vmiscope_vmm::Reply {
        if matches!(e, vmiscope_vmm::Event::ExecFault { .. }) {
            self.fetches.fetch_add(1, Ordering::SeqCst);
        }
        self.intro.on_event(cpu, e)
    }
    fn on_exit(
        &self,
        cpu: &mut vmiscope_vmm::VcpuCtl<'_>,
    ) -> Result<(), vmiscope_vmm::HandlerStop> {
        self.exits.fetch_add(1, Ordering::SeqCst);
        self.intro.on_exit(cpu)
    }
}

/// `spin` mode 8 (`spin_hot`: `add; dec; jnz`, `n` times) with every debug
/// register taken, so a hidden breakpoint at `at` is an INT3 on a read-trapped
/// page; `hits` counts its hits. Checks the loop's result; returns the guest's
/// exits and the fetch faults the engine was asked about.
fn hot_loop_beyond_the_slots(n: u64, at: &str, hits: Arc<AtomicU32>) -> (u64, u64) {
    let img = vmiscope_images::find("spin").unwrap();
    let c = cfg(1);
    let vm = Vm::new(&c, img.elf).unwrap();
    let ram = vm.shared().ram();
    ram.write(symbol("spin", "spin_mode"), &8u64.to_le_bytes())
        .unwrap();
    ram.write(symbol("spin", "spin_count"), &n.to_le_bytes())
        .unwrap();
    while vm.shared().claim_hw_breakpoint(0xdead_0000).is_some() {}
    let target = symbol("spin", at);
    let intro = Introspection::new(Engine::new(), vec![], PolicyEnv::default());
    intro.on_ready(Box::new(move |e, g| {
        let t = Target::Breakpoint {
            gva: target,
            gpa: 0,
            hidden: true,
        };
        let h = hits.clone();
        let count: vmiscope_introspect::Callback = Box::new(move |_| {
            h.fetch_add(1, Ordering::SeqCst);
            Outcome::allow()
        });
        e.add_hook(g, t, "bp", count).unwrap();
    }));
    let h = Arc::new(CountingExits {
        intro: Arc::new(intro),
        exits: Default::default(),
        fetches: Default::default(),
    });
    let out = vm.run(h.clone(), &c);
    assert_eq!(out.reason, StopReason::GuestExit(0), "{}", out.serial);
    let sum = format!("spin: spin_hot {}", n * (n + 1) / 2);
    assert!(out.serial.contains(&sum), "{}", out.serial);
    (
        h.exits.load(Ordering::SeqCst),
        h.fetches.load(Ordering::SeqCst),
    )
}

/// Code that shares its page with a hidden INT3 (no debug register free) faults
/// at every fetch; the VMM completes it and goes on with the instructions after
/// it on that page without entering the guest, each one its own fetch event:
/// far fewer exits than instructions, the same result.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_hot_page_with_a_hidden_breakpoint_runs_in_runs_of_instructions() {
    if !kvm_available() {
        return;
    }
    let n = 3000;
    let hits = Arc::new(AtomicU32::new(0));
    let (exits, fetches) = hot_loop_beyond_the_slots(n, "spin_hot_bp", hits.clone());
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "spin_hot_bp is never called"
    );
    assert!(
        fetches >= 3 * n,
        "every instruction of the loop is a fetch event: {fetches}"
    );
    assert!(
        exits * 4 < fetches,
        "{exits} exits for {fetches} fetches: one exit per instruction"
    );
}

/// A run of instructions stops at a hidden INT3 on its page: the breakpoint
/// inside the loop is hit at every iteration.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_hidden_breakpoint_inside_the_hot_loop_is_hit_every_time() {
    if !kvm_available() {
        return;
    }
    let n = 200;
    let hits = Arc::new(AtomicU32::new(0));
    hot_loop_beyond_the_slots(n, "spin_hot_dec", hits.clone());
    assert_eq!(hits.load(Ordering::SeqCst), n as u32);
}

/// A hook edit is VM-wide: added from the test's thread while both vCPUs spin
/// in user code, it goes in without any vCPU running a task for it (the tasks
/// each vCPU has run are counted before and after), and then fires on both.
/// Before hook edits went through `VmWide`, an edit was a task one vCPU had to
/// run and answer ("vCPU N did not answer").
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_hook_goes_in_while_every_vcpu_runs_with_no_vcpu_answering() {
    if !kvm_available() {
        return;
    }
    let img = vmiscope_images::find("spin").unwrap();
    let c = cfg(2);
    let vm = Vm::new(&c, img.elf).unwrap();
    let page = symbol("spin", "spin_page");
    let count = symbol("spin", "spin_count");
    // Mode 0 (the default): every vCPU writes spin_page at CPL3, here for good.
    vm.shared()
        .ram()
        .write(count, &u64::MAX.to_le_bytes())
        .unwrap();
    let shared = vm.shared().clone();
    let intro = Arc::new(Introspection::new(
        Engine::new(),
        vec![],
        PolicyEnv::default(),
    ));
    let i2 = intro.clone();
    let t = std::thread::spawn(move || vm.run(i2, &c));
    // Both vCPUs in the write loop: the guest says so, then each runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !shared.serial().text().contains("spin: mode 0") {
        assert!(std::time::Instant::now() < deadline, "spin never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let running = |_, s| s == vmiscope_vmm::VcpuState::Running;
    assert!(shared.wait_states(Duration::from_secs(5), running));
    let tasks = |s: &vmiscope_vmm::VmShared| [0, 1].map(|v| s.tasks_started(v));
    let before = tasks(&shared);
    let seen = Arc::new(AtomicU32::new(0));
    let s2 = seen.clone();
    let target = Target::Gpa {
        gpa: page,
        len: 64,
        rights: Rights::W,
    };
    let cb: vmiscope_introspect::Callback = Box::new(move |ctx| {
        s2.fetch_or(1 << ctx.guest.vcpu(), Ordering::SeqCst);
        Outcome::allow()
    });
    let id = intro.add_hook(&shared, 0, target, "w", cb);
    assert!(id.is_ok(), "{id:?}");
    assert_eq!(tasks(&shared), before, "a vCPU ran a task for the edit");
    // It fires on both vCPUs.
    while seen.load(Ordering::SeqCst) != 0b11 {
        assert!(
            std::time::Instant::now() < deadline,
            "the hook fired on vCPUs {:#b} only",
            seen.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // And it comes out the same way.
    intro.remove_hook(&shared, id.unwrap()).unwrap();
    assert_eq!(tasks(&shared), before, "a vCPU ran a task for the removal");
    shared.stop(StopReason::User);
    assert_eq!(t.join().unwrap().reason, StopReason::User);
}
