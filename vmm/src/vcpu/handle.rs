//! Exit handling as a free function over a small backend (Firecracker's
//! `handle_kvm_exit`): it decides what each `Reply` means for each exit kind and
//! asks the backend to do it. The backend (`backend.rs`, the vCPU thread over
//! KVM) holds every `kvm_run` write; the unit tests below use a fake one, so the
//! `Reply` contract of `event.rs` is checked row by row without a guest.

use kvm_bindings::kvm_regs;

use crate::devices::{INTROCALL_MAGIC, PortEffect};
use crate::error::VmError;
use crate::event::{Event, Introcall, MemAccess, Reply};
use crate::exit::RawExit;
use crate::slots::Access;
use crate::stats::ExitClass;
use crate::stop::StopReason;
use crate::vcpu::state::Catch;

mod faults;
pub(crate) use faults::{FailureSite, SlotUse};

/// What the loop does after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Stop,
}

/// What exit handling needs from the vCPU and its VM.
pub(crate) trait ExitBackend {
    fn id(&self) -> u32;
    fn regs(&self) -> kvm_regs;
    /// Changes general registers (loaded on the next entry).
    fn set_regs(&mut self, regs: &kvm_regs);
    fn cpl(&self) -> u8;
    /// CR4.LA57: addresses are 57-bit canonical instead of 48-bit.
    fn la57(&self) -> bool;
    /// After a shutdown: when the vCPU holds the state INIT gives it (CS F000
    /// based at FFFF0000, RIP FFF0; KVM on SVM resets a vCPU that shut down),
    /// the RIP of its exit before the shutdown, the last place known; else None.
    fn reset_at_shutdown(&self) -> Option<u64>;
    /// Counts an exit of `class` (for `stats` and `bench`).
    fn count(&self, class: ExitClass);
    /// Asks the exit handler (the engine, in a session) about `event`.
    fn ask(&mut self, event: &Event) -> Reply;
    /// Ends the run with `reason` (the first reason wins).
    fn stop(&mut self, reason: StopReason);
    /// Marks this vCPU halted; returns whether every vCPU now is.
    fn halt(&mut self) -> bool;

    fn port_write(&mut self, port: u16, size: u8, value: u32) -> PortEffect;
    fn port_read(&mut self, port: u16, size: u8) -> Option<u32>;
    /// Completes an IN: the value the guest's register receives.
    fn complete_io_in(&mut self, value: u32);
    /// Completes an MMIO read: the value the guest's load receives.
    fn complete_mmio_read(&mut self, value: u64);
    /// Completes RDMSR/WRMSR: `error` raises #GP; `data` is what RDMSR returns.
    fn complete_msr(&mut self, error: bool, data: Option<u64>);
    fn get_msr(&mut self, index: u32) -> Option<u64>;
    /// Applies an MSR write KVM handed to user space; returns whether KVM took it.
    fn set_msr(&mut self, index: u32, value: u64) -> bool;

    fn ram_contains(&self, gpa: u64, len: u64) -> bool;
    fn page_access(&self, gpa: u64) -> Access;
    fn ram_read(&self, gpa: u64, buf: &mut [u8]);
    fn ram_write(&mut self, gpa: u64, data: &[u8]);

    // Debug exits, emulation failures and kicks (routed in `faults`).
    /// What debug-register slot `slot` (0-3) holds.
    fn slot_use(&self, slot: usize) -> SlotUse;
    /// One instruction ran under a step (KVM's, or a TF step caught at #DB)
    /// and ended at `pc`: a step-over's restores are put back; an analyst's
    /// step (or one nobody asked for) is reported.
    fn stepped(&mut self, pc: u64) -> Flow;
    /// A watched guest exception entry was reached: ours (a TF step, an INT3
    /// at CPL3) is undone and handled, the guest's own runs its handler.
    fn caught(&mut self, catch: Catch) -> Flow;
    /// Resumes past an execute breakpoint that fired (resuming on it would
    /// fire it again): a step over the instruction with debug registers off.
    fn step_past_hw_breakpoint(&mut self);
    /// The INT3 at `rip`: its guest-physical address, and whether it is ours.
    fn sw_breakpoint_at(&self, rip: u64) -> (Option<u64>, bool);
    /// Where an internal error happened (see `FailureSite`).
    fn failure_site(&mut self) -> FailureSite;
    /// A fetch at `gva` from the execute-trapped page at `gpa`: its event,
    /// then the instruction completed here or stepped over.
    fn exec_fault(&mut self, gva: u64, gpa: u64, cpl: u8) -> Flow;
    /// Completes an instruction KVM's emulator cannot run (on PVM) if the VMM
    /// can; returns whether it did.
    fn fixup(&mut self, bytes: &[u8]) -> bool;
    /// After a kick: Some(RIP) when the vCPU was kicked on the same CPL0
    /// hypercall the previous time too, with no exit in between (livelock).
    fn kicked_on_hypercall(&mut self) -> Option<u64>;
    /// Whether KVM's single-step (KVM_GUESTDBG_SINGLESTEP) is armed for the
    /// instruction that exited.
    fn kvm_stepping(&self) -> bool;
    /// Called before every exit but a debug one: a step-over that could not
    /// single-step finishes here.
    fn finish_deferred(&mut self);
    /// Moves RIP past an instruction of `len` bytes without running it.
    fn skip(&mut self, len: u8);
    /// Runs the instruction under our breakpoint at `gpa` once (original byte,
    /// page opened if execute-trapped), then re-arms everything.
    fn step_over_at(&mut self, gpa: u64) -> Result<(), VmError>;
    /// Delivers the guest's own #BP for the INT3 at `rip`.
    fn reinject_breakpoint(&mut self, rip: u64) -> Result<(), VmError>;
}

/// Handles one decoded exit: asks the handler where the exit is an event, then
/// applies its reply.
pub(crate) fn handle_exit(be: &mut dyn ExitBackend, raw: RawExit) -> Flow {
    if !matches!(raw, RawExit::Debug { .. }) {
        be.finish_deferred();
    }
    match raw {
        RawExit::IoOut { port, size, value } => io_out(be, port, size, value),
        RawExit::IoIn { port, size } => io_in(be, port, size),
        RawExit::MmioRead { gpa, len } => mmio_read(be, gpa, len),
        RawExit::MmioWrite { gpa, len, data } => {
            // KVM's emulator has already moved RIP past a write it hands to
            // user space, and it skips the single-step trap for it (x86.c:
            // `kvm_vcpu_do_singlestep` runs only when the emulation did not
            // exit, and `complete_emulated_mmio` returns to the guest with a
            // "FIXME: return into emulator if single-stepping"). Its write-back
            // also drops RFLAGS.TF, as RIP is no longer `singlestep_rip`, so a
            // step over a store to a write-trapped page ran free (VMX, SVM
            // and PVM alike). The step ends here instead, as the CPU's would.
            let flow = mmio_write(be, gpa, len, data);
            if flow == Flow::Continue && be.kvm_stepping() {
                let rip = be.regs().rip;
                be.stepped(rip)
            } else {
                flow
            }
        }
        RawExit::RdMsr { index } => msr(be, index, None),
        RawExit::WrMsr { index, value } => msr(be, index, Some(value)),
        RawExit::Debug { exception, pc, dr6 } => faults::debug(be, exception, pc, dr6),
        RawExit::InternalError => faults::internal_error(be),
        RawExit::Hlt => halt(be),
        RawExit::Shutdown => {
            // The guest cannot go on, whatever the handler says.
            let _ = ask(be, &Event::Shutdown);
            let cpu = be.id();
            let reason = match be.reset_at_shutdown() {
                Some(rip) => StopReason::TripleFault {
                    cpu,
                    rip,
                    reset: true,
                },
                None => StopReason::TripleFault {
                    cpu,
                    rip: be.regs().rip,
                    reset: false,
                },
            };
            stop(be, reason)
        }
        RawExit::Intr => faults::kicked(be),
        RawExit::FailEntry { reason } => {
            let why = format!("vCPU {}: VM entry failed (reason {reason:#x})", be.id());
            stop(be, StopReason::Error(why))
        }
        RawExit::SystemEvent { kind } => stop(
            be,
            match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
                _ => StopReason::GuestExit(0),
            },
        ),
        RawExit::Other(what) => {
            let why = format!("vCPU {}: {what}", be.id());
            stop(be, StopReason::Error(why))
        }
    }
}

/// Counts the event's class, then asks the handler.
pub(crate) fn ask(be: &mut dyn ExitBackend, event: &Event) -> Reply {
    be.count(event.class());
    be.ask(event)
}

pub(crate) fn stop(be: &mut dyn ExitBackend, reason: StopReason) -> Flow {
    be.stop(reason);
    Flow::Stop
}

/// `Reply::Stop` ends the run; any other reply goes on.
pub(crate) fn stop_or_continue(be: &mut dyn ExitBackend, reply: Reply) -> Flow {
    match reply {
        Reply::Stop(cause) => stop(be, StopReason::Handler(cause)),
        _ => Flow::Continue,
    }
}

fn halt(be: &mut dyn ExitBackend) -> Flow {
    match ask(be, &Event::Halt) {
        Reply::Stop(cause) => stop(be, StopReason::Handler(cause)),
        _ => {
            if be.halt() {
                be.stop(StopReason::AllHalted);
            }
            Flow::Stop
        }
    }
}

fn set_regs(be: &mut dyn ExitBackend, f: impl FnOnce(&mut kvm_regs)) {
    let mut r = be.regs();
    f(&mut r);
    be.set_regs(&r);
}

fn io_out(be: &mut dyn ExitBackend, port: u16, size: u8, value: u32) -> Flow {
    be.count(ExitClass::Io);
    match be.port_write(port, size, value) {
        PortEffect::None => Flow::Continue,
        PortEffect::Exit(status) => stop(be, StopReason::GuestExit(status)),
        PortEffect::Reset => stop(be, StopReason::Reset),
        PortEffect::Doorbell if be.regs().rax == INTROCALL_MAGIC => introcall(be),
        PortEffect::Doorbell | PortEffect::Unclaimed => {
            let reply = ask(
                be,
                &Event::Port {
                    port,
                    size,
                    write: Some(value),
                },
            );
            stop_or_continue(be, reply)
        }
    }
}

/// The introcall doorbell: RAX = 0 and RBX = the answer when a handler took it,
/// RAX = -1 when nobody did.
fn introcall(be: &mut dyn ExitBackend) -> Flow {
    let r = be.regs();
    let call = Introcall {
        op: r.rdi,
        args: [r.rsi, r.rdx, r.rbx],
        rip: r.rip,
        cpl: be.cpl(),
    };
    match ask(be, &Event::Introcall(call)) {
        Reply::Data(v) => set_regs(be, |r| {
            r.rax = 0;
            r.rbx = v;
        }),
        Reply::Stop(cause) => return stop(be, StopReason::Handler(cause)),
        _ => set_regs(be, |r| r.rax = u64::MAX),
    }
    Flow::Continue
}

fn io_in(be: &mut dyn ExitBackend, port: u16, size: u8) -> Flow {
    be.count(ExitClass::Io);
    let value = match be.port_read(port, size) {
        Some(v) => v,
        None => match ask(
            be,
            &Event::Port {
                port,
                size,
                write: None,
            },
        ) {
            Reply::Data(v) => v as u32,
            Reply::Stop(cause) => return stop(be, StopReason::Handler(cause)),
            _ => u32::MAX,
        },
    };
    be.complete_io_in(value);
    Flow::Continue
}

fn mem_access(be: &dyn ExitBackend, gpa: u64, len: u8, write: bool, data: u64) -> MemAccess {
    MemAccess {
        gpa,
        len,
        write,
        data,
        rip: be.regs().rip,
        cpl: be.cpl(),
    }
}

fn ram_value(be: &dyn ExitBackend, gpa: u64, len: u8) -> u64 {
    let mut b = [0u8; 8];
    be.ram_read(gpa, &mut b[..len.min(8) as usize]);
    u64::from_le_bytes(b)
}

fn mmio_read(be: &mut dyn ExitBackend, gpa: u64, len: u8) -> Flow {
    let in_ram = be.ram_contains(gpa, len as u64);
    // A read of a page that is no longer trapped (a commit raced with this exit)
    // is served silently.
    let value = if in_ram && be.page_access(gpa) != Access::AllTrap {
        ram_value(be, gpa, len)
    } else {
        let acc = mem_access(be, gpa, len, false, 0);
        let ev = if in_ram {
            Event::Mem(acc)
        } else {
            Event::Mmio(acc)
        };
        match ask(be, &ev) {
            Reply::Data(v) => v,
            Reply::Stop(cause) => return stop(be, StopReason::Handler(cause)),
            _ if in_ram => ram_value(be, gpa, len),
            _ => u64::MAX,
        }
    };
    be.complete_mmio_read(value);
    Flow::Continue
}

fn mmio_write(be: &mut dyn ExitBackend, gpa: u64, len: u8, data: u64) -> Flow {
    let in_ram = be.ram_contains(gpa, len as u64);
    let bytes = data.to_le_bytes();
    let bytes = &bytes[..len.min(8) as usize];
    // A write to a page that is no longer trapped (a commit raced) just lands.
    if in_ram && be.page_access(gpa) == Access::Full {
        be.ram_write(gpa, bytes);
        return Flow::Continue;
    }
    let acc = mem_access(be, gpa, len, true, data);
    let ev = if in_ram {
        Event::Mem(acc)
    } else {
        Event::Mmio(acc)
    };
    match ask(be, &ev) {
        // TOCTOU-safe: the bytes that were judged are the bytes applied.
        Reply::Continue if in_ram => be.ram_write(gpa, bytes),
        Reply::Stop(cause) => return stop(be, StopReason::Handler(cause)),
        _ => {}
    }
    Flow::Continue
}

fn msr(be: &mut dyn ExitBackend, index: u32, write: Option<u64>) -> Flow {
    // The CPU's own checks come before any policy: a value it would reject
    // raises #GP as without a VMM, and no handler hears of a write that never
    // happens.
    if let Some(v) = write
        && crate::msr::write_faults(index, v, be.la57())
    {
        be.complete_msr(true, None);
        return Flow::Continue;
    }
    let rip = be.regs().rip;
    let reply = ask(be, &Event::Msr { index, write, rip });
    let (error, data) = match (reply, write) {
        (Reply::Stop(cause), _) => return stop(be, StopReason::Handler(cause)),
        (Reply::Deny, _) => (true, 0u64),
        (Reply::Data(v), None) => (false, v),
        (_, None) => match be.get_msr(index) {
            Some(v) => (false, v),
            None => (true, 0),
        },
        // KVM does not apply a write it handed to user space: the VMM must.
        (Reply::Continue, Some(v)) => (!be.set_msr(index, v), 0),
        (_, Some(_)) => (false, 0),
    };
    be.complete_msr(error, write.is_none().then_some(data));
    Flow::Continue
}

/// An INT3 executed at `rip`: one of ours (`ours`, planted at `gpa`) or the
/// guest's own.
pub(crate) fn breakpoint(
    be: &mut dyn ExitBackend,
    rip: u64,
    gpa: Option<u64>,
    ours: bool,
    cpl: u8,
) -> Flow {
    let ev = Event::Breakpoint {
        rip,
        gpa,
        ours,
        cpl,
    };
    let done = match ask(be, &ev) {
        Reply::Stop(cause) => return stop(be, StopReason::Handler(cause)),
        Reply::Retry => Ok(()),
        Reply::Skip(len) if ours => {
            be.skip(len);
            Ok(())
        }
        _ => match gpa {
            Some(gpa) if ours => be.step_over_at(gpa),
            _ => be.reinject_breakpoint(rip),
        },
    };
    match done {
        Ok(()) => Flow::Continue,
        Err(e) => stop(be, StopReason::Error(e.to_string())),
    }
}

#[cfg(test)]
mod tests;
