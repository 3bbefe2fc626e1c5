//! `vmiscope caps`: which introspection events this host's KVM delivers exactly,
//! which vmiscope must poll, and which are unavailable — measured by running the
//! built-in images on scratch VMs, not read from a table.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::launch::image_symbol;

use serde::Serialize;
use vmiscope_vmm::{Access, Event, ExitHandler, Host, HostKind, Reply, VcpuCtl, Vm, VmConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Support {
    /// The host delivers an exit for the event.
    Exact,
    /// No exit exists; vmiscope compares state on exits and timer ticks.
    Polled,
    Unavailable,
    /// Not applicable at this privilege level (e.g. WRMSR at CPL3).
    #[serde(rename = "n/a")]
    NotApplicable,
}

impl Support {
    pub fn label(self) -> &'static str {
        match self {
            Support::Exact => "exact",
            Support::Polled => "polled",
            Support::Unavailable => "unavailable",
            Support::NotApplicable => "n/a",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub mechanism: &'static str,
    pub handler: &'static str,
    pub cpl0: Support,
    pub cpl3: Support,
    pub how: String,
}

/// How one debugger feature is served here at each CPL (the VMM's own choice,
/// from the start-up probe's answers).
#[derive(Debug, Serialize)]
pub struct FeatureRow {
    pub feature: &'static str,
    pub cpl0: &'static str,
    pub cpl3: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Caps {
    pub host: &'static str,
    pub pvm: bool,
    /// Why the start-up probe could not run (its answers are then assumed).
    pub probe_error: Option<&'static str>,
    pub features: Vec<FeatureRow>,
    pub rows: Vec<Row>,
    pub kick_latency_us: Option<f64>,
    /// Instructions KVM's emulator refuses at CPL0 on a PVM host that the VMM
    /// completes itself (on a hardware host the CPU runs them).
    pub completed_by_vmm: Vec<&'static str>,
}

/// Events seen, and (CR0, IDTR base, RIP) at every exit.
type Seen = (Vec<Event>, Vec<(u64, u64, u64)>);

type Probe = dyn Fn(&mut VcpuCtl<'_>, &Event) -> Reply + Send + Sync;

/// Records events and CR/DTR values seen at exits, answering with `f`.
struct Recorder {
    events: Mutex<Vec<Event>>,
    seen: Mutex<Vec<(u64, u64, u64)>>,
    f: Box<Probe>,
}

impl ExitHandler for Recorder {
    fn on_event(&self, cpu: &mut VcpuCtl<'_>, e: &Event) -> Reply {
        self.events.lock().unwrap().push(e.clone());
        (self.f)(cpu, e)
    }
    fn on_exit(&self, cpu: &mut VcpuCtl<'_>) -> Result<(), vmiscope_vmm::HandlerStop> {
        let s = cpu.sregs();
        let v = (s.cr0, s.idt.base, cpu.regs().rip);
        self.seen.lock().unwrap().push(v);
        Ok(())
    }
}

/// Runs `image` on a scratch VM after `setup`, answering events with `f`.
fn probe(
    image: &str,
    setup: impl FnOnce(&Vm) -> Result<(), Error>,
    f: impl Fn(&mut VcpuCtl<'_>, &Event) -> Reply + Send + Sync + 'static,
) -> Result<Seen, Error> {
    let img = vmiscope_images::find(image).ok_or("missing image")?;
    let cfg = VmConfig {
        timeout: Some(Duration::from_secs(10)),
        ..VmConfig::default()
    };
    let vm = Vm::new(&cfg, img.elf)?;
    setup(&vm)?;
    let rec = Arc::new(Recorder {
        events: Mutex::new(vec![]),
        seen: Mutex::new(vec![]),
        f: Box::new(f),
    });
    let _ = vm.run(rec.clone(), &cfg);
    let e = rec.events.lock().unwrap().clone();
    let s = rec.seen.lock().unwrap().clone();
    Ok((e, s))
}

/// Traps the page of `symbol` in `image` and reports at which CPLs `pred` saw it.
fn page_probe(
    image: &str,
    symbol: &str,
    access: Access,
    pred: impl Fn(&Event) -> Option<u8>,
) -> Result<(Support, Support), Error> {
    let (ev, _) = probe(
        image,
        |vm| {
            let gpa = image_symbol(image, symbol).ok_or(format!("{image} lacks {symbol}"))?;
            vm.shared()
                .protect_page(gpa, access)
                .map(|_| ())
                .map_err(|e| e.to_string())
                .map_err(Into::into)
        },
        |_, _| Reply::Continue,
    )?;
    Ok((at(&ev, 0, &pred), at(&ev, 3, &pred)))
}

fn at(events: &[Event], cpl: u8, pred: impl Fn(&Event) -> Option<u8>) -> Support {
    if events.iter().any(|e| pred(e) == Some(cpl)) {
        Support::Exact
    } else {
        Support::Unavailable
    }
}

/// Measures, on scratch VMs of the built-in images, which mechanism catches
/// which HVMI event at which CPL on this host.
pub fn measure() -> Result<Caps, Error> {
    let host = Host::detect();
    let mut rows = Vec::new();
    rows.extend(memory_rows(host)?);
    rows.extend(msr_rows(host)?);
    rows.extend(register_rows(host)?);
    rows.extend(introcall_rows(host)?);
    rows.extend(int3_rows(host)?);
    rows.extend(step_rows(host)?);
    let kick = kick_latency()?;
    rows.push(Row {
        mechanism: "timer",
        handler: "handle_timer",
        cpl0: Support::Exact,
        cpl3: Support::Exact,
        how: format!(
            "host timer thread kicks quiet vCPUs (signal + immediate_exit), latency {kick:.0} us"
        ),
    });
    let features = host
        .features()
        .iter()
        .map(|f| FeatureRow {
            feature: f.name,
            cpl0: f.cpl0.describe(),
            cpl3: f.cpl3.describe(),
        })
        .collect();
    Ok(Caps {
        host: host.name(),
        pvm: host.kind() == HostKind::Pvm,
        probe_error: host.probe_error(),
        features,
        rows,
        kick_latency_us: Some(kick),
        completed_by_vmm: vmiscope_vmm::vcpu::complete::Completed::ALL
            .iter()
            .map(|c| c.name())
            .collect(),
    })
}

/// EPT write, read and execute: memslot traps on the event images.
fn memory_rows(host: Host) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    let mem = |write: bool| {
        move |e: &Event| match e {
            Event::Mem(m) if m.write == write => Some(m.cpl),
            _ => None,
        }
    };
    let (c0, c3) = page_probe("ept-write", "ept_target", Access::WriteTrap, mem(true))?;
    rows.push(Row {
        mechanism: "EPT write",
        handler: "handle_ept_violation",
        cpl0: c0,
        cpl3: c3,
        how: "read-only memslot -> MMIO write exit (RIP after the instruction)".into(),
    });
    let (c0, c3) = page_probe("ept-read", "ept_secret", Access::AllTrap, mem(false))?;
    rows.push(Row {
        mechanism: "EPT read",
        handler: "handle_ept_violation",
        cpl0: c0,
        cpl3: c3,
        how: "page without memslot -> MMIO read exit (RIP at the instruction)".into(),
    });
    let exec = |e: &Event| match e {
        Event::ExecFault { cpl, .. } => Some(*cpl),
        _ => None,
    };
    let (c0, c3) = page_probe("ept-exec", "exec_target", Access::AllTrap, exec)?;
    let rearm = if host.single_step_at(3) {
        "re-armed after a single-step"
    } else {
        "re-armed after a single-step (at CPL3: a TF step caught at the guest's #DB entry)"
    };
    rows.push(Row {
        mechanism: "EPT execute",
        handler: "handle_ept_violation",
        cpl0: c0,
        cpl3: c3,
        how: format!(
            "page without memslot -> fetch fails (emulation failure at the target); {rearm}"
        ),
    });

    Ok(rows)
}

/// MSR accesses through the MSR filter.
fn msr_rows(_: Host) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    let cont = |_: &mut VcpuCtl<'_>, _: &Event| Reply::Continue;
    let (ev, _) = probe(
        "msr",
        |vm| {
            vm.shared()
                .intercept_msr(0xc000_0082, true, true)
                .map_err(|e| e.to_string())
                .map_err(Into::into)
        },
        cont,
    )?;
    let m = |e: &Event| matches!(e, Event::Msr { .. }).then_some(0);
    rows.push(Row {
        mechanism: "MSR",
        handler: "handle_msr_violation",
        cpl0: at(&ev, 0, m),
        cpl3: Support::NotApplicable,
        how: "KVM_X86_SET_MSR_FILTER + user-space MSR exits; the VMM applies allowed writes".into(),
    });

    Ok(rows)
}

/// CR, DTR and XCR changes: no exits, so polled if seen at all.
fn register_rows(host: Host) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    let cont = |_: &mut VcpuCtl<'_>, _: &Event| Reply::Continue;
    let (ev, seen) = probe("cr", |_| Ok(()), cont)?;
    let cr_exit = ev
        .iter()
        .any(|e| !matches!(e, Event::Kicked | Event::Port { .. }));
    let cr_seen = seen.iter().any(|s| s.0 == 0x8004_0033);
    let cr = if cr_exit {
        Support::Exact
    } else if cr_seen {
        Support::Polled
    } else {
        Support::Unavailable
    };
    rows.push(Row { mechanism: "CR write", handler: "handle_cr_write", cpl0: cr, cpl3: Support::NotApplicable, how: format!("no KVM exit for MOV CR; the change {} in the registers of the next exit (KVM_CAP_SYNC_REGS) and timer kicks; writer unknown", if cr_seen { "was seen" } else { "was NOT seen" }) });

    let (_, seen) = probe("dtr", |_| Ok(()), cont)?;
    let dtr_seen = seen.iter().any(|s| s.1 == 0x207000 || s.1 == 0x206000);
    rows.push(Row {
        mechanism: "DTR load (LIDT/LGDT)",
        handler: "handle_dtr_violation",
        cpl0: if dtr_seen {
            Support::Polled
        } else {
            Support::Unavailable
        },
        cpl3: Support::NotApplicable,
        how: "no KVM exit for LIDT/LGDT; compared on exits and timer kicks".into(),
    });

    let xcr = if xcr_polled()? {
        Support::Polled
    } else {
        Support::Unavailable
    };
    rows.push(Row {
        mechanism: "XCR write (XSETBV)",
        handler: "handle_xcr_write",
        cpl0: xcr,
        cpl3: Support::NotApplicable,
        how: if host.debug().xsetbv {
            "no KVM exit for XSETBV; XCR0 read with KVM_GET_XCRS on timer ticks".into()
        } else {
            "this host's KVM never sees a guest's XSETBV, so guests get no XSAVE, AVX or PKU in CPUID (FXSAVE and SSE only)".into()
        },
    });

    Ok(rows)
}

/// The introcall doorbell at CPL0 and CPL3.
fn introcall_rows(host: Host) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    let (ev, _) = probe("introcall", |_| Ok(()), |_, _| Reply::Data(0))?;
    let ic = |e: &Event| {
        if let Event::Introcall(c) = e {
            Some(c.cpl)
        } else {
            None
        }
    };
    let vmcall = if host.kind() == HostKind::Pvm {
        "VMCALL itself livelocks a CPL0 vCPU here (the VMM turns it into #UD)"
    } else {
        "VMCALL stays in the kernel"
    };
    rows.push(Row {
        mechanism: "introcall",
        handler: "handle_introcall",
        cpl0: at(&ev, 0, ic),
        cpl3: at(&ev, 3, ic),
        how: format!("I/O-port doorbell 0x9a with RAX=0x22; {vmcall}"),
    });

    Ok(rows)
}

/// Our INT3s at CPL0 and the guest's own at CPL3.
fn int3_rows(host: Host) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    let cont = |_: &mut VcpuCtl<'_>, _: &Event| Reply::Continue;
    let (ev, _) = probe(
        "int3",
        |vm| {
            let at = image_symbol("int3", "bp_target").ok_or("int3 lacks bp_target")?;
            vm.shared()
                .insert_sw_breakpoint(at, None)
                .map_err(|e| e.to_string())
                .map_err(Into::into)
        },
        cont,
    )?;
    let ours = |e: &Event| {
        if let Event::Breakpoint {
            ours: true, cpl, ..
        } = e
        {
            Some(*cpl)
        } else {
            None
        }
    };
    let guest3 = ev.iter().any(|e| {
        matches!(
            e,
            Event::Breakpoint {
                ours: false,
                cpl: 3,
                ..
            }
        )
    });
    let how = if host.kind() == HostKind::Pvm {
        "INT3 at CPL0 fails emulation on the INT3 (taken as the breakpoint); at CPL3 caught at the guest's #BP entry by a CPL0 hardware breakpoint, frame popped by the VMM"
    } else if host.debug().int3_at(0).reaches_vmm() {
        "KVM_GUESTDBG_USE_SW_BP -> debug exit"
    } else {
        "KVM_GUESTDBG_USE_SW_BP: no exit on this host (the INT3 goes to the guest); our INT3s are hit by a fetch trap on their page instead"
    };
    rows.push(Row {
        mechanism: "INT3 breakpoint",
        handler: "handle_breakpoint",
        cpl0: at(&ev, 0, ours),
        cpl3: if guest3 {
            Support::Exact
        } else {
            Support::Unavailable
        },
        how: how.into(),
    });

    Ok(rows)
}

/// Single-steps and hardware execute breakpoints at CPL0 and CPL3.
fn step_rows(host: Host) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    // Single-step and hardware breakpoints: arm an execute breakpoint on CPL0 code
    // (step_start) and on CPL3 code (user_hello), then step from each.
    let steps = Arc::new(Mutex::new(Vec::<(u64, u8)>::new()));
    let s2 = steps.clone();
    let (ev, _) = probe(
        "step",
        |vm| {
            vm.shared()
                .set_hw_breakpoint(0, image_symbol("step", "step_start"));
            Ok(())
        },
        move |cpu, e| {
            match e {
                Event::HwBreakpoint { .. } => {
                    cpu.set_hw_breakpoint(0, None);
                    cpu.set_single_step(true);
                }
                Event::SingleStep { rip } => {
                    s2.lock().unwrap().push((*rip, cpu.cpl()));
                    cpu.set_single_step(false);
                }
                _ => {}
            }
            Reply::Continue
        },
    )?;
    let hw0 = ev.iter().any(|e| matches!(e, Event::HwBreakpoint { .. }));
    let from_hw0 = steps.lock().unwrap().iter().any(|s| s.1 == 0);
    let (ev, from_writes) = steps_from_writes()?;
    let hw3 = ev.iter().any(|e| matches!(e, Event::HwBreakpoint { .. }));
    let stepped = |cpl: u8| from_writes.contains(&(cpl, cpl));
    let step0 = from_hw0 || stepped(0);
    let step3 = stepped(3);
    let ex = |b: bool| {
        if b {
            Support::Exact
        } else {
            Support::Unavailable
        }
    };
    rows.push(Row {
        mechanism: "single-step",
        handler: "(stepping)",
        cpl0: ex(step0),
        cpl3: ex(step3),
        how: if host.kind() == HostKind::Pvm {
            "KVM_GUESTDBG_SINGLESTEP at CPL0; at CPL3 RFLAGS.TF, caught at the guest's #DB entry by a CPL0 hardware breakpoint, frame popped by the VMM (guest sees DR6.BS)"
        } else {
            "KVM_GUESTDBG_SINGLESTEP"
        }
        .into(),
    });
    rows.push(Row {
        mechanism: "HW execute breakpoint",
        handler: "handle_breakpoint",
        cpl0: ex(hw0),
        cpl3: ex(hw3),
        how: format!(
            "KVM_GUESTDBG_USE_HW_BP ({} slots for breakpoints)",
            host.usable_hw_slots()
        ),
    });

    Ok(rows)
}

/// (CPL a step started at, CPL it ended at.)
type StepFrom = (u8, u8);

/// Steps from the guest's trapped writes, at each CPL (without a debug register
/// that fires, a step from a DR breakpoint never starts), with a DR breakpoint
/// on the user code too: the events, and (CPL of the write, CPL where the step
/// ended) for each CPL's first write.
fn steps_from_writes() -> Result<(Vec<Event>, Vec<StepFrom>), Error> {
    let from_writes = Arc::new(Mutex::new(Vec::<(u8, u8)>::new()));
    let (w2, pending) = (from_writes.clone(), Mutex::new(None::<u8>));
    let (ev, _) = probe(
        "ept-write",
        |vm| {
            vm.shared()
                .set_hw_breakpoint(0, image_symbol("ept-write", "user_write"));
            let at = image_symbol("ept-write", "ept_target").ok_or("ept-write lacks ept_target")?;
            vm.shared()
                .protect_page(at, Access::WriteTrap)
                .map(|_| ())
                .map_err(|e| e.to_string())
                .map_err(Into::into)
        },
        move |cpu, e| {
            match e {
                // Step from each CPL's first write: does the step exit come
                // back at that CPL?
                Event::Mem(m) if !w2.lock().unwrap().iter().any(|s| s.0 == m.cpl) => {
                    *pending.lock().unwrap() = Some(m.cpl);
                    cpu.set_single_step(true);
                }
                Event::SingleStep { .. } => {
                    if let Some(from) = pending.lock().unwrap().take() {
                        w2.lock().unwrap().push((from, cpu.cpl()));
                    }
                    cpu.set_single_step(false);
                }
                _ => {}
            }
            Reply::Continue
        },
    )?;
    let steps = from_writes.lock().unwrap().clone();
    Ok((ev, steps))
}

/// Whether XCR0 changes are visible to the VMM (KVM_GET_XCRS at exits).
fn xcr_polled() -> Result<bool, Error> {
    struct Watch(Mutex<bool>);
    impl ExitHandler for Watch {
        fn on_event(&self, _: &mut VcpuCtl<'_>, _: &Event) -> Reply {
            Reply::Continue
        }
        fn on_exit(&self, cpu: &mut VcpuCtl<'_>) -> Result<(), vmiscope_vmm::HandlerStop> {
            if cpu.xcr(0) == Some(3) {
                *self.0.lock().unwrap() = true;
            }
            Ok(())
        }
    }
    let img = vmiscope_images::find("xcr").ok_or("missing image")?;
    let cfg = VmConfig {
        timeout: Some(Duration::from_secs(10)),
        ..VmConfig::default()
    };
    let vm = Vm::new(&cfg, img.elf)?;
    let w = Arc::new(Watch(Mutex::new(false)));
    let _ = vm.run(w.clone(), &cfg);
    let seen = *w.0.lock().unwrap();
    Ok(seen)
}

/// Time from a kick to the vCPU's exit, median of a few, on a guest spinning at CPL3.
fn kick_latency() -> Result<f64, Error> {
    let img = vmiscope_images::find("hang").ok_or("missing image")?;
    let cfg = VmConfig {
        timeout: Some(Duration::from_secs(10)),
        tick: Duration::from_secs(3600),
        ..VmConfig::default()
    };
    let vm = Vm::new(&cfg, img.elf)?;
    let shared = vm.shared().clone();
    let t0 = Arc::new(Mutex::new(None::<Instant>));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let (t1, l1) = (t0.clone(), lat.clone());
    let h = Arc::new(move |_: &mut VcpuCtl<'_>, e: &Event| {
        if matches!(e, Event::Kicked)
            && let Some(t) = t1.lock().unwrap().take()
        {
            l1.lock().unwrap().push(t.elapsed().as_secs_f64() * 1e6);
        }
        Reply::Continue
    });
    let runner = std::thread::spawn(move || vm.run(h, &cfg));
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..9 {
        *t0.lock().unwrap() = Some(Instant::now());
        shared.kick_vcpu(0);
        std::thread::sleep(Duration::from_millis(20));
    }
    shared.stop(vmiscope_vmm::StopReason::User);
    let _ = runner.join();
    let v = lat.lock().unwrap().clone();
    if v.is_empty() {
        return Err("no kick reached the vCPU".into());
    }
    Ok(crate::stats::median(v))
}

pub fn run(a: &crate::cli::CapsArgs) -> i32 {
    let caps = match measure() {
        Ok(c) => c,
        Err(e) => {
            crate::errln!("vmiscope: error: {e}");
            return 2;
        }
    };
    if a.json {
        crate::outln!("{}", serde_json::to_string_pretty(&caps).unwrap());
        return 0;
    }
    crate::outln!("host: {}", caps.host);
    if let Some(e) = caps.probe_error {
        crate::outln!("start-up probe failed ({e}): the answers below for debugging are assumed");
    }
    crate::outln!("{:<22} {:<44} CPL3", "feature", "CPL0");
    for f in &caps.features {
        crate::outln!("{:<22} {:<44} {}", f.feature, f.cpl0, f.cpl3);
    }
    crate::outln!();
    crate::outln!(
        "{:<22} {:<21} {:<12} {:<12} how",
        "mechanism",
        "HVMI handler",
        "CPL0",
        "CPL3"
    );
    for r in &caps.rows {
        crate::outln!(
            "{:<22} {:<21} {:<12} {:<12} {}",
            r.mechanism,
            r.handler,
            r.cpl0.label(),
            r.cpl3.label(),
            r.how
        );
    }
    crate::outln!(
        "completed by the VMM at CPL0{}: {}",
        if caps.pvm {
            ""
        } else {
            " (only on a PVM host)"
        },
        caps.completed_by_vmm.join(", ")
    );
    0
}
