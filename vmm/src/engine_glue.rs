//! The engine as the VMM's exit handler: the one place that turns `Event`s into
//! HVMI handler calls and their verdicts into `Reply`s (`respond`); arms
//! protection policies once the guest has its own descriptor tables; drives the
//! 1 Hz timer and register polls. Batch mode, the console, caps, bench and the
//! tests all use it.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::event::{Event, ExitHandler, HandlerStop, Reply};
use crate::loader::Symbols;
use crate::shared::VcpuCtl;
use vmiscope_introspect::handlers::{self, BreakpointAction, MemAction, MemExit};
use vmiscope_introspect::policy::{self, Policy, PolicyEnv};
use vmiscope_introspect::{AccessKind, Alert, Engine, EventRecord, Guest, Journal, Verdict};

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
    pub fn new(engine: Engine, policies: Vec<Policy>, env: PolicyEnv) -> Self {
        let pending: Vec<OnReady> = policies
            .into_iter()
            .map(|p| {
                let env = env.clone();
                Box::new(move |e: &mut Engine, g: &mut dyn Guest| {
                    if let Err(err) = policy::enable(e, g, &[p], &env) {
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
        self.engine.lock().unwrap().alerts().to_vec()
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
            for a in &e.alerts()[before..] {
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
        let before = e.alerts().len();
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
        let before = e.alerts().len();
        let reply = respond(e, cpu, event);
        self.report(e, before);
        reply
    }
}

/// The engine's answer to one VMM event, as the VMM's reply: the whole mapping
/// between the two vocabularies. A commit failure inside the engine (its hooks'
/// controls could not be applied) ends the run with a clear reason rather than
/// letting the guest run unprotected.
pub fn respond(e: &mut Engine, g: &mut dyn Guest, event: &Event) -> Reply {
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
            mem_reply(handlers::handle_ept_violation(e, g, &x).1)
        }
        Event::ExecFault { gva, gpa, .. } => {
            let x = MemExit {
                gpa,
                len: 1,
                access: AccessKind::Exec,
                data: None,
                rip: gva,
            };
            mem_reply(handlers::handle_ept_violation(e, g, &x).1)
        }
        Event::Msr { index, write, .. } => match handlers::handle_msr_violation(e, g, index, write)
        {
            Verdict::NotAllowed => Reply::Drop,
            _ => Reply::Continue,
        },
        Event::Introcall(c) => match handlers::handle_introcall(e, g, c.op, c.args) {
            Some(v) => Reply::Data(v),
            None => Reply::Continue,
        },
        Event::Breakpoint {
            rip,
            gpa: Some(gpa),
            ..
        } => match handlers::handle_breakpoint(e, g, rip, gpa) {
            BreakpointAction::StepOver | BreakpointAction::Reinject => Reply::Continue,
            BreakpointAction::Skip(len) => Reply::Skip(len),
        },
        _ => Reply::Continue,
    };
    match e.take_fatal() {
        Some(why) => Reply::Stop(HandlerStop::EngineFailed(why)),
        None => reply,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::MemAccess;
    use crate::stop::StopReason;
    use vmiscope_introspect::mock::{MockGuest, Op};
    use vmiscope_introspect::{Outcome, Rights, Target};

    #[test]
    fn a_failed_commit_stops_the_run_with_a_clear_reason() {
        let (mut e, mut g) = (Engine::new(), MockGuest::new());
        // A write hook that removes itself when it fires: the commit at the end of
        // the handler gives the page back, and that commit fails.
        e.add_hook(
            &mut g,
            Target::Gpa {
                gpa: 0x5000,
                len: 8,
                rights: Rights::W,
            },
            "once",
            Box::new(|_| Outcome::allow().and_remove()),
        )
        .unwrap();
        g.fail_nth(Op::CommitRights, 1);
        g.put(0x20000, &[0x89, 0x08]); // mov [rax], ecx
        (g.regs.rax, g.regs.rip) = (0x5000, 0x20002);
        let write = Event::Mem(MemAccess {
            gpa: 0x5000,
            len: 4,
            write: true,
            data: 7,
            rip: 0x20002,
            cpl: 0,
        });
        let reply = respond(&mut e, &mut g, &write);
        let Reply::Stop(cause) = reply else {
            panic!("the run goes on unprotected: {reply:?}");
        };
        let said = StopReason::Handler(cause).to_string();
        assert!(
            said.contains("introspection disabled: commit failed")
                && said.contains("injected CommitRights failure"),
            "{said}"
        );
        // The next event is answered normally: the failure was reported once.
        assert_eq!(respond(&mut e, &mut g, &Event::Halt), Reply::Continue);
    }
}
