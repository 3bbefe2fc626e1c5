//! The gdb remote stub (gdbstub): vCPUs are gdb threads; breakpoints, watchpoints and
//! steps are the engine's hooks and the console's event stops, so gdb and the
//! console see the same stops. All-stop: when one vCPU stops, the others pause.
//!
//! On a PVM host KVM's single-step and INT3 interception work for CPL0 code only;
//! the VMM catches CPL3 steps and INT3s at the guest's own #DB/#BP entry instead
//! (vmm's `usertrap`), so gdb's breakpoints and `stepi` work at both CPLs.
//! Watchpoints are page hooks and work at every CPL. Hardware breakpoints (DR
//! registers) fire for CPL0 code only on PVM.

use std::collections::HashMap;
use std::net::TcpListener;
use std::num::NonZeroUsize;
use std::time::Duration;

use crate::error::Error;

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::ConnectionExt;
use gdbstub::outputln;
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event as GdbEvent, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, MultiThreadStopReason};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::exec_file::{ExecFile, ExecFileOps};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use vmiscope_introspect::{Outcome, Rights, Target as HookTarget};
use vmiscope_vmm::{StopReason, VcpuCtl};

use crate::control::StopCause;
use crate::gdb_arch::{Vmi64, VmiRegs};
use crate::gdb_conn::GdbConn;
use crate::session::Session;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    Continue,
    Step,
}

/// Why a gdb-requested stop happens, by console breakpoint id.
#[derive(Debug, Clone, Copy)]
enum GdbStop {
    Sw,
    Watch(WatchKind, u64),
}

pub struct GdbTarget {
    s: Session,
    exec_file: Option<String>,
    /// address -> (engine hook, console breakpoint)
    sw: HashMap<u64, (u64, u32)>,
    hw: [Option<u64>; 4],
    /// (address, length, kind) -> (engine hook, console breakpoint)
    watches: HashMap<(u64, u64, u8), (u64, u32)>,
    stops: HashMap<u32, GdbStop>,
    resume: HashMap<u32, Resume>,
    /// Resume only the threads with an action (gdb's scheduler locking).
    locked: bool,
    /// The console's stop count when gdb last resumed.
    seen: u64,
    /// A step was refused, or a resume named a thread that does not exist: report
    /// a stop at once, without running.
    refused: bool,
    /// `monitor breakpoints visible`: plain INT3s the guest can read, trading
    /// stealth for speed (a hidden one read-traps its page, so every other
    /// instruction on that page exits too).
    visible_breakpoints: bool,
}

fn err<T>(_: impl std::fmt::Display) -> TargetResult<T, GdbTarget> {
    Err(TargetError::NonFatal)
}

fn tid(cpu: u32) -> Tid {
    NonZeroUsize::new(cpu as usize + 1).expect("non-zero")
}

/// The vCPU behind gdb thread `t` (threads are vCPUs + 1), if the guest has it.
/// gdbstub passes thread ids from packets through unchecked (`Hg5`, `vCont;c:5`,
/// `qThreadExtraInfo,5`): every use goes through here.
pub(crate) fn cpu_of(t: Tid, vcpus: u32) -> Option<u32> {
    let cpu = u32::try_from(t.get() - 1).ok()?;
    (cpu < vcpus).then_some(cpu)
}

fn kind_code(k: WatchKind) -> u8 {
    match k {
        WatchKind::Write => 0,
        WatchKind::Read => 1,
        WatchKind::ReadWrite => 2,
    }
}

impl GdbTarget {
    pub fn new(s: Session, exec_file: Option<String>) -> Self {
        let seen = s.control().stop_count();
        GdbTarget {
            s,
            exec_file,
            sw: HashMap::new(),
            hw: [None; 4],
            watches: HashMap::new(),
            stops: HashMap::new(),
            resume: HashMap::new(),
            locked: false,
            seen,
            refused: false,
            visible_breakpoints: false,
        }
    }

    /// Runs `f` on vCPU `cpu`'s thread: it is held at a stop or paused (all-stop).
    fn on_cpu<R: Send + 'static>(
        &self,
        cpu: u32,
        f: impl FnOnce(&mut VcpuCtl<'_>) -> R + Send + 'static,
    ) -> Option<R> {
        self.s.on_vcpu(cpu, f).ok()
    }

    /// Any held vCPU, for engine work (hooks are VM-wide).
    fn any_cpu<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuCtl<'_>) -> R + Send + 'static,
    ) -> Option<R> {
        let cpu = self.s.control().stop().map(|s| s.vcpu).unwrap_or(0);
        self.on_cpu(cpu, f)
    }

    fn add_engine_hook(&mut self, target: HookTarget) -> Option<(u64, u32)> {
        let after_write = matches!(target, HookTarget::Gva { .. });
        let intro = self.s.intro().clone();
        let id = self.any_cpu(move |cpu| {
            let mut e = intro.engine.lock().unwrap();
            let r = e.add_hook(cpu, target, "gdb", Box::new(|_| Outcome::allow()));
            let _ = e.commit(cpu);
            r.ok()
        })??;
        let brk = self
            .s
            .control()
            .add_break_ext(None, Some(id), None, after_write);
        Some((id, brk))
    }

    fn remove_engine_hook(&mut self, hook: u64, brk: u32) {
        self.s.control().delete_break(brk);
        self.stops.remove(&brk);
        let intro = self.s.intro().clone();
        let _ = intro.engine.lock().unwrap().remove_hook(hook);
        self.any_cpu(move |cpu| {
            let _ = intro.engine.lock().unwrap().commit(cpu);
        });
    }

    /// Pauses every vCPU (the one at a stop is held already) and waits for each
    /// to acknowledge.
    fn all_stop(&self) {
        self.s.shared().pause_all();
        self.s.shared().wait_paused(Duration::from_secs(2));
    }

    fn stop_reason(&mut self) -> MultiThreadStopReason<u64> {
        let Some(st) = self.s.control().stop() else {
            return MultiThreadStopReason::SignalWithThread {
                tid: tid(0),
                signal: Signal::SIGINT,
            };
        };
        let t = tid(st.vcpu);
        let gdb_stop = match st.cause {
            StopCause::Break(id) => self.stops.get(&id).copied(),
            _ => None,
        };
        match (st.cause, gdb_stop) {
            (StopCause::HwBreak { .. }, _) => MultiThreadStopReason::HwBreak(t),
            (_, Some(GdbStop::Sw)) => MultiThreadStopReason::SwBreak(t),
            (_, Some(GdbStop::Watch(kind, addr))) => {
                MultiThreadStopReason::Watch { tid: t, kind, addr }
            }
            // Steps and every introspection stop (`break event`, next-event) are SIGTRAP.
            _ => MultiThreadStopReason::SignalWithThread {
                tid: t,
                signal: Signal::SIGTRAP,
            },
        }
    }

    /// The vCPU behind thread `t`, checked (see `cpu_of`).
    fn cpu(&self, t: Tid) -> Option<u32> {
        cpu_of(t, self.s.shared().vcpu_count())
    }

    /// Records a resume action for thread `t`; one for a thread that does not exist
    /// makes the whole resume a stop in place.
    fn set_action(&mut self, t: Tid, action: Resume) {
        match self.cpu(t) {
            Some(cpu) => {
                self.resume.insert(cpu, action);
            }
            None => {
                eprintln!(
                    "[vmiscope] gdb: no thread {t} (this guest has {} vCPUs); nothing resumed",
                    self.s.shared().vcpu_count()
                );
                self.refused = true;
            }
        }
    }

    fn translate(&self, cpu: u32, gva: u64) -> Option<u64> {
        let mode = self.s.shared().last_paging(cpu)?;
        vmiscope_introspect::paging::translate(self.s.shared().ram(), mode, gva)
            .ok()
            .map(|t| t.gpa)
    }
}

impl Target for GdbTarget {
    type Arch = Vmi64;
    type Error = Error;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }
    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
    fn support_exec_file(&mut self) -> Option<ExecFileOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for GdbTarget {
    fn read_registers(&mut self, regs: &mut VmiRegs, t: Tid) -> TargetResult<(), Self> {
        let Some(cpu) = self.cpu(t) else {
            return err("no such thread");
        };
        // The held vCPU's registers were taken when it stopped: no round trip.
        let held = self
            .s
            .control()
            .snapshot(cpu)
            .map(|sn| (sn.regs, sn.sregs, sn.fpu));
        let Some((r, s, fpu)) =
            held.or_else(|| self.on_cpu(cpu, |c| (VcpuCtl::regs(c), VcpuCtl::sregs(c), c.fpu())))
        else {
            return err("vCPU busy");
        };
        if let Some(f) = fpu {
            crate::gdb_fpu::to_gdb(&f, &mut regs.core);
        }
        regs.core.regs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        regs.core.rip = r.rip;
        regs.core.eflags = r.rflags as u32;
        regs.core.segments.cs = s.cs.selector as u32;
        regs.core.segments.ss = s.ss.selector as u32;
        regs.core.segments.ds = s.ds.selector as u32;
        regs.core.segments.es = s.es.selector as u32;
        regs.core.segments.fs = s.fs.selector as u32;
        regs.core.segments.gs = s.gs.selector as u32;
        regs.fs_base = s.fs.base;
        regs.gs_base = s.gs.base;
        regs.sys = [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer];
        Ok(())
    }

    fn write_registers(&mut self, regs: &VmiRegs, t: Tid) -> TargetResult<(), Self> {
        let Some(cpu) = self.cpu(t) else {
            return err("no such thread");
        };
        let g = regs.clone();
        let done = self.on_cpu(cpu, move |c| {
            let mut r = VcpuCtl::regs(c);
            let v = g.core.regs;
            (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) =
                (v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
            (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
                (v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]);
            r.rip = g.core.rip;
            r.rflags = g.core.eflags as u64;
            c.set_regs(&r);
            let mut s = VcpuCtl::sregs(c);
            (s.fs.base, s.gs.base) = (g.fs_base, g.gs_base);
            (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer) =
                (g.sys[0], g.sys[1], g.sys[2], g.sys[3], g.sys[4], g.sys[5]);
            c.set_sregs(&s);
            // x87/SSE only when gdb changed them (one ioctl pair otherwise saved).
            if let Some(old) = c.fpu() {
                let new = crate::gdb_fpu::from_gdb(&g.core, old);
                if new != old {
                    let _ = c.set_fpu(&new);
                }
            }
        });
        done.ok_or(TargetError::NonFatal)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], t: Tid) -> TargetResult<usize, Self> {
        let Some(cpu) = self.cpu(t) else {
            return err("no such thread");
        };
        let bps = self.s.shared().sw_breakpoints();
        let mut done = 0;
        // Page by page through the vCPU's tables; stop at the first unmapped page.
        for (va, n) in vmiscope_introspect::decode::split_pages(start, data.len() as u64) {
            let Some(gpa) = self.translate(cpu, va) else {
                break;
            };
            let chunk = &mut data[done..done + n as usize];
            if self.s.shared().ram().read(gpa, chunk).is_err() {
                break;
            }
            // Our INT3s read as the original bytes.
            for (bp, orig) in &bps {
                if (gpa..gpa + n).contains(bp) {
                    chunk[(bp - gpa) as usize] = *orig;
                }
            }
            done += n as usize;
        }
        if done == 0 { err("unmapped") } else { Ok(done) }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], t: Tid) -> TargetResult<(), Self> {
        let Some(cpu) = self.cpu(t) else {
            return err("no such thread");
        };
        let mut done = 0;
        for (va, n) in vmiscope_introspect::decode::split_pages(start, data.len() as u64) {
            let Some(gpa) = self.translate(cpu, va) else {
                return err("unmapped");
            };
            if self
                .s
                .shared()
                .write_around_breakpoints(gpa, &data[done..done + n as usize])
                .is_err()
            {
                return err("outside RAM");
            }
            done += n as usize;
        }
        Ok(())
    }

    fn list_active_threads(&mut self, f: &mut dyn FnMut(Tid)) -> Result<(), Error> {
        (0..self.s.shared().vcpu_count()).for_each(|c| f(tid(c)));
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(
        &mut self,
    ) -> Option<gdbstub::target::ext::thread_extra_info::ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl gdbstub::target::ext::thread_extra_info::ThreadExtraInfo for GdbTarget {
    /// What `info threads` shows beside each thread: the vCPU, its privilege level
    /// and why it is stopped.
    fn thread_extra_info(&self, t: Tid, buf: &mut [u8]) -> Result<usize, Error> {
        // An error here would end the session: a thread that does not exist says so.
        let text = match self.cpu(t) {
            None => "no such vCPU".to_string(),
            Some(cpu) => {
                let (_, cpl) = self.s.shared().last_position(cpu).unwrap_or_default();
                let why = match self.s.control().stop() {
                    Some(st) if st.vcpu == cpu => st.cause.to_string(),
                    _ => "paused".into(),
                };
                format!("vCPU {cpu}, CPL{cpl}, {why}")
            }
        };
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(n)
    }
}

impl MultiThreadResume for GdbTarget {
    fn resume(&mut self) -> Result<(), Error> {
        let actions = std::mem::take(&mut self.resume);
        let locked = std::mem::take(&mut self.locked);
        if self.refused {
            return Ok(()); // a thread that does not exist: stop where we are
        }
        let cpus: Vec<u32> = actions.keys().copied().collect();
        for (cpu, action) in actions {
            if action == Resume::Step {
                // The held vCPU arms the step itself as it resumes; another one is
                // asked on its thread.
                let stepping = match self.s.control().step_on_resume(cpu) {
                    Some(ok) => ok,
                    None => self
                        .on_cpu(cpu, |c| c.start_step())
                        .ok_or("vCPU did not answer")?,
                };
                if !stepping {
                    // Not fatal: the thread stops where it is and gdb sees no progress.
                    eprintln!(
                        "[vmiscope] gdb: vCPU {cpu} cannot single-step here (CPL3 needs a #DB gate in the guest's IDT and a free DR slot; see `vmiscope caps`)"
                    );
                    self.refused = true;
                    return Ok(());
                }
                self.s.control().arm_step(cpu);
            }
        }
        self.seen = self.s.control().stop_count();
        if locked {
            self.s.go_only(&cpus);
        } else {
            self.s.go();
        }
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Error> {
        self.resume.clear();
        Ok(())
    }

    fn set_resume_action_continue(&mut self, t: Tid, _: Option<Signal>) -> Result<(), Error> {
        self.set_action(t, Resume::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSchedulerLocking for GdbTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Error> {
        self.locked = true;
        Ok(())
    }
}

impl MultiThreadSingleStep for GdbTarget {
    fn set_resume_action_step(&mut self, t: Tid, _: Option<Signal>) -> Result<(), Error> {
        self.set_action(t, Resume::Step);
        Ok(())
    }
}

impl Breakpoints for GdbTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for GdbTarget {
    /// A hidden INT3 (guest reads see the original byte).
    fn add_sw_breakpoint(&mut self, addr: u64, _: usize) -> TargetResult<bool, Self> {
        if self.sw.contains_key(&addr) {
            return Ok(true);
        }
        let Some((hook, brk)) = self.add_engine_hook(HookTarget::Breakpoint {
            gva: addr,
            gpa: 0,
            hidden: !self.visible_breakpoints,
        }) else {
            return Ok(false);
        };
        self.stops.insert(brk, GdbStop::Sw);
        self.sw.insert(addr, (hook, brk));
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _: usize) -> TargetResult<bool, Self> {
        let Some((hook, brk)) = self.sw.remove(&addr) else {
            return Ok(false);
        };
        self.remove_engine_hook(hook, brk);
        Ok(true)
    }
}

impl HwBreakpoint for GdbTarget {
    /// A DR execute breakpoint. On a host whose DR breakpoints do not fire at CPL3
    /// (PVM), one on a user-mapped address is refused, so gdb says it could not
    /// insert it instead of never stopping (`break` works there).
    fn add_hw_breakpoint(&mut self, addr: u64, _: usize) -> TargetResult<bool, Self> {
        // Where guest debugging reaches CPL3 DR breakpoints do too; on PVM they do
        // not, and two of the four slots stay free for the #DB/#BP catches that
        // make steps and breakpoints work in user code.
        let cpl3_debug = self.s.shared().host().single_step_at(3);
        let cpu = self.s.control().stop().map(|s| s.vcpu).unwrap_or(0);
        let user = self.s.shared().last_paging(cpu).is_some_and(|mode| {
            vmiscope_introspect::paging::translate(self.s.shared().ram(), mode, addr)
                .is_ok_and(|t| t.user)
        });
        if user && !cpl3_debug {
            eprintln!(
                "[vmiscope] gdb: hbreak {addr:#x} refused: user code, and this host's DR breakpoints fire at CPL0 only (use break)"
            );
            return Ok(false);
        }
        let usable = if cpl3_debug { 4 } else { 2 };
        let Some(slot) = self.hw[..usable].iter().position(Option::is_none) else {
            eprintln!("[vmiscope] gdb: hbreak {addr:#x} refused: all {usable} DR slots in use");
            return Ok(false);
        };
        self.hw[slot] = Some(addr);
        self.s.shared().set_hw_breakpoint(slot, Some(addr));
        Ok(true)
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _: usize) -> TargetResult<bool, Self> {
        let Some(slot) = self.hw.iter().position(|a| *a == Some(addr)) else {
            return Ok(false);
        };
        self.hw[slot] = None;
        self.s.shared().set_hw_breakpoint(slot, None);
        Ok(true)
    }
}

impl HwWatchpoint for GdbTarget {
    /// A page hook on the range: any number, invisible, at any CPL.
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let rights = match kind {
            WatchKind::Write => Rights::W,
            WatchKind::Read => Rights::R,
            WatchKind::ReadWrite => Rights {
                read: true,
                write: true,
                exec: false,
            },
        };
        let mut pieces = Vec::new();
        for (va, n) in vmiscope_introspect::decode::split_pages(addr, len) {
            let Some(p) = self.add_engine_hook(HookTarget::Gva {
                gva: va,
                len: n,
                rights,
                cr3: 0,
                gpa: None,
            }) else {
                return Ok(false);
            };
            self.stops.insert(p.1, GdbStop::Watch(kind, addr));
            pieces.push(p);
        }
        // Ranges that cross a page get one hook per page; the first one is the key.
        if let Some(first) = pieces.first() {
            self.watches.insert((addr, len, kind_code(kind)), *first);
        }
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let Some((hook, brk)) = self.watches.remove(&(addr, len, kind_code(kind))) else {
            return Ok(false);
        };
        self.remove_engine_hook(hook, brk);
        Ok(true)
    }
}

impl MonitorCmd for GdbTarget {
    /// Any console command; `phys ADDR LEN` reads guest-physical memory;
    /// `breakpoints visible|hidden` chooses how `break` patches the guest.
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), Error> {
        let line = String::from_utf8_lossy(cmd).to_string();
        if let Some(how) = line.strip_prefix("breakpoints") {
            match how.trim() {
                "visible" => self.visible_breakpoints = true,
                "hidden" => self.visible_breakpoints = false,
                "" => {}
                _ => {
                    outputln!(out, "error: expected `breakpoints [visible|hidden]`");
                    return Ok(());
                }
            }
            let how = if self.visible_breakpoints {
                "visible (plain INT3s the guest can read; fast)"
            } else {
                "hidden (the guest reads the original byte; other code on the page exits too)"
            };
            outputln!(out, "gdb breakpoints inserted from now on: {how}");
            return Ok(());
        }
        let line = match line.strip_prefix("phys ") {
            Some(rest) => format!("mem read {rest} phys"),
            None => line,
        };
        match self.s.exec(&line) {
            Ok(o) => outputln!(out, "{}", o.text.trim_end()),
            Err(e) => outputln!(out, "error: {e}"),
        }
        Ok(())
    }
}

impl ExecFile for GdbTarget {
    fn get_exec_file(
        &self,
        _: Option<gdbstub::common::Pid>,
        offset: u64,
        length: usize,
        buf: &mut [u8],
    ) -> TargetResult<usize, Self> {
        let Some(p) = &self.exec_file else {
            return err("no file");
        };
        let b = p.as_bytes();
        let start = (offset as usize).min(b.len());
        let n = length.min(b.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&b[start..start + n]);
        Ok(n)
    }
}

enum EventLoop {}

impl BlockingEventLoop for EventLoop {
    type Target = GdbTarget;
    type Connection = GdbConn;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(
        t: &mut GdbTarget,
        conn: &mut GdbConn,
    ) -> Result<GdbEvent<Self::StopReason>, WaitForStopReasonError<Error, std::io::Error>> {
        loop {
            if conn
                .peek()
                .map_err(WaitForStopReasonError::Connection)?
                .is_some()
            {
                let b = ConnectionExt::read(conn).map_err(WaitForStopReasonError::Connection)?;
                return Ok(GdbEvent::IncomingData(b));
            }
            if std::mem::take(&mut t.refused) {
                return Ok(GdbEvent::TargetStopped(t.stop_reason()));
            }
            if t.s.ended() {
                // The stub's session is attached (it does not own the run): the
                // reason comes from the VM itself.
                let code =
                    t.s.shared()
                        .stop_reason()
                        .map(|r| r.exit_status())
                        .unwrap_or(0);
                return Ok(GdbEvent::TargetStopped(MultiThreadStopReason::Exited(
                    code.clamp(0, 255) as u8,
                )));
            }
            // Wakes as soon as a stop is recorded; the timeout bounds how late gdb's
            // Ctrl-C (incoming data) or the guest's end are noticed.
            let _ = t.s.control().wait_stop(t.seen, Duration::from_millis(1));
            if t.s.control().stop_count() > t.seen {
                t.seen = t.s.control().stop_count();
                t.all_stop();
                return Ok(GdbEvent::TargetStopped(t.stop_reason()));
            }
        }
    }

    /// Ctrl-C: stop every vCPU.
    fn on_interrupt(t: &mut GdbTarget) -> Result<Option<Self::StopReason>, Error> {
        t.all_stop();
        Ok(Some(MultiThreadStopReason::SignalWithThread {
            tid: tid(0),
            signal: Signal::SIGINT,
        }))
    }
}

/// The stub's packet size (gdb's PacketSize): 64 KiB of hex is 32 KiB of memory
/// per `m`/`M` packet.
const PACKET_SIZE: usize = 64 * 1024;

/// `HOST:PORT`, or a bare port on 127.0.0.1.
pub fn bind_addr(a: &str) -> String {
    if a.contains(':') {
        a.to_string()
    } else {
        format!("127.0.0.1:{a}")
    }
}

/// Serves gdb connections one after another until the guest ends or gdb kills it.
/// A detach leaves the guest running.
pub fn serve(listener: TcpListener, s: Session, exec_file: Option<String>) {
    let mut target = GdbTarget::new(s, exec_file);
    while !target.s.ended() {
        let conn = match listener.accept() {
            Ok((c, peer)) => {
                eprintln!("[vmiscope] gdb connected from {peer}");
                c
            }
            Err(e) => {
                eprintln!("[vmiscope] gdb: {e}");
                return;
            }
        };
        let _ = conn.set_nodelay(true);
        // gdb expects the target stopped when it attaches.
        if !target.s.run_state().is_held() {
            target.all_stop();
        }
        target.seen = target.s.control().stop_count();
        // A large packet buffer: gdb reads and writes memory in PacketSize chunks,
        // and each chunk is a round trip.
        let stub = match gdbstub::stub::GdbStubBuilder::new(GdbConn::new(conn))
            .packet_buffer_size(PACKET_SIZE)
            .build()
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("[vmiscope] gdb: {e}");
                return;
            }
        };
        match stub.run_blocking::<EventLoop>(&mut target) {
            Ok(DisconnectReason::Kill) => {
                target.s.shared().stop(StopReason::User);
                let _ = target.s.control().resume(None);
                return;
            }
            Ok(DisconnectReason::Disconnect) => {
                eprintln!("[vmiscope] gdb detached; the guest runs on");
                target.s.go();
            }
            Ok(_) => return,
            // A broken connection or a malformed conversation ends this session
            // only: the guest stays stopped for the next gdb (as with QEMU).
            Err(e) => eprintln!("[vmiscope] gdb session ended: {e}; waiting for gdb again"),
        }
    }
}

/// Where gdb finds the image: the file the user gave, or the built-in image
/// written to a temporary file.
pub fn exec_file_for(image: &str, bytes: &[u8]) -> Option<String> {
    if vmiscope_images::find(image).is_none() {
        return std::fs::canonicalize(image)
            .ok()
            .map(|p| p.display().to_string());
    }
    let p = std::env::temp_dir().join(format!("vmiscope-{}-{image}.elf", std::process::id()));
    std::fs::write(&p, bytes).ok()?;
    Some(p.display().to_string())
}

/// `run --gdb`: the stub on its own thread (next to a console, or alone in batch
/// mode, where the run ends with the guest).
pub fn run(a: &crate::cli::RunArgs, addr: &str, ui: Option<crate::cli::Mode>) -> i32 {
    let mut s = match Session::start(a) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmiscope: {e}");
            return 2;
        }
    };
    let addr = bind_addr(addr);
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vmiscope: cannot listen on {addr}: {e}");
            s.finish();
            return 2;
        }
    };
    let exec = crate::launch::load_image(&a.image)
        .ok()
        .and_then(|(img, _)| exec_file_for(&a.image, &img));
    eprintln!(
        "[vmiscope] gdb: the guest waits at its entry; connect with `gdb -ex 'target remote {}'`",
        listener.local_addr().map(|a| a.to_string()).unwrap_or(addr)
    );
    let g = s.attach();
    let server = std::thread::spawn(move || serve(listener, g, exec));
    let code = match ui {
        Some(mode) => crate::ui::run_session(s, mode),
        None => {
            let mut printed = 0;
            while !s.ended() {
                std::thread::sleep(Duration::from_millis(20));
                print_new_serial(&s, &mut printed);
            }
            print_new_serial(&s, &mut printed);
            let o = s.finish();
            let code = o.map(|o| o.reason.exit_status()).unwrap_or(0);
            if let Some(o) = o {
                eprintln!("[vmiscope] stop: {}", o.reason);
            }
            code
        }
    };
    // The listener thread ends with the guest (or is left blocked in accept).
    drop(server);
    code
}

fn print_new_serial(s: &Session, printed: &mut usize) {
    let lines = s.serial_lines();
    let complete = lines.len().saturating_sub(1);
    for l in &lines[(*printed).min(complete)..complete] {
        println!("{l}");
    }
    *printed = complete.max(*printed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_ids_map_to_existing_vcpus_only() {
        let t = |n: usize| Tid::new(n).unwrap();
        assert_eq!(cpu_of(t(1), 1), Some(0));
        assert_eq!(cpu_of(t(2), 1), None, "thread 2 on a 1-vCPU guest");
        assert_eq!(cpu_of(t(2), 2), Some(1));
        assert_eq!(cpu_of(t(5), 4), None);
        assert_eq!(
            cpu_of(t(usize::MAX), 4),
            None,
            "no overflow into a valid index"
        );
        assert_eq!(
            cpu_of(t(1 << 33), 4),
            None,
            "no truncation into a valid index"
        );
    }
}
