//! `vmiscope bench`: each figure beside a raw-KVM baseline measured by the same
//! binary in the same run. The guest is the same in both: the `spin` image with
//! `spin_mode`/`spin_count` patched in; the baseline drives KVM_RUN in a bare
//! kvm-ioctls loop, vmiscope runs it through its vCPU threads, exit decoding and
//! handler. Medians of `--repeat` runs; ratios of medians.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::cli::BenchGroup;
use crate::error::Error;

use vmiscope_introspect::{Outcome, Rights, Target};
use vmiscope_vmm::{Access, HostKind};

use vmiscope_monitor::OnReady;

mod breakpoints;
mod common;
mod gdb;
mod linux;
mod runs;

use runs::{EngineRun, Workload, build, engine_run, raw, vmiscope, vmiscope_with};

pub use common::{Figure, Report, median, spin_session, spin_sym, spin_vm};

/// A write hook over `[off, off+len)` of spin_page that allows everything.
fn write_hook(off: u64, len: u64) -> Result<OnReady, Error> {
    let page = spin_sym("spin_page")?;
    Ok(Box::new(move |e, g| {
        let t = Target::Gpa {
            gpa: page + off,
            len,
            rights: Rights::W,
        };
        if let Err(err) = e.add_hook(g, t, "bench", Box::new(|_| Outcome::allow())) {
            crate::errln!("[bench] write hook: {err}");
        }
    }))
}

/// The engine's figures: hooked writes, hooks' cost, breakpoints, throughput.
fn engine_figures(n: u64, repeat: usize, figures: &mut Vec<Figure>) -> Result<(), Error> {
    hooked_write_figures(n, repeat, figures)?;
    outside_hook_figure(n, repeat, figures)?;
    throughput_figures(n, repeat, figures)?;
    breakpoints::hit_figures(n, repeat, figures)?;
    breakpoints::hot_page_figures(repeat, figures)?;
    hook_cost_figures(figures)
}

/// A hooked, allowed write at CPL0 and CPL3, beside the raw MMIO exit.
fn hooked_write_figures(n: u64, repeat: usize, figures: &mut Vec<Figure>) -> Result<(), Error> {
    let med = |v: &Vec<EngineRun>, f: fn(&EngineRun) -> f64| median(v.iter().map(f).collect());
    for (cpl3, mode) in [(false, 3u64), (true, 0u64)] {
        let (mut hooked, mut base) = (vec![], vec![]);
        for _ in 0..repeat {
            base.push(raw(Workload::Mmio { cpl3 }, n)? / 1e3);
            hooked.push(engine_run(mode, n, 1, write_hook(0, 64)?)?);
        }
        let (v, b) = (med(&hooked, |r| r.per_event_us), median(base));
        let cpl = if cpl3 { 3 } else { 0 };
        figures.push(Figure {
            name: format!("hooked, allowed, emulated write, CPL{cpl}"),
            unit: "us/event",
            value: v,
            baseline: Some(b),
            ratio: Some(v / b),
            note: "engine dispatch + emulated write vs the raw MMIO exit".into(),
        });
        figures.push(Figure {
            name: format!("engine CPU time per event, CPL{cpl}"),
            unit: "us",
            value: med(&hooked, |r| r.engine_us),
            baseline: None,
            ratio: None,
            note: "decode + page walk + dispatch + verdict, measured inside the handler".into(),
        });
    }
    Ok(())
}

/// A write on a hooked page that no hook covers: what it costs in ioctls.
fn outside_hook_figure(n: u64, repeat: usize, figures: &mut Vec<Figure>) -> Result<(), Error> {
    let med = |v: &Vec<EngineRun>, f: fn(&EngineRun) -> f64| median(v.iter().map(f).collect());
    let outside: Vec<EngineRun> = (0..repeat)
        .map(|_| engine_run(0, n, 1, write_hook(0x800, 8)?))
        .collect::<Result<_, _>>()?;
    figures.push(Figure {
        name: "write on a hooked page, outside every hook".into(),
        unit: "ioctls/event",
        value: med(&outside, |r| r.ioctls_per_event),
        baseline: None,
        ratio: None,
        note: format!(
            "{:.2} us/event; emulated from the VMM's mapping, no ioctl but KVM_RUN",
            med(&outside, |r| r.per_event_us)
        ),
    });
    Ok(())
}

/// Hooked-write events per second with one and two vCPUs.
fn throughput_figures(n: u64, repeat: usize, figures: &mut Vec<Figure>) -> Result<(), Error> {
    for vcpus in [1u32, 2] {
        let runs: Vec<EngineRun> = (0..repeat)
            .map(|_| engine_run(0, n, vcpus, write_hook(0, 64)?))
            .collect::<Result<_, _>>()?;
        let rate = median(
            runs.iter()
                .map(|r| r.events as f64 / (r.per_event_us * (r.events - 1) as f64 / 1e6))
                .collect(),
        );
        figures.push(Figure {
            name: format!("hooked-write events per second, {vcpus} vCPU"),
            unit: "events/s",
            value: rate,
            baseline: None,
            ratio: None,
            note: format!(
                "CPL3 write loop on a hooked page, every vCPU ({} events per run)",
                median(runs.iter().map(|r| r.events as f64).collect())
            ),
        });
    }
    Ok(())
}

/// Adds and removes a write hook on `page` 50 times: the median microseconds of
/// each (memslot ioctls here have rare millisecond outliers).
fn hook_cycles(
    e: &mut vmiscope_introspect::Engine,
    g: &mut dyn vmiscope_introspect::Guest,
    page: u64,
) -> Result<(f64, f64), String> {
    let (mut add, mut del) = (vec![], vec![]);
    for _ in 0..50 {
        let t = Instant::now();
        let target = Target::Gpa {
            gpa: page,
            len: 8,
            rights: Rights::W,
        };
        let id = e
            .add_hook(g, target, "b", Box::new(|_| Outcome::allow()))
            .map_err(|e| e.to_string())?;
        e.commit(g).map_err(|e| e.to_string())?;
        add.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        e.remove_hook(id).map_err(|e| e.to_string())?;
        e.commit(g).map_err(|e| e.to_string())?;
        del.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((median(add), median(del)))
}

/// Adding and removing one write hook (memslot split and merge), medians.
fn hook_cost_figures(figures: &mut Vec<Figure>) -> Result<(), Error> {
    let times = Arc::new(Mutex::new(Err::<(f64, f64), String>("no run".into())));
    let t2 = times.clone();
    let page = spin_sym("spin_page")?;
    engine_run(
        1,
        10,
        1,
        Box::new(move |e, g| *t2.lock().unwrap() = hook_cycles(e, g, page)),
    )?;
    let (add, del) = times.lock().unwrap().clone()?;
    figures.push(Figure {
        name: "add one write hook (protect + commit)".into(),
        unit: "us",
        value: add,
        baseline: None,
        ratio: None,
        note: "engine bookkeeping + memslot split; median of 50".into(),
    });
    figures.push(Figure {
        name: "remove one write hook (flag + commit)".into(),
        unit: "us",
        value: del,
        baseline: None,
        ratio: None,
        note: "engine bookkeeping + memslot merge; median of 50".into(),
    });
    figures.push(wide_hook_figure()?);
    Ok(())
}

/// One console command write-hooks all RAM above 4 MiB of a 256 MiB guest
/// (one hook over 64 512 pages): how long it takes to install, median of 5.
fn wide_hook_figure() -> Result<Figure, Error> {
    let mut times = vec![];
    let mut ioctls = 0;
    for _ in 0..5 {
        let args = crate::cli::RunArgs {
            mem: 256,
            ..crate::cli::RunArgs::for_image("spin")
        };
        let mut s = crate::session::Session::start(&args)?;
        let before = s.shared().ioctl_count();
        let t = Instant::now();
        s.exec("hook ept 0x400000 0xfc00000 w log")?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        ioctls = s.shared().ioctl_count() - before;
        s.finish();
    }
    Ok(Figure {
        name: "write-hook all RAM above 4 MiB (256 MiB guest)".into(),
        unit: "ms",
        value: median(times),
        baseline: None,
        ratio: None,
        note: format!(
            "`hook ept 0x400000 0xfc00000 w log`: one hook over 64512 pages, {ioctls} ioctls (one read-only slot for the range)"
        ),
    })
}

fn console_run(n: u64, with_tui: bool) -> Result<(f64, Vec<f64>), Error> {
    let mut s = spin_session(0, n)?;
    s.exec("hook ept spin_page 64 w log")?;
    let mut term = ratatui::Terminal::new(ratatui::backend::TestBackend::new(120, 40))
        .map_err(|e| e.to_string())?;
    let mut tui = crate::tui::Tui::new();
    // The TUI's own wait (a frame's pacing, woken by the session's notices),
    // on a terminal that never types.
    let (keys, _typist) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    let wakes = crate::tui::Wakes::new(keys.as_raw_fd(), s.intro().notices().clone())
        .map_err(|e| e.to_string())?;
    // Without a UI the loop waits for the end alone: notices are few (serial
    // lines, the end), while waiting on every event would cost each a wake-up.
    let notices = s.intro().subscribe();
    let before = s.intro().counters().events;
    let start = Instant::now();
    s.exec("continue")?;
    let (mut shown, mut lat) = (before, Vec::new());
    while s.running() {
        if with_tui {
            tui.refresh(&mut s);
            term.draw(|f| tui.draw(f, &s)).map_err(|e| e.to_string())?;
            // Every event newer than the last frame's newest appears in this frame.
            // The copy first, then the clock: a record handled between the two
            // calls is older than `now`, never newer (it wrapped round once).
            let new = s.intro().recent_since(shown);
            let now = s.intro().now_us();
            lat.extend(new.iter().map(|r| now.saturating_sub(r.at_us) as f64 / 1e3));
            shown = new.last().map(|r| r.event_id).unwrap_or(shown);
            crate::tui::next_wake(&wakes, &tui);
        } else if notices.recv().is_err() {
            break;
        }
    }
    let events = s.intro().counters().events - before;
    Ok((events as f64 / start.elapsed().as_secs_f64(), lat))
}

fn console_figures(n: u64, repeat: usize, figures: &mut Vec<Figure>) -> Result<(), Error> {
    let n = n.max(20_000);
    let (mut bare, mut tui, mut lat) = (vec![], vec![], vec![]);
    for _ in 0..repeat {
        bare.push(console_run(n, false)?.0);
        let (rate, l) = console_run(n, true)?;
        tui.push(rate);
        lat.extend(l);
    }
    let (b, t) = (median(bare), median(tui));
    figures.push(Figure {
        name: "events/s with the TUI attached".into(),
        unit: "events/s",
        value: t,
        baseline: Some(b),
        ratio: Some(t / b),
        note: "hooked CPL3 writes; baseline: the same session without a UI (the TUI off screen, drawn as it is on one: at each notice, at most 20x/s)".into(),
    });
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    figures.push(Figure {
        name: "event to its line on screen".into(),
        unit: "ms",
        value: p(0.5),
        baseline: None,
        ratio: None,
        note: format!(
            "median over {} events; p90 {:.1} ms, max {:.1} ms (one 50 ms frame bounds it)",
            lat.len(),
            p(0.9),
            lat.last().copied().unwrap_or(f64::NAN)
        ),
    });
    Ok(())
}

fn protect_cost(repeat: usize) -> Result<(f64, f64, f64), Error> {
    let vm = build(Workload::Io { cpl3: true }, 1)?;
    let sh = vm.shared();
    let page = spin_sym("spin_page")?;
    let (mut p, mut u, mut ioctls) = (vec![], vec![], 0u32);
    for _ in 0..(repeat * 20) {
        let t = Instant::now();
        let a = sh
            .protect_page(page, Access::WriteTrap)
            .map_err(|e| e.to_string())?;
        p.push(t.elapsed().as_nanos() as f64);
        let t = Instant::now();
        let b = sh
            .protect_page(page, Access::Full)
            .map_err(|e| e.to_string())?;
        u.push(t.elapsed().as_nanos() as f64);
        ioctls = a.ioctls().max(b.ioctls());
    }
    Ok((median(p), median(u), ioctls as f64))
}

fn hello_wall(repeat: usize) -> Result<f64, Error> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut v = vec![];
    for _ in 0..repeat {
        let t = Instant::now();
        let out = std::process::Command::new(&exe)
            .args(["run", "hello", "--batch"])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err("hello failed".into());
        }
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(v))
}

pub fn measure(iterations: u64, repeat: usize, only: Option<BenchGroup>) -> Result<Report, Error> {
    let repeat = repeat.max(1);
    let mut figures = vec![];
    let wanted = |g: BenchGroup| only.is_none_or(|o| o == g);
    if wanted(BenchGroup::Exits) {
        exit_figures(iterations, repeat, &mut figures)?;
    }
    if wanted(BenchGroup::Engine) {
        engine_figures(iterations, repeat, &mut figures)?;
    }
    if wanted(BenchGroup::Console) {
        console_figures(iterations, repeat, &mut figures)?;
    }
    if wanted(BenchGroup::Gdb) {
        gdb::figures(repeat, &mut figures)?;
    }
    if wanted(BenchGroup::Hello) {
        figures.push(Figure {
            name: "hello: process start to guest exit".into(),
            unit: "ms",
            value: hello_wall(repeat)?,
            baseline: None,
            ratio: None,
            note: "`vmiscope run hello --batch`, wall clock".into(),
        });
    }
    Ok(Report {
        baseline: "raw KVM",
        host: HostKind::detect().figures_label(),
        iterations,
        repeat,
        figures,
    })
}

/// I/O and MMIO exits through vmiscope beside bare KVM, and page protection.
fn exit_figures(iterations: u64, repeat: usize, figures: &mut Vec<Figure>) -> Result<(), Error> {
    for w in [
        Workload::Io { cpl3: false },
        Workload::Io { cpl3: true },
        Workload::Mmio { cpl3: false },
        Workload::Mmio { cpl3: true },
    ] {
        let (mut r, mut v) = (vec![], vec![]);
        // Interleave baseline and vmiscope runs so drift on a noisy host hits both.
        for _ in 0..repeat {
            r.push(raw(w, iterations)? / 1e3);
            v.push(vmiscope(w, iterations)? / 1e3);
        }
        let (r, v) = (median(r), median(v));
        figures.push(Figure {
            name: w.label(),
            unit: "us/exit",
            value: v,
            baseline: Some(r),
            ratio: Some(v / r),
            note: "vmiscope's vCPU loop + handler vs a bare KVM_RUN loop, same guest".into(),
        });
    }
    // An INT3 on a user page (never hit here) arms the #BP catch on PVM: a DR
    // breakpoint, which KVM loads on every entry.
    let w = Workload::Io { cpl3: false };
    let (mut r, mut v) = (vec![], vec![]);
    for _ in 0..repeat {
        r.push(raw(w, iterations)? / 1e3);
        v.push(
            vmiscope_with(w, iterations, |vm| {
                let at = spin_sym("spin_bp")?;
                vm.shared()
                    .insert_sw_breakpoint(at, Some(at))
                    .map_err(|e| e.to_string())
                    .map_err(Into::into)
            })? / 1e3,
        );
    }
    let (r, v) = (median(r), median(v));
    figures.push(Figure {
        name: "I/O exit, CPL0, breakpoint on a user page".into(),
        unit: "us/exit",
        value: v,
        baseline: Some(r),
        ratio: Some(v / r),
        note: "an unhit INT3 at spin_bp (user-accessible page): on PVM the #BP catch's DR breakpoint is armed; baseline: the bare KVM_RUN loop".into(),
    });
    let (p, u, ioctls) = protect_cost(repeat)?;
    figures.push(Figure {
        name: "protect one page (write-trap)".into(),
        unit: "us",
        value: p / 1e3,
        baseline: None,
        ratio: None,
        note: format!("{ioctls} memslot ioctls per operation (split the RAM slot)"),
    });
    figures.push(Figure {
        name: "unprotect one page".into(),
        unit: "us",
        value: u / 1e3,
        baseline: None,
        ratio: None,
        note: format!("{ioctls} memslot ioctls per operation (merge back)"),
    });
    Ok(())
}

pub fn run(a: &crate::cli::BenchArgs) -> i32 {
    let r = match &a.linux {
        Some(kernel) => linux::measure(kernel, a.initrd.as_deref()),
        None => measure(a.iterations.max(2), a.repeat, a.only),
    };
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            crate::errln!("vmiscope: error: bench: {e}");
            return 2;
        }
    };
    if a.json {
        crate::outln!("{}", serde_json::to_string_pretty(&r).unwrap());
        return 0;
    }
    if r.iterations > 1 {
        crate::outln!(
            "host: {}  ({} exits per run, median of {})",
            r.host,
            r.iterations,
            r.repeat
        );
    } else {
        crate::outln!("host: {}  (one run each)", r.host);
    }
    crate::outln!(
        "{:<36} {:>10} {:>10} {:>7}  unit",
        "figure",
        "vmiscope",
        r.baseline,
        "ratio"
    );
    for f in &r.figures {
        let b = f
            .baseline
            .map(|b| format!("{b:.2}"))
            .unwrap_or_else(|| "-".into());
        let q = f
            .ratio
            .map(|q| format!("{q:.3}x"))
            .unwrap_or_else(|| "-".into());
        crate::outln!(
            "{:<36} {:>10.2} {:>10} {:>7}  {}  ({})",
            f.name,
            f.value,
            b,
            q,
            f.unit,
            f.note
        );
    }
    0
}
