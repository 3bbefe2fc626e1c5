//! vmiscope's hypervisor side: a minimal KVM VMM (rust-vmm crates) that runs small
//! guests and delivers every exit that matters to an exit handler as a typed
//! `Event`, then applies the handler's `Reply`.

pub mod config;
pub mod devices;
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
pub mod signals;
pub mod slots;
pub mod stats;
pub mod stop;
mod usertrap;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use error::{LoadError, VmError};
pub use event::{Event, ExitHandler, HandlerStop, Introcall, MemAccess, PassThrough, Reply};
pub use host::{DebugCaps, Feature, Host, HostKind, Int3, Via};
pub use loader::Module;
pub use shared::{
    FinalState, GuestHeld, HANDOFF_SPIN, VcpuCtl, VcpuState, VcpuTask, VmShared, spin_for,
};
pub use slots::Access;
pub use stats::ExitClass;
pub use stop::StopReason;
pub use vm::{RunOutcome, Vm};
