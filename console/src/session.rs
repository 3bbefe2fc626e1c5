//! A console session: the VM on a background thread, the engine, the event
//! breakpoints, and the execution of commands (shared by REPL, TUI and scripts).

use std::fmt::Write as _;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use vmiscope_introspect::policy::{self, POLICIES, PolicyEnv};
use vmiscope_introspect::{Cr, DtrKind, Engine, Outcome, Rule, Target};
use vmiscope_vmm::{RunOutcome, StopReason, VcpuCtl, VcpuState, Vm, VmShared};

use crate::cli::RunArgs;
use crate::commands::{self, Action, Command, Expect, HookSpec, VerdictChoice};
use crate::control::{ConsoleHandler, Control, Override};
use vmiscope_vmm::engine_glue::{Introspection, policy_env};

/// What a command printed, and whether the session should end.
#[derive(Debug, Default)]
pub struct Output {
    pub text: String,
    pub quit: bool,
}

impl Output {
    fn text(t: impl Into<String>) -> Self {
        Output {
            text: t.into(),
            quit: false,
        }
    }
}

pub struct Session {
    shared: Arc<VmShared>,
    intro: Arc<Introspection>,
    control: Arc<Control>,
    runner: Option<JoinHandle<RunOutcome>>,
    outcome: Option<RunOutcome>,
    /// The selected vCPU.
    vcpu: u32,
    env: PolicyEnv,
    /// vCPUs still in their initial pause.
    at_entry: bool,
    image: String,
    /// Serial output lines, for the TUI.
    serial: Arc<Mutex<Vec<String>>>,
}

impl Session {
    /// Builds the VM and starts it paused at its entry.
    pub fn start(a: &RunArgs) -> Result<Session, String> {
        let (image, vcpus) = crate::launch::load_image(&a.image)?;
        let mut cfg = crate::launch::config(a, vcpus)?;
        cfg.start_paused = true;
        let vm = Vm::new(&cfg, &image).map_err(|e| e.to_string())?;
        let intro = Arc::new(crate::launch::engine(a, vm.shared().symbols())?);
        let shared = vm.shared().clone();
        let control = Arc::new(Control::new(shared.clone()));
        let env = policy_env(shared.symbols());
        let serial = Arc::new(Mutex::new(vec![String::new()]));
        let s2 = serial.clone();
        shared.serial().set_live(Box::new(move |b| {
            let mut lines = s2.lock().unwrap();
            for ch in String::from_utf8_lossy(b).chars() {
                if ch == '\n' {
                    lines.push(String::new());
                } else if let Some(l) = lines.last_mut() {
                    l.push(ch);
                }
            }
        }));
        let handler = Arc::new(ConsoleHandler {
            intro: intro.clone(),
            control: control.clone(),
        });
        let runner = std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || vm.run(handler, &cfg))
            .map_err(|e| e.to_string())?;
        // Commands need the vCPU threads: wait for each to sit in its initial pause
        // (each acknowledges it).
        let paused = |_, st| st == VcpuState::Paused || st == VcpuState::Stopped;
        if !shared.wait_states(Duration::from_secs(5), paused)
            || (0..shared.vcpu_count()).any(|c| shared.vcpu_state(c) == Some(VcpuState::Stopped))
        {
            return Err("the vCPUs did not start".into());
        }
        Ok(Session {
            shared,
            intro,
            control,
            runner: Some(runner),
            outcome: None,
            vcpu: 0,
            env,
            at_entry: true,
            image: a.image.clone(),
            serial,
        })
    }

    /// A second command executor on the same VM, engine and stops (gdb's
    /// `monitor`, next to a console). It does not own the VM thread.
    pub fn attach(&self) -> Session {
        Session {
            shared: self.shared.clone(),
            intro: self.intro.clone(),
            control: self.control.clone(),
            runner: None,
            outcome: None,
            vcpu: 0,
            env: self.env.clone(),
            at_entry: self.at_entry,
            image: self.image.clone(),
            serial: self.serial.clone(),
        }
    }

    /// The VM's shared state (memory, vCPUs, symbols).
    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// The engine and its adapter.
    pub fn intro(&self) -> &Arc<Introspection> {
        &self.intro
    }

    /// Event breakpoints and the current stop.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// The selected vCPU.
    pub fn vcpu(&self) -> u32 {
        self.vcpu
    }

    /// The image name the session was started with.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// The guest's serial output, as lines (the last one still open).
    pub fn serial_lines(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.serial.lock().unwrap()
    }

    /// The serial lines, for a thread that watches them.
    pub fn serial(&self) -> &Arc<Mutex<Vec<String>>> {
        &self.serial
    }

    /// Whether the guest has ended (also for an attached executor).
    pub fn ended(&mut self) -> bool {
        self.outcome().is_some() || (self.runner.is_none() && self.shared.is_stopping())
    }

    fn sym(&self) -> impl Fn(&str) -> Option<u64> + '_ {
        move |n| self.shared.symbols().get(n)
    }

    /// The run's outcome once the guest has ended.
    pub fn outcome(&mut self) -> Option<&RunOutcome> {
        if self.outcome.is_none() && self.runner.as_ref().is_some_and(|r| r.is_finished()) {
            self.outcome = self.runner.take().and_then(|r| r.join().ok());
        }
        self.outcome.as_ref()
    }

    pub fn running(&mut self) -> bool {
        self.outcome().is_none()
    }

    /// running / paused / stopped-at-event / ended, for status lines.
    pub fn status(&mut self) -> String {
        if let Some(o) = self.outcome() {
            return format!("ended: {}", o.reason);
        }
        if let Some(s) = self.control.stop() {
            let what = s.event.as_ref().map(|e| e.class.name()).unwrap_or("step");
            return format!("stopped: vCPU {} at {} ({})", s.vcpu, what, s.why);
        }
        if self.at_entry {
            return "paused at entry".into();
        }
        if (0..self.shared.vcpu_count())
            .all(|c| self.shared.vcpu_state(c).is_none_or(VcpuState::is_quiet))
        {
            "paused".into()
        } else {
            "running".into()
        }
    }

    /// Lets every vCPU run: the one held at a stop, and the paused ones.
    pub fn go(&mut self) {
        self.at_entry = false;
        self.control.resume(None);
        self.shared.resume_all();
    }

    /// Lets only `cpus` run (gdb's scheduler locking).
    pub fn go_only(&mut self, cpus: &[u32]) {
        self.at_entry = false;
        for &c in cpus {
            if self.control.stop().is_some_and(|s| s.vcpu == c) {
                self.control.resume(None);
            }
            // Also cancels a pause queued for it by an all-stop.
            self.shared.resume_vcpu(c);
        }
    }

    /// Runs `f` with the selected vCPU (see `on_vcpu`).
    fn with_guest<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuCtl<'_>) -> R + Send + 'static,
    ) -> Result<R, String> {
        self.on_vcpu(self.vcpu, f)
    }

    /// Runs `f` on vCPU `cpu`'s thread: at once when it is paused or held at a
    /// stop, at its next exit when it runs. The one path for every front end.
    pub fn on_vcpu<R: Send + 'static>(
        &self,
        cpu: u32,
        f: impl FnOnce(&mut VcpuCtl<'_>) -> R + Send + 'static,
    ) -> Result<R, String> {
        let (tx, rx) = mpsc::channel();
        let task: vmiscope_vmm::VcpuTask = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        if !self.shared.with_vcpu(cpu, task) {
            return Err("the guest has ended".into());
        }
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| format!("vCPU {cpu} did not answer"))
    }

    /// Runs one line; errors are one line.
    pub fn exec(&mut self, line: &str) -> Result<Output, String> {
        let cmd = match commands::parse(line, &self.sym())? {
            Some(c) => c,
            None => return Ok(Output::default()),
        };
        self.run(cmd)
    }

    pub fn run(&mut self, cmd: Command) -> Result<Output, String> {
        use Command as C;
        let ended = self.ended();
        let needs_guest = !matches!(
            cmd,
            C::Help(_)
                | C::Quit
                | C::Events { .. }
                | C::Alerts
                | C::Alert(_)
                | C::Exceptions
                | C::ExceptionsSave(_)
                | C::Stats
                | C::Caps
                | C::JournalSave(_)
                | C::Breaks
                | C::Delete(_)
                | C::Hooks
                | C::LogOnly(_)
                | C::ExceptionFromAlert(_)
                | C::BreakEvent { .. }
                | C::BreakHook(_)
                | C::Expect(..)
                | C::Vcpu(_)
                | C::MemRead { phys: true, .. }
        );
        if ended && needs_guest {
            return Err(format!(
                "the guest has ended ({})",
                self.outcome()
                    .map(|o| o.reason.to_string())
                    .unwrap_or_default()
            ));
        }
        Ok(match cmd {
            C::Quit => {
                self.shared.stop(StopReason::User);
                let _ = self.control.resume(None);
                Output {
                    text: "bye".into(),
                    quit: true,
                }
            }
            C::Continue => {
                self.go();
                Output::text("continuing")
            }
            C::Pause => {
                self.shared.pause_all();
                let ok = self.shared.wait_paused(Duration::from_secs(3));
                Output::text(if ok {
                    self.where_all()
                } else {
                    "some vCPU did not pause (stopped at an event?)".into()
                })
            }
            C::NextEvent => {
                let n = self.control.stop_count();
                self.control.arm_next_event();
                self.go();
                match self.control.wait_stop(n, Duration::from_secs(10)) {
                    Some(_) => Output::text(self.describe_stop()),
                    None => Output::text("no event within 10 s (still running; `pause` to stop)"),
                }
            }
            C::Step => self.step()?,
            C::Vcpu(n) => {
                if n >= self.shared.vcpu_count() {
                    return Err(format!(
                        "no vCPU {n} (this guest has {})",
                        self.shared.vcpu_count()
                    ));
                }
                self.vcpu = n;
                Output::text(format!("vCPU {n} selected"))
            }
            C::BreakEvent { class, vcpu } => {
                let id = self.control.add_break(class, None, vcpu);
                Output::text(format!(
                    "breakpoint {id}: events{}{}",
                    class
                        .map(|c| format!(" of class {}", c.name()))
                        .unwrap_or_default(),
                    vcpu.map(|v| format!(" on vCPU {v}")).unwrap_or_default()
                ))
            }
            C::BreakHook(h) => {
                if self.intro.engine.lock().unwrap().hooks().get(h).is_none() {
                    return Err(format!("no hook {h} (see `hooks`)"));
                }
                let id = self.control.add_break(None, Some(h), None);
                Output::text(format!("breakpoint {id}: when hook {h} fires"))
            }
            C::Breaks => {
                let mut t = String::new();
                for b in self.control.breaks() {
                    let _ = writeln!(
                        t,
                        "{:>3}  class {:<10} hook {:<6} vcpu {}",
                        b.id,
                        b.class.map(|c| c.name()).unwrap_or("any"),
                        b.hook.map(|h| h.to_string()).unwrap_or("any".into()),
                        b.vcpu.map(|v| v.to_string()).unwrap_or("any".into())
                    );
                }
                Output::text(if t.is_empty() {
                    "no event breakpoints".into()
                } else {
                    t
                })
            }
            C::Delete(n) => {
                if !self.control.delete_break(n) {
                    return Err(format!("no breakpoint {n}"));
                }
                Output::text(format!("deleted breakpoint {n}"))
            }
            C::Event => Output::text(self.describe_stop()),
            C::Verdict(v) => {
                let stop = self.control.stop().ok_or("not stopped at an event")?;
                if stop.applied {
                    return Err("this event's verdict is already applied (a polled register change or a step)".into());
                }
                let over = match v {
                    VerdictChoice::Allow => Some(Override::Allow),
                    VerdictChoice::Deny => Some(Override::Deny),
                    VerdictChoice::Policy => None,
                };
                if let (Some(o), Some(ev)) = (over, &stop.event) {
                    self.intro.engine.lock().unwrap().journal_override(
                        ev.event_id,
                        ev.verdict,
                        o == Override::Allow,
                    );
                }
                self.control.resume(over);
                Output::text(format!(
                    "verdict {}; continuing",
                    match v {
                        VerdictChoice::Allow => "allow",
                        VerdictChoice::Deny => "deny",
                        VerdictChoice::Policy => "as the policy said",
                    }
                ))
            }
            C::Hook(spec) => self.add_hook(spec)?,
            C::Hooks => Output::text(self.hooks_text()),
            C::HookEnable(id, on) => {
                self.intro
                    .engine
                    .lock()
                    .unwrap()
                    .set_hook_enabled(id, on)
                    .map_err(|e| e.to_string())?;
                Output::text(format!(
                    "hook {id} {}",
                    if on { "enabled" } else { "disabled" }
                ))
            }
            C::HookDelete(id) => {
                let intro = self.intro.clone();
                self.intro
                    .engine
                    .lock()
                    .unwrap()
                    .remove_hook(id)
                    .map_err(|e| e.to_string())?;
                self.with_guest(move |cpu| {
                    intro
                        .engine
                        .lock()
                        .unwrap()
                        .commit(cpu)
                        .map_err(|e| e.to_string())
                })??;
                Output::text(format!("hook {id} deleted"))
            }
            C::Protect(name) if name == "list" => Output::text(
                POLICIES
                    .iter()
                    .map(|(n, d)| format!("{n:<14} {d}\n"))
                    .collect::<String>(),
            ),
            C::Protect(name) if self.with_guest(|cpu| VcpuCtl::sregs(cpu).idt.base)? == 0 => {
                // At entry the guest has no IDT yet: arm the policy for when it does,
                // as `--protect` does.
                policy::parse_list(&name).map_err(|e| e.to_string())?;
                let (env, n) = (self.env.clone(), name.clone());
                self.intro.on_ready(Box::new(move |e, g| {
                    if let Err(err) = policy::enable(e, g, &n, &env) {
                        eprintln!("[vmiscope] {err}");
                    }
                }));
                Output::text(format!(
                    "policy {name} armed: it switches on when the guest loads its own IDT"
                ))
            }
            C::Protect(name) => {
                let (intro, env) = (self.intro.clone(), self.env.clone());
                let n = name.clone();
                let ids = self.with_guest(move |cpu| {
                    let mut e = intro.engine.lock().unwrap();
                    let r = policy::enable(&mut e, cpu, &n, &env).map_err(|e| e.to_string());
                    let _ = e.commit(cpu);
                    r
                })??;
                Output::text(format!("policy {name} on: hooks {ids:?}"))
            }
            C::Unprotect(name) => {
                let intro = self.intro.clone();
                let n = self
                    .intro
                    .engine
                    .lock()
                    .unwrap()
                    .hooks()
                    .iter()
                    .filter(|h| h.name == format!("policy:{name}"))
                    .count();
                if n == 0 {
                    return Err(format!("policy {name} is not on"));
                }
                policy::disable(&mut self.intro.engine.lock().unwrap(), &name);
                self.with_guest(move |cpu| {
                    intro
                        .engine
                        .lock()
                        .unwrap()
                        .commit(cpu)
                        .map_err(|e| e.to_string())
                })??;
                Output::text(format!("policy {name} off ({n} hooks removed)"))
            }
            C::Regs => Output::text(self.with_guest(|cpu| fmt_regs(&VcpuCtl::regs(cpu)))?),
            C::Sregs => Output::text(self.with_guest(|cpu| fmt_sregs(&VcpuCtl::sregs(cpu)))?),
            C::Msr(i) => match self.with_guest(move |cpu| cpu.msr(i))? {
                Some(v) => Output::text(format!("msr {i:#x} = {v:#018x}")),
                None => return Err(format!("KVM cannot read MSR {i:#x}")),
            },
            C::MemRead { addr, len, phys } => {
                let mut buf = vec![0u8; len as usize];
                self.read(addr, &mut buf, phys)?;
                Output::text(hexdump(addr, &buf))
            }
            C::MemWrite { addr, bytes, phys } => {
                // Page by page: consecutive virtual pages need not be consecutive
                // in guest-physical memory. Checked before any byte is written.
                let pieces: Vec<(u64, u64)> = if phys {
                    vec![(addr, bytes.len() as u64)]
                } else {
                    vmiscope_introspect::decode::split_pages(addr, bytes.len() as u64)
                        .into_iter()
                        .map(|(va, n)| self.translate(va).map(|gpa| (gpa, n)))
                        .collect::<Result<_, _>>()?
                };
                let mut done = 0;
                for (gpa, n) in pieces {
                    self.shared
                        .write_around_breakpoints(gpa, &bytes[done..done + n as usize])
                        .map_err(|e| e.to_string())?;
                    done += n as usize;
                }
                Output::text(format!("wrote {} bytes at {addr:#x}", bytes.len()))
            }
            C::Disasm { addr, count } => Output::text(self.disasm(addr, count)?),
            C::Translate(gva) => Output::text(format!("{gva:#x} -> {:#x}", self.translate(gva)?)),
            C::Pagewalk(gva) => {
                let mode = self.paging()?;
                let t = vmiscope_introspect::paging::translate(self.shared.ram(), mode, gva)
                    .map_err(|e| e.to_string())?;
                let mut out = String::new();
                for s in &t.steps {
                    let _ = writeln!(
                        out,
                        "PML{} table {:#x} [{:3}] = {:#018x}",
                        s.level, s.table, s.index, s.entry
                    );
                }
                let _ = write!(
                    out,
                    "-> {:#x} ({} page, {}{}{})",
                    t.gpa,
                    size_name(t.page_size),
                    if t.writable { "w" } else { "r" },
                    if t.user { "u" } else { "s" },
                    if t.no_exec { " nx" } else { "" }
                );
                Output::text(out)
            }
            C::Events { n, class } => {
                let e = self.intro.engine.lock().unwrap();
                let list: Vec<_> = e
                    .recent()
                    .iter()
                    .filter(|r| class.is_none_or(|c| c == r.class))
                    .collect();
                let mut t = String::new();
                for r in &list[list.len().saturating_sub(n)..] {
                    let _ = writeln!(t, "{}", event_line(r));
                }
                Output::text(if t.is_empty() {
                    "no handled events yet".into()
                } else {
                    t
                })
            }
            C::Alerts => {
                let e = self.intro.engine.lock().unwrap();
                let t: String = e
                    .alerts()
                    .iter()
                    .map(|a| format!("{}\n", alert_line(a)))
                    .collect();
                Output::text(if t.is_empty() { "no alerts".into() } else { t })
            }
            C::Alert(id) => {
                let e = self.intro.engine.lock().unwrap();
                let a = e
                    .alerts()
                    .iter()
                    .find(|a| a.id == id)
                    .ok_or_else(|| format!("no alert {id} (see `alerts`)"))?;
                Output::text(serde_json::to_string_pretty(a).unwrap_or_default())
            }
            C::ExceptionFromAlert(id) => {
                let mut e = self.intro.engine.lock().unwrap();
                let a = e
                    .alerts()
                    .iter()
                    .find(|a| a.id == id)
                    .ok_or_else(|| format!("no alert {id} (see `alerts`)"))?;
                let rule = Rule::from_alert(a);
                let text = serde_json::to_string(&rule).unwrap_or_default();
                e.exceptions_mut().rules.push(rule);
                Output::text(format!(
                    "exception {} added: {text}",
                    e.exceptions().rules.len() - 1
                ))
            }
            C::Exceptions => {
                let e = self.intro.engine.lock().unwrap();
                Output::text(if e.exceptions().rules.is_empty() {
                    "no exception rules".into()
                } else {
                    e.exceptions().to_json()
                })
            }
            C::ExceptionsSave(f) => {
                let json = self.intro.engine.lock().unwrap().exceptions().to_json();
                std::fs::write(&f, json).map_err(|e| format!("cannot write {f}: {e}"))?;
                Output::text(format!("saved to {f}"))
            }
            C::LogOnly(on) => {
                self.intro.engine.lock().unwrap().set_log_only(on);
                Output::text(format!("log-only {}", if on { "on" } else { "off" }))
            }
            C::Stats => Output::text(self.stats()),
            C::Caps => {
                let c = crate::caps::measure()?;
                Output::text(
                    c.rows
                        .iter()
                        .map(|r| {
                            format!(
                                "{:<22} CPL0 {:<12} CPL3 {:<12}\n",
                                r.mechanism,
                                format!("{:?}", r.cpl0).to_lowercase(),
                                format!("{:?}", r.cpl3).to_lowercase()
                            )
                        })
                        .collect::<String>(),
                )
            }
            C::JournalSave(f) => {
                let e = self.intro.engine.lock().unwrap();
                let mut out = String::new();
                for r in e.recent() {
                    let _ = writeln!(out, "{}", serde_json::json!({"type": "event", "record": r}));
                }
                for a in e.alerts() {
                    let _ = writeln!(out, "{}", serde_json::json!({"type": "alert", "alert": a}));
                }
                std::fs::write(&f, out).map_err(|e| format!("cannot write {f}: {e}"))?;
                Output::text(format!(
                    "saved {} events and {} alerts to {f}",
                    e.recent().len(),
                    e.alerts().len()
                ))
            }
            C::Help(None) => Output::text(
                commands::HELP
                    .iter()
                    .map(|(u, d)| format!("{u:<38} {d}\n"))
                    .collect::<String>(),
            ),
            C::Help(Some(c)) => {
                let hits: String = commands::HELP
                    .iter()
                    .filter(|(u, _)| u.split_whitespace().next() == Some(c.as_str()))
                    .map(|(u, d)| format!("{u:<38} {d}\n"))
                    .collect();
                if hits.is_empty() {
                    return Err(format!("no command `{c}` (try `help`)"));
                }
                Output::text(hits)
            }
            C::Expect(e, t) => Output::text(self.expect(&e, t)?),
        })
    }

    fn where_all(&self) -> String {
        (0..self.shared.vcpu_count())
            .map(|c| {
                let (rip, cpl) = self.shared.last_position(c).unwrap_or_default();
                format!("vCPU {c} at {} CPL{cpl}", self.addr_name(rip))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// `0x1234 <symbol+0x10>`
    pub fn addr_name(&self, a: u64) -> String {
        match self.shared.symbols().lookup(a) {
            Some((n, 0)) => format!("{a:#x} <{n}>"),
            Some((n, off)) if off < 0x1000 => format!("{a:#x} <{n}+{off:#x}>"),
            _ => format!("{a:#x}"),
        }
    }

    pub fn describe_stop(&self) -> String {
        let Some(s) = self.control.stop() else {
            return "not stopped at an event".into();
        };
        let mut t = format!("vCPU {} stopped ({})", s.vcpu, s.why);
        if let Some(e) = &s.event {
            let _ = write!(t, "\n  {}", event_line(e));
            let _ = write!(
                t,
                "\n  instruction: {} at {}",
                e.instruction.as_deref().unwrap_or("(unknown: polled)"),
                self.addr_name(e.rip)
            );
            let _ = write!(t, "\n  hooks: {:?}", e.hooks);
        }
        if let Some(r) = &s.raw {
            let _ = write!(t, "\n  exit: {r}");
        }
        let _ = write!(
            t,
            "\n  verdict: {}{}",
            s.proposed,
            if s.applied {
                ""
            } else {
                "  (`verdict allow|deny|policy`)"
            }
        );
        t
    }

    fn step(&mut self) -> Result<Output, String> {
        let n = self.control.stop_count();
        let ok = self.with_guest(|cpu| cpu.start_step())?;
        if !ok {
            return Err(
                "cannot single-step here: at CPL3 this host needs a #DB gate in the guest's IDT and a free DR slot (see `caps`)"
                    .into(),
            );
        }
        self.control.arm_step(self.vcpu);
        self.go();
        match self.control.wait_stop(n, Duration::from_secs(5)) {
            Some(s) => {
                Output::text(format!("vCPU {}: {}", s.vcpu, s.raw.unwrap_or_default())).pipe(Ok)
            }
            None => Err("the step did not complete within 5 s".into()),
        }
    }

    /// The selected vCPU's paging mode at its last exit.
    fn paging(&self) -> Result<vmiscope_introspect::paging::PagingMode, String> {
        self.shared
            .last_paging(self.vcpu)
            .ok_or_else(|| format!("no vCPU {}", self.vcpu))
    }

    fn translate(&self, gva: u64) -> Result<u64, String> {
        let mode = self.paging()?;
        vmiscope_introspect::paging::translate(self.shared.ram(), mode, gva)
            .map(|t| t.gpa)
            .map_err(|e| e.to_string())
    }

    fn read(&self, addr: u64, buf: &mut [u8], phys: bool) -> Result<(), String> {
        if phys {
            self.shared.ram().read(addr, buf).map_err(|e| e.to_string())
        } else {
            self.shared
                .read_virt(self.vcpu, addr, buf)
                .map_err(|e| e.to_string())
        }
    }

    pub fn disasm(&self, addr: Option<u64>, count: usize) -> Result<String, String> {
        let rip = self.shared.last_position(self.vcpu).unwrap_or_default().0;
        let start = addr.unwrap_or(rip);
        let mut bytes = vec![0u8; count * 15];
        // Read what is mapped: stop at the first unreadable page.
        let mut n = 0;
        while n < bytes.len()
            && self
                .read(start + n as u64, &mut bytes[n..n + 1], false)
                .is_ok()
        {
            n += 1;
        }
        if n == 0 {
            return Err(format!("{start:#x} is not mapped"));
        }
        let bps: Vec<u64> = self
            .intro
            .engine
            .lock()
            .unwrap()
            .hooks()
            .iter()
            .filter_map(|h| match h.target {
                Target::Breakpoint { gva, .. } => Some(gva),
                _ => None,
            })
            .collect();
        // Show our INT3s as the original instruction, with a marker.
        for (i, b) in bytes[..n].iter_mut().enumerate() {
            if let Some(orig) = self
                .shared
                .sw_breakpoint_at(self.translate(start + i as u64).unwrap_or(u64::MAX))
            {
                *b = orig;
            }
        }
        let mut d = Decoder::with_ip(64, &bytes[..n], start, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        let mut out = String::new();
        for instr in d.iter().take(count) {
            let mut text = String::new();
            f.format(&instr, &mut text);
            let ip = instr.ip();
            let mark = if bps.contains(&ip) { "*" } else { " " };
            let cur = if ip == rip { "=>" } else { "  " };
            let label = match self.shared.symbols().lookup(ip) {
                Some((s, 0)) => format!("  <{s}>"),
                Some((s, o)) if o < 0x1000 => format!("  <{s}+{o:#x}>"),
                _ => String::new(),
            };
            let _ = writeln!(out, "{cur}{mark}{ip:x} {text:<28}{label}");
        }
        Ok(out)
    }

    pub fn hooks_text(&self) -> String {
        let e = self.intro.engine.lock().unwrap();
        let mut t = String::new();
        for h in e.hooks().iter() {
            let _ = writeln!(
                t,
                "{:>4} {:<8} {:<22} hits {:<6} {} {}",
                h.id,
                h.target.class().name(),
                h.name,
                h.hits,
                if h.enabled { "on " } else { "off" },
                target_text(&h.target)
            );
        }
        if t.is_empty() { "no hooks".into() } else { t }
    }

    fn stats(&self) -> String {
        let e = self.intro.engine.lock().unwrap();
        let mut t = String::from("events per class:");
        let mut classes: Vec<_> = e.events_per_class().iter().collect();
        classes.sort();
        for (c, n) in classes {
            let _ = write!(t, " {}={n}", c.name());
        }
        let _ = write!(
            t,
            "\nhandler latency: {} events, mean {:.2} us\n",
            e.latency().count,
            e.latency().total_ns as f64 / e.latency().count.max(1) as f64 / 1e3
        );
        for (i, n) in e
            .latency()
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
        {
            let _ = writeln!(t, "  {:>8} ns .. {:>8} ns  {n}", 1u64 << i, 1u64 << (i + 1));
        }
        t.push_str("hook hits:\n");
        for h in e.hooks().iter() {
            let _ = writeln!(t, "  hook {:>3} {:<22} {}", h.id, h.name, h.hits);
        }
        let (exits, per) = self.shared.exit_counts();
        let _ = write!(
            t,
            "exits: {} (per vCPU {per:?})",
            exits
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        t
    }

    fn add_hook(&mut self, spec: HookSpec) -> Result<Output, String> {
        let n = self.intro.engine.lock().unwrap().hooks().len();
        let name = format!("console:{n}");
        let deny_cb = |act: Action| -> vmiscope_introspect::Callback {
            match act {
                Action::Log => Box::new(|_| Outcome::allow()),
                Action::Deny => {
                    Box::new(|ctx| Outcome::block(format!("console hook {} denied it", ctx.hook)))
                }
            }
        };
        let (target, cb): (Target, vmiscope_introspect::Callback) = match spec {
            HookSpec::Ept {
                gpa,
                len,
                rights,
                action,
            } => (Target::Gpa { gpa, len, rights }, deny_cb(action)),
            HookSpec::Gva {
                gva,
                len,
                rights,
                action,
            } => (
                Target::Gva {
                    gva,
                    len,
                    rights,
                    cr3: 0,
                    gpa: None,
                },
                deny_cb(action),
            ),
            HookSpec::Msr {
                index,
                read,
                write,
                action,
            } => (Target::Msr { index, read, write }, deny_cb(action)),
            HookSpec::Cr { cr, mask, action } => {
                let cr = match cr {
                    0 => Cr::Cr0,
                    3 => Cr::Cr3,
                    _ => Cr::Cr4,
                };
                (Target::Cr { cr, mask }, deny_cb(action))
            }
            HookSpec::Dtr { idtr, action } => (
                Target::Dtr {
                    dtr: if idtr { DtrKind::Idtr } else { DtrKind::Gdtr },
                },
                deny_cb(action),
            ),
            HookSpec::Xcr { action } => (Target::Xcr { index: 0 }, deny_cb(action)),
            HookSpec::Bp { addr, hidden } => (
                Target::Breakpoint {
                    gva: addr,
                    gpa: 0,
                    hidden,
                },
                Box::new(|_| Outcome::allow()),
            ),
            HookSpec::Introcall { op, value } => (
                Target::Introcall { op },
                Box::new(move |ctx| {
                    ctx.answer_introcall(value);
                    Outcome::allow()
                }),
            ),
        };
        let intro = self.intro.clone();
        let id = self.with_guest(move |cpu| {
            let mut e: std::sync::MutexGuard<'_, Engine> = intro.engine.lock().unwrap();
            let r = e.add_hook(cpu, target, name, cb).map_err(|e| e.to_string());
            let _ = e.commit(cpu);
            r
        })??;
        Ok(Output::text(format!("hook {id} added")))
    }

    /// Waits (up to `timeout` s) for an expectation; Err carries what was seen.
    pub fn expect(&mut self, e: &Expect, timeout: f64) -> Result<String, String> {
        if self.at_entry && !matches!(e, Expect::Mem { .. } | Expect::Reg { .. } | Expect::NoAlert)
        {
            self.go();
        }
        let deadline = Instant::now() + Duration::from_secs_f64(timeout);
        let poll = |s: &mut Session, f: &mut dyn FnMut(&mut Session) -> bool| -> bool {
            loop {
                if f(s) {
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let alerts = |s: &Session| {
            s.intro
                .engine
                .lock()
                .unwrap()
                .alerts()
                .iter()
                .map(alert_line)
                .collect::<Vec<_>>()
                .join("; ")
        };
        match e {
            Expect::Alert { class } => {
                let ok = poll(self, &mut |s| {
                    s.intro
                        .engine
                        .lock()
                        .unwrap()
                        .alerts()
                        .iter()
                        .any(|a| class.is_none_or(|c| c == a.class))
                });
                if ok {
                    Ok("alert seen".into())
                } else {
                    Err(format!(
                        "no {} alert within {timeout} s; alerts: [{}]",
                        class.map(|c| c.name()).unwrap_or("any"),
                        alerts(self)
                    ))
                }
            }
            Expect::Event { class } => {
                let ok = poll(self, &mut |s| {
                    s.intro
                        .engine
                        .lock()
                        .unwrap()
                        .recent()
                        .iter()
                        .any(|r| class.is_none_or(|c| c == r.class))
                });
                if ok {
                    Ok("event seen".into())
                } else {
                    let seen: Vec<String> = self
                        .intro
                        .engine
                        .lock()
                        .unwrap()
                        .recent()
                        .iter()
                        .rev()
                        .take(5)
                        .map(event_line)
                        .collect();
                    Err(format!(
                        "no {} event within {timeout} s; last events: [{}]",
                        class.map(|c| c.name()).unwrap_or("any"),
                        seen.join("; ")
                    ))
                }
            }
            Expect::NoAlert => {
                let a = alerts(self);
                if a.is_empty() {
                    Ok("no alert".into())
                } else {
                    Err(format!("alerts were raised: [{a}]"))
                }
            }
            Expect::Serial { text } => {
                let ok = poll(self, &mut |s| {
                    s.serial
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|l| l.contains(text.as_str()))
                });
                if ok {
                    Ok("seen on the serial line".into())
                } else {
                    let tail: Vec<String> = self
                        .serial
                        .lock()
                        .unwrap()
                        .iter()
                        .rev()
                        .take(3)
                        .cloned()
                        .collect();
                    Err(format!(
                        "`{text}` not printed within {timeout} s; last lines: {tail:?}"
                    ))
                }
            }
            Expect::Exit { code } => {
                let ok = poll(self, &mut |s| s.outcome().is_some());
                match self.outcome() {
                    Some(o) if ok && o.reason.exit_status() == *code => Ok(format!("exit {code}")),
                    Some(o) => Err(format!(
                        "exit status {} ({}), expected {code}",
                        o.reason.exit_status(),
                        o.reason
                    )),
                    None => Err(format!(
                        "the guest was still running after {timeout} s ({})",
                        self.where_all()
                    )),
                }
            }
            Expect::Mem { addr, bytes, phys } => {
                let mut buf = vec![0u8; bytes.len()];
                self.read(*addr, &mut buf, *phys)?;
                if buf == *bytes {
                    Ok("memory matches".into())
                } else {
                    Err(format!("memory at {addr:#x} is {}", hex(&buf)))
                }
            }
            Expect::Reg { name, value } => {
                let n = name.clone();
                let pause =
                    self.control.stop().is_none() && !self.at_entry && self.outcome().is_none();
                if pause {
                    self.shared.pause_all();
                    self.shared.wait_paused(Duration::from_secs(3));
                }
                let got = self.with_guest(move |cpu| {
                    reg_by_name(&VcpuCtl::regs(cpu), &VcpuCtl::sregs(cpu), &n)
                });
                if pause {
                    self.shared.resume_all();
                }
                match got? {
                    Some(v) if v == *value => Ok(format!("{name} = {v:#x}")),
                    Some(v) => Err(format!("{name} is {v:#x}, expected {value:#x}")),
                    None => Err(format!("no register `{name}`")),
                }
            }
        }
    }

    /// Ends the guest (if running) and returns the outcome.
    pub fn finish(&mut self) -> Option<&RunOutcome> {
        if self.running() {
            self.shared.stop(StopReason::User);
            let _ = self.control.resume(None);
        }
        if let Some(r) = self.runner.take() {
            self.outcome = r.join().ok();
        }
        self.outcome.as_ref()
    }
}

trait Pipe: Sized {
    fn pipe<R>(self, f: impl FnOnce(Self) -> R) -> R {
        f(self)
    }
}
impl<T> Pipe for T {}

fn size_name(n: u64) -> &'static str {
    match n {
        0x1000 => "4 KiB",
        0x20_0000 => "2 MiB",
        _ => "1 GiB",
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn hexdump(addr: u64, b: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in b.chunks(16).enumerate() {
        let ascii: String = chunk
            .iter()
            .map(|c| {
                if (32..127).contains(c) {
                    *c as char
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "{:#010x}  {:<48} {ascii}",
            addr + 16 * i as u64,
            hex(chunk)
        );
    }
    out
}

pub fn event_line(r: &vmiscope_introspect::EventRecord) -> String {
    let what = match &r.event {
        vmiscope_introspect::EventInfo::Mem {
            gla,
            gpa,
            size,
            access,
            data,
            ..
        } => {
            format!(
                "{access:?} {size}B at {gla:#x} (gpa {gpa:#x}){}",
                data.map(|d| format!(" data {d:#x}")).unwrap_or_default()
            )
        }
        other => format!("{other:x?}"),
    };
    format!(
        "#{:<6} vcpu{} {:<10} {:<14} rip {:#x} cpl{} {}",
        r.event_id,
        r.vcpu,
        r.class.name(),
        format!("{:?}", r.verdict),
        r.rip,
        r.cpl,
        what
    )
}

pub fn alert_line(a: &vmiscope_introspect::Alert) -> String {
    format!(
        "alert {} {} {}: {} (vcpu {} rip {:#x}{})",
        a.id,
        a.class.name(),
        if a.enforced { "blocked" } else { "log-only" },
        a.reason,
        a.vcpu,
        a.rip,
        a.instruction
            .as_deref()
            .map(|i| format!(" `{i}`"))
            .unwrap_or_default()
    )
}

fn target_text(t: &Target) -> String {
    match t {
        Target::Gpa { gpa, len, rights } => format!("gpa {gpa:#x}+{len} {rights}"),
        Target::Gva {
            gva,
            len,
            rights,
            gpa,
            ..
        } => format!(
            "gva {gva:#x}+{len} {rights} -> {}",
            gpa.map(|g| format!("{g:#x}")).unwrap_or("unmapped".into())
        ),
        Target::Msr { index, read, write } => format!(
            "msr {index:#x} {}{}",
            if *read { "r" } else { "" },
            if *write { "w" } else { "" }
        ),
        Target::Cr { cr, mask } => format!("{cr:?} mask {mask:#x}"),
        Target::Dtr { dtr } => format!("{dtr:?}"),
        Target::Xcr { index } => format!("xcr{index}"),
        Target::Breakpoint { gva, hidden, .. } => {
            format!("bp {gva:#x}{}", if *hidden { " hidden" } else { "" })
        }
        Target::Introcall { op } => format!(
            "introcall {}",
            op.map(|o| o.to_string()).unwrap_or("any".into())
        ),
    }
}

pub fn fmt_regs(r: &kvm_bindings::kvm_regs) -> String {
    format!(
        "rax {:016x} rbx {:016x} rcx {:016x} rdx {:016x}\nrsi {:016x} rdi {:016x} rbp {:016x} rsp {:016x}\nr8  {:016x} r9  {:016x} r10 {:016x} r11 {:016x}\nr12 {:016x} r13 {:016x} r14 {:016x} r15 {:016x}\nrip {:016x} rflags {:08x}",
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp,
        r.rsp,
        r.r8,
        r.r9,
        r.r10,
        r.r11,
        r.r12,
        r.r13,
        r.r14,
        r.r15,
        r.rip,
        r.rflags
    )
}

pub fn fmt_sregs(s: &kvm_bindings::kvm_sregs) -> String {
    format!(
        "cr0 {:016x} cr2 {:016x} cr3 {:016x} cr4 {:016x} cr8 {:x}\nefer {:x}  idtr {:x}/{:x}  gdtr {:x}/{:x}\ncs {:04x} ss {:04x} ds {:04x} es {:04x} fs {:04x} gs {:04x} tr {:04x}\nfs_base {:x} gs_base {:x}",
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.cr8,
        s.efer,
        s.idt.base,
        s.idt.limit,
        s.gdt.base,
        s.gdt.limit,
        s.cs.selector,
        s.ss.selector,
        s.ds.selector,
        s.es.selector,
        s.fs.selector,
        s.gs.selector,
        s.tr.selector,
        s.fs.base,
        s.gs.base
    )
}

/// A general, segment or system register by name (`cpl` is CS's low bits).
pub fn reg_by_name(
    r: &kvm_bindings::kvm_regs,
    s: &kvm_bindings::kvm_sregs,
    n: &str,
) -> Option<u64> {
    Some(match n {
        "cs" => s.cs.selector as u64,
        "ss" => s.ss.selector as u64,
        "ds" => s.ds.selector as u64,
        "es" => s.es.selector as u64,
        "fs" => s.fs.selector as u64,
        "gs" => s.gs.selector as u64,
        "fs_base" => s.fs.base,
        "gs_base" => s.gs.base,
        "cr0" => s.cr0,
        "cr2" => s.cr2,
        "cr3" => s.cr3,
        "cr4" => s.cr4,
        "cr8" => s.cr8,
        "efer" => s.efer,
        "cpl" => (s.cs.selector & 3) as u64,
        "rax" => r.rax,
        "rbx" => r.rbx,
        "rcx" => r.rcx,
        "rdx" => r.rdx,
        "rsi" => r.rsi,
        "rdi" => r.rdi,
        "rbp" => r.rbp,
        "rsp" => r.rsp,
        "r8" => r.r8,
        "r9" => r.r9,
        "r10" => r.r10,
        "r11" => r.r11,
        "r12" => r.r12,
        "r13" => r.r13,
        "r14" => r.r14,
        "r15" => r.r15,
        "rip" => r.rip,
        "rflags" => r.rflags,
        _ => return None,
    })
}
