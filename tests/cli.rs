//! The command-line contract: `images`, `run --batch` for every image, multiboot
//! with modules, `caps` and `bench`.

mod common;

use common::kvm_available;

fn vmiscope(args: &[&str]) -> (Option<i32>, String, String) {
    common::vmiscope_cli(env!("CARGO_BIN_EXE_vmiscope"), args)
}

#[test]
fn images_lists_and_exports_every_image() {
    let (code, out, _) = vmiscope(&["images"]);
    assert_eq!(code, Some(0));
    for name in [
        "hello",
        "ept-write",
        "ept-read",
        "ept-exec",
        "msr",
        "cr",
        "dtr",
        "xcr",
        "introcall",
        "int3",
        "step",
        "smp",
        "spin",
        "demo",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} missing"
        );
    }
    let dir = std::env::temp_dir().join(format!("vmiscope-export-{}", std::process::id()));
    let (code, out, err) = vmiscope(&["images", "--export", dir.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    // An export says what it wrote; it does not reprint the table.
    assert!(
        err.contains("wrote") && !out.contains("WHAT IT DOES"),
        "{out}{err}"
    );
    let elf = std::fs::read(dir.join("int3.elf")).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn run_batch_exits_zero_for_hello_and_every_event_image() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = vmiscope(&["run", "hello", "--batch"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("Hello from the vmiscope guest"));
    assert!(
        err.contains("[vmiscope] exits: io="),
        "per-class summary: {err}"
    );
    assert!(err.contains("[vmiscope] stop: guest exited with status 0"));
    for i in vmiscope_images::IMAGES
        .iter()
        .filter(|i| i.kind == vmiscope_images::Kind::EventClass)
    {
        let (code, _, err) = vmiscope(&["run", i.name, "--batch", "--timeout", "60"]);
        assert_eq!(code, Some(0), "{}: {err}", i.name);
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn multiboot_gets_its_command_line_modules_and_fw_cfg() {
    if !kvm_available() {
        return;
    }
    let m = std::env::temp_dir().join(format!("vmiscope-mod-{}", std::process::id()));
    std::fs::write(&m, b"initrd payload from the host").unwrap();
    let (code, out, _) = vmiscope(&[
        "run",
        "multiboot",
        "--batch",
        "--vcpus",
        "2",
        "--mem",
        "64",
        "--cmdline",
        "console=ttyS0 quiet",
        "--module",
        m.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&m);
    assert_eq!(code, Some(0));
    assert!(out.contains("magic 2badb002 (ok)"));
    assert!(out.contains("cmdline 'console=ttyS0 quiet'"));
    assert!(
        out.contains("1 module(s)") && out.contains("'initrd payload from the host'"),
        "{out}"
    );
    assert!(out.contains("mem_upper 64512 KiB"));
    assert!(
        out.contains("fw_cfg signature QEMU, 2 cpu(s), 64 MiB"),
        "{out}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn caps_reports_each_mechanism_consistently_with_the_host() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = vmiscope(&["caps", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = |m: &str| {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["mechanism"] == m)
            .unwrap_or_else(|| panic!("{m}"))
            .clone()
    };
    for m in ["EPT write", "EPT read", "EPT execute", "introcall"] {
        assert_eq!(row(m)["cpl0"], "exact", "{m}");
        assert_eq!(row(m)["cpl3"], "exact", "{m}");
    }
    assert_eq!(row("MSR")["cpl0"], "exact");
    for m in ["CR write", "DTR load (LIDT/LGDT)"] {
        assert_eq!(row(m)["cpl0"], "polled", "KVM has no exit for {m}");
    }
    // The start-up probe (a scratch VM) and the rows (the built-in images run)
    // are two measurements: they must agree.
    let host = vmiscope_vmm::Host::detect();
    let xcr = if host.debug().xsetbv {
        "polled"
    } else {
        "unavailable"
    };
    assert_eq!(row("XCR write (XSETBV)")["cpl0"], xcr);
    let int3 = if host.debug().int3_at(0).reaches_vmm() {
        "exact"
    } else {
        "unavailable"
    };
    assert_eq!(row("INT3 breakpoint")["cpl0"], int3);
    // Each debugger feature's mechanism (the VMM's own choice) must be one the
    // rows measured working at that CPL, and "unavailable" only where none did.
    let exact = |m: &str, cpl: &str| row(m)[cpl] == "exact";
    let features = v["features"].as_array().unwrap();
    assert_eq!(features.len(), 6, "{features:?}");
    for f in features {
        let name = f["feature"].as_str().unwrap();
        for cpl in ["cpl0", "cpl3"] {
            let via = f[cpl].as_str().unwrap();
            let holds = match via {
                "KVM debug exit" | "caught at the guest's #BP entry" => {
                    exact("INT3 breakpoint", cpl)
                }
                "emulation failure at the INT3" => cpl == "cpl0" && exact("INT3 breakpoint", cpl),
                "debug register" => exact("HW execute breakpoint", cpl),
                "fetch trap (page without memslot)" | "hidden breakpoint (fetch trap)" => {
                    exact("EPT execute", cpl)
                }
                "KVM single-step" | "RFLAGS.TF caught at the guest's #DB entry" => {
                    exact("single-step", cpl)
                }
                "page hook (memslot)" => exact("EPT write", cpl),
                "unavailable" => match name {
                    "single-step" => !exact("single-step", cpl),
                    "hbreak" => !exact("HW execute breakpoint", cpl) || cpl == "cpl3",
                    _ => !exact("EPT execute", cpl),
                },
                other => panic!("{name}: unknown mechanism {other}"),
            };
            assert!(
                holds,
                "{name} at {cpl}: caps says {via}, the rows say otherwise: {v:#}"
            );
        }
    }
    if vmiscope_vmm::HostKind::detect() == vmiscope_vmm::HostKind::Pvm {
        // kvm-host-probe.md Q3: KVM's guest debugging works at CPL0 only on PVM; DR
        // breakpoints stay CPL0-only, while steps and INT3s at CPL3 are caught at the
        // guest's #DB/#BP entry (vmm's usertrap).
        assert_eq!(v["pvm"], true);
        assert_eq!(row("single-step")["cpl0"], "exact");
        assert_eq!(row("HW execute breakpoint")["cpl3"], "unavailable");
        assert_eq!(row("single-step")["cpl3"], "exact");
        assert_eq!(row("INT3 breakpoint")["cpl3"], "exact");
        assert!(
            row("single-step")["how"]
                .as_str()
                .unwrap()
                .contains("#DB entry")
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn bench_json_has_every_figure_with_its_baseline() {
    if !kvm_available()
        || common::not_run_here(
            std::env::var_os("VMISCOPE_RIG").is_some(),
            "bench figures mean something on real hardware only; the nested-SVM rig runs at TCG speed (tens of times slower than silicon)",
        )
    {
        return;
    }
    let (code, out, err) = vmiscope(&["bench", "--json", "--iterations", "300", "--repeat", "1"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let figs = v["figures"].as_array().unwrap();
    for name in [
        "I/O exit round trip, CPL0",
        "I/O exit round trip, CPL3",
        "MMIO write exit round trip, CPL0",
        "MMIO write exit round trip, CPL3",
        "hooked, allowed, emulated write, CPL0",
        "events/s with the TUI attached",
        "gdb stepi round trip, CPL0",
        "gdb stepi round trip, CPL3",
        "gdb stepi, CPL0, against its floor",
        "gdb stepi + register read, CPL0",
        "I/O exit, CPL0, breakpoint on a user page",
        "breakpoint hit, hidden (DR slot) vs visible",
        "hot page with a hidden breakpoint (DR slot free)",
        "hot page, hidden breakpoint beyond the free slots",
        "gdb continue to a breakpoint, hidden",
    ] {
        let f = figs
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("{name}"));
        let (val, base, ratio) = (
            f["value"].as_f64().unwrap(),
            f["baseline"].as_f64().unwrap(),
            f["ratio"].as_f64().unwrap(),
        );
        assert!(val > 0.0 && base > 0.0);
        assert!((ratio - val / base).abs() < 1e-9);
    }
    assert!(
        figs.iter()
            .any(|f| f["name"] == "protect one page (write-trap)"
                && f["note"].as_str().unwrap().contains("ioctls"))
    );
    for name in [
        "hello: process start to guest exit",
        "gdb memory read (large x/)",
        "engine CPU time per event, CPL0",
        "breakpoint hit, hidden INT3 (user page)",
        "write-hook all RAM above 4 MiB (256 MiB guest)",
    ] {
        assert!(
            figs.iter()
                .any(|f| f["name"] == name && f["value"].as_f64().is_some_and(|v| v > 0.0)),
            "{name}"
        );
    }
}
