//! vmiscope's introspection engine: HVMI's callback layer on top of a small
//! hypervisor interface (`glue::Guest`). This crate names no KVM type.

pub mod alert;
pub mod arch;
mod atomic;
pub mod ctx;
pub mod decode;
pub mod engine;
pub mod entry;
pub mod event;
pub mod exceptions;
pub mod glue;
pub mod handlers;
pub mod hooks;
pub mod integrity;
pub mod linux;
#[cfg(any(test, feature = "mock"))]
pub mod mock;
pub mod paging;
pub mod policy;
pub mod target;
pub mod verdict;

pub use alert::{Alert, Journal, Override, Record};
pub use arch::{Cr, Dtr, DtrKind, Regs, SRegs};
pub use ctx::{Callback, Ctx};
pub use engine::{Engine, EventRecord, HookError};
pub use entry::{EngineEvent, Handled, Response};
pub use event::{AccessKind, Detection, EventInfo};
pub use exceptions::{Exceptions, Rule};
pub use glue::{BreakpointKind, GlueError, Guest, PageRights, VcpuView, VmControl};
pub use policy::Policy;
pub use target::{Class, HookId, Owner, Rights, Target};
pub use verdict::{Outcome, Verdict};
