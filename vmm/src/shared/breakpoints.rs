//! Our software breakpoints (INT3s in guest RAM) and hardware execute breakpoints.

use std::sync::atomic::Ordering;

use super::{SwBp, VmShared};
use crate::error::VmError;
use vmiscope_introspect::paging::{self, PagingMode};

impl VmShared {
    /// Whether the code at `gva` runs at CPL3 only, as far as the guest's
    /// state tells. One rule for every debug-register breakpoint (a hidden
    /// `break`, gdb's `hbreak`): its slot must fire at CPL3 then, else at
    /// CPL0. Yes when the page is user-accessible and CPL0 cannot run it
    /// (SMEP) or the guest keeps its kernel on supervisor pages; no for a
    /// supervisor page, no paging, or a kernel that runs from user-accessible
    /// pages itself (many small kernels map everything U/S=1: their code is
    /// CPL0 code). None on the tables the VMM built for the entry: they map
    /// everything as supervisor and say nothing of the guest's code yet (the
    /// caller decides: a hidden breakpoint plays safe, an `hbreak` the
    /// analyst asked for is taken as kernel code).
    pub fn user_only_code(&self, mode: PagingMode, gva: u64) -> Option<bool> {
        if mode.cr3 & !0xfff == crate::loader::boot::PML4 {
            return None;
        }
        let user = |va: u64| paging::translate(self.ram(), mode, va).is_ok_and(|t| t.user);
        if !mode.paging || !user(gva) {
            return Some(false);
        }
        if mode.smep {
            return Some(true);
        }
        let kernel_on_user_pages = (0..self.vcpu_count())
            .filter_map(|c| self.last_position(c))
            .any(|(rip, cpl)| cpl == 0 && rip != 0 && user(rip));
        Some(!kernel_on_user_pages)
    }

    pub(crate) fn debug_generation(&self) -> u64 {
        self.debug_gen.load(Ordering::SeqCst)
    }

    /// The hardware execute breakpoints, per slot.
    pub(crate) fn hw_breakpoints(&self) -> [Option<u64>; 4] {
        *self.hw_bps.lock().unwrap()
    }

    pub(crate) fn has_sw_breakpoints(&self) -> bool {
        !self.sw_bps.lock().unwrap().is_empty()
    }

    /// Plants a software breakpoint (INT3) at guest-physical `gpa`, executed at
    /// guest-virtual `gva` (None: unknown, so assumed reachable from user code).
    pub fn insert_sw_breakpoint(&self, gpa: u64, gva: Option<u64>) -> Result<(), VmError> {
        self.insert_sw_breakpoint_as(gpa, gva, true)
    }

    /// As `insert_sw_breakpoint`; `hidden`: the guest must not read the INT3.
    pub(crate) fn insert_sw_breakpoint_as(
        &self,
        gpa: u64,
        gva: Option<u64>,
        hidden: bool,
    ) -> Result<(), VmError> {
        let mut bps = self.sw_bps.lock().unwrap();
        if bps.contains_key(&gpa) {
            return Ok(());
        }
        let mut b = [0u8];
        self.ram.read(gpa, &mut b)?;
        self.ram.write(gpa, &[0xcc])?;
        bps.insert(
            gpa,
            SwBp {
                orig: b[0],
                gva,
                hidden,
            },
        );
        self.debug_gen.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    pub fn remove_sw_breakpoint(&self, gpa: u64) -> Result<bool, VmError> {
        let mut bps = self.sw_bps.lock().unwrap();
        let Some(bp) = bps.remove(&gpa) else {
            return Ok(false);
        };
        self.ram.write(gpa, &[bp.orig])?;
        self.debug_gen.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    /// Writes guest-physical memory for a debugger or the console. Bytes under our
    /// INT3s become those breakpoints' original bytes (restored when they go) and
    /// the INT3s stay, so an edit neither loses a breakpoint nor leaves a stale
    /// byte to be put back later.
    pub fn write_around_breakpoints(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        let mut bps = self.sw_bps.lock().unwrap();
        self.ram.write(gpa, data)?;
        let end = gpa + data.len() as u64;
        for (at, bp) in bps.iter_mut().filter(|(at, _)| (gpa..end).contains(*at)) {
            bp.orig = data[(*at - gpa) as usize];
            self.ram.write(*at, &[0xcc])?;
        }
        Ok(())
    }

    /// Sets hardware execute breakpoint `slot` (0..4) at a guest-virtual address on
    /// every vCPU. On a PVM host these fire for CPL0 code only.
    pub fn set_hw_breakpoint(&self, slot: usize, addr: Option<u64>) {
        self.hw_bps.lock().unwrap()[slot] = addr;
        self.debug_generation_changed();
    }

    /// Every vCPU applies its debug state again before its next entry (it
    /// reads the generation after it marks itself running). Only one in the
    /// guest needs a kick: a held or paused vCPU kicked would pay a signal and
    /// an entry that returns EINTR at once for nothing (gdb sets its
    /// breakpoints again at every stop).
    fn debug_generation_changed(&self) {
        self.debug_gen.fetch_add(1, Ordering::SeqCst);
        for c in 0..self.vcpu_count() {
            self.kick_if_running(c);
        }
    }

    /// The debug-register slots breakpoints may take: all four where guest
    /// debugging reaches CPL3, else two (PVM: the other two are for the #DB and
    /// #BP catches that make steps and INT3s work in user code).
    pub fn usable_hw_slots(&self) -> usize {
        self.host.usable_hw_slots()
    }

    /// Places a hidden breakpoint at `gpa` (executed at `gva`) in a free
    /// debug-register slot, if one is left and such a breakpoint fires for this
    /// code (`user`: the code is on a user page, where PVM's DR breakpoints do not
    /// fire). Nothing in guest memory changes: there is nothing to hide. Set on
    /// every vCPU (each re-applies its debug state at its next entry).
    pub fn insert_register_breakpoint(&self, gpa: u64, gva: u64, user: bool) -> bool {
        if !self.host.dr_breakpoints_at(if user { 3 } else { 0 }) {
            return false;
        }
        let mut regs = self.reg_bps.lock().unwrap();
        if regs.contains_key(&gpa) {
            return true;
        }
        let slot = {
            let mut hw = self.hw_bps.lock().unwrap();
            let Some(slot) = hw[..self.usable_hw_slots()]
                .iter()
                .position(Option::is_none)
            else {
                return false;
            };
            hw[slot] = Some(gva);
            slot
        };
        regs.insert(gpa, slot);
        drop(regs);
        self.debug_generation_changed();
        true
    }

    /// Frees the slot of the register breakpoint at `gpa`; false if none.
    pub fn remove_register_breakpoint(&self, gpa: u64) -> bool {
        let Some(slot) = self.reg_bps.lock().unwrap().remove(&gpa) else {
            return false;
        };
        self.set_hw_breakpoint(slot, None);
        true
    }

    /// Takes the first free usable debug-register slot for an execute
    /// breakpoint at `addr` (a debugger's `hbreak`); None when all are taken
    /// (by other `hbreak`s or hidden breakpoints).
    pub fn claim_hw_breakpoint(&self, addr: u64) -> Option<usize> {
        let slot = {
            let mut hw = self.hw_bps.lock().unwrap();
            let slot = hw[..self.usable_hw_slots()]
                .iter()
                .position(Option::is_none)?;
            hw[slot] = Some(addr);
            slot
        };
        self.set_hw_breakpoint(slot, Some(addr));
        Some(slot)
    }

    /// The gpa of the register breakpoint in `slot`, if it holds one.
    pub(crate) fn register_breakpoint_in(&self, slot: usize) -> Option<u64> {
        self.reg_bps
            .lock()
            .unwrap()
            .iter()
            .find(|(_, s)| **s == slot)
            .map(|(g, _)| *g)
    }

    /// Whether a debug-register slot is left for the #DB catch of a CPL3 step
    /// (`hbreak`s may have taken all four).
    pub(crate) fn dr_slot_free(&self) -> bool {
        self.hw_bps.lock().unwrap().iter().any(Option::is_none)
    }

    /// Every software breakpoint: (guest-physical address, original byte).
    pub fn sw_breakpoints(&self) -> Vec<(u64, u8)> {
        self.sw_bps
            .lock()
            .unwrap()
            .iter()
            .map(|(at, bp)| (*at, bp.orig))
            .collect()
    }

    /// The INT3s a step over the instruction at `gpa` must put their original
    /// bytes back for: every hidden one on its page (the instruction must not
    /// read an INT3 it could not see), and a visible one only under the
    /// instruction itself (at most 15 bytes): the guest may read those.
    pub(crate) fn sw_breakpoints_for_step(&self, gpa: u64) -> Vec<(u64, u8)> {
        let page = gpa & !(crate::memory::PAGE_SIZE - 1);
        self.sw_bps
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, bp)| {
                let own = (gpa..gpa + 15).contains(*at);
                **at & !(crate::memory::PAGE_SIZE - 1) == page && (bp.hidden || own)
            })
            .map(|(at, bp)| (*at, bp.orig))
            .collect()
    }

    /// Whether user code (CPL3) can reach one of our breakpoints under `mode`'s
    /// page tables: one is on a user page, or was planted without its address.
    pub(crate) fn user_breakpoints(&self, mode: vmiscope_introspect::paging::PagingMode) -> bool {
        self.sw_bps.lock().unwrap().values().any(|bp| match bp.gva {
            None => true,
            Some(v) => {
                vmiscope_introspect::paging::translate(&self.ram, mode, v).is_ok_and(|t| t.user)
            }
        })
    }

    /// The original byte under our breakpoint at `gpa`, if there is one.
    pub fn sw_breakpoint_at(&self, gpa: u64) -> Option<u8> {
        self.sw_bps.lock().unwrap().get(&gpa).map(|bp| bp.orig)
    }
}
