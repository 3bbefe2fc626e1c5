//! What kind of KVM host this is. A PVM host (`kvm_pvm`, no VMX/SVM) runs guest
//! CPL0 code in KVM's instruction emulator and CPL3 code natively, which changes
//! which debug mechanisms work (see `caps` for the measured answer).

use kvm_ioctls::{Cap, Kvm};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Pagetable-based VM: no hardware virtualisation under the guest.
    Pvm,
    /// Intel VMX.
    Vmx,
    /// AMD SVM.
    Svm,
    Unknown,
}

impl HostKind {
    pub fn detect() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            return HostKind::Pvm;
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or("");
        if flags.split_whitespace().any(|f| f == "vmx") {
            HostKind::Vmx
        } else if flags.split_whitespace().any(|f| f == "svm") {
            HostKind::Svm
        } else {
            HostKind::Unknown
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HostKind::Pvm => "PVM (kvm_pvm: CPL0 emulated, CPL3 native)",
            HostKind::Vmx => "hardware KVM (Intel VMX)",
            HostKind::Svm => "hardware KVM (AMD SVM)",
            HostKind::Unknown => "KVM (unknown backend)",
        }
    }

    /// Whether KVM's single-step works for guest code at this CPL.
    pub fn single_step_at(self, cpl: u8) -> bool {
        cpl == 0 || self != HostKind::Pvm
    }
}

/// Opens /dev/kvm with a message that says what to do when it is missing.
pub fn open_kvm() -> Result<Kvm, crate::error::VmError> {
    Kvm::new().map_err(|e| {
        let why = match e.errno() {
            libc::ENOENT => "no /dev/kvm on this machine: KVM is not available (enable virtualisation or load kvm)",
            libc::EACCES | libc::EPERM => "permission denied on /dev/kvm (run as root or join the kvm group)",
            _ => "cannot open /dev/kvm",
        };
        crate::error::VmError::Kvm(format!("{why} ({e})"))
    })
}

/// Capabilities the VMM cannot do without.
pub fn check_required(kvm: &Kvm) -> Result<(), crate::error::VmError> {
    for (cap, name) in [
        (Cap::SyncRegs, "KVM_CAP_SYNC_REGS"),
        (Cap::ReadonlyMem, "KVM_CAP_READONLY_MEM"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(crate::error::VmError::Kvm(format!("this KVM lacks {name}")));
        }
    }
    Ok(())
}
