//! Typed event payloads handed to hook callbacks.

use serde::Serialize;

use crate::arch::{Cr, Dtr, DtrKind};
use crate::target::{Class, HookId};
use crate::verdict::Verdict;

/// Kind of a memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessKind {
    Read,
    Write,
    Exec,
}

/// How a register-class event was observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Detection {
    /// The hypervisor delivered an exit for it (the writing instruction is known).
    Exit,
    /// Found by comparing registers at a later exit or timer tick: the writing
    /// instruction is unknown, and the change was already in effect meanwhile.
    Polled,
}

/// What happened, as the hooks see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "class", rename_all = "kebab-case")]
pub enum EventInfo {
    Mem {
        gla: u64,
        gpa: u64,
        size: u64,
        access: AccessKind,
        /// The bytes being written (little-endian), for the access KVM reported.
        data: Option<u64>,
        /// What memory held before the write (a trapped write has not landed yet).
        old: Option<u64>,
    },
    Msr {
        index: u32,
        /// WRMSR: the new value; RDMSR: None.
        write: Option<u64>,
    },
    Cr {
        cr: Cr,
        old: u64,
        new: u64,
        detection: Detection,
    },
    Dtr {
        dtr: DtrKind,
        old: Dtr,
        new: Dtr,
        detection: Detection,
    },
    Xcr {
        index: u32,
        old: u64,
        new: u64,
        detection: Detection,
    },
    Breakpoint {
        gva: u64,
        gpa: u64,
    },
    Introcall {
        op: u64,
        args: [u64; 3],
    },
    Integrity {
        gva: u64,
        len: u64,
        /// Offset in the region of the first byte that changed.
        changed: u64,
        old_hash: u64,
        new_hash: u64,
    },
}

/// A handled event, as the console lists it.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub event_id: u64,
    /// Microseconds since the engine started.
    pub at_us: u64,
    pub class: Class,
    pub vcpu: u32,
    pub rip: u64,
    pub cpl: u8,
    pub instruction: Option<String>,
    /// The task the vCPU was running, when the guest's OS is known.
    pub task: Option<String>,
    pub event: EventInfo,
    pub hooks: Vec<HookId>,
    pub verdict: Verdict,
    /// An analyst replaced the verdict (allowed: true); `verdict` is then
    /// the one applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overridden: Option<bool>,
}
