//! A console session: the VM on a background thread, the engine, the event
//! breakpoints, and the execution of commands (shared by REPL, TUI and scripts).

use std::fmt::Write as _;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::Error;

use vmiscope_vmm::{RunOutcome, StopReason, VcpuCtl, VcpuState, Vm, VmShared};

use crate::cli::RunArgs;
use crate::commands::{self, Action, Command};
use vmiscope_monitor::Introspection;
use vmiscope_monitor::{Control, SessionHandler};

use crate::format::*;

mod cpu_pages;
mod expect;
mod hooks;
mod inspect;
mod json;
mod machine;
mod records;
mod run;
mod search;
mod stack;

pub use inspect::DisLine;
pub use machine::CpuState;

/// Commands that need vCPUs that still run: after the guest's end the others
/// read its final state (post-mortem).
fn needs_live_guest(cmd: &Command) -> bool {
    use Command as C;
    matches!(
        cmd,
        C::Continue { .. }
            | C::Pause
            | C::Step
            | C::NextEvent { .. }
            | C::Verdict(_)
            | C::Hook(_)
            | C::HookEnable(..)
            | C::HookDelete(_)
            | C::Protect(_)
            | C::Unprotect(_)
            | C::Msr(_)
            | C::MemWrite { .. }
    )
}

/// Where the guest of a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Ended,
    /// A vCPU is held at an event stop.
    Stopped {
        vcpu: u32,
    },
    /// Every vCPU waits at its entry (the start of every session).
    PausedAtEntry,
    Paused,
    Running,
}

impl RunState {
    /// No vCPU runs guest code: registers can be read at once.
    pub fn is_held(self) -> bool {
        !matches!(self, RunState::Running | RunState::Ended)
    }
}

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
    /// Set by the VM thread once the run has returned (before `Notice::End`).
    ran: Arc<RunEnd>,
    outcome: Option<RunOutcome>,
    /// The selected vCPU.
    vcpu: u32,
    /// vCPUs still in their initial pause.
    at_entry: bool,
    /// The stop count the selected vCPU last followed (see `follow_stop`).
    followed: u64,
    image: String,
    /// Serial output lines, for the TUI.
    serial: Arc<Mutex<Vec<String>>>,
    /// Commands may write host files (`journal save`, `exceptions save`): off for
    /// gdb's `monitor` unless `--gdb-host-writes`.
    host_writes: bool,
    /// `--journal`'s file, which gets the `end` record when the guest ends.
    journal: Option<vmiscope_monitor::journal::JournalFile>,
    /// What `--journal`'s header says (also `journal save`'s).
    /// Shared with attached sessions: a `protect` from either adds to it.
    info: Arc<Mutex<vmiscope_monitor::journal::RunInfo>>,
    /// What each console hook does on a hit, as it was made (`hooks` shows
    /// it); shared with attached sessions.
    hook_actions: Arc<Mutex<HookActions>>,
}

/// What each console hook was made to do on a hit, by its id.
type HookActions = std::collections::HashMap<vmiscope_introspect::HookId, Action>;

impl Session {
    /// Builds the VM and starts it paused at its entry.
    pub fn start(a: &RunArgs) -> Result<Session, Error> {
        let (image, vcpus) = crate::launch::load_image(&a.image, a.mem)?;
        let mut cfg = crate::launch::config(a, vcpus)?;
        cfg.start_paused = true;
        let mut vm = Vm::new(&cfg, &image)?;
        let os = crate::launch::os(a, &image, &mut vm)?;
        let (intro, journal) = crate::launch::engine(a, vm.shared(), os)?;
        let intro = Arc::new(intro);
        let info = Arc::new(Mutex::new(crate::launch::run_info(a, vm.shared())));
        let shared = vm.shared().clone();
        let notices = intro.notices().clone();
        let n1 = notices.clone();
        let on_stop = Box::new(move |s: &vmiscope_monitor::Stop| {
            n1.publish(vmiscope_monitor::Notice::Stop(s.clone()))
        });
        let control = Arc::new(Control::new(shared.clone(), on_stop));
        let serial = Arc::new(Mutex::new(vec![String::new()]));
        let s2 = serial.clone();
        let n2 = notices.clone();
        let mut split = vmiscope_monitor::LineSplitter::default();
        shared.serial().set_live(Box::new(move |b| {
            // The TUI's lines end with the one still being printed.
            let done = split.push(b);
            let mut lines = s2.lock().unwrap();
            lines.pop();
            lines.extend(done.iter().cloned());
            lines.push(split.partial().to_string());
            drop(lines);
            if done.is_empty() {
                // Part of a line (a prompt): what `expect serial` may wait for.
                n2.touch();
            }
            for line in done {
                n2.publish(vmiscope_monitor::Notice::Serial(line));
            }
        }));
        let handler = Arc::new(SessionHandler::new(intro.clone(), control.clone()));
        let c2 = control.clone();
        let ran = Arc::new(RunEnd::default());
        let ran2 = ran.clone();
        let (j2, shared2, intro2) = (journal.clone(), vm.shared().clone(), intro.clone());
        let runner = std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || {
                let out = vm.run(handler, &cfg);
                let ended = intro2.now_us();
                // The journal ends here, whatever ends the console after: a
                // signal's exit waits for this (`RunEnd::wait`).
                if let Some(j) = &j2 {
                    j.end(&shared2, &out, ended);
                }
                // Before the notice: whoever it wakes can join this thread at once.
                ran2.set(ended);
                notices.publish(vmiscope_monitor::Notice::End(out.reason.clone()));
                c2.notify_end();
                out
            })
            .map_err(Error::io("start a thread for", "the VM"))?;
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
            ran,
            outcome: None,
            vcpu: 0,
            at_entry: true,
            followed: 0,
            image: a.image.clone(),
            serial,
            host_writes: true,
            journal,
            info,
            hook_actions: Default::default(),
        })
    }

    /// A second command executor on the same VM, engine and stops (gdb's
    /// `monitor`, next to a console). It does not own the VM thread.
    /// `host_writes`: whether its commands may write host files.
    pub fn attach(&self, host_writes: bool) -> Session {
        Session {
            host_writes,
            shared: self.shared.clone(),
            intro: self.intro.clone(),
            control: self.control.clone(),
            runner: None,
            ran: Arc::new(RunEnd::default()),
            outcome: None,
            vcpu: 0,
            at_entry: self.at_entry,
            followed: self.followed,
            image: self.image.clone(),
            serial: self.serial.clone(),
            journal: None,
            info: self.info.clone(),
            hook_actions: self.hook_actions.clone(),
        }
    }

    /// What each console hook was made to do (held while the guard lives).
    pub(super) fn hook_actions(&self) -> std::sync::MutexGuard<'_, HookActions> {
        self.hook_actions.lock().unwrap()
    }

    /// The VM's shared state (memory, vCPUs, symbols).
    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// The engine and its adapter.
    /// Set once the VM thread has finished the run (and ended the journal).
    pub fn run_end(&self) -> &Arc<RunEnd> {
        &self.ran
    }

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

    /// The run's outcome once the guest has ended.
    pub fn outcome(&mut self) -> Option<&RunOutcome> {
        let done = |r: &JoinHandle<RunOutcome>| r.is_finished() || self.ran.is_set();
        if self.outcome.is_none() && self.runner.as_ref().is_some_and(done) {
            self.outcome = self.runner.take().and_then(|r| r.join().ok());
            self.journal_end();
        }
        self.outcome.as_ref()
    }

    /// When the run ended (engine µs); now, if the VM thread did not say.
    pub(super) fn ended_us(&self) -> u64 {
        self.ran.at_us().unwrap_or_else(|| self.intro.now_us())
    }

    /// Writes `--journal`'s last record, once the outcome is known.
    fn journal_end(&self) {
        if let (Some(j), Some(o)) = (&self.journal, &self.outcome) {
            j.end(&self.shared, o, self.ended_us());
        }
    }

    pub fn running(&mut self) -> bool {
        self.outcome().is_none()
    }

    /// running / paused / stopped-at-event / ended, for status lines.
    pub fn status(&mut self) -> String {
        self.follow_stop();
        match self.run_state() {
            RunState::Ended => match self.outcome() {
                Some(o) => format!("ended: {}", o.reason),
                None => "ended".into(),
            },
            RunState::Stopped { vcpu } => match self.control.stop() {
                Some(s) => {
                    let what = s.event.as_ref().map(|e| e.class.name()).unwrap_or("step");
                    let task = self
                        .stopped_task(vcpu)
                        .map(|t| format!(" in {t}"))
                        .unwrap_or_default();
                    format!("stopped: vCPU {vcpu}{task} at {what} ({})", s.cause)
                }
                None => format!("stopped: vCPU {vcpu}"),
            },
            RunState::PausedAtEntry => "paused at entry".into(),
            RunState::Paused => "paused".into(),
            RunState::Running => "running".into(),
        }
    }

    /// The task a stopped vCPU runs in a Linux guest (`comm[pid]`), read
    /// while it is held at CPL0; None for other guests.
    fn stopped_task(&self, vcpu: u32) -> Option<String> {
        self.intro.linux()?;
        let (cpl, gs) = self
            .on_vcpu(vcpu, |c| {
                let s = VcpuCtl::sregs(c);
                (s.cs.selector & 3, s.gs.base)
            })
            .ok()?;
        (cpl == 0).then(|| self.current_task(vcpu, gs)).flatten()
    }

    /// Where the guest is, for front ends that act on it.
    pub fn run_state(&mut self) -> RunState {
        if self.ended() {
            return RunState::Ended;
        }
        if let Some(s) = self.control.stop() {
            return RunState::Stopped { vcpu: s.vcpu };
        }
        if self.at_entry {
            return RunState::PausedAtEntry;
        }
        if (0..self.shared.vcpu_count())
            .all(|c| self.shared.vcpu_state(c).is_none_or(VcpuState::is_quiet))
        {
            RunState::Paused
        } else {
            RunState::Running
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
    ) -> Result<R, Error> {
        self.on_vcpu(self.vcpu, f)
    }

    /// Runs `f` on vCPU `cpu`'s thread: at once when it is paused or held at a
    /// stop, at its next exit when it runs. The one path for every front end.
    pub fn on_vcpu<R: Send + 'static>(
        &self,
        cpu: u32,
        f: impl FnOnce(&mut VcpuCtl<'_>) -> R + Send + 'static,
    ) -> Result<R, Error> {
        let (tx, rx) = mpsc::channel();
        let task: vmiscope_vmm::VcpuTask = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        if !self.shared.with_vcpu(cpu, task) {
            return Err("the guest has ended".into());
        }
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| format!("vCPU {cpu} did not answer"))
            .map_err(Into::into)
    }

    /// Runs one line; errors are one line.
    pub fn exec(&mut self, line: &str) -> Result<Output, Error> {
        match self.parse(line)? {
            Some(c) => self.run(c),
            None => Ok(Output::default()),
        }
    }

    /// Parses one line with what its names mean now: symbols as the running
    /// kernel has them (a KASLR slide found since moves them) and `$rsp`,
    /// `$rip+8` … (a register where a number goes, as in gdb) from one read of
    /// the selected vCPU's registers, only when the line names one.
    pub fn parse(&mut self, line: &str) -> Result<Option<Command>, Error> {
        self.follow_stop();
        let regs = line.contains('$').then(|| self.cpu_state().ok()).flatten();
        let resolve = |n: &str| match n.strip_prefix('$') {
            Some(r) => regs.and_then(|c| reg_by_name(&c.regs, &c.sregs, &r.to_ascii_lowercase())),
            None => self.intro.symbols().get(n),
        };
        Ok(commands::parse(line, &resolve)?)
    }

    /// Selects the vCPU of a stop that came since the last one followed, as
    /// gdb switches to the thread that stopped: `regs`, `step` and `expect
    /// reg` then act on the vCPU at the breakpoint, not on vCPU 0. `vcpu N`
    /// still selects another until the next stop.
    fn follow_stop(&mut self) {
        let count = self.control.stop_count();
        if count == self.followed {
            return;
        }
        self.followed = count;
        if let Some(stop) = self.control.stop() {
            self.vcpu = stop.vcpu;
        }
    }

    pub fn run(&mut self, cmd: Command) -> Result<Output, Error> {
        use Command as C;
        self.follow_stop();
        if self.ended() && needs_live_guest(&cmd) {
            return Err(format!(
                "the guest has ended ({}); its final registers, memory, events, alerts and the journal can still be read",
                self.outcome()
                    .map(|o| o.reason.to_string())
                    .unwrap_or_default()
            )
            .into());
        }
        match cmd {
            C::Quit => self.quit(),
            C::Continue { wait } => self.cont(wait),
            C::Wait(t) => self.wait(t),
            C::Pause => self.pause(),
            C::NextEvent { all } => self.next_event(all),
            C::Step => Ok(self.step()?),
            C::Vcpu(n) => self.select_vcpu(n),
            C::BreakEvent { class, vcpu } => self.break_event(class, vcpu),
            C::BreakHook(h) => self.break_hook(h),
            C::Breaks => self.breaks(),
            C::Delete(n) => self.delete_break(n),
            C::Event => Ok(Output::text(self.describe_stop()?)),
            C::Verdict(v) => self.verdict(v),
            C::Hook(spec) => Ok(self.add_hook(spec)?),
            C::Hooks => Ok(Output::text(self.hooks_text())),
            C::HookEnable(id, on) => self.hook_enable(id, on),
            C::HookDelete(id) => self.hook_delete(id),
            C::Protect(name) => self.protect(name),
            C::Unprotect(name) => self.unprotect(name),
            C::Regs => Ok(Output::text(fmt_regs(&self.cpu_state()?.regs))),
            C::Sregs => Ok(Output::text(fmt_sregs(&self.cpu_state()?.sregs))),
            C::Segments => Ok(Output::text(self.segments()?)),
            C::Dregs => Ok(Output::text(self.dregs()?)),
            C::Idt(n) => Ok(Output::text(self.idt(n)?)),
            C::Gdt => Ok(Output::text(self.gdt()?)),
            C::Ps => Ok(Output::text(self.ps()?)),
            C::Lsmod => Ok(Output::text(self.lsmod()?)),
            C::Msr(i) => self.msr(i),
            C::MemRead { addr, len, phys } => self.mem_read(addr, len, phys),
            C::MemWrite { addr, bytes, phys } => self.mem_write(addr, bytes, phys),
            C::MemFind {
                pattern,
                range,
                phys,
            } => Ok(Output::text(self.mem_find(&pattern, range, phys)?)),
            C::Vmmap => Ok(Output::text(self.vmmap()?)),
            C::Kaslr => Ok(Output::text(self.kaslr())),
            C::Examine { fmt, addr } => Ok(Output::text(self.examine(fmt, addr)?)),
            C::Tele { addr, count } => Ok(Output::text(self.telescope(addr, count)?)),
            C::Bt(n) => Ok(Output::text(self.backtrace(n)?)),
            C::Sym(a) => Ok(Output::text(self.sym_of(a)?)),
            C::Addr(n) => Ok(Output::text(self.addr_of(&n)?)),
            C::Disasm { addr, count } => Ok(Output::text(self.disasm(addr, count)?)),
            C::Translate(gva) => Ok(Output::text(format!(
                "{} -> {:#x}",
                self.addr_name(gva),
                self.translate(gva)?
            ))),
            C::Pagewalk(gva) => self.pagewalk(gva),
            C::Events { n, class } => self.events(n, class),
            C::Alerts => self.alerts(),
            C::Alert(id) => self.alert(id),
            C::ExceptionFromAlert(id) => self.exception_from_alert(id),
            C::Exceptions => self.exceptions(),
            C::ExceptionsSave(f) => self.save_exceptions(f),
            C::LogOnly(on) => self.log_only(on),
            C::Stats => Ok(Output::text(self.stats())),
            C::Caps => self.caps(),
            C::JournalSave(f) => self.save_journal(f),
            C::Help(c) => self.help(c),
            C::Json(c) => Ok(Output::text(self.json(*c)?.to_string())),
            C::Expect(e, t) => Ok(Output::text(
                self.expect(&e, t).map_err(Error::Expectation)?,
            )),
        }
    }

    /// `0x1234 <symbol+0x10>`
    pub fn addr_name(&self, a: u64) -> String {
        match self.intro.symbols().lookup(a) {
            Some((n, 0)) => format!("{a:#x} <{n}>"),
            Some((n, off)) if off < 0x1000 => format!("{a:#x} <{n}+{off:#x}>"),
            _ => format!("{a:#x}"),
        }
    }

    /// The event the analyst is stopped at, in words.
    pub fn describe_stop(&self) -> Result<String, Error> {
        let Some(s) = self.control.stop() else {
            return Err("not stopped at an event (`next-event`, `break event`, `wait`)".into());
        };
        let mut t = format!("vCPU {} stopped ({})", s.vcpu, s.cause);
        if let Some(e) = &s.event {
            let _ = write!(t, "\n  {}", event_line(e, self.intro.symbols()));
            let _ = write!(
                t,
                "\n  instruction: {} at {}",
                e.instruction.as_deref().unwrap_or("(unknown: polled)"),
                self.addr_name(e.rip)
            );
            let _ = write!(t, "\n  {}", hook_list(&e.hooks));
        }
        if let Some(r) = &s.raw {
            let _ = write!(t, "\n  exit: {}", exit_text(r, self.intro().symbols()));
        }
        let _ = write!(
            t,
            "\n  verdict: {}{}",
            crate::format::proposed(&s.proposed),
            if s.proposed.pending() {
                "  (`verdict allow|deny|policy`)"
            } else {
                ""
            }
        );
        Ok(t)
    }

    /// The selected vCPU's paging mode at its last exit.
    fn paging(&self) -> Result<vmiscope_introspect::paging::PagingMode, Error> {
        self.shared
            .last_paging(self.vcpu)
            .ok_or_else(|| format!("no vCPU {}", self.vcpu))
            .map_err(Into::into)
    }

    fn translate(&self, gva: u64) -> Result<u64, Error> {
        let mode = self.paging()?;
        vmiscope_introspect::paging::translate(self.shared.ram(), mode, gva)
            .map(|t| t.gpa)
            .map_err(|e| e.to_string())
            .map_err(Into::into)
    }

    /// Ends the guest (if running) and returns the outcome.
    pub fn finish(&mut self) -> Option<&RunOutcome> {
        self.finish_with(StopReason::User)
    }

    /// Ends the guest (if running) for `reason`, and returns the outcome.
    pub fn finish_with(&mut self, reason: StopReason) -> Option<&RunOutcome> {
        if self.running() {
            self.shared.stop(reason);
            let _ = self.control.resume(None);
        }
        if let Some(r) = self.runner.take() {
            self.outcome = r.join().ok();
            self.journal_end();
        }
        self.outcome.as_ref()
    }
}

/// That the VM thread has finished its run and written the journal's `end`:
/// something to wait for (a signal's exit does, so the record is there).
#[derive(Default)]
pub struct RunEnd {
    /// When the run ended, on the engine's clock (µs): every `end` record
    /// (`--journal`'s, `journal save`'s) carries this, not the time it is written.
    done: Mutex<Option<u64>>,
    cv: std::sync::Condvar,
}

impl RunEnd {
    fn set(&self, t_us: u64) {
        *self.done.lock().unwrap() = Some(t_us);
        self.cv.notify_all();
    }

    pub fn is_set(&self) -> bool {
        self.done.lock().unwrap().is_some()
    }

    /// When the run ended (engine µs), once it has.
    pub fn at_us(&self) -> Option<u64> {
        *self.done.lock().unwrap()
    }

    /// Waits at most `timeout` for the end; whether it came.
    pub fn wait(&self, timeout: Duration) -> bool {
        let g = self.done.lock().unwrap();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |d| d.is_none())
            .unwrap();
        g.is_some()
    }
}
