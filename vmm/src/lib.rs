//! vmiscope's hypervisor side: a minimal KVM VMM (rust-vmm crates) that runs small
//! guests and delivers every exit that matters to an exit handler as a typed
//! `Event`, then applies the handler's `Reply`.

pub mod config;
pub mod devices;
pub mod engine_glue;
pub mod error;
pub mod event;
pub mod exit;
pub mod glue;
mod guest;
pub mod host;
pub mod kick;
pub mod loader;
pub mod memory;
pub mod msr;
pub mod shared;
pub mod slots;
pub mod stats;
pub mod stop;
mod usertrap;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use error::{LoadError, VmError};
pub use event::{Event, ExitHandler, HandlerStop, Introcall, MemAccess, PassThrough, Reply};
pub use host::HostKind;
pub use loader::{Module, Symbols};
pub use shared::{VcpuCtl, VcpuState, VcpuTask, VmShared};
pub use slots::Access;
pub use stats::ExitClass;
pub use stop::StopReason;
pub use vm::{RunOutcome, Vm};

use std::sync::atomic::{AtomicU64, Ordering};

/// SIGINTs received by the process. A count, not a flag: each run compares it with
/// the count at its start, so one Ctrl-C ends the runs it interrupted and not the
/// VMs a process (`caps`, `bench`) builds after it.
static INTERRUPTS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigint(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTS.fetch_add(1, Ordering::SeqCst);
}

/// Makes SIGINT (Ctrl-C) stop a running VM cleanly instead of killing the process.
pub fn install_interrupt_handler() {
    let _ = vmm_sys_util::signal::register_signal_handler(libc::SIGINT, on_sigint);
}

/// How many times the user pressed Ctrl-C so far. A run's watchdog turns a count
/// above the one at the run's start into `StopReason::User`.
pub fn interrupts() -> u64 {
    INTERRUPTS.load(Ordering::SeqCst)
}
