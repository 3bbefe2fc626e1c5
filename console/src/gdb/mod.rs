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
use std::num::NonZeroUsize;
use std::time::Duration;

use gdbstub::common::{Signal, Tid};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::breakpoints::WatchKind;
use gdbstub::target::{TargetError, TargetResult};
use vmiscope_introspect::{HookId, Outcome, Target as HookTarget};
use vmiscope_vmm::VcpuCtl;

use crate::session::Session;
use vmiscope_monitor::{BreakId, StopCause};

pub mod arch;
mod base;
mod breakpoints;
pub mod conn;
mod event_loop;
mod exec_file;
pub mod fpu;
mod monitor;
mod resume;
mod serve;
mod single_register;
mod symbol_file;
mod watch;

pub use serve::{ImageFile, bind_addr, exec_file_for, run, serve};
pub use symbol_file::elf as symbol_elf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    Continue,
    Step,
}

/// Why a gdb-requested stop happens, by console breakpoint id.
#[derive(Debug, Clone, Copy)]
enum GdbStop {
    Sw,
    /// An `hbreak` served by a hidden breakpoint (no debug register fires here).
    Hw,
    Watch(WatchKind, u64),
}

/// What gdb asked for, as gdb names it when it takes it out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum GdbKey {
    /// `break` (Z0), by address.
    Sw(u64),
    /// `hbreak` (Z1) held as a hidden breakpoint, by address.
    HiddenHw(u64),
    /// A watchpoint (Z2..Z4): address, length, kind.
    Watch(u64, u64, u8),
}

/// One gdb breakpoint or watchpoint: the engine hooks and console event
/// breakpoints that serve it (a watched range that crosses a page has a hook
/// per page), and what its stop reports.
#[derive(Debug)]
struct GdbBreak {
    stop: GdbStop,
    pieces: Vec<(HookId, BreakId)>,
}

pub struct GdbTarget {
    s: Session,
    exec_file: Option<String>,
    /// gdb's breakpoints and watchpoints that the engine serves.
    breaks: HashMap<GdbKey, GdbBreak>,
    /// `hbreak`s in debug registers, by slot.
    hw: [Option<u64>; 4],
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
    /// The packet being handled is a legacy `c`/`C`/`s`/`S` (see `conn`).
    legacy: conn::LegacyResume,
    /// `monitor watch force`: watchpoints on pages a vCPU uses by itself too.
    force_watch: bool,
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
            breaks: HashMap::new(),
            hw: [None; 4],
            resume: HashMap::new(),
            locked: false,
            seen,
            refused: false,
            visible_breakpoints: false,
            legacy: conn::LegacyResume::default(),
            force_watch: false,
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

    fn add_engine_hook(&mut self, target: HookTarget) -> Option<(HookId, BreakId)> {
        let after_write = matches!(target, HookTarget::Gva { .. });
        // VM-wide, with no vCPU answering; a guest-virtual target resolved
        // with the page tables of the vCPU at the stop (vCPU 0 when none).
        let cpu = self.s.control().stop().map(|s| s.vcpu).unwrap_or(0);
        let id = self
            .s
            .intro()
            .add_gdb_hook(self.s.shared(), cpu, target, Box::new(|_| Outcome::allow()))
            .ok()?;
        let brk = self
            .s
            .control()
            .add_break_ext(None, Some(id), None, after_write);
        Some((id, brk))
    }

    fn remove_engine_hook(&mut self, (hook, brk): (HookId, BreakId)) {
        self.s.control().delete_break(brk);
        let _ = self.s.intro().remove_hook(self.s.shared(), hook);
    }

    /// Records gdb's `key` as served by `pieces`.
    fn keep(&mut self, key: GdbKey, stop: GdbStop, pieces: Vec<(HookId, BreakId)>) {
        self.breaks.insert(key, GdbBreak { stop, pieces });
    }

    /// Takes gdb's `key` out, every piece of it; false if there was none.
    fn forget(&mut self, key: GdbKey) -> bool {
        let Some(b) = self.breaks.remove(&key) else {
            return false;
        };
        for p in b.pieces {
            self.remove_engine_hook(p);
        }
        true
    }

    /// What the stop at console breakpoint `id` reports to gdb.
    fn gdb_stop(&self, id: BreakId) -> Option<GdbStop> {
        self.breaks
            .values()
            .find(|b| b.pieces.iter().any(|(_, brk)| *brk == id))
            .map(|b| b.stop)
    }

    /// Pauses every vCPU (the one at a stop is held already) and waits for each
    /// to acknowledge.
    /// All-stop: every other vCPU pauses (the one at the stop is held already).
    fn all_stop(&self) {
        self.s.shared().pause_unheld();
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
            StopCause::Break(id) => self.gdb_stop(id),
            _ => None,
        };
        match (st.cause, gdb_stop) {
            (StopCause::HwBreak { .. }, _) => MultiThreadStopReason::HwBreak(t),
            (_, Some(GdbStop::Sw)) => MultiThreadStopReason::SwBreak(t),
            (_, Some(GdbStop::Hw)) => MultiThreadStopReason::HwBreak(t),
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
                crate::errln!(
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
