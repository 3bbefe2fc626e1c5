//! Breakpoint figures: a hit (visible INT3, hidden in a debug register, hidden
//! INT3) beside a raw exit, and what a hidden breakpoint costs the other code on
//! its page (a hot loop that shares the page and never hits it).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmiscope_introspect::policy::PolicyEnv;
use vmiscope_introspect::{Engine, Outcome, Target};
use vmiscope_monitor::{Introspection, OnReady};
use vmiscope_vmm::{Event, ExitHandler, Reply, VcpuCtl, VmConfig};

use super::common::{Figure, median, spin_sym, spin_vm};
use super::runs::{BENCH_PORT, EngineRun, Workload, engine_run, raw};
use crate::error::Error;

/// A hook that puts an allow-everything breakpoint at `at`.
fn bp_hook(at: u64, hidden: bool) -> OnReady {
    Box::new(move |e, g| {
        let t = Target::Breakpoint {
            gva: at,
            gpa: 0,
            hidden,
        };
        if let Err(err) = e.add_hook(g, t, "bench", Box::new(|_| Outcome::allow())) {
            crate::errln!("[bench] breakpoint: {err}");
        }
    })
}

/// Hits per kind on `spin_kbp` (kernel text, mode 7) and on `spin_bp` (a user
/// page, mode 6), beside one raw I/O exit, in one run of interleaved rounds.
pub(super) fn hit_figures(n: u64, repeat: usize, figures: &mut Vec<Figure>) -> Result<(), Error> {
    let med = |v: &Vec<EngineRun>| median(v.iter().map(|r| r.per_event_us).collect());
    let (kbp, ubp) = (spin_sym("spin_kbp")?, spin_sym("spin_bp")?);
    let n = n.min(5000);
    let (mut io0, mut vis, mut reg, mut int3) = (vec![], vec![], vec![], vec![]);
    for _ in 0..repeat {
        io0.push(raw(Workload::Io { cpl3: false }, n)? / 1e3);
        vis.push(engine_run(7, n, 1, bp_hook(kbp, false))?);
        reg.push(engine_run(7, n, 1, bp_hook(kbp, true))?);
        int3.push(engine_run(6, n, 1, bp_hook(ubp, true))?);
    }
    let (b, v, r, i) = (median(io0), med(&vis), med(&reg), med(&int3));
    figures.push(Figure {
        name: "breakpoint hit round trip, visible, CPL0".into(),
        unit: "us/hit",
        value: v,
        baseline: Some(b),
        ratio: Some(v / b),
        note: "INT3 exit + engine + single-step over the original byte, vs one raw I/O exit".into(),
    });
    figures.push(Figure {
        name: "breakpoint hit, hidden (DR slot) vs visible".into(),
        unit: "us/hit",
        value: r,
        baseline: Some(v),
        ratio: Some(r / v),
        note: "kernel text: a free debug register holds it (no patch, no trapped page); baseline: the visible INT3 above, same run".into(),
    });
    figures.push(Figure {
        name: "breakpoint hit, hidden INT3 (user page)".into(),
        unit: "us/hit",
        value: i,
        baseline: Some(b),
        ratio: Some(i / b),
        note: "where no DR can catch it (a user page on PVM): INT3 on a read-trapped page, opened and closed around each step (memslot ioctls)".into(),
    });
    small_kernel_figure(n, repeat, figures)
}

/// A hidden breakpoint beside a visible one on a kernel that maps its own
/// text U/S=1 (the `multiboot` image, as many small kernels), with 2 vCPUs:
/// one rule gives it a debug register as `hbreak` (it took the trapped-page
/// path: 14.5 ms a hit on 2 vCPUs, 21x an `hbreak`). The bar: at most 1.5x.
fn small_kernel_figure(n: u64, repeat: usize, figures: &mut Vec<Figure>) -> Result<(), Error> {
    let img = vmiscope_images::find("multiboot").ok_or("missing image")?;
    let syms = vmiscope_monitor::Symbols::parse(img.elf);
    let (count, kbp) = match (syms.get("mb_bench_count"), syms.get("mb_kbp")) {
        (Some(c), Some(k)) => (c, k),
        _ => return Err("multiboot lacks mb_bench_count/mb_kbp".into()),
    };
    let n = n.min(2000);
    let run = |hidden: bool| -> Result<EngineRun, Error> {
        let cfg = VmConfig {
            vcpus: 2,
            ..VmConfig::default()
        };
        let vm = vmiscope_vmm::Vm::new(&cfg, img.elf)?;
        vm.shared().ram().write(count, &n.to_le_bytes())?;
        super::runs::engine_run_on(vm, 2, bp_hook(kbp, hidden))
    };
    let (mut vis, mut hid) = (vec![], vec![]);
    for _ in 0..repeat {
        vis.push(run(false)?.per_event_us);
        hid.push(run(true)?.per_event_us);
    }
    let (v, h) = (median(vis), median(hid));
    figures.push(Figure {
        name: "breakpoint hit, hidden vs visible, 2 vCPUs, kernel text on U/S=1 pages".into(),
        unit: "us/hit",
        value: h,
        baseline: Some(v),
        ratio: Some(h / v),
        note: "the multiboot image (identity-mapped U/S=1, as small kernels are), second vCPU waiting for SIPI; the bar is 1.5x. The hidden one takes a debug register as hbreak does; the visible INT3's step-over, which must run alone, waits for the AP blocked in KVM_RUN (milliseconds a hit on PVM: open)".into(),
    });
    Ok(())
}

/// Timestamps the guest's two BENCH_PORT writes around `spin_hot`'s loop.
struct LoopTimer {
    intro: Arc<Introspection>,
    marks: Mutex<Vec<Instant>>,
}

impl ExitHandler for LoopTimer {
    fn on_event(&self, cpu: &mut VcpuCtl<'_>, e: &Event) -> Reply {
        if let Event::Port {
            port: BENCH_PORT, ..
        } = e
        {
            self.marks.lock().unwrap().push(Instant::now());
        }
        self.intro.on_event(cpu, e)
    }
    fn on_exit(&self, cpu: &mut VcpuCtl<'_>) -> Result<(), vmiscope_vmm::HandlerStop> {
        self.intro.on_exit(cpu)
    }
}

/// One run of `spin_hot`'s loop (mode 8, `n` iterations): its seconds and the
/// non-KVM_RUN ioctls of the run. `slots_taken`: debug-register slots filled
/// first, so a hidden breakpoint finds none free.
fn hot_loop(n: u64, bp: Option<u64>, slots_taken: bool) -> Result<(f64, u64), Error> {
    let vm = spin_vm(8, n, 1)?;
    let shared = vm.shared().clone();
    if slots_taken {
        while shared.claim_hw_breakpoint(0xdead_0000).is_some() {}
    }
    let intro = Arc::new(Introspection::new(
        Engine::new(),
        vec![],
        PolicyEnv::default(),
    ));
    if let Some(at) = bp {
        intro.on_ready(bp_hook(at, true));
    }
    let h = Arc::new(LoopTimer {
        intro,
        marks: Mutex::default(),
    });
    let cfg = VmConfig {
        timeout: Some(Duration::from_secs(300)),
        ..VmConfig::default()
    };
    let out = vm.run(h.clone(), &cfg);
    if out.reason.exit_status() != 0 {
        return Err(format!("spin_hot: {}", out.reason).into());
    }
    let m = h.marks.lock().unwrap();
    match m.as_slice() {
        [a, b, ..] => Ok(((*b - *a).as_secs_f64(), shared.ioctl_count())),
        _ => Err("spin_hot made no timestamps".into()),
    }
}

/// A hidden breakpoint on a hot page (never hit): the loop's time beside the
/// same loop without it, while a DR slot is free and beyond the free slots.
pub(super) fn hot_page_figures(repeat: usize, figures: &mut Vec<Figure>) -> Result<(), Error> {
    let bp = spin_sym("spin_hot_bp")?;
    // Enough iterations to dwarf the timing noise; few where each instruction
    // of the loop may fault.
    let (big, small) = (200_000u64, 300u64);
    let (mut plain, mut dr, mut io0) = (vec![], vec![], vec![]);
    let (mut plain_s, mut trapped, mut ioctls) = (vec![], vec![], vec![]);
    for _ in 0..repeat {
        plain.push(hot_loop(big, None, false)?.0);
        dr.push(hot_loop(big, Some(bp), false)?.0);
        io0.push(raw(Workload::Io { cpl3: false }, 5000)? / 1e3);
        plain_s.push(hot_loop(small, None, true)?.0);
        let (t, io) = hot_loop(small, Some(bp), true)?;
        trapped.push(t);
        ioctls.push(io as f64);
    }
    let (p, d) = (median(plain), median(dr));
    figures.push(Figure {
        name: "hot page with a hidden breakpoint (DR slot free)".into(),
        unit: "ms/loop",
        value: d * 1e3,
        baseline: Some(p * 1e3),
        ratio: Some(d / p),
        note: format!(
            "spin_hot: {big} iterations of 3 instructions on the page of an unhit breakpoint; baseline: the same loop without it"
        ),
    });
    let insns = (3 * small) as f64;
    let per = (median(trapped) - median(plain_s)) / insns * 1e6;
    let b = median(io0);
    figures.push(Figure {
        name: "hot page, hidden breakpoint beyond the free slots".into(),
        unit: "us/insn",
        value: per,
        baseline: Some(b),
        ratio: Some(per / b),
        note: format!(
            "every DR slot taken: INT3 on a read-trapped page; the loop's {insns} instructions fault, and the VMM completes each with those after it on the page (up to 16 a guest exit; {:.2} ioctls an instruction); baseline: one raw I/O exit",
            median(ioctls) / insns
        ),
    });
    Ok(())
}
