//! Reading guest state the way the guest sees it: its privilege level, its paging
//! mode, its virtual memory, an MSR, an injected exception. Shared by the vCPU
//! loop, `VcpuCtl`, the debug machinery and the user-mode catches (`usertrap`).
//! Callers count the ioctls.

use kvm_bindings::kvm_sregs;
use kvm_ioctls::VcpuFd;
use vmiscope_introspect::paging::{self, PagingMode};

use crate::error::VmError;
use crate::memory::{GuestRam, PAGE_SIZE};

/// The CPL of a vCPU in state `s` (0 before protected mode).
pub(crate) fn cpl_of(s: &kvm_sregs) -> u8 {
    if s.cr0 & 1 == 0 {
        0
    } else {
        (s.cs.selector & 3) as u8
    }
}

pub(crate) fn paging_mode(s: &kvm_sregs) -> PagingMode {
    PagingMode::from_regs(s.cr0, s.cr3, s.cr4, s.efer)
}

/// Reads guest-virtual memory page by page through the guest's tables.
pub(crate) fn read_virt(
    ram: &GuestRam,
    mode: PagingMode,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), VmError> {
    let mut done = 0usize;
    while done < buf.len() {
        let va = gva.wrapping_add(done as u64);
        let t = paging::translate(ram, mode, va).map_err(|e| VmError::Memory(e.to_string()))?;
        let n = ((PAGE_SIZE - (va & (PAGE_SIZE - 1))) as usize).min(buf.len() - done);
        ram.read(t.gpa, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// An extended control register through KVM_GET_XCRS (None: the CPU has no
/// such XCR).
pub(crate) fn xcr(fd: &VcpuFd, index: u32) -> Option<u64> {
    let x = fd.get_xcrs().ok()?;
    x.xcrs[..x.nr_xcrs as usize]
        .iter()
        .find(|e| e.xcr == index)
        .map(|e| e.value)
}

/// One MSR through KVM_GET_MSRS.
pub(crate) fn get_msr(fd: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    (fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
}

/// One MSR through KVM_SET_MSRS; whether KVM took it.
pub(crate) fn set_msr(fd: &VcpuFd, index: u32, data: u64) -> bool {
    kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .ok()
    .and_then(|m| fd.set_msrs(&m).ok())
        == Some(1)
}

/// Injects exception `vector` on the next entry — unless this exit came in
/// the middle of delivering an event (see [`delivering`]): then nothing is
/// injected, the event is delivered on entry, and the instruction, which has
/// not run yet, runs (and traps) again after it.
pub(crate) fn inject(fd: &VcpuFd, vector: u8, error_code: Option<u32>) -> Result<(), VmError> {
    let mut ev = fd
        .get_vcpu_events()
        .map_err(VmError::ioctl("KVM_GET_VCPU_EVENTS"))?;
    if delivering(&ev) {
        return Ok(());
    }
    ev.exception.injected = 1;
    ev.exception.nr = vector;
    ev.exception.has_error_code = error_code.is_some() as u8;
    ev.exception.error_code = error_code.unwrap_or(0);
    fd.set_vcpu_events(&ev)
        .map_err(VmError::ioctl("KVM_SET_VCPU_EVENTS"))
}

/// Whether KVM was delivering an interrupt, NMI or exception when the vCPU
/// exited (VMX's IDT-vectoring information, SVM's EXITINTINFO): KVM re-delivers
/// it on the next entry. An exception injected now would take its place, and
/// KVM then drops the interrupt for good (SVM clears both queues at the next
/// exit): the interrupt controller holds it in service, the guest never EOIs
/// it, and its timer stops.
fn delivering(ev: &kvm_bindings::kvm_vcpu_events) -> bool {
    ev.interrupt.injected != 0 || ev.nmi.injected != 0 || ev.exception.injected != 0
}

#[cfg(test)]
mod delivery_tests {
    use super::*;

    #[test]
    fn an_exception_waits_while_an_interrupt_is_being_delivered() {
        let mut ev = kvm_bindings::kvm_vcpu_events::default();
        assert!(!delivering(&ev), "nothing in flight: inject");
        ev.interrupt.injected = 1;
        ev.interrupt.nr = 0x30;
        assert!(delivering(&ev), "a PIT tick in flight");
        ev.interrupt.injected = 0;
        ev.nmi.injected = 1;
        assert!(delivering(&ev));
    }
}
