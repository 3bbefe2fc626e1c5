//! Software breakpoints (hidden INT3s, engine hooks) and hardware ones (DR slots).

use gdbstub::target::TargetResult;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, HwBreakpoint, HwBreakpointOps, HwWatchpointOps, SwBreakpoint, SwBreakpointOps,
};
use vmiscope_introspect::Target as HookTarget;

use super::*;

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
