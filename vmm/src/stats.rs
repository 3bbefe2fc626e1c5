//! Per-vCPU exit counters, one atomic per exit class (no allocation, no string
//! compare per exit).

use std::sync::atomic::{AtomicU64, Ordering};

/// What an exit was, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitClass {
    Io,
    Mmio,
    MemRead,
    MemWrite,
    MsrRead,
    MsrWrite,
    Port,
    Introcall,
    Breakpoint,
    SingleStep,
    HwBreakpoint,
    ExecFault,
    EmulationFailure,
    Halt,
    Shutdown,
    Kick,
    /// An instruction KVM could not emulate that the VMM completed itself.
    Fixup,
}

impl ExitClass {
    pub const ALL: [ExitClass; 17] = [
        ExitClass::Io,
        ExitClass::Mmio,
        ExitClass::MemRead,
        ExitClass::MemWrite,
        ExitClass::MsrRead,
        ExitClass::MsrWrite,
        ExitClass::Port,
        ExitClass::Introcall,
        ExitClass::Breakpoint,
        ExitClass::SingleStep,
        ExitClass::HwBreakpoint,
        ExitClass::ExecFault,
        ExitClass::EmulationFailure,
        ExitClass::Halt,
        ExitClass::Shutdown,
        ExitClass::Kick,
        ExitClass::Fixup,
    ];

    /// The name listings and `--batch` summaries use.
    pub fn name(self) -> &'static str {
        match self {
            ExitClass::Io => "io",
            ExitClass::Mmio => "mmio",
            ExitClass::MemRead => "mem-read",
            ExitClass::MemWrite => "mem-write",
            ExitClass::MsrRead => "msr-read",
            ExitClass::MsrWrite => "msr-write",
            ExitClass::Port => "port",
            ExitClass::Introcall => "introcall",
            ExitClass::Breakpoint => "breakpoint",
            ExitClass::SingleStep => "single-step",
            ExitClass::HwBreakpoint => "hw-breakpoint",
            ExitClass::ExecFault => "exec-fault",
            ExitClass::EmulationFailure => "emulation-failure",
            ExitClass::Halt => "halt",
            ExitClass::Shutdown => "shutdown",
            ExitClass::Kick => "kick",
            ExitClass::Fixup => "fixup",
        }
    }
}

impl std::fmt::Display for ExitClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Default)]
pub struct ExitCounters([AtomicU64; ExitClass::ALL.len()]);

impl ExitCounters {
    pub fn bump(&self, class: ExitClass) {
        self.0[class as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<(ExitClass, u64)> {
        ExitClass::ALL
            .iter()
            .zip(&self.0)
            .map(|(c, n)| (*c, n.load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_its_own_counter() {
        for (i, c) in ExitClass::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "ALL is in declaration order");
        }
        let n = ExitCounters::default();
        n.bump(ExitClass::Fixup);
        n.bump(ExitClass::Io);
        n.bump(ExitClass::Io);
        let s = n.snapshot();
        assert_eq!(s[ExitClass::Io as usize], (ExitClass::Io, 2));
        assert_eq!(s[ExitClass::Fixup as usize], (ExitClass::Fixup, 1));
    }
}

/// An instruction the VMM completes, for `caps` and `stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    Xgetbv,
    Cmpxchg16b,
    Clac,
    Stac,
    Popcnt,
    Lzcnt,
    Tzcnt,
    Fwait,
    Movbe,
    Clwb,
    Invpcid,
    Rdpru,
    Ldmxcsr,
    Stmxcsr,
    /// `int n` (the guest's own `int3` goes through the breakpoint path).
    IntN,
}

impl Completed {
    pub const ALL: [Completed; 15] = [
        Completed::Xgetbv,
        Completed::Cmpxchg16b,
        Completed::Clac,
        Completed::Stac,
        Completed::Popcnt,
        Completed::Lzcnt,
        Completed::Tzcnt,
        Completed::Fwait,
        Completed::Movbe,
        Completed::Clwb,
        Completed::Invpcid,
        Completed::Rdpru,
        Completed::Ldmxcsr,
        Completed::Stmxcsr,
        Completed::IntN,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Completed::Xgetbv => "xgetbv",
            Completed::Cmpxchg16b => "cmpxchg16b",
            Completed::Clac => "clac",
            Completed::Stac => "stac",
            Completed::Popcnt => "popcnt",
            Completed::Lzcnt => "lzcnt",
            Completed::Tzcnt => "tzcnt",
            Completed::Fwait => "fwait",
            Completed::Movbe => "movbe",
            Completed::Clwb => "clwb",
            Completed::Invpcid => "invpcid",
            Completed::Rdpru => "rdpru",
            Completed::Ldmxcsr => "ldmxcsr",
            Completed::Stmxcsr => "stmxcsr",
            Completed::IntN => "int n",
        }
    }
}

/// How many of each instruction the VMM completed (shared by all vCPUs).
#[derive(Default)]
pub struct CompletedCounters([AtomicU64; Completed::ALL.len()]);

impl CompletedCounters {
    pub fn bump(&self, what: Completed) {
        self.0[what as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<(Completed, u64)> {
        Completed::ALL
            .iter()
            .zip(&self.0)
            .map(|(c, n)| (*c, n.load(Ordering::Relaxed)))
            .collect()
    }
}
