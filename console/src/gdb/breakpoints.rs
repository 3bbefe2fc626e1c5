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
        if self.breaks.contains_key(&GdbKey::Sw(addr)) {
            return Ok(true);
        }
        let Some(piece) = self.add_engine_hook(HookTarget::Breakpoint {
            gva: addr,
            gpa: 0,
            hidden: !self.visible_breakpoints,
        }) else {
            // Not mapped yet (a Linux kernel's own addresses before it builds
            // its page tables): a debug register matches the virtual address
            // and needs no translation.
            if self.unmapped(addr) {
                return self.add_hw_breakpoint(addr, 1);
            }
            return Ok(false);
        };
        self.keep(GdbKey::Sw(addr), GdbStop::Sw, vec![piece]);
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _: usize) -> TargetResult<bool, Self> {
        if !self.forget(GdbKey::Sw(addr)) {
            // One placed in a debug register while its page was unmapped.
            return self.remove_hw(addr);
        }
        Ok(true)
    }
}

impl HwBreakpoint for GdbTarget {
    /// A DR execute breakpoint. On a host whose DR breakpoints do not fire at CPL3
    /// (PVM), one on a user-mapped address is refused, so gdb says it could not
    /// insert it instead of never stopping (`break` works there).
    fn add_hw_breakpoint(&mut self, addr: u64, _: usize) -> TargetResult<bool, Self> {
        if self.s.shared().usable_hw_slots() == 0 {
            return Ok(self.add_hidden_hw(addr));
        }
        // Where guest debugging reaches CPL3 DR breakpoints do too; on PVM they do
        // not, and two of the four slots stay free for the #DB/#BP catches that
        // make steps and breakpoints work in user code.
        let cpl3_debug = self.s.shared().host().dr_breakpoints_at(3);
        if !cpl3_debug && self.user_only_code(addr) {
            crate::errln!(
                "[vmiscope] gdb: hbreak {addr:#x} refused: user code, and this host's DR breakpoints fire at CPL0 only (use break)"
            );
            return Ok(false);
        }
        let Some(slot) = self.s.shared().claim_hw_breakpoint(addr) else {
            let usable = self.s.shared().usable_hw_slots();
            crate::errln!(
                "[vmiscope] gdb: hbreak {addr:#x} refused: all {usable} DR slots in use (hbreaks, or hidden breakpoints)"
            );
            return Ok(false);
        };
        self.hw[slot] = Some(addr);
        Ok(true)
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _: usize) -> TargetResult<bool, Self> {
        self.remove_hw(addr)
    }
}

impl GdbTarget {
    /// Whether `addr` has no translation in the stopped vCPU's page tables.
    fn unmapped(&self, addr: u64) -> bool {
        use vmiscope_introspect::paging::{PagingMode, translate};
        let cpu = self.s.control().stop().map(|s| s.vcpu).unwrap_or(0);
        let Some(s) = self.on_cpu(cpu, |c| c.sregs()) else {
            return false;
        };
        let mode = PagingMode::from_regs(s.cr0, s.cr3, s.cr4, s.efer);
        translate(self.s.shared().ram(), mode, addr).is_err()
    }

    /// Whether the code at `addr` runs at CPL3 only: the VMM's one rule
    /// for debug-register breakpoints (`VmShared::user_only_code`), with the
    /// stopped vCPU's paging.
    fn user_only_code(&self, addr: u64) -> bool {
        use vmiscope_introspect::paging::PagingMode;
        let cpu = self.s.control().stop().map(|s| s.vcpu).unwrap_or(0);
        let Some(sregs) = self.on_cpu(cpu, |c| c.sregs()) else {
            return false;
        };
        let mode = PagingMode::from_regs(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer);
        self.s.shared().user_only_code(mode, addr).unwrap_or(false)
    }

    /// An `hbreak` on a host where no debug-register breakpoint fires (measured
    /// at start-up; QEMU's emulated SVM never arms DR7): a hidden breakpoint
    /// stands in. Like a DR breakpoint it changes nothing the guest can read;
    /// unlike one it needs the address mapped.
    fn add_hidden_hw(&mut self, addr: u64) -> bool {
        if self.breaks.contains_key(&GdbKey::HiddenHw(addr)) {
            return true;
        }
        let target = HookTarget::Breakpoint {
            gva: addr,
            gpa: 0,
            hidden: true,
        };
        let Some(piece) = self.add_engine_hook(target) else {
            crate::errln!(
                "[vmiscope] gdb: hbreak {addr:#x} refused: this host's debug registers never fire, and the address is not mapped yet for the hidden breakpoint that stands in (set it once the guest maps it)"
            );
            return false;
        };
        self.keep(GdbKey::HiddenHw(addr), GdbStop::Hw, vec![piece]);
        true
    }

    fn remove_hw(&mut self, addr: u64) -> TargetResult<bool, Self> {
        if self.forget(GdbKey::HiddenHw(addr)) {
            return Ok(true);
        }
        let Some(slot) = self.hw.iter().position(|a| *a == Some(addr)) else {
            return Ok(false);
        };
        self.hw[slot] = None;
        self.s.shared().set_hw_breakpoint(slot, None);
        Ok(true)
    }
}
