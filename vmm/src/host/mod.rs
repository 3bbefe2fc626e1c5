//! What kind of KVM host this is. A PVM host (`kvm_pvm`, no VMX/SVM) runs guest
//! CPL0 code in KVM's instruction emulator and CPL3 code natively, which changes
//! which debug mechanisms work (see `caps` for the measured answer).

use std::sync::OnceLock;

use kvm_ioctls::{Cap, Kvm};

pub mod probe;
pub use probe::{DebugCaps, Int3};

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

    /// Whether this KVM itself runs under a hypervisor (the CPU flag
    /// `hypervisor`): nested, as the nested-SVM rig (QEMU's TCG) and our PVM
    /// machines (Firecracker) are. Timings there are not hardware timings.
    pub fn nested() -> bool {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"))
    }

    /// The host's name for figures: says when no figure measured here can be
    /// read as a hardware figure (PVM, or a KVM that is itself nested).
    pub fn figures_label(self) -> String {
        if self == HostKind::Pvm || HostKind::nested() {
            format!(
                "{} — nested under another hypervisor: no figure here is a hardware figure",
                self.name()
            )
        } else {
            self.name().to_string()
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
}

/// This host: its kind (for labels, and the PVM emulator's own quirks) and what
/// its KVM was measured to deliver (which decides every debug mechanism).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    kind: HostKind,
    debug: DebugCaps,
    /// Why the probe could not run, if it could not (then `debug` is the
    /// documented answer for `kind`).
    probe_error: Option<&'static str>,
}

impl Host {
    /// The kind, and the probe's answers, measured once per process: every VM
    /// a process makes runs on the same KVM, and the probe costs a VM.
    pub fn detect() -> Host {
        static HOST: OnceLock<Host> = OnceLock::new();
        *HOST.get_or_init(|| {
            let kind = HostKind::detect();
            match probe::measure() {
                Ok(debug) => Host {
                    kind,
                    debug,
                    probe_error: None,
                },
                Err(e) => {
                    let why: &'static str = Box::leak(e.to_string().into_boxed_str());
                    Host {
                        kind,
                        debug: if kind == HostKind::Pvm {
                            DebugCaps::PVM
                        } else {
                            DebugCaps::HARDWARE
                        },
                        probe_error: Some(why),
                    }
                }
            }
        })
    }

    /// A host with the given answers (unit tests of the mechanisms' choice).
    pub fn with(kind: HostKind, debug: DebugCaps) -> Host {
        Host {
            kind,
            debug,
            probe_error: None,
        }
    }

    pub fn kind(&self) -> HostKind {
        self.kind
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    pub fn debug(&self) -> &DebugCaps {
        &self.debug
    }

    pub fn probe_error(&self) -> Option<&'static str> {
        self.probe_error
    }

    /// Whether KVM's single-step ends in a debug exit for guest code at this CPL.
    pub fn single_step_at(&self, cpl: u8) -> bool {
        self.debug.step_at(cpl)
    }

    /// Whether a debug-register execute breakpoint fires for code at this CPL.
    pub fn dr_breakpoints_at(&self, cpl: u8) -> bool {
        self.debug.hw_exec_at(cpl)
    }

    /// Whether steps and INT3s in user code are caught at the guest's own
    /// #DB/#BP entry (`usertrap`): where KVM does not deliver them at CPL3 but
    /// a DR breakpoint on the CPL0 handler does fire (PVM).
    pub fn user_catches(&self) -> bool {
        let missing = !self.debug.step_at(3) || !self.debug.int3_at(3).reaches_vmm();
        missing && self.debug.hw_exec_at(0)
    }

    /// Whether an INT3 of ours at this CPL reaches the VMM: as a debug exit or
    /// an emulation failure, or (CPL3) through the #BP catch. Where it does not,
    /// the breakpoint's page is execute-trapped so the fetch of the INT3 is the hit.
    pub fn int3_caught_at(&self, cpl: u8) -> bool {
        self.debug.int3_at(cpl).reaches_vmm() || (cpl != 0 && self.user_catches())
    }

    /// The debug-register slots breakpoints may take: four where they fire,
    /// two where two more are the user catches, none where they never fire.
    pub fn usable_hw_slots(&self) -> usize {
        if !self.debug.hw_exec_at(0) && !self.debug.hw_exec_at(3) {
            0
        } else if self.user_catches() {
            2
        } else {
            4
        }
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

/// How a debugger feature is served on this host at one CPL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// KVM reports it as a debug exit (`KVM_GUESTDBG_USE_SW_BP`).
    DebugExit,
    /// KVM's emulator fails on the INT3, at the INT3 (PVM, CPL0).
    EmulationFailure,
    /// Caught at the guest's own #DB/#BP entry by a CPL0 debug register, the
    /// exception frame popped by the VMM (PVM, CPL3).
    EntryCatch,
    /// The page has no memslot: the fetch of the instruction exits.
    FetchTrap,
    /// A debug-register execute breakpoint (while slots last).
    DebugRegister,
    /// A hidden breakpoint stands in (no debug register fires on this host).
    HiddenBreakpoint,
    /// `KVM_GUESTDBG_SINGLESTEP`.
    KvmStep,
    /// RFLAGS.TF, caught at the guest's #DB entry (see `EntryCatch`).
    TfCatch,
    /// Page hooks (memslots): a write exits after it lands.
    PageHook,
    Unavailable,
}

impl Via {
    pub fn describe(self) -> &'static str {
        match self {
            Via::DebugExit => "KVM debug exit",
            Via::EmulationFailure => "emulation failure at the INT3",
            Via::EntryCatch => "caught at the guest's #BP entry",
            Via::FetchTrap => "fetch trap (page without memslot)",
            Via::DebugRegister => "debug register",
            Via::HiddenBreakpoint => "hidden breakpoint (fetch trap)",
            Via::KvmStep => "KVM single-step",
            Via::TfCatch => "RFLAGS.TF caught at the guest's #DB entry",
            Via::PageHook => "page hook (memslot)",
            Via::Unavailable => "unavailable",
        }
    }
}

/// A debugger feature and how this host serves it at CPL0 and CPL3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub cpl0: Via,
    pub cpl3: Via,
}

impl Host {
    /// Which mechanism serves each debugger feature here: the same decisions
    /// the VMM takes (`usable_hw_slots`, `int3_caught_at`, `user_catches`, …),
    /// so `caps` cannot say one thing while the VMM does another.
    pub fn features(&self) -> [Feature; 6] {
        let by_cpl = |f: &dyn Fn(u8) -> Via| (f(0), f(3));
        let hidden = by_cpl(&|c| {
            if self.usable_hw_slots() > 0 && self.dr_breakpoints_at(c) {
                Via::DebugRegister
            } else {
                self.fetch_trap(c)
            }
        });
        let visible = by_cpl(&|c| match self.debug.int3_at(c) {
            Int3::DebugExit => Via::DebugExit,
            Int3::EmulationFailure => Via::EmulationFailure,
            Int3::Missed if c != 0 && self.user_catches() => Via::EntryCatch,
            Int3::Missed => self.fetch_trap(c),
        });
        let step = by_cpl(&|c| {
            if self.single_step_at(c) {
                Via::KvmStep
            } else if c != 0 && self.user_catches() {
                Via::TfCatch
            } else {
                Via::Unavailable
            }
        });
        let hbreak = by_cpl(&|c| {
            if self.usable_hw_slots() > 0 && self.dr_breakpoints_at(c) {
                Via::DebugRegister
            } else if self.usable_hw_slots() == 0 && self.debug.exec_trap_at(c) {
                Via::HiddenBreakpoint
            } else {
                Via::Unavailable
            }
        });
        let exec = by_cpl(&|c| self.fetch_trap(c));
        let row = |name, (cpl0, cpl3): (Via, Via)| Feature { name, cpl0, cpl3 };
        [
            row("breakpoint (hidden)", hidden),
            row("breakpoint (visible)", visible),
            row("single-step", step),
            row("hbreak", hbreak),
            row("watchpoint", (Via::PageHook, Via::PageHook)),
            row("execute trap", exec),
        ]
    }

    fn fetch_trap(&self, cpl: u8) -> Via {
        if self.debug.exec_trap_at(cpl) {
            Via::FetchTrap
        } else {
            Via::Unavailable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the probe measured on the nested-SVM rig (QEMU's emulated SVM).
    const RIG: DebugCaps = DebugCaps {
        int3: [Int3::Missed; 2],
        hw_exec: [false; 2],
        step: [true; 2],
        exec_trap: [true; 2],
        xsetbv: false,
    };

    fn vias(h: &Host) -> Vec<(&'static str, Via, Via)> {
        h.features()
            .iter()
            .map(|f| (f.name, f.cpl0, f.cpl3))
            .collect()
    }

    #[test]
    fn silicon_uses_kvm_exits_and_all_four_debug_registers() {
        let h = Host::with(HostKind::Svm, DebugCaps::HARDWARE);
        assert_eq!(h.usable_hw_slots(), 4);
        assert!(!h.user_catches());
        assert!(h.int3_caught_at(0) && h.int3_caught_at(3));
        let v = vias(&h);
        assert_eq!(
            v[0],
            (
                "breakpoint (hidden)",
                Via::DebugRegister,
                Via::DebugRegister
            )
        );
        assert_eq!(
            v[1],
            ("breakpoint (visible)", Via::DebugExit, Via::DebugExit)
        );
        assert_eq!(v[2], ("single-step", Via::KvmStep, Via::KvmStep));
        assert_eq!(v[3], ("hbreak", Via::DebugRegister, Via::DebugRegister));
    }

    #[test]
    fn pvm_keeps_two_slots_for_the_user_catches() {
        let h = Host::with(HostKind::Pvm, DebugCaps::PVM);
        assert_eq!(h.usable_hw_slots(), 2);
        assert!(h.user_catches());
        assert!(h.int3_caught_at(0) && h.int3_caught_at(3));
        let v = vias(&h);
        assert_eq!(v[0].1, Via::DebugRegister);
        assert_eq!(v[0].2, Via::FetchTrap);
        assert_eq!(
            v[1],
            (
                "breakpoint (visible)",
                Via::EmulationFailure,
                Via::EntryCatch
            )
        );
        assert_eq!(v[2], ("single-step", Via::KvmStep, Via::TfCatch));
        assert_eq!(v[3], ("hbreak", Via::DebugRegister, Via::Unavailable));
    }

    /// The rig: no INT3 and no DR breakpoint reaches KVM, so every breakpoint
    /// is a fetch trap and an `hbreak` a hidden breakpoint; nothing is caught
    /// at the guest's entries (no DR to catch with).
    #[test]
    fn without_int3_or_dr_exits_breakpoints_are_fetch_traps() {
        let h = Host::with(HostKind::Svm, RIG);
        assert_eq!(h.usable_hw_slots(), 0);
        assert!(!h.user_catches());
        assert!(!h.int3_caught_at(0) && !h.int3_caught_at(3));
        assert!(!h.dr_breakpoints_at(0));
        let v = vias(&h);
        assert_eq!(
            v[0],
            ("breakpoint (hidden)", Via::FetchTrap, Via::FetchTrap)
        );
        assert_eq!(
            v[1],
            ("breakpoint (visible)", Via::FetchTrap, Via::FetchTrap)
        );
        assert_eq!(v[2], ("single-step", Via::KvmStep, Via::KvmStep));
        assert_eq!(
            v[3],
            ("hbreak", Via::HiddenBreakpoint, Via::HiddenBreakpoint)
        );
        assert_eq!(v[5], ("execute trap", Via::FetchTrap, Via::FetchTrap));
    }

    /// Without the execute trap either, nothing can stand in: unavailable.
    #[test]
    fn with_nothing_that_exits_breakpoints_are_unavailable() {
        let none = DebugCaps {
            exec_trap: [false; 2],
            ..RIG
        };
        let v = vias(&Host::with(HostKind::Unknown, none));
        assert_eq!(v[1].1, Via::Unavailable);
        assert_eq!(v[3].1, Via::Unavailable);
    }
}
