//! How to build a VM.

use std::time::Duration;

use crate::loader::Module;

/// How to build the VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u32,
    pub mem_mib: u64,
    /// In-kernel PIC/IOAPIC/LAPIC and PIT (as a PC has). Without it HLT exits.
    pub irqchip: bool,
    /// Keep KVM's fix-hypercall quirk (then a CPL0 VMCALL livelocks a PVM vCPU and
    /// the watchdog must catch it); by default it is turned off and VMCALL is a #UD.
    pub hypercall_quirk: bool,
    pub timeout: Option<Duration>,
    /// A vCPU that has not exited for this long is kicked (the 1 Hz timer).
    pub tick: Duration,
    pub cmdline: String,
    pub modules: Vec<Module>,
    /// Boot a bzImage through its own decompressor (else vmiscope decompresses
    /// it and enters the vmlinux).
    pub linux_own_decompressor: bool,
    /// A Linux kernel's initial RAM disk.
    pub initrd: Option<Vec<u8>>,
    /// vCPUs wait, paused, before their first instruction (until `resume_all`).
    pub start_paused: bool,
    /// How many of the process's signals (`crate::signals::received`) belong to
    /// earlier runs; any beyond it ends this run. `None`: those received before
    /// the run started. The `run` command gives `Some(0)`: a signal that arrives
    /// while the VM is still being built ends the run as soon as it starts.
    pub signals_seen: Option<u64>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 1,
            mem_mib: 128,
            irqchip: true,
            hypercall_quirk: false,
            timeout: None,
            tick: Duration::from_secs(1),
            cmdline: String::new(),
            modules: vec![],
            initrd: None,
            linux_own_decompressor: false,
            start_paused: false,
            signals_seen: None,
        }
    }
}

pub const MAX_VCPUS: u32 = 4;
pub const MAX_MEM_MIB: u64 = 3072;
