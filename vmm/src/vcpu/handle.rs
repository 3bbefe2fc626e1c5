//! Exit handling as a free function over a small backend (Firecracker's
//! `handle_kvm_exit`): it decides what each `Reply` means for each exit kind and
//! asks the backend to do it. The backend (`backend.rs`, the vCPU thread over
//! KVM) holds every `kvm_run` write; the unit tests below use a fake one, so the
//! `Reply` contract of `event.rs` is checked row by row without a guest.

use kvm_bindings::kvm_regs;

use crate::devices::{INTROCALL_MAGIC, PortEffect};
use crate::event::{Event, Introcall, MemAccess, Reply};
use crate::exit::RawExit;
use crate::slots::Access;
use crate::stats::ExitClass;
use crate::stop::StopReason;

mod contract;
mod faults;
pub(crate) use contract::{
    ExitBackend, FailedInsn, FailureSite, Flow, SlotUse, ask, stop, stop_or_continue,
};
pub(crate) use faults::breakpoint;

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

#[cfg(test)]
mod tests;
