//! The data of a vCPU's debug machinery (no behaviour here: `debug.rs` and
//! `usertrap.rs` hold it). `VcpuCtl` borrows only its `user_step`, so the
//! shared state (`shared/`) names nothing of this module: the tie between
//! `shared/` and `vcpu/` runs one way.

/// Debug controls of one vCPU (KVM_SET_GUEST_DEBUG is issued only on change).
#[derive(Debug, Default)]
pub(crate) struct DebugState {
    pub(crate) user_step: bool,
    pub(crate) applied: Option<(u32, [u64; 8])>,
    pub(crate) generation: u64,
    /// Which hardware breakpoint slots watch a guest exception entry (see `usertrap`).
    pub(crate) catches: [Option<Catch>; 4],
    /// We set RFLAGS.TF for a CPL3 step and wait for the #DB catch.
    pub(crate) tf_step: bool,
    /// The stepped instruction is PUSHF: it will push our TF.
    pub(crate) tf_pushf: bool,
    /// The stepped instruction is SYSRET and we set TF in R11 for it (see
    /// `apply_debug`): taken out of R11 again after the step.
    pub(crate) tf_r11: bool,
    /// What the catches need (cleared on timer kicks, so edits of the page tables
    /// or the IDT without a CR3 or IDTR load are seen too).
    pub(crate) plan: Option<Plan>,
}

/// What a step-over must put back once the stepped instruction has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Restore {
    /// A page opened for the step (`VmShared::open_page`): closed again.
    Page {
        gpa: u64,
    },
    SwBp {
        gpa: u64,
    },
    HwBps,
}

#[derive(Debug, Default)]
pub(crate) struct StepOver {
    /// Restores waiting for the single-step exit.
    pub(crate) stepping: Vec<Restore>,
    /// Restores for hosts that cannot step here (PVM at CPL3): applied at the next exit.
    pub(crate) deferred: Vec<Restore>,
    pub(crate) hw_suspended: bool,
    /// This vCPU steps alone until the restores are done (`begin_exclusive`).
    pub(crate) exclusive: bool,
}

/// Which guest exception entry a hardware breakpoint slot is watching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Catch {
    /// Vector 1: the end of a TF step.
    Db,
    /// Vector 3: an INT3 executed at CPL3.
    Bp,
}

/// What the catches need, worked out once per (debug generation, CR3, IDT) and
/// after each timer kick, not on every VM entry: reading the gates walks the
/// guest's page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) key: (u64, u64, u64, u16),
    /// One of our breakpoints is reachable from user code (see
    /// `VmShared::user_breakpoints`): the #BP catch is worth its cost.
    pub(crate) user_bps: bool,
    pub(crate) db: Option<u64>,
    pub(crate) bp: Option<u64>,
}
