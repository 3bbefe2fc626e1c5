//! Building a VM (KVM, irqchip, RAM, the image, vCPUs) and running it: one thread
//! per vCPU plus the watchdog. What the threads share is `shared::VmShared`.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_enable_cap};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{MAX_MEM_MIB, MAX_VCPUS, VmConfig};
use crate::devices::{Devices, FwCfg, SerialLog, SerialPort};
use crate::error::VmError;
use crate::event::ExitHandler;
use crate::host;
use crate::kick;
use crate::loader;
use crate::memory::GuestRam;
use crate::shared::{Parts, VcpuState, VmShared};
use crate::stats::ExitClass;
use crate::stop::StopReason;
use crate::vcpu::VcpuThread;

/// The result of `Vm::run`.
#[derive(Debug)]
pub struct RunOutcome {
    pub reason: StopReason,
    pub elapsed: Duration,
    /// Exits per class, summed over vCPUs.
    pub exits: Vec<(ExitClass, u64)>,
    /// Exits per vCPU.
    pub exits_per_vcpu: Vec<u64>,
    pub serial: String,
}

/// A built VM, ready to run.
pub struct Vm {
    shared: Arc<VmShared>,
    fds: Vec<VcpuFd>,
    pub format: String,
    /// What the user should know about how the kernel was started (a Linux
    /// kernel's command line and what vmiscope added to it).
    pub boot_note: Option<String>,
    /// See `take_vmlinux`.
    vmlinux: Option<Vec<u8>>,
}

impl Vm {
    /// Builds a VM and loads `image` into it.
    pub fn new(cfg: &VmConfig, image: &[u8]) -> Result<Vm, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!("--vcpus must be 1..={MAX_VCPUS}")));
        }
        if cfg.mem_mib < 4 || cfg.mem_mib > MAX_MEM_MIB {
            return Err(VmError::Config(format!(
                "--mem must be 4..={MAX_MEM_MIB} MiB"
            )));
        }
        let kvm = host::open_kvm()?;
        host::check_required(&kvm)?;
        let vm = kvm.create_vm().map_err(VmError::ioctl("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(VmError::ioctl("KVM_SET_TSS_ADDR"))?;
        let serial_irq = if cfg.irqchip {
            vm.create_irq_chip()
                .map_err(VmError::ioctl("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit)
                .map_err(VmError::ioctl("KVM_CREATE_PIT2"))?;
            pit_without_reinjection(&vm)?;
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Kvm(e.to_string()))?;
            vm.register_irqfd(&fd, 4)
                .map_err(VmError::ioctl("KVM_IRQFD"))?;
            Some(fd)
        } else {
            None
        };
        enable_vm_caps(&kvm, &vm, cfg)?;

        let mem = cfg.mem_mib << 20;
        let ram = GuestRam::new(mem)?;
        loader::write_boot_area(&ram)?;
        let host = crate::host::Host::detect();
        let (cmdline, boot_note) = command_line(image, cfg, &host);
        let inputs = loader::BootInputs {
            cmdline: &cmdline,
            user_cmdline_bytes: cfg.cmdline.trim().len(),
            modules: &cfg.modules,
            initrd: cfg.initrd.as_deref(),
            own_decompressor: cfg.linux_own_decompressor,
            vcpus: cfg.vcpus,
        };
        let loaded = loader::load(&ram, image, &inputs)?;
        let serial = Arc::new(SerialLog::default());
        let devices = Devices::new(
            SerialPort::new(serial.clone(), serial_irq),
            FwCfg::new(cfg.vcpus as u16, mem),
        );
        if !cfg.irqchip
            && cfg.vcpus > 1
            && !matches!(loaded.entry, loader::EntryState::Long64 { .. })
        {
            return Err(VmError::Config("a multiboot or Linux kernel with several vCPUs needs the irqchip (its APs wait for INIT/SIPI)".into()));
        }
        let mut fds = Vec::new();
        let entry = loaded.entry;
        let cpuid = guest_cpuid(&kvm, host.debug().xsetbv)?;
        for id in 0..cfg.vcpus {
            fds.push(crate::vcpu::create(&vm, id, cfg, &loaded.entry, &cpuid)?);
        }
        let shared = Arc::new(VmShared::new(Parts {
            host,
            ram,
            vm_fd: vm,
            serial,
            devices,
            vcpus: cfg.vcpus,
        }));
        // Before the first exit, "last position" is the entry.
        for c in 0..cfg.vcpus {
            let r = loader::regs_for(&entry, c, cfg.vcpus);
            let s = loader::sregs_for(&entry, kvm_bindings::kvm_sregs::default());
            shared.set_entry_position(c, r.rip, [s.cr0, s.cr3, s.cr4, s.efer]);
        }
        shared.commit_access()?;
        Ok(Vm {
            shared,
            fds,
            format: loaded.format,
            vmlinux: loaded.vmlinux,
            boot_note,
        })
    }

    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// The built VM's vCPU file descriptors, for driving KVM_RUN directly (the raw
    /// baseline of `vmiscope bench`). The VMM's exit handling is bypassed.
    pub fn into_raw(self) -> (Arc<VmShared>, Vec<VcpuFd>) {
        (self.shared, self.fds)
    }

    /// The Linux kernel's ELF the loader read (decompressed from a bzImage),
    /// for the monitor to read its symbols and BTF from; once.
    pub fn take_vmlinux(&mut self) -> Option<Vec<u8>> {
        self.vmlinux.take()
    }

    /// Runs every vCPU on its own thread until the run stops; `cfg.timeout` and
    /// `cfg.tick` drive the watchdog.
    pub fn run(self, handler: Arc<dyn ExitHandler>, cfg: &VmConfig) -> RunOutcome {
        kick::install();
        let signals = cfg.signals_seen.unwrap_or_else(crate::signals::received);
        let shared = self.shared;
        let start = Instant::now();
        let mut threads = Vec::new();
        for (id, fd) in self.fds.into_iter().enumerate() {
            let (tx, rx) = channel();
            shared.attach_vcpu(id as u32, tx);
            if cfg.start_paused {
                shared.set_state(id as u32, VcpuState::Paused);
            }
            let t = VcpuThread::new(
                id as u32,
                fd,
                shared.clone(),
                handler.clone(),
                rx,
                cfg.start_paused,
            );
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || t.run())
            {
                Ok(h) => {
                    shared.set_vcpu_thread(id as u32, h.as_pthread_t());
                    threads.push(h);
                }
                Err(e) => {
                    shared.stop(StopReason::Error(format!("cannot start vCPU thread: {e}")));
                    break;
                }
            }
        }
        if shared.is_stopping() {
            // A stop that came before the threads existed could not kick them.
            shared.stop(StopReason::User);
        }
        let watchdog = {
            let shared = shared.clone();
            let (timeout, tick) = (cfg.timeout, cfg.tick);
            std::thread::spawn(move || watchdog(&shared, timeout, tick, signals))
        };
        for t in threads {
            let _ = t.join();
        }
        if !shared.is_stopping() {
            shared.stop(StopReason::Error(
                "all vCPU threads ended without a stop reason".into(),
            ));
        }
        let _ = watchdog.join();
        let reason = shared
            .stop_reason()
            .unwrap_or(StopReason::Error("no stop reason".into()));
        let (exits, exits_per_vcpu) = shared.exit_counts();
        RunOutcome {
            reason,
            elapsed: start.elapsed(),
            exits,
            exits_per_vcpu,
            serial: shared.serial().text(),
        }
    }
}

/// Kicks every vCPU in the guest and waits (at most 200 ms) for each to exit,
/// so their last positions are where they are now: a vCPU spinning at CPL3
/// since its last exit at CPL0 was reported at that old CPL0 position when
/// the timeout came before any tick had kicked it (seen on a slow host).
fn where_now(shared: &VmShared) {
    let kicked = Instant::now();
    let running = |c| shared.vcpu_state(c) == Some(VcpuState::Running);
    for c in (0..shared.vcpu_count()).filter(|&c| running(c)) {
        shared.kick(c);
    }
    let stale = |c| running(c) && shared.quiet_for(c) >= kicked.elapsed();
    while kicked.elapsed() < Duration::from_millis(200) && (0..shared.vcpu_count()).any(stale) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Kicks vCPUs that have not exited for a tick (so periodic checks run and
/// livelocks are noticed) and enforces the timeout.
fn watchdog(shared: &VmShared, timeout: Option<Duration>, tick: Duration, signals: u64) {
    let start = Instant::now();
    let mut last_tick = Instant::now();
    while !shared.is_stopping() {
        std::thread::sleep(Duration::from_millis(20));
        if crate::signals::received() > signals {
            shared.stop(StopReason::Signal(crate::signals::last()));
            break;
        }
        if let Some(t) = timeout
            && start.elapsed() >= t
        {
            where_now(shared);
            let where_ = (0..shared.vcpu_count())
                .map(|c| {
                    let (rip, cpl) = shared.last_position(c).unwrap_or_default();
                    (c, rip, cpl)
                })
                .collect();
            shared.stop(StopReason::Timeout {
                millis: t.as_millis() as u64,
                where_,
            });
            break;
        }
        if last_tick.elapsed() >= tick {
            last_tick = Instant::now();
            for c in 0..shared.vcpu_count() {
                let running = shared.vcpu_state(c) == Some(VcpuState::Running);
                if running && shared.quiet_for(c) >= tick {
                    shared.kick(c);
                }
            }
        }
    }
}

vmm_sys_util::ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);

/// Turns off KVM's PIT "reinjection" (the lost-tick policy `delay` that QEMU
/// calls `lost_tick_policy`): in that mode the PIT holds every later tick until
/// the guest has acknowledged the last one, so one tick never acknowledged
/// silences it for good. Seen on the nested-SVM rig: a PIT interrupt injected
/// and re-injected, never EOIed, and no timer interrupt for the rest of the run
/// (KVM's `kvm_inj_virq`/`kvm_pic_set_irq` tracepoints; the guest's clock froze
/// and RCU, with no ticks, let `filp` fill 512 MiB until the OOM killer came).
/// Linux counts time from its clocksource, not from ticks, so a late tick
/// dropped costs it nothing.
fn pit_without_reinjection(vm: &VmFd) -> Result<(), VmError> {
    let ctl = kvm_bindings::kvm_reinject_control::default();
    // SAFETY: KVM_REINJECT_CONTROL reads one kvm_reinject_control (32 bytes,
    // `pit_reinject` 0: off) from the pointer, which lives across the call; the
    // fd is a VM with a PIT (created just before).
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_REINJECT_CONTROL(), &ctl) };
    if r < 0 {
        return Err(VmError::ioctl("KVM_REINJECT_CONTROL")(
            kvm_ioctls::Error::last(),
        ));
    }
    Ok(())
}

fn enable_vm_caps(kvm: &Kvm, vm: &VmFd, cfg: &VmConfig) -> Result<(), VmError> {
    if kvm.check_extension(Cap::X86UserSpaceMsr) {
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            args: [kvm_bindings::KVM_MSR_EXIT_REASON_FILTER as u64, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(VmError::ioctl("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
    }
    crate::host::probe::enable_exit_on_emulation_failure(vm)?;
    const FIX_HYPERCALL_INSN: u64 = 1 << 5;
    const CAP_DISABLE_QUIRKS2: u32 = 213;
    let quirks = vm.check_extension_raw(CAP_DISABLE_QUIRKS2 as libc::c_ulong) as u64;
    if !cfg.hypercall_quirk && quirks & FIX_HYPERCALL_INSN != 0 {
        let cap = kvm_enable_cap {
            cap: CAP_DISABLE_QUIRKS2,
            args: [FIX_HYPERCALL_INSN, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(VmError::ioctl("KVM_ENABLE_CAP(DISABLE_QUIRKS2)"))?;
    }
    Ok(())
}

/// KVM's supported CPUID, adjusted by [`adjust_cpuid`]; the APIC id is set per
/// vCPU. `xsetbv_seen`: the start-up probe saw a guest's XSETBV reach KVM.
fn guest_cpuid(kvm: &Kvm, xsetbv_seen: bool) -> Result<kvm_bindings::CpuId, VmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    adjust_cpuid(cpuid.as_mut_slice());
    if !xsetbv_seen {
        hide_xsave(cpuid.as_mut_slice());
    }
    Ok(cpuid)
}

/// Takes XSAVE, and everything whose state only XSAVE holds, out of the
/// guest's CPUID, for a host whose KVM never sees the guest's XSETBV (the
/// nested-SVM rig: QEMU 7.2's TCG runs a nested XSETBV without checking its
/// SVM intercept). There KVM can virtualise XSAVE no better than not at all:
/// - CPUID 0xD.0 EBX (the XSAVE area for the enabled features) never follows
///   the guest's XCR0, because only an intercepted XSETBV updates it
///   (`kvm_update_cpuid_runtime`). Linux then sizes its FPU buffers at 576
///   bytes while XSAVE writes 2,696 ("XSAVE consistency problem"), and the
///   kernel triple-faults later;
/// - KVM loads its own idea of XCR0 at every VM entry
///   (`kvm_load_guest_xsave_state`), undoing the guest's XSETBV, so AVX and
///   XRSTOR fault at random.
///
/// Without XSAVE the guest uses FXSAVE and SSE, which need no XCR0. Silicon
/// always intercepts XSETBV (KVM requires it), so this is a rig's remedy only.
fn hide_xsave(entries: &mut [kvm_bindings::kvm_cpuid_entry2]) {
    // Leaf 1 ECX: FMA 12, XSAVE 26, OSXSAVE 27, AVX 28, F16C 29.
    const L1_ECX: u32 = (1 << 12) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29);
    // Leaf 7.0 EBX: AVX2 5, AVX-512 F/DQ/IFMA/PF/ER/CD/BW/VL.
    const L7_EBX: u32 = (1 << 5)
        | (1 << 16)
        | (1 << 17)
        | (1 << 21)
        | (1 << 26)
        | (1 << 27)
        | (1 << 28)
        | (3 << 30);
    // Leaf 7.0 ECX: AVX-512 VBMI 1, PKU 3, OSPKE 4, VBMI2 6, VAES 9,
    // VPCLMULQDQ 10, VNNI 11, BITALG 12, VPOPCNTDQ 14 (PKRU is XSAVE state).
    const L7_ECX: u32 = (1 << 1)
        | (1 << 3)
        | (1 << 4)
        | (1 << 6)
        | (1 << 9)
        | (1 << 10)
        | (1 << 11)
        | (1 << 12)
        | (1 << 14);
    // Leaf 7.0 EDX: AVX-512 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX 22/24/25,
    // AVX-512 FP16 23.
    const L7_EDX: u32 = (1 << 2) | (1 << 3) | (1 << 8) | (0xf << 22);
    // Leaf 7.1 EAX: AVX-VNNI 4, AVX-512 BF16 5.
    const L7_1_EAX: u32 = (1 << 4) | (1 << 5);
    for e in entries {
        match (e.function, e.index) {
            (1, _) => e.ecx &= !L1_ECX,
            (7, 0) => {
                e.ebx &= !L7_EBX;
                e.ecx &= !L7_ECX;
                e.edx &= !L7_EDX;
            }
            (7, 1) => e.eax &= !L7_1_EAX,
            (0xd, _) => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            _ => {}
        }
    }
}

/// What every VMM adds to KVM's supported CPUID:
/// - the hypervisor bit (leaf 1 ECX[31]). Upstream KVM leaves it out of
///   `KVM_GET_SUPPORTED_CPUID` (QEMU and Firecracker set it themselves); PVM
///   sets it. Without it Linux never reads KVM's leaves at 0x40000000, so it has
///   no kvmclock and must calibrate its TSC against the PIT. Under an emulated
///   SVM that calibration fails, and the kernel then spun in `calibrate_delay`.
/// - XSAVE (so the guest may set CR4.OSXSAVE) and SMEP (so the demo's guest
///   may set CR4.SMEP).
fn adjust_cpuid(entries: &mut [kvm_bindings::kvm_cpuid_entry2]) {
    for e in entries {
        match (e.function, e.index) {
            (1, _) => e.ecx |= (1 << 31) | (1 << 26),
            (7, 0) => e.ebx |= 1 << 7,
            _ => {}
        }
    }
}

/// `line` as one printed line: a control character (a newline in
/// `--cmdline`) is escaped, not allowed to cut the note.
fn shown(line: &str) -> String {
    line.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// The command line the kernel gets: a Linux kernel's gets what it needs on
/// this host, with a note that says what was added.
/// The note also says when the guest's CPUID lacks XSAVE (see `hide_xsave`).
fn command_line(image: &[u8], cfg: &VmConfig, host: &crate::Host) -> (String, Option<String>) {
    let hidden = (!host.debug().xsetbv).then_some(
        "XSAVE, AVX and PKU hidden from the guest's CPUID: this host's KVM never sees the guest's XSETBV, so it could not keep XCR0",
    );
    if !loader::is_linux(image) {
        return (cfg.cmdline.clone(), hidden.map(str::to_string));
    }
    let pvm = host.kind() == crate::HostKind::Pvm;
    let (line, added) = loader::linux_command_line(&cfg.cmdline, pvm);
    let mut note = match added.is_empty() {
        true => format!("kernel command line: {}", shown(&line)),
        false => format!(
            "kernel command line: {} (vmiscope added: {})",
            shown(&line),
            added.join(" ")
        ),
    };
    if let Some(h) = hidden {
        note = format!("{note}; {h}");
    }
    (line, Some(note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_is_told_it_runs_under_a_hypervisor() {
        // Upstream KVM's supported leaf 1 (no hypervisor bit, no XSAVE here).
        let mut e = [
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x0000_2000,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 7,
                ..Default::default()
            },
        ];
        adjust_cpuid(&mut e);
        assert_eq!(e[0].ecx >> 31, 1, "hypervisor bit");
        assert_eq!(e[0].ecx & (1 << 26), 1 << 26, "XSAVE");
        assert_eq!(e[0].ecx & 0x2000, 0x2000, "the rest kept");
        assert_eq!(e[1].ebx, 1 << 7, "SMEP");
    }

    #[test]
    fn a_host_that_never_sees_xsetbv_gives_no_xsave() {
        // What QEMU's TCG CPU offers on the rig: XSAVE, AVX, AVX2, PKU, XCR0 0x207.
        let entry = |function, index, eax, ebx, ecx, edx| kvm_bindings::kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        let mut e = [
            entry(
                1,
                0,
                0,
                0,
                (1 << 26) | (1 << 28) | (1 << 0) | (1 << 19),
                1 << 25,
            ),
            entry(
                7,
                0,
                0,
                (1 << 5) | (1 << 7) | (1 << 3),
                (1 << 3) | (1 << 2),
                0,
            ),
            entry(0xd, 0, 0x207, 0x240, 0xa88, 0),
            entry(0xd, 2, 0x100, 0x240, 0, 0),
        ];
        adjust_cpuid(&mut e);
        hide_xsave(&mut e);
        assert_eq!(e[0].ecx & ((1 << 26) | (1 << 28)), 0, "no XSAVE, no AVX");
        assert_eq!(e[0].ecx >> 31, 1, "still a hypervisor");
        assert_eq!(
            e[0].ecx & ((1 << 0) | (1 << 19)),
            (1 << 0) | (1 << 19),
            "SSE3, SSE4.1 kept"
        );
        assert_eq!(e[0].edx, 1 << 25, "SSE kept");
        assert_eq!(
            e[1].ebx,
            (1 << 7) | (1 << 3),
            "SMEP and BMI1 kept, AVX2 gone"
        );
        assert_eq!(e[1].ecx, 1 << 2, "UMIP kept, PKU gone");
        assert!(
            e[2..]
                .iter()
                .all(|x| (x.eax, x.ebx, x.ecx, x.edx) == (0, 0, 0, 0))
        );
    }
}
