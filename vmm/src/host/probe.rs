//! What this host's KVM delivers to the VMM, measured once per process on a
//! scratch VM: whether an INT3, a debug-register execute breakpoint and a
//! single-step reach us as exits at CPL0 and at CPL3, and whether a fetch from
//! a page with no memslot (our execute trap) does.
//!
//! Why measure instead of trusting the host's name: the same upstream KVM gives
//! different answers under different CPUs. On PVM, CPL0 code runs in KVM's
//! emulator (INT3 is an emulation failure, DR breakpoints work) and CPL3 natively
//! (neither INT3 nor a single-step reaches KVM). Under QEMU's emulated SVM,
//! INT3 checks the SWINT intercept instead of the #BP exception intercept, and
//! DR7 loaded at VMRUN is never armed, so neither breakpoint kind exits, at any
//! CPL (`README.md`, "Hosts", has the source lines). On silicon all of them
//! exit. The VMM picks its mechanism per feature from these answers.
//!
//! The probe: 4 MiB of RAM, the VMM's own boot GDT and page tables with the
//! second 2 MiB made user-accessible, and one instruction sequence at 2 MiB:
//! `nop; nop; int3; out 0x80, al`. Each case sets the registers (CS/SS of the
//! wanted CPL, IOPL 3 so `out` exits at CPL3 too) and the guest-debug controls,
//! and runs once. Anything the VMM was not told about reaches a guest without
//! an IDT and ends as a shutdown, so every case ends in one exit.

use kvm_bindings::{
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
    KVM_MAX_CPUID_ENTRIES, kvm_guest_debug, kvm_userspace_memory_region,
};
use std::cell::Cell;

use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::error::VmError;
use crate::loader::{self, EntryState};
use crate::memory::GuestRam;

/// How an INT3 executed by the guest reaches the VMM at one CPL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int3 {
    /// `KVM_GUESTDBG_USE_SW_BP`: a debug exit for #BP at the INT3.
    DebugExit,
    /// KVM's emulator cannot run INT3 (PVM at CPL0): an emulation failure at it.
    EmulationFailure,
    /// It goes to the guest's own #BP handler: the VMM never sees it.
    Missed,
}

impl Int3 {
    pub fn reaches_vmm(self) -> bool {
        self != Int3::Missed
    }
}

/// The measured answers, index 0 for CPL0 and 1 for CPL3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugCaps {
    pub int3: [Int3; 2],
    /// A `KVM_GUESTDBG_USE_HW_BP` execute breakpoint gives a debug exit.
    pub hw_exec: [bool; 2],
    /// `KVM_GUESTDBG_SINGLESTEP` gives a debug exit after one instruction.
    pub step: [bool; 2],
    /// A fetch from a guest-physical page with no memslot exits to the VMM
    /// (an emulation failure at the fetch) instead of faulting the guest.
    pub exec_trap: [bool; 2],
    /// A CPL0 XSETBV reaches KVM (KVM_GET_XCRS then shows the new XCR0). Not
    /// a debugger feature, but the XCR event depends on it: QEMU's emulated
    /// SVM runs a nested guest's XSETBV without checking its intercept.
    pub xsetbv: bool,
}

impl DebugCaps {
    /// What every hardware-virtualised host is documented to do (VMX and SVM
    /// silicon): everything exits. Used only when the probe cannot run.
    pub const HARDWARE: DebugCaps = DebugCaps {
        int3: [Int3::DebugExit; 2],
        hw_exec: [true; 2],
        step: [true; 2],
        exec_trap: [true; 2],
        xsetbv: true,
    };

    /// What `shared/reference/kvm-host-probe.md` measured on PVM: CPL0 code is
    /// emulated (INT3 fails emulation, DR breakpoints and steps work), CPL3
    /// code runs natively out of KVM's sight. Used only when the probe cannot run.
    pub const PVM: DebugCaps = DebugCaps {
        int3: [Int3::EmulationFailure, Int3::Missed],
        hw_exec: [true, false],
        step: [true, false],
        exec_trap: [true, true],
        xsetbv: true,
    };
}

fn idx(cpl: u8) -> usize {
    usize::from(cpl != 0)
}

impl DebugCaps {
    pub fn int3_at(&self, cpl: u8) -> Int3 {
        self.int3[idx(cpl)]
    }
    pub fn hw_exec_at(&self, cpl: u8) -> bool {
        self.hw_exec[idx(cpl)]
    }
    pub fn step_at(&self, cpl: u8) -> bool {
        self.step[idx(cpl)]
    }
    pub fn exec_trap_at(&self, cpl: u8) -> bool {
        self.exec_trap[idx(cpl)]
    }
}

const CODE: u64 = 0x20_0000;
/// `nop; nop; int3; out 0x80, al`
const SEQUENCE: [u8; 5] = [0x90, 0x90, 0xcc, 0xe6, 0x80];
const XSETBV_CODE: u64 = CODE + 0x10;
/// `xor ecx, ecx; mov eax, 3; xor edx, edx; xsetbv; out 0x80, al`
const XSETBV: [u8; 14] = [
    0x31, 0xc9, 0xb8, 0x03, 0, 0, 0, 0x31, 0xd2, 0x0f, 0x01, 0xd1, 0xe6, 0x80,
];
const CR4_OSXSAVE: u64 = 1 << 18;
/// Mapped by the page tables, beyond the 4 MiB of RAM: no memslot.
const NO_SLOT: u64 = 0x40_0000;
const RAM: u64 = 0x40_0000;

/// What one run of the probe vCPU ended in.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Debug { exception: u32, pc: u64 },
    EmulationFailure { rip: u64 },
    Other,
}

struct Probe {
    vm: VmFd,
    cpuid: CpuId,
    /// Each case runs on a vCPU of its own: one that ended in a shutdown is
    /// left as it is.
    next_id: Cell<u64>,
    _ram: GuestRam,
}

/// Measures this host (see the module's comment).
pub fn measure() -> Result<DebugCaps, VmError> {
    let p = Probe::new()?;
    let mut caps = DebugCaps {
        int3: [Int3::Missed; 2],
        hw_exec: [false; 2],
        step: [false; 2],
        exec_trap: [false; 2],
        xsetbv: false,
    };
    caps.xsetbv = p.xsetbv()?;
    for cpl in [0u8, 3] {
        let i = idx(cpl);
        let ctl = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        caps.step[i] = p.run(cpl, CODE, ctl, None)?
            == Outcome::Debug {
                exception: 1,
                pc: CODE + 1,
            };
        let ctl = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        caps.hw_exec[i] = p.run(cpl, CODE, ctl, Some(CODE + 1))?
            == Outcome::Debug {
                exception: 1,
                pc: CODE + 1,
            };
        let ctl = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
        caps.int3[i] = match p.run(cpl, CODE + 2, ctl, None)? {
            Outcome::Debug { exception: 3, pc } if pc == CODE + 2 => Int3::DebugExit,
            Outcome::EmulationFailure { rip } if rip == CODE + 2 => Int3::EmulationFailure,
            _ => Int3::Missed,
        };
        caps.exec_trap[i] =
            p.run(cpl, NO_SLOT, 0, None)? == Outcome::EmulationFailure { rip: NO_SLOT };
    }
    Ok(caps)
}

impl Probe {
    fn new() -> Result<Probe, VmError> {
        let kvm = Kvm::new().map_err(VmError::ioctl("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(VmError::ioctl("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(VmError::ioctl("KVM_SET_TSS_ADDR"))?;
        enable_exit_on_emulation_failure(&vm)?;
        let ram = GuestRam::new(RAM)?;
        loader::write_boot_area(&ram)?;
        // User-accessible on the walk to the second 2 MiB page (the boot
        // tables map everything as supervisor).
        ram.write(loader::boot::PML4, &(loader::boot::PDPT | 7).to_le_bytes())?;
        ram.write(loader::boot::PDPT, &(loader::boot::PD | 7).to_le_bytes())?;
        ram.write(loader::boot::PD + 8, &(CODE | 0x87).to_le_bytes())?;
        ram.write(loader::boot::PD + 16, &(NO_SLOT | 0x87).to_le_bytes())?;
        ram.write(CODE, &SEQUENCE)?;
        ram.write(XSETBV_CODE, &XSETBV)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: RAM,
            userspace_addr: ram.host_base(),
        };
        // SAFETY: the region is `ram`'s own mapping, which `Probe` keeps alive
        // for as long as the VM (its vCPU) exists.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(VmError::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        // XSAVE, so CR4.OSXSAVE may be set (a PVM host's list lacks it).
        for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            e.ecx |= 1 << 26;
        }
        Ok(Probe {
            vm,
            cpuid,
            next_id: Cell::new(0),
            _ram: ram,
        })
    }

    fn vcpu(&self) -> Result<VcpuFd, VmError> {
        let id = self.next_id.replace(self.next_id.get() + 1);
        let vcpu = self
            .vm
            .create_vcpu(id)
            .map_err(VmError::ioctl("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&self.cpuid)
            .map_err(VmError::ioctl("KVM_SET_CPUID2"))?;
        Ok(vcpu)
    }

    /// Whether a CPL0 XSETBV of XCR0 = 3 reaches KVM.
    fn xsetbv(&self) -> Result<bool, VmError> {
        let mut vcpu = self.vcpu()?;
        let entry = EntryState::Long64 { rip: XSETBV_CODE };
        let s = vcpu.get_sregs().map_err(VmError::ioctl("KVM_GET_SREGS"))?;
        let mut s = loader::sregs_for(&entry, s);
        s.cr4 |= CR4_OSXSAVE;
        vcpu.set_sregs(&s)
            .map_err(VmError::ioctl("KVM_SET_SREGS"))?;
        let mut r = loader::regs_for(&entry, 0, 1);
        r.rip = XSETBV_CODE;
        vcpu.set_regs(&r).map_err(VmError::ioctl("KVM_SET_REGS"))?;
        if !bounded(&mut vcpu, |v| matches!(v.run(), Ok(VcpuExit::IoOut(..)))) {
            return Ok(false);
        }
        let x = vcpu.get_xcrs().map_err(VmError::ioctl("KVM_GET_XCRS"))?;
        Ok(x.xcrs[..x.nr_xcrs as usize]
            .iter()
            .any(|x| x.xcr == 0 && x.value == 3))
    }

    /// Runs once from `rip` at `cpl` with guest-debug `control` (and DR0 =
    /// `dr0` as an execute breakpoint).
    fn run(&self, cpl: u8, rip: u64, control: u32, dr0: Option<u64>) -> Result<Outcome, VmError> {
        let mut vcpu = self.vcpu()?;
        let entry = EntryState::Long64 { rip };
        let s = vcpu.get_sregs().map_err(VmError::ioctl("KVM_GET_SREGS"))?;
        let mut s = loader::sregs_for(&entry, s);
        if cpl == 3 {
            for seg in [&mut s.cs, &mut s.ss] {
                seg.dpl = 3;
                seg.selector |= 3;
            }
        }
        vcpu.set_sregs(&s)
            .map_err(VmError::ioctl("KVM_SET_SREGS"))?;
        let mut r = loader::regs_for(&entry, 0, 1);
        r.rip = rip;
        r.rflags = 0x3002; // IOPL 3: `out` exits at CPL3 too
        r.rsp = CODE + 0x1000;
        vcpu.set_regs(&r).map_err(VmError::ioctl("KVM_SET_REGS"))?;
        let mut dbg = kvm_guest_debug {
            control,
            ..Default::default()
        };
        if let Some(a) = dr0 {
            dbg.arch.debugreg[0] = a;
            dbg.arch.debugreg[7] = 0x601;
        }
        vcpu.set_guest_debug(&dbg)
            .map_err(VmError::ioctl("KVM_SET_GUEST_DEBUG"))?;
        let out = bounded(&mut vcpu, |v| match v.run() {
            Ok(VcpuExit::Debug(d)) => Outcome::Debug {
                exception: d.exception,
                pc: d.pc,
            },
            Ok(VcpuExit::InternalError) => Outcome::EmulationFailure {
                rip: v.get_regs().map(|r| r.rip).unwrap_or(0),
            },
            _ => Outcome::Other,
        });
        Ok(out)
    }
}

/// Longest one probe's KVM_RUN may take. Each runs a few instructions, so an
/// answer comes in microseconds on silicon and milliseconds under emulation.
const RUN_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `f` (one KVM_RUN of `vcpu`) with the vCPU kicked out after
/// `RUN_LIMIT`: a host that loops inside KVM must not hang start-up (Bochs's
/// emulated VMX re-faults for good on a CPL3 fetch from a page with no
/// memslot, measured). A kicked run ends in EINTR, which counts as the
/// mechanism missing.
fn bounded<T>(vcpu: &mut VcpuFd, f: impl FnOnce(&mut VcpuFd) -> T) -> T {
    crate::kick::install();
    crate::kick::register_thread(vcpu.get_kvm_run());
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if wait.recv_timeout(RUN_LIMIT) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            // This thread is joined before `me` returns, so `me` is alive.
            crate::kick::kick(me);
        }
    });
    let out = f(vcpu);
    drop(done);
    let _ = guard.join();
    crate::kick::unregister_thread();
    // A kick that landed after the run left `immediate_exit` set.
    vcpu.get_kvm_run().immediate_exit = 0;
    out
}

/// Without it KVM gives a CPL3 guest a #UD where its emulator fails (x86.c,
/// `handle_emulation_failure`), and queues that #UD even where it exits to us
/// at CPL0: on a hardware host an execute trap (a fetch from a page with no
/// memslot) at CPL3 became the guest's #UD. With it, every emulation failure
/// exits to the VMM and nothing is queued.
pub(crate) fn enable_exit_on_emulation_failure(
    vm: &kvm_ioctls::VmFd,
) -> Result<(), crate::error::VmError> {
    let cap = kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE;
    if vm.check_extension_raw(cap as libc::c_ulong) > 0 {
        let cap = kvm_bindings::kvm_enable_cap {
            cap,
            args: [1, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap).map_err(crate::error::VmError::ioctl(
            "KVM_ENABLE_CAP(EXIT_ON_EMULATION_FAILURE)",
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a PVM host the probe finds what `kvm-host-probe.md` measured by hand.
    #[test]
    fn pvm_answers_match_the_documented_probe() {
        let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
        if !std::path::Path::new("/dev/kvm").exists() || !pvm {
            eprintln!("NOT RUN: not a PVM host");
            return;
        }
        assert_eq!(measure().unwrap(), DebugCaps::PVM);
    }
}
