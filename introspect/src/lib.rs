//! vmiscope's introspection engine: HVMI's callback layer on top of a small
//! hypervisor interface (`glue::Guest`). This crate names no KVM type.

pub mod arch;
pub mod decode;
pub mod glue;
#[cfg(test)]
pub mod mock;
pub mod paging;
pub mod verdict;

pub use arch::{Cr, Dtr, DtrKind, Regs, SRegs};
pub use glue::{GlueError, Guest, PageRights};
pub use verdict::{Outcome, Verdict};
