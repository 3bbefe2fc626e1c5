//! RAM, page rights and the memslot run gate, the MSR filter, port devices.

use std::sync::atomic::Ordering;
use std::sync::{RwLockReadGuard, RwLockWriteGuard};

use kvm_bindings::{KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;

use super::VmShared;
use crate::error::VmError;
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::slots::{Access, CommitStats, Slot, SlotSink};

impl VmShared {
    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The memslot generation (see `slot_gen`).
    pub(crate) fn slot_generation(&self) -> u64 {
        self.slot_gen.load(Ordering::SeqCst)
    }

    /// Takes the run gate for one KVM_RUN: waits while a memslot commit is pending
    /// or in progress (see `commit_access`).
    pub(crate) fn enter_gate(&self) -> RwLockReadGuard<'_, ()> {
        loop {
            let g = self.run_gate.read().unwrap();
            if !self.gate_pending.load(Ordering::SeqCst) {
                return g;
            }
            // A commit waits for the gate: let it have it first.
            drop(g);
            std::thread::yield_now();
        }
    }

    /// Records the wished access of the page holding `gpa` (applied by `commit_access`).
    pub fn set_page_access(&self, gpa: u64, access: Access) -> Result<bool, VmError> {
        if !self.ram.contains(gpa, 1) {
            return Err(VmError::OutsideRam(gpa));
        }
        Ok(self.change_slots(|s| s.set(gpa / PAGE_SIZE, access)))
    }

    /// Applies `change` to the slot map and, if it changed what is installed,
    /// bumps the slot generation before the map is unlocked. A vCPU that reads a
    /// page's access to judge a failed fetch then reads the generation (see
    /// `FailureSite`): if it saw the new access, it sees the new generation and
    /// runs the instruction again instead of taking the failure as real. With
    /// the bump left to the commit, a page opened for another vCPU's step-over
    /// read as open while the generation still said nothing had changed: the
    /// fetch that had failed on the closed page ended the run as an emulation
    /// failure (about 1 LLDB session in 60 on `smp`).
    fn change_slots(&self, change: impl FnOnce(&mut crate::slots::SlotMap) -> bool) -> bool {
        let mut slots = self.slots.lock().unwrap();
        let changed = change(&mut slots);
        if changed {
            self.slot_gen.fetch_add(1, Ordering::SeqCst);
        }
        changed
    }

    /// The access installed for the page holding `gpa` (`Full` while a
    /// step-over has it open, whatever the hooks wish).
    pub fn page_access(&self, gpa: u64) -> Access {
        self.slots.lock().unwrap().installed_access(gpa / PAGE_SIZE)
    }

    /// Pages that are not `Full`.
    pub fn trapped_pages(&self) -> Vec<(u64, Access)> {
        self.slots
            .lock()
            .unwrap()
            .trapped()
            .map(|(p, a)| (p * PAGE_SIZE, a))
            .collect()
    }

    /// Applies the recorded page-access changes as memslot changes, in one batch.
    /// A split or merge deletes a slot before creating its replacement (KVM has no
    /// atomic replace), so while the VM runs every vCPU is kicked out of the guest
    /// and kept at the run gate (`enter_gate`) until the slots are whole again: a
    /// vCPU in the guest during that window would find its code or page tables
    /// gone (a triple fault on PVM). The committing thread is never inside
    /// KVM_RUN itself (vCPU threads commit while handling an exit).
    pub fn commit_access(&self) -> Result<CommitStats, VmError> {
        if !self.slots.lock().unwrap().is_dirty() {
            return Ok(CommitStats::default());
        }
        // The gate before the slots: a thread holding the gate (`hold_guest`)
        // sets page access, which takes the slots' lock.
        let _quiet = self.hold_guest();
        let mut slots = self.slots.lock().unwrap();
        let mut sink = Memslots {
            vm: &self.vm_fd,
            host: self.ram.host_base(),
        };
        self.slot_gen.fetch_add(1, Ordering::SeqCst);
        let st = slots
            .commit(&mut sink)
            .map_err(|e| VmError::Kvm(format!("KVM_SET_USER_MEMORY_REGION: {e}")))?;
        self.count_ioctls(st.ioctls() as u64);
        Ok(st)
    }

    /// Installs the page holding `gpa` as `Full` for a step-over, and commits,
    /// until `close_page`; its wished access is kept (see `SlotMap::open`).
    pub(crate) fn open_page(&self, gpa: u64) -> Result<CommitStats, VmError> {
        if !self.ram.contains(gpa, 1) {
            return Err(VmError::OutsideRam(gpa));
        }
        self.change_slots(|s| {
            s.open(gpa / PAGE_SIZE);
            true
        });
        self.commit_access()
    }

    /// Ends one `open_page`: the page's access of now is installed again.
    pub(crate) fn close_page(&self, gpa: u64) -> Result<CommitStats, VmError> {
        self.change_slots(|s| {
            s.close(gpa / PAGE_SIZE);
            true
        });
        self.commit_access()
    }

    /// Kicks every running vCPU out of the guest and keeps them out (at the run
    /// gate, `enter_gate`) until the result is dropped. A hook edit holds the
    /// guest this way from its first change to its commit: a hidden
    /// breakpoint's INT3 is written before its page is read-trapped, and a vCPU
    /// in the guest between the two would run it (on a host where no INT3
    /// exits, the guest's own #BP handler gets it: the rig's busybox test hung
    /// on that once hook edits left the vCPU threads). Inside a hold,
    /// `commit_access` takes no second one. Lock order: the engine, then this,
    /// then the slots.
    pub fn hold_guest(&self) -> GuestHeld<'_> {
        let me = std::thread::current().id();
        // Before `run` no vCPU executes, so there is nothing to hold off.
        if *self.gate_holder.lock().unwrap() == Some(me) || !self.running.load(Ordering::SeqCst) {
            return GuestHeld {
                vm: self,
                gate: None,
            };
        }
        self.gate_pending.store(true, Ordering::SeqCst);
        // Only a running vCPU can be in the guest: one that marks itself
        // running after this looks at `gate_pending` after that (in
        // `enter_gate`) and waits. A held or paused one is left alone (gdb
        // takes its watchpoints out and puts them back at every stop: two
        // commits, each of which cost the held vCPU a signal and an entry
        // that returned EINTR at once).
        for c in 0..self.vcpu_count() {
            self.kick_if_running(c);
        }
        let g = self.run_gate.write().unwrap();
        self.gate_pending.store(false, Ordering::SeqCst);
        *self.gate_holder.lock().unwrap() = Some(me);
        GuestHeld {
            vm: self,
            gate: Some(g),
        }
    }

    /// Sets and commits the access of one page.
    pub fn protect_page(&self, gpa: u64, access: Access) -> Result<CommitStats, VmError> {
        self.set_page_access(gpa, access)?;
        self.commit_access()
    }

    /// Intercepts reads and/or writes of an MSR (both false: stop intercepting).
    pub fn intercept_msr(&self, index: u32, read: bool, write: bool) -> Result<(), VmError> {
        let mut m = self.msrs.lock().unwrap();
        let old = m.get(index);
        m.set(index, read, write);
        self.count_ioctls(1);
        m.apply(&self.vm_fd).map_err(|e| {
            m.set(index, old.0, old.1);
            VmError::Config(e)
        })
    }

    pub fn msr_intercepted(&self, index: u32) -> (bool, bool) {
        self.msrs.lock().unwrap().get(index)
    }

    /// Reads guest-virtual memory as `cpu` saw it at its last exit.
    pub fn read_virt(&self, cpu: u32, gva: u64, buf: &mut [u8]) -> Result<(), VmError> {
        let mode = self.last_paging(cpu).ok_or(VmError::NoVcpu(cpu))?;
        crate::guest::read_virt(&self.ram, mode, gva, buf)
    }

    pub(crate) fn port_write(&self, port: u16, size: u8, value: u32) -> crate::devices::PortEffect {
        self.devices.lock().unwrap().write(port, size, value)
    }

    pub(crate) fn port_read(&self, port: u16, size: u8) -> Option<u32> {
        self.devices.lock().unwrap().read(port, size)
    }

    /// KVM ioctls issued while running, other than KVM_RUN.
    pub fn ioctl_count(&self) -> u64 {
        self.ioctls.load(Ordering::Relaxed)
    }

    pub(crate) fn count_ioctls(&self, n: u64) {
        self.ioctls.fetch_add(n, Ordering::Relaxed);
    }
}

/// Every vCPU out of the guest while this lives (`VmShared::hold_guest`).
pub struct GuestHeld<'a> {
    vm: &'a VmShared,
    gate: Option<RwLockWriteGuard<'a, ()>>,
}

impl Drop for GuestHeld<'_> {
    fn drop(&mut self) {
        if self.gate.is_some() {
            // Before the gate opens (the guard drops after this).
            *self.vm.gate_holder.lock().unwrap() = None;
        }
    }
}

struct Memslots<'a> {
    vm: &'a VmFd,
    host: u64,
}

impl SlotSink for Memslots<'_> {
    fn create(&mut self, s: &Slot) -> std::io::Result<()> {
        self.set(s, s.pages * PAGE_SIZE)
    }
    fn delete(&mut self, s: &Slot) -> std::io::Result<()> {
        self.set(s, 0)
    }
}

impl Memslots<'_> {
    fn set(&self, s: &Slot, size: u64) -> std::io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: s.id,
            flags: if s.read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: s.first_page * PAGE_SIZE,
            memory_size: size,
            userspace_addr: self.host + s.first_page * PAGE_SIZE,
        };
        // SAFETY: the host range lies inside the guest RAM mapping, which lives as
        // long as the VM (VmShared owns both).
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}
