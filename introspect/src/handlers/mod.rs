//! HVMI's exit handlers (`callbacks.h`), one module each. Every handler runs inside
//! `Engine::handle` (the shared prologue/epilogue) and returns a verdict the VMM
//! adapter turns into a hypervisor action.

pub mod breakpoint;
pub mod cr;
pub mod dtr;
pub mod ept;
pub mod introcall;
pub mod msr;
pub mod timer;
pub mod xcr;

pub use breakpoint::{BreakpointAction, handle_breakpoint};
pub use cr::handle_cr_write;
pub use dtr::handle_dtr_violation;
pub use ept::{MemAction, MemExit, handle_ept_violation};
pub use introcall::handle_introcall;
pub use msr::handle_msr_violation;
pub use timer::{handle_timer, poll_registers};
pub use xcr::handle_xcr_write;

#[cfg(test)]
mod tests;
