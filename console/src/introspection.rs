//! The engine as the VMM's exit handler: turns `vmm::Event`s into HVMI handler
//! calls and their verdicts into `vmm::Reply`s; arms protection policies once the
//! guest has its own descriptor tables; drives the 1 Hz timer and register polls.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmiscope_introspect::handlers::{self, BreakpointAction, MemAction, MemExit};
use vmiscope_introspect::policy::{self, PolicyEnv};
use vmiscope_introspect::{AccessKind, Alert, Engine, EventRecord, Guest, Journal, Verdict};
use vmiscope_vmm::{Event, ExitHandler, HandlerStop, Reply, Symbols, VcpuCtl};

/// A journal file: one JSON object per line, written as it happens (nothing
/// buffered away if the process dies).
pub struct FileJournal(std::io::LineWriter<std::fs::File>);

impl FileJournal {
    pub fn create(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(FileJournal(std::io::LineWriter::new(
            std::fs::File::create(path)?,
        )))
    }
}

impl Journal for FileJournal {
    fn record(&mut self, line: &str) {
        let _ = writeln!(self.0, "{line}");
    }
}

/// Where the image's symbols put the things policies protect.
pub fn policy_env(sym: &Symbols) -> PolicyEnv {
    let sized = |name: &str| {
        sym.get(name)
            .map(|a| (a, sym.size(name).filter(|s| *s > 0).unwrap_or(8)))
    };
    let mut env = PolicyEnv::default();
    if let (Some(start), Some(end)) = (sym.get("__image_start"), sym.get("__ktext_end")) {
        env.kernel_code.push((start, end - start));
    }
    env.syscall_table = sized("sys_table");
    env.user_pages.extend(sym.get("user_secret"));
    env.integrity.extend(sized("sys_table"));
    env
}

/// Setup run once the guest is up (policies, a test's hooks).
pub type OnReady = Box<dyn FnOnce(&mut Engine, &mut dyn Guest) + Send>;

pub struct Introspection {
    pub engine: Mutex<Engine>,
    pending: Mutex<Vec<OnReady>>,
    last_tick: Mutex<Instant>,
    /// How often `handle_timer` runs (HVMI: once a second).
    pub timer_period: Duration,
    /// Print each alert as it happens (batch mode).
    pub print_alerts: bool,
}

impl Introspection {
    pub fn new(engine: Engine, policies: Vec<&'static str>, env: PolicyEnv) -> Self {
        let pending: Vec<OnReady> = policies
            .into_iter()
            .map(|name| {
                let env = env.clone();
                Box::new(move |e: &mut Engine, g: &mut dyn Guest| {
                    if let Err(err) = policy::enable(e, g, name, &env) {
                        eprintln!("[vmiscope] {err}");
                    }
                }) as OnReady
            })
            .collect();
        Introspection {
            engine: Mutex::new(engine),
            pending: Mutex::new(pending),
            last_tick: Mutex::new(Instant::now()),
            timer_period: Duration::from_secs(1),
            print_alerts: false,
        }
    }

    /// Runs `f` once the guest runs on its own descriptor tables.
    pub fn on_ready(&self, f: OnReady) {
        self.pending.lock().unwrap().push(f);
    }

    pub fn alerts(&self) -> Vec<Alert> {
        self.engine.lock().unwrap().alerts.clone()
    }

    /// Policies wait until the guest runs on its own descriptor tables (IDTR set),
    /// as HVMI waits for the guest OS to be initialised.
    fn arm(&self, e: &mut Engine, cpu: &mut VcpuCtl<'_>) {
        let mut pending = self.pending.lock().unwrap();
        if pending.is_empty() || VcpuCtl::sregs(cpu).idt.base == 0 {
            return;
        }
        for f in pending.drain(..) {
            f(e, cpu);
        }
        if let Err(err) = e.commit(cpu) {
            eprintln!("[vmiscope] {err}");
        }
    }

    fn report(&self, e: &Engine, before: usize) {
        if self.print_alerts {
            for a in &e.alerts[before..] {
                eprintln!(
                    "[vmiscope] ALERT {} {}: {} (vcpu {} rip {:#x} cpl {}{}{})",
                    a.id,
                    a.class.name(),
                    a.reason,
                    a.vcpu,
                    a.rip,
                    a.cpl,
                    a.instruction
                        .as_deref()
                        .map(|i| format!(", `{i}`"))
                        .unwrap_or_default(),
                    if a.enforced {
                        ""
                    } else {
                        ", log-only: allowed"
                    }
                );
            }
        }
    }
}

impl Introspection {
    /// The engine's answer to `event` together with the record of that event (if
    /// a hook fired), both from one hold of the engine lock: with several vCPUs
    /// the newest record may be another vCPU's a moment later.
    pub fn decide(&self, cpu: &mut VcpuCtl<'_>, event: &Event) -> (Reply, Option<EventRecord>) {
        let mut e = self.engine.lock().unwrap();
        e.take_handled();
        let reply = self.reply(&mut e, cpu, event);
        (reply, e.take_handled())
    }

    /// The per-exit work (policies, timer, register polls) and the record of the
    /// newest polled change it concluded, from one hold of the engine lock.
    pub fn poll(&self, cpu: &mut VcpuCtl<'_>) -> Option<EventRecord> {
        let mut e = self.engine.lock().unwrap();
        e.take_handled();
        self.exit_work(&mut e, cpu);
        e.take_handled()
    }

    fn exit_work(&self, e: &mut Engine, cpu: &mut VcpuCtl<'_>) {
        let before = e.alerts.len();
        e.note_exit(cpu.id());
        self.arm(e, cpu);
        let tick = {
            let mut t = self.last_tick.lock().unwrap();
            let due = t.elapsed() >= self.timer_period;
            if due {
                *t = Instant::now();
            }
            due
        };
        if tick {
            handlers::handle_timer(e, cpu);
        } else {
            handlers::poll_registers(e, cpu);
        }
        self.report(e, before);
    }

    fn reply(&self, e: &mut Engine, cpu: &mut VcpuCtl<'_>, event: &Event) -> Reply {
        let before = e.alerts.len();
        let reply = match *event {
            Event::Mem(m) => {
                let access = if m.write {
                    AccessKind::Write
                } else {
                    AccessKind::Read
                };
                let x = MemExit {
                    gpa: m.gpa,
                    len: m.len as u64,
                    access,
                    data: m.write.then_some(m.data),
                    rip: m.rip,
                };
                mem_reply(handlers::handle_ept_violation(e, cpu, &x).1)
            }
            Event::ExecFault { gva, gpa, .. } => {
                let x = MemExit {
                    gpa,
                    len: 1,
                    access: AccessKind::Exec,
                    data: None,
                    rip: gva,
                };
                mem_reply(handlers::handle_ept_violation(e, cpu, &x).1)
            }
            Event::Msr { index, write, .. } => {
                match handlers::handle_msr_violation(e, cpu, index, write) {
                    Verdict::NotAllowed => Reply::Drop,
                    _ => Reply::Continue,
                }
            }
            Event::Introcall(c) => match handlers::handle_introcall(e, cpu, c.op, c.args) {
                Some(v) => Reply::Data(v),
                None => Reply::Continue,
            },
            Event::Breakpoint {
                rip,
                gpa: Some(gpa),
                ..
            } => match handlers::handle_breakpoint(e, cpu, rip, gpa) {
                BreakpointAction::StepOver | BreakpointAction::Reinject => Reply::Continue,
                BreakpointAction::Skip(len) => Reply::Skip(len),
            },
            _ => Reply::Continue,
        };
        self.report(e, before);
        if let Some(f) = e.fatal.take() {
            return Reply::Stop(HandlerStop::EngineFailed(f));
        }
        reply
    }
}

impl ExitHandler for Introspection {
    fn on_exit(&self, cpu: &mut VcpuCtl<'_>) {
        self.poll(cpu);
    }

    fn on_event(&self, cpu: &mut VcpuCtl<'_>, event: &Event) -> Reply {
        self.decide(cpu, event).0
    }
}

fn mem_reply(a: MemAction) -> Reply {
    match a {
        MemAction::Apply => Reply::Continue,
        MemAction::Drop => Reply::Drop,
        MemAction::Data(v) => Reply::Data(v),
        MemAction::Skip => Reply::Retry,
    }
}
