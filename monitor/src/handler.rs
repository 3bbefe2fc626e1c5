//! The engine as the VMM's exit handler: the one place that turns `Event`s into
//! HVMI handler calls and their verdicts into `Reply`s (`respond`); arms
//! protection policies once the guest has its own descriptor tables; drives the
//! 1 Hz timer and register polls. Batch mode, the console, caps, bench and the
//! tests all use it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use vmiscope_vmm::{Event, ExitHandler, HandlerStop, Reply, VcpuCtl};

use crate::notices::{Notice, Notices};
use crate::os::{LINUX_CEA_RO_IDT, OsKnowledge, Symbols, policy_env};

use vmiscope_introspect::handlers::MemExit;
use vmiscope_introspect::policy::{self, Policy, PolicyEnv};
use vmiscope_introspect::{
    AccessKind, Alert, Engine, EngineEvent, EventRecord, Guest, Handled, Response,
};

/// Receives each alert as it is raised, on the vCPU thread that raised it.
pub type AlertSink = Box<dyn Fn(&Alert) + Send + Sync>;

/// Setup run once the guest is up (policies, a test's hooks).
pub type OnReady = Box<dyn FnOnce(&mut Engine, &mut dyn Guest) + Send>;

/// What waits for the guest to be ready.
enum Pending {
    /// Policies, switched on with the policy environment of that moment.
    Policies(Vec<Policy>),
    Setup(OnReady),
}

pub struct Introspection {
    pub(crate) engine: Mutex<Engine>,
    pending: Mutex<Vec<Pending>>,
    last_tick: Mutex<Instant>,
    /// How often `handle_timer` runs (HVMI: once a second).
    pub timer_period: Duration,
    /// Called with each alert as it is raised (batch mode prints them).
    alert_sink: std::sync::OnceLock<AlertSink>,
    /// What happened, for the front ends (`subscribe`).
    notices: Arc<Notices>,
    /// Where the policies find what they protect: from the symbols, again once
    /// a KASLR slide is found (policies armed after that see the moved kernel).
    env: Mutex<PolicyEnv>,
    /// The guest OS's symbols and layout.
    os: OsKnowledge,
}

impl Introspection {
    pub fn new(engine: Engine, policies: Vec<Policy>, env: PolicyEnv) -> Self {
        let pending: Vec<Pending> = policies
            .into_iter()
            .map(|p| Pending::Policies(vec![p]))
            .collect();
        Introspection {
            env: Mutex::new(env),
            engine: Mutex::new(engine),
            pending: Mutex::new(pending),
            last_tick: Mutex::new(Instant::now()),
            timer_period: Duration::from_secs(1),
            alert_sink: std::sync::OnceLock::new(),
            notices: Arc::default(),
            os: OsKnowledge::default(),
        }
    }

    /// The same, knowing the guest's OS (`env` is made from its symbols).
    pub fn with_os(mut self, os: OsKnowledge) -> Self {
        self.os = os;
        self
    }

    /// The guest's symbols (moved by the KASLR slide once it is found).
    pub fn symbols(&self) -> &Symbols {
        self.os.symbols()
    }

    /// A Linux guest's layout (from its BTF), or why there is none; None for
    /// a guest that is not Linux.
    pub fn linux(&self) -> Option<&Result<vmiscope_introspect::linux::Layout, String>> {
        self.os.linux()
    }

    /// Switches `policies` on when the guest is ready (see `arm`), with the
    /// policy environment of that moment (a KASLR slide may be known by then).
    pub fn enable_when_ready(&self, policies: Vec<Policy>) {
        self.pending
            .lock()
            .unwrap()
            .push(Pending::Policies(policies));
    }

    /// Where the policies find what they protect now (see `env`).
    pub fn policy_env(&self) -> PolicyEnv {
        self.env.lock().unwrap().clone()
    }

    /// Sends every alert, as it is raised, to `sink` (once set, it stays: a
    /// front end sets it before the guest runs).
    pub fn set_alert_sink(&self, sink: AlertSink) {
        let _ = self.alert_sink.set(sink);
    }

    /// Runs `f` once the guest runs on its own descriptor tables.
    pub fn on_ready(&self, f: OnReady) {
        self.pending.lock().unwrap().push(Pending::Setup(f));
    }

    pub fn alerts(&self) -> Vec<Alert> {
        self.engine.lock().unwrap().alerts().to_vec()
    }

    /// Set-ups (policies, hooks) still waiting for the guest's own IDT.
    pub fn armed(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    /// Policies wait until the guest runs on its own descriptor tables (IDTR set),
    /// as HVMI waits for the guest OS to be initialised; a Linux kernel, until
    /// it has cleared its .bss and loaded `idt_table` (its boot IDT comes
    /// before that, and clearing .bss zeroes the table).
    fn arm(&self, e: &mut Engine, cpu: &mut VcpuCtl<'_>) {
        let mut pending = self.pending.lock().unwrap();
        if pending.is_empty() {
            return;
        }
        let idt = VcpuCtl::sregs(cpu).idt.base;
        let Some(env) = self.ready_env(cpu, idt) else {
            return;
        };
        // The other vCPUs stay out of the guest until the hooks are whole
        // (see `VmShared::hold_guest`).
        let _held = cpu.vm().hold_guest();
        for p in pending.drain(..) {
            match p {
                Pending::Policies(p) => {
                    if let Err(err) = policy::enable(e, cpu, &p, &env) {
                        crate::say!("[vmiscope] {err}");
                    }
                }
                Pending::Setup(f) => f(e, cpu),
            }
        }
        if let Err(err) = e.commit(cpu) {
            crate::say!("[vmiscope] {err}");
        }
    }

    /// The policy environment once the guest runs on its own IDT (`idt`, its
    /// IDTR base), else None. A Linux kernel whose base is not known yet
    /// (KASLR: its own decompressor placed it) is found from that IDT: it
    /// points into the kernel image, at its boot table or at `idt_table`.
    fn ready_env(&self, cpu: &VcpuCtl<'_>, idt: u64) -> Option<PolicyEnv> {
        let mut env = self.env.lock().unwrap();
        if env.linux.is_none() {
            return (idt != 0).then(|| env.clone());
        }
        let sym = self.os.symbols();
        if sym.slide().is_none() {
            // Until the slide is known, `env` holds link addresses: the kernel's
            // own IDTs there (its boot table and `idt_table`; not the fixed alias).
            let links = env.linux.as_ref()?.idt_bases.iter().copied();
            let slide = sym.slide_from(idt, links.filter(|b| *b != LINUX_CEA_RO_IDT))?;
            crate::say!(
                "[vmiscope] KASLR: the kernel runs {slide:#x} above its link addresses (found from its IDT at {idt:#x}); every symbol moves with it"
            );
            *env = policy_env(sym, cpu.vm().ram().size());
        }
        // Linux: armed once it has cleared its .bss and loaded `idt_table`
        // (its boot IDT comes before that, and clearing .bss zeroes the table).
        let table = env.linux.as_ref()?.idt_table.0;
        [table, LINUX_CEA_RO_IDT]
            .contains(&idt)
            .then(|| env.clone())
    }

    /// Hands the alerts raised since `before` to the alert sink, if any, and
    /// to the subscribers.
    fn report(&self, e: &Engine, before: usize) {
        for a in &e.alerts()[before..] {
            if let Some(sink) = self.alert_sink.get() {
                sink(a);
            }
            self.notices.publish(Notice::Alert(a.clone()));
        }
    }

    /// Where the session's notices go (serial lines, alerts, stops, the end).
    pub fn notices(&self) -> &Arc<Notices> {
        &self.notices
    }

    /// A receiver of every notice from now on.
    pub fn subscribe(&self) -> std::sync::mpsc::Receiver<Notice> {
        self.notices.subscribe()
    }
}

impl Introspection {
    /// The engine's answer to `event` together with the record of that event (if
    /// a hook fired), both from one hold of the engine lock: with several vCPUs
    /// the newest record may be another vCPU's a moment later.
    pub fn decide(
        &self,
        cpu: &mut VcpuCtl<'_>,
        event: &Event,
    ) -> (Reply, Option<Arc<EventRecord>>) {
        let mut e = self.engine.lock().unwrap();
        let before = e.alerts().len();
        let out = respond(&mut e, cpu, event);
        self.report(&e, before);
        // Counted once the lock is free: a waiter it wakes reads the engine.
        drop(e);
        if let Some(r) = &out.1 {
            self.notices.event_recorded(r.class);
        }
        out
    }

    /// The per-exit work (policies, timer, register polls) and the record of the
    /// newest polled change it concluded, from one hold of the engine lock. A
    /// panic in it (a policy's set-up, a poll's hook) ends the run as an engine
    /// crash, with the lock unpoisoned (see `per_exit`).
    pub fn poll(&self, cpu: &mut VcpuCtl<'_>) -> Result<Option<Arc<EventRecord>>, HandlerStop> {
        let mut e = self.engine.lock().unwrap();
        let before = e.alerts().len();
        let timer = self.tick_due();
        let rec = per_exit(&mut e, cpu, timer, |e, cpu| self.arm(e, cpu));
        self.report(&e, before);
        drop(e);
        if let Ok(Some(r)) = &rec {
            self.notices.event_recorded(r.class);
        }
        rec
    }

    /// Whether HVMI's timer is due (once per `timer_period`, on any vCPU).
    fn tick_due(&self) -> bool {
        let mut t = self.last_tick.lock().unwrap();
        let due = t.elapsed() >= self.timer_period;
        if due {
            *t = Instant::now();
        }
        due
    }
}

/// The work of every exit on the engine the caller holds locked: `first` (the
/// policies waiting to be armed), then the register polls or, with `timer`,
/// HVMI's timer handler. Hook callbacks run inside, so a panic is caught here,
/// inside the lock's hold: the guard is never dropped while unwinding, so the
/// engine's mutex is not poisoned, and the run ends as an engine crash instead
/// of the vCPU thread dying and every later lock panicking.
pub fn per_exit<G: Guest>(
    e: &mut Engine,
    g: &mut G,
    timer: bool,
    first: impl FnOnce(&mut Engine, &mut G),
) -> Result<Option<Arc<EventRecord>>, HandlerStop> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        first(e, g);
        e.handle_exit(g, timer)
    }))
    .map_err(|panic| HandlerStop::EngineCrashed(panic_message(panic.as_ref())))
}

/// What a caught panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// The engine's answer to one VMM event, as the VMM's reply, with the record of
/// that event: the whole mapping between the two vocabularies. A commit failure
/// inside the engine (its hooks' controls could not be applied), or a panic in
/// the engine or a hook, ends the run with a clear reason rather than letting
/// the guest run unprotected or taking the VMM down.
pub fn respond(
    e: &mut Engine,
    g: &mut dyn Guest,
    event: &Event,
) -> (Reply, Option<Arc<EventRecord>>) {
    let Some(ev) = engine_event(event) else {
        // Not the engine's; a failure of the timer or a register poll ends the
        // run at the next event.
        return match e.take_fatal() {
            Some(why) => (Reply::Stop(HandlerStop::EngineFailed(why)), None),
            None => (Reply::Continue, None),
        };
    };
    match std::panic::catch_unwind(AssertUnwindSafe(|| e.handle_event(g, ev))) {
        Ok(Handled { response, record }) => (reply_for(response), record),
        Err(panic) => (
            Reply::Stop(HandlerStop::EngineCrashed(panic_message(panic.as_ref()))),
            None,
        ),
    }
}

/// The engine's view of a VMM event, for the events it handles.
fn engine_event(event: &Event) -> Option<EngineEvent> {
    Some(match *event {
        Event::Mem(m) => EngineEvent::Mem(MemExit {
            gpa: m.gpa,
            len: m.len as u64,
            access: if m.write {
                AccessKind::Write
            } else {
                AccessKind::Read
            },
            data: m.write.then_some(m.data),
            rip: m.rip,
        }),
        Event::ExecFault { gva, gpa, .. } => EngineEvent::Mem(MemExit {
            gpa,
            len: 1,
            access: AccessKind::Exec,
            data: None,
            rip: gva,
        }),
        Event::Msr { index, write, .. } => EngineEvent::Msr { index, write },
        Event::Introcall(c) => EngineEvent::Introcall {
            op: c.op,
            args: c.args,
        },
        Event::Breakpoint {
            rip,
            gpa: Some(gpa),
            ..
        } => EngineEvent::Breakpoint { gva: rip, gpa },
        _ => return None,
    })
}

/// The engine's response as the VMM's reply (see `Reply` for what each does).
fn reply_for(r: Response) -> Reply {
    match r {
        Response::Allow | Response::Introcall(None) => Reply::Continue,
        Response::Drop => Reply::Drop,
        Response::Data(v) | Response::Introcall(Some(v)) => Reply::Data(v),
        Response::Retry => Reply::Retry,
        Response::Skip(len) => Reply::Skip(len),
        Response::Fatal(why) => Reply::Stop(HandlerStop::EngineFailed(why)),
    }
}

impl ExitHandler for Introspection {
    fn on_exit(&self, cpu: &mut VcpuCtl<'_>) -> Result<(), HandlerStop> {
        self.poll(cpu).map(|_| ())
    }

    fn on_event(&self, cpu: &mut VcpuCtl<'_>, event: &Event) -> Reply {
        self.decide(cpu, event).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmiscope_introspect::mock::{MockGuest, Op};
    use vmiscope_introspect::{Outcome, Rights, Target};
    use vmiscope_vmm::{MemAccess, StopReason};

    /// An engine with a write hook (`cb`) on 0x5000, and the trapped write of
    /// `mov [rax], ecx` to it.
    fn hooked_write(cb: vmiscope_introspect::Callback) -> (Engine, MockGuest, Event) {
        let (mut e, mut g) = (Engine::new(), MockGuest::new());
        let t = Target::Gpa {
            gpa: 0x5000,
            len: 8,
            rights: Rights::W,
        };
        e.add_hook(&mut g, t, "w", cb).unwrap();
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
        (e, g, write)
    }

    #[test]
    fn a_failed_commit_stops_the_run_with_a_clear_reason() {
        // A write hook that removes itself when it fires: the commit at the end of
        // the handler gives the page back, and that commit fails.
        let (mut e, mut g, write) = hooked_write(Box::new(|_| Outcome::allow().and_remove()));
        g.fail_nth(Op::CommitRights, 1);
        let (reply, _) = respond(&mut e, &mut g, &write);
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
        assert_eq!(respond(&mut e, &mut g, &Event::Halt).0, Reply::Continue);
    }

    fn msr_write(value: u64) -> Event {
        Event::Msr {
            index: 0x10,
            write: Some(value),
            rip: 0,
        }
    }

    #[test]
    fn a_panicking_hook_stops_the_run_with_a_clear_reason() {
        let (mut e, mut g) = (Engine::new(), MockGuest::new());
        let t = Target::Msr {
            index: 0x10,
            read: false,
            write: true,
        };
        e.add_hook(&mut g, t, "bad", Box::new(|_| panic!("hook bug")))
            .unwrap();
        let (reply, _) = respond(&mut e, &mut g, &msr_write(1));
        assert_eq!(
            reply,
            Reply::Stop(HandlerStop::EngineCrashed("hook bug".into()))
        );
    }

    #[test]
    fn a_panicking_per_exit_callback_ends_the_run_without_poisoning_the_lock() {
        // A polled CR0 change whose hook panics, on the per-exit path (which
        // runs on every exit of every vCPU, outside any event).
        let engine = Mutex::new(Engine::new());
        let mut g = MockGuest::new();
        g.sregs.cr0 = 1 << 31;
        g.sregs.efer = 1 << 10;
        g.sregs.idtr = vmiscope_introspect::arch::Dtr {
            base: 0x1000,
            limit: 0xfff,
        };
        let t = Target::Cr {
            cr: vmiscope_introspect::arch::Cr::Cr0,
            mask: !0,
        };
        let mut e = engine.lock().unwrap();
        e.add_hook(&mut g, t, "bad", Box::new(|_| panic!("poll hook bug")))
            .unwrap();
        // The first exit takes the baseline; the second sees CR0 change.
        let crashed = |why: &str| Some(HandlerStop::EngineCrashed(why.into()));
        let out = per_exit(&mut e, &mut g, false, |_, _| {});
        assert!(matches!(out, Ok(None)));
        g.sregs.cr0 |= 1;
        let out = per_exit(&mut e, &mut g, false, |_, _| {});
        assert_eq!(out.err(), crashed("poll hook bug"));
        // So does a panic in the set-up run before the polls (a policy's arming).
        let out = per_exit(&mut e, &mut g, true, |_, _| panic!("arming bug"));
        assert_eq!(out.err(), crashed("arming bug"));
        drop(e);
        assert!(!engine.is_poisoned());
        // The engine still answers.
        let (reply, _) = respond(&mut engine.lock().unwrap(), &mut g, &Event::Halt);
        assert_eq!(reply, Reply::Continue);
    }

    #[test]
    fn each_vcpu_gets_the_record_of_its_own_event() {
        // Two vCPUs' events handled back to back, as two vCPU threads do when one
        // of them is about to stop: each answer carries its own record, so the
        // stop shows the right vCPU's event (the console used to re-read the
        // newest record after the call, which could be the other vCPU's).
        let (mut e, mut g) = (Engine::new(), MockGuest::new());
        g.vcpus = 2;
        let t = Target::Msr {
            index: 0x10,
            read: false,
            write: true,
        };
        e.add_hook(&mut g, t, "m", Box::new(|_| Outcome::block("no")))
            .unwrap();
        let mut records = vec![];
        for (vcpu, value) in [(0, 1), (1, 2), (0, 3)] {
            g.vcpu = vcpu;
            let (reply, rec) = respond(&mut e, &mut g, &msr_write(value));
            assert_eq!(reply, Reply::Drop);
            records.push(rec.expect("a hook fired"));
        }
        let seen: Vec<(u32, Option<u64>)> = records
            .iter()
            .map(|r| match r.event {
                vmiscope_introspect::EventInfo::Msr { write, .. } => (r.vcpu, write),
                _ => (r.vcpu, None),
            })
            .collect();
        assert_eq!(seen, [(0, Some(1)), (1, Some(2)), (0, Some(3))]);
        // An event no hook takes yields no record, not the previous one.
        let (reply, rec) = respond(&mut e, &mut g, &Event::Halt);
        assert!(reply == Reply::Continue && rec.is_none());
    }

    #[test]
    fn a_guest_memory_read_that_fails_mid_event_is_survived() {
        // The engine reads the instruction bytes and page tables while it judges a
        // write; if the hypervisor fails one of those reads, the event is still
        // answered (judged from what the exit reported), nothing panics.
        for nth in 1..=4 {
            let (mut e, mut g, write) = hooked_write(Box::new(|_| Outcome::block("no")));
            g.fail_nth(Op::ReadPhys, nth);
            let (reply, rec) = respond(&mut e, &mut g, &write);
            assert_eq!(
                reply,
                Reply::Drop,
                "read {nth} failed: the hook still decides"
            );
            assert!(rec.is_some());
        }
    }
}
