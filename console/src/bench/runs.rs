//! The runs every figure is made of: the raw KVM_RUN loop, vmiscope's loop with
//! a timestamping handler, and the engine on `spin` with a setup.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use vmiscope_introspect::Engine;
use vmiscope_introspect::policy::PolicyEnv;
use vmiscope_monitor::{Introspection, OnReady};
use vmiscope_vmm::{Access, Event, ExitHandler, Reply, VcpuCtl, Vm, VmConfig};

use super::common::{spin_sym, spin_vm};
use crate::error::Error;

pub(super) const BENCH_PORT: u16 = 0x80;

#[derive(Clone, Copy)]
pub(super) enum Workload {
    Io { cpl3: bool },
    Mmio { cpl3: bool },
}

impl Workload {
    pub(super) fn mode(self) -> u64 {
        match self {
            Workload::Mmio { cpl3: true } => 0,
            Workload::Io { cpl3: true } => 1,
            Workload::Io { cpl3: false } => 2,
            Workload::Mmio { cpl3: false } => 3,
        }
    }
    pub(super) fn label(self) -> String {
        match self {
            Workload::Io { cpl3 } => {
                format!("I/O exit round trip, CPL{}", if cpl3 { 3 } else { 0 })
            }
            Workload::Mmio { cpl3 } => format!(
                "MMIO write exit round trip, CPL{}",
                if cpl3 { 3 } else { 0 }
            ),
        }
    }
}

pub(super) fn build(w: Workload, n: u64) -> Result<Vm, Error> {
    let vm = spin_vm(w.mode(), n, 1)?;
    let sh = vm.shared();
    if let Workload::Mmio { .. } = w {
        sh.protect_page(spin_sym("spin_page")?, Access::WriteTrap)
            .map_err(|e| e.to_string())?;
    }
    Ok(vm)
}

/// Nanoseconds per exit from the first to the last benchmark exit.
pub(super) fn per_exit(
    first: Option<Instant>,
    last: Option<Instant>,
    count: u64,
) -> Result<f64, Error> {
    match (first, last) {
        (Some(f), Some(l)) if count > 1 => Ok((l - f).as_nanos() as f64 / (count - 1) as f64),
        _ => Err(format!("the workload made {count} benchmark exits").into()),
    }
}

/// The floor: KVM_RUN in a loop that only answers what the guest needs.
pub(super) fn raw(w: Workload, n: u64) -> Result<f64, Error> {
    let (_shared, mut fds) = build(w, n)?.into_raw();
    let fd = &mut fds[0];
    let spin_page = spin_sym("spin_page")?;
    let (mut first, mut last, mut count) = (None, None, 0u64);
    loop {
        match fd.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::IoOut(BENCH_PORT, _) => {}
            VcpuExit::MmioWrite(gpa, _) if gpa & !0xfff == spin_page => {}
            VcpuExit::IoOut(0x604 | 0xf4, _) => break,
            VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) => continue,
            VcpuExit::IoIn(_, data) => {
                data.fill(0);
                continue;
            }
            e => return Err(format!("unexpected exit {e:?}").into()),
        }
        let now = Instant::now();
        first.get_or_insert(now);
        last = Some(now);
        count += 1;
    }
    per_exit(first, last, count)
}

/// Timestamps the benchmark events in the handler.
#[derive(Default)]
pub(super) struct Stamp(Mutex<(Option<Instant>, Option<Instant>, u64)>);

impl ExitHandler for Stamp {
    fn on_event(&self, _: &mut VcpuCtl<'_>, e: &Event) -> Reply {
        if matches!(
            e,
            Event::Port {
                port: BENCH_PORT,
                ..
            } | Event::Mem(_)
        ) {
            let now = Instant::now();
            let mut s = self.0.lock().unwrap();
            s.0.get_or_insert(now);
            s.1 = Some(now);
            s.2 += 1;
        }
        Reply::Continue
    }
}

pub(super) fn vmiscope(w: Workload, n: u64) -> Result<f64, Error> {
    vmiscope_with(w, n, |_| Ok(()))
}

/// `vmiscope` with `setup` applied to the VM first.
pub(super) fn vmiscope_with(
    w: Workload,
    n: u64,
    setup: impl FnOnce(&Vm) -> Result<(), Error>,
) -> Result<f64, Error> {
    let vm = build(w, n)?;
    setup(&vm)?;
    let stamp = Arc::new(Stamp::default());
    let cfg = VmConfig {
        timeout: Some(Duration::from_secs(300)),
        ..VmConfig::default()
    };
    let out = vm.run(stamp.clone(), &cfg);
    if out.reason.exit_status() != 0 {
        return Err(spin_failed(&out).into());
    }
    let s = stamp.0.lock().unwrap();
    per_exit(s.0, s.1, s.2)
}

/// The engine behind a timestamping wrapper.
pub(super) struct Timed {
    intro: Arc<Introspection>,
    stamp: Stamp,
}

impl ExitHandler for Timed {
    fn on_event(&self, cpu: &mut VcpuCtl<'_>, e: &Event) -> Reply {
        let r = self.intro.on_event(cpu, e);
        if matches!(e, Event::Mem(_) | Event::Breakpoint { .. }) {
            let now = Instant::now();
            let mut s = self.stamp.0.lock().unwrap();
            s.0.get_or_insert(now);
            s.1 = Some(now);
            s.2 += 1;
        }
        r
    }
    fn on_exit(&self, cpu: &mut VcpuCtl<'_>) -> Result<(), vmiscope_vmm::HandlerStop> {
        self.intro.on_exit(cpu)
    }
}

/// One run of `spin` under the engine.
pub(super) struct EngineRun {
    /// Microseconds per event, first to last.
    pub(super) per_event_us: f64,
    pub(super) events: u64,
    /// The engine's own time per handled event (decode, walk, dispatch, verdict).
    pub(super) engine_us: f64,
    /// Non-KVM_RUN ioctls during the run, per event.
    pub(super) ioctls_per_event: f64,
}

pub(super) fn engine_run(
    mode: u64,
    n: u64,
    vcpus: u32,
    setup: OnReady,
) -> Result<EngineRun, Error> {
    engine_run_on(spin_vm(mode, n, vcpus)?, vcpus, setup)
}

/// `engine_run` on a VM already made (another image than `spin`).
pub(super) fn engine_run_on(
    vm: vmiscope_vmm::Vm,
    vcpus: u32,
    setup: OnReady,
) -> Result<EngineRun, Error> {
    let shared = vm.shared().clone();
    let intro = Arc::new(Introspection::new(
        Engine::new(),
        vec![],
        PolicyEnv::default(),
    ));
    intro.on_ready(setup);
    let h = Arc::new(Timed {
        intro: intro.clone(),
        stamp: Stamp::default(),
    });
    let cfg = VmConfig {
        vcpus,
        timeout: Some(Duration::from_secs(300)),
        ..VmConfig::default()
    };
    let ioctls_before = Arc::new(Mutex::new(None::<u64>));
    let out = vm.run(h.clone(), &cfg);
    drop(ioctls_before);
    if out.reason.exit_status() != 0 {
        return Err(spin_failed(&out).into());
    }
    let s = h.stamp.0.lock().unwrap();
    let latency = intro.counters().latency;
    // A run that only times hook bookkeeping has no events: NaN, not an error.
    let per = per_exit(s.0, s.1, s.2)
        .map(|ns| ns / 1e3)
        .unwrap_or(f64::NAN);
    Ok(EngineRun {
        per_event_us: per,
        events: s.2,
        engine_us: latency.total_ns as f64 / latency.count.max(1) as f64 / 1e3,
        ioctls_per_event: shared.ioctl_count() as f64 / s.2.max(1) as f64,
    })
}

/// Why a bench guest did not finish, with its last serial lines (a guest's
/// FATAL line names the exception and where it happened).
pub(super) fn spin_failed(out: &vmiscope_vmm::RunOutcome) -> String {
    let lines: Vec<&str> = out.serial.lines().collect();
    let tail = lines[lines.len().saturating_sub(4)..].join(" | ");
    format!("spin did not finish: {} (serial: {tail})", out.reason)
}
