//! `vmiscope run --batch`: no UI, guest serial on stdout, a line per stop and an
//! exit-class summary on stderr; the exit status is the guest's.

use std::io::Write;
use std::sync::Arc;

use vmiscope_vmm::{Event, ExitHandler, Reply, VcpuCtl, Vm};

use vmiscope_monitor::Introspection;

use crate::cli::RunArgs;
use crate::launch::{config, engine, load_image};

/// The engine, with `--events` printing every event first.
struct BatchHandler {
    events: bool,
    engine: Arc<Introspection>,
}

impl ExitHandler for BatchHandler {
    fn on_event(&self, cpu: &mut VcpuCtl<'_>, event: &Event) -> Reply {
        if self.events && !matches!(event, Event::Kicked) {
            crate::errln!(
                "[vmiscope] vcpu{} {}: {}",
                cpu.id(),
                event.class(),
                crate::format::exit_text(event, self.engine.symbols())
            );
        }
        self.engine.on_event(cpu, event)
    }

    fn on_exit(&self, cpu: &mut VcpuCtl<'_>) -> Result<(), vmiscope_vmm::HandlerStop> {
        self.engine.on_exit(cpu)
    }
}

pub fn run(a: &RunArgs) -> i32 {
    if let Some(script) = &a.script {
        return crate::script::run(a, script);
    }
    let ui = (!a.batch).then(|| {
        use std::io::IsTerminal;
        let tty = std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
        if a.repl || (!a.tui && !tty) {
            crate::ui::Mode::Repl
        } else {
            crate::ui::Mode::Tui
        }
    });
    if let Some(addr) = &a.gdb {
        return crate::gdb::run(a, addr, ui);
    }
    if let Some(mode) = ui {
        return crate::ui::interactive(a, mode);
    }
    let (image, vcpus) = match load_image(&a.image, a.mem) {
        Ok(x) => x,
        Err(e) => {
            crate::errln!("vmiscope: error: {e}");
            return 2;
        }
    };
    let cfg = match config(a, vcpus) {
        Ok(c) => c,
        Err(e) => {
            crate::errln!("vmiscope: error: {e}");
            return 2;
        }
    };
    let mut vm = match Vm::new(&cfg, &image) {
        Ok(vm) => vm,
        Err(e) => {
            crate::errln!("vmiscope: error: {e}");
            return 2;
        }
    };
    let os = crate::launch::os(a, &image, &mut vm);
    let (intro, journal) = match os.and_then(|os| engine(a, vm.shared(), os)) {
        Ok(i) => i,
        Err(e) => {
            crate::errln!("vmiscope: error: {e}");
            return 2;
        }
    };
    intro.set_alert_sink(crate::format::stderr_alert_sink());
    let intro = Arc::new(intro);
    vm.shared().serial().set_live(Box::new(|b| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(b);
        let _ = out.flush();
    }));
    crate::errln!(
        "[vmiscope] {} ({}) on {}: {} vCPU(s), {} MiB",
        a.image,
        vm.format,
        vm.shared().host().name(),
        cfg.vcpus,
        cfg.mem_mib
    );
    if let Some(note) = &vm.boot_note {
        crate::errln!("[vmiscope] {note}");
    }
    let shared = vm.shared().clone();
    let out = vm.run(
        Arc::new(BatchHandler {
            events: a.events,
            engine: intro.clone(),
        }),
        &cfg,
    );
    if let Some(j) = &journal {
        j.end(&shared, &out, intro.now_us());
    }
    summary(&out, &intro, &shared);
    out.reason.exit_status()
}

/// `vmiscope` with no arguments: the demo guest.
pub fn run_default() -> i32 {
    let a = RunArgs {
        protect: Some("all".into()),
        ..RunArgs::for_image("demo")
    };
    run(&a)
}

/// The run's summary on stderr: exits, alerts, why it stopped, and where each
/// vCPU ended.
fn summary(out: &vmiscope_vmm::RunOutcome, intro: &Introspection, shared: &vmiscope_vmm::VmShared) {
    let summary: Vec<String> = out.exits.iter().map(|(c, n)| format!("{c}={n}")).collect();
    crate::errln!(
        "[vmiscope] exits: {} (per vCPU: {:?})",
        summary.join(" "),
        out.exits_per_vcpu
    );
    let alerts = intro.alerts();
    let enforced = alerts.iter().filter(|a| a.enforced).count();
    crate::errln!(
        "[vmiscope] alerts: {} ({} enforced)",
        alerts.len(),
        enforced
    );
    crate::errln!(
        "[vmiscope] stop: {} after {:.3} s",
        out.reason,
        out.elapsed.as_secs_f64()
    );
    // Where each vCPU was when it ended, named.
    for c in 0..shared.vcpu_count() {
        if let Some(f) = shared.final_state(c) {
            crate::errln!(
                "[vmiscope] vCPU {c} ended at {} cpl{} rsp {:#x}",
                crate::format::at(intro.symbols(), f.regs.rip),
                f.sregs.cs.selector & 3,
                f.regs.rsp
            );
        }
    }
}
