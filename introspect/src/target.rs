//! What hooks watch: hook ids, access rights, targets and event classes (plain
//! data, shared by the registry, the callbacks' context, alerts and exceptions).

use serde::{Deserialize, Serialize};

use crate::arch::{Cr, DtrKind};

/// A hook's number: given by the registry, in order, never reused.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct HookId(pub u64);

impl std::fmt::Display for HookId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Which accesses a memory hook wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Rights {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Rights {
    pub const W: Rights = Rights {
        read: false,
        write: true,
        exec: false,
    };
    pub const R: Rights = Rights {
        read: true,
        write: false,
        exec: false,
    };
    pub const X: Rights = Rights {
        read: false,
        write: false,
        exec: true,
    };
    pub const RWX: Rights = Rights {
        read: true,
        write: true,
        exec: true,
    };

    pub fn parse(s: &str) -> Option<Rights> {
        let mut r = Rights::default();
        for c in s.chars() {
            match c {
                'r' => r.read = true,
                'w' => r.write = true,
                'x' => r.exec = true,
                _ => return None,
            }
        }
        (r != Rights::default()).then_some(r)
    }

    pub fn any(self, other: Rights) -> bool {
        (self.read && other.read) || (self.write && other.write) || (self.exec && other.exec)
    }
}

impl std::fmt::Display for Rights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = |b: bool, ch: char| if b { ch } else { '-' };
        write!(
            f,
            "{}{}{}",
            c(self.read, 'r'),
            c(self.write, 'w'),
            c(self.exec, 'x')
        )
    }
}

/// What a hook watches.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "class", rename_all = "kebab-case")]
pub enum Target {
    /// Guest-physical range inside one page.
    Gpa {
        gpa: u64,
        len: u64,
        rights: Rights,
    },
    /// Guest-virtual range inside one page, translated through `cr3`; `gpa` is
    /// where it is mapped now (None: not present). The hook follows remaps.
    Gva {
        gva: u64,
        len: u64,
        rights: Rights,
        cr3: u64,
        gpa: Option<u64>,
    },
    Msr {
        index: u32,
        read: bool,
        write: bool,
    },
    /// A control-register write changing any bit of `mask`.
    Cr {
        cr: Cr,
        mask: u64,
    },
    Dtr {
        dtr: DtrKind,
    },
    Xcr {
        index: u32,
    },
    /// An INT3 at `gva` (mapped at `gpa`). `hidden`: guest reads of the byte return
    /// the original (the page is read-trapped for that, so every instruction
    /// fetched from it also exits: expensive on code pages, see `vmiscope bench`).
    Breakpoint {
        gva: u64,
        gpa: u64,
        hidden: bool,
    },
    /// Introcall sub-op (None: every one).
    Introcall {
        op: Option<u64>,
    },
}

impl Target {
    pub fn class(&self) -> Class {
        match self {
            Target::Gpa { .. } | Target::Gva { .. } => Class::Ept,
            Target::Msr { .. } => Class::Msr,
            Target::Cr { .. } => Class::Cr,
            Target::Dtr { .. } => Class::Dtr,
            Target::Xcr { .. } => Class::Xcr,
            Target::Breakpoint { .. } => Class::Breakpoint,
            Target::Introcall { .. } => Class::Introcall,
        }
    }

    /// The guest-physical page this hook occupies, for memory hooks.
    pub fn page(&self) -> Option<u64> {
        match self {
            Target::Gpa { gpa, .. } => Some(gpa & !0xfff),
            Target::Gva { gpa: Some(g), .. } => Some(g & !0xfff),
            Target::Breakpoint { gpa, .. } => Some(gpa & !0xfff),
            _ => None,
        }
    }

    /// Every guest-physical page a memory hook occupies, lowest first: a
    /// physical hook may span many (`hook ept 0x400000 0xfc00000 w`), a virtual
    /// one stays within its page (its pages need not be contiguous).
    pub fn pages(&self) -> impl Iterator<Item = u64> + use<> {
        let (first, last) = match *self {
            Target::Gpa { gpa, len, .. } => {
                (gpa & !0xfff, gpa.saturating_add(len.max(1) - 1) & !0xfff)
            }
            _ => match self.page() {
                Some(p) => (p, p),
                None => (1, 0), // empty
            },
        };
        (first..=last)
            .step_by(0x1000)
            .filter(move |_| first <= last)
    }

    /// For memory hooks: the guest-physical range it watches and its rights.
    pub fn phys_range(&self) -> Option<(u64, u64, Rights)> {
        match *self {
            Target::Gpa { gpa, len, rights } => Some((gpa, len, rights)),
            Target::Gva {
                len,
                rights,
                gpa: Some(g),
                ..
            } => Some((g, len, rights)),
            // A hidden breakpoint hides its byte from reads.
            Target::Breakpoint {
                gpa, hidden: true, ..
            } => Some((gpa, 1, Rights::R)),
            _ => None,
        }
    }

    /// Whether an access of `len` bytes at `gpa` that wants `want` falls in
    /// this memory hook.
    pub fn covers(&self, gpa: u64, len: u64, want: Rights) -> bool {
        self.phys_range().is_some_and(|(start, n, r)| {
            r.any(want) && start < gpa.saturating_add(len) && gpa < start.saturating_add(n)
        })
    }
}

/// Event classes, each with its own exit switched on by the first hook of the
/// class and off by the last (HVMI's IntEnable*/IntDisable*Notifications).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    Ept,
    Msr,
    Cr,
    Dtr,
    Xcr,
    Breakpoint,
    Introcall,
    Timer,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Ept => "ept",
            Class::Msr => "msr",
            Class::Cr => "cr",
            Class::Dtr => "dtr",
            Class::Xcr => "xcr",
            Class::Breakpoint => "breakpoint",
            Class::Introcall => "introcall",
            Class::Timer => "timer",
        }
    }

    pub fn parse(s: &str) -> Option<Class> {
        Some(match s {
            "ept" | "mem" => Class::Ept,
            "msr" => Class::Msr,
            "cr" => Class::Cr,
            "dtr" => Class::Dtr,
            "xcr" => Class::Xcr,
            "breakpoint" | "bp" => Class::Breakpoint,
            "introcall" => Class::Introcall,
            "timer" => Class::Timer,
            _ => return None,
        })
    }
}

/// Who placed a hook: the analyst (console, scripts), gdb, or a policy. Policies
/// are switched off by owner, not by matching names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    Analyst,
    Gdb,
    Policy(Policy),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Analyst => f.write_str("analyst"),
            Owner::Gdb => f.write_str("gdb"),
            Owner::Policy(p) => write!(f, "policy:{p}"),
        }
    }
}

/// A protection policy, by name on the command line (`--protect idt,cr4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    Idt,
    Gdtr,
    SyscallMsrs,
    Cr4,
    Cr0Wp,
    KernelCode,
    SyscallTable,
    UserPage,
    Integrity,
}

impl Policy {
    pub const ALL: [Policy; 9] = [
        Policy::Idt,
        Policy::Gdtr,
        Policy::SyscallMsrs,
        Policy::Cr4,
        Policy::Cr0Wp,
        Policy::KernelCode,
        Policy::SyscallTable,
        Policy::UserPage,
        Policy::Integrity,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Idt => "idt",
            Policy::Gdtr => "gdtr",
            Policy::SyscallMsrs => "syscall-msrs",
            Policy::Cr4 => "cr4",
            Policy::Cr0Wp => "cr0-wp",
            Policy::KernelCode => "kernel-code",
            Policy::SyscallTable => "syscall-table",
            Policy::UserPage => "user-page",
            Policy::Integrity => "integrity",
        }
    }

    /// What it protects, for `protect list`.
    pub fn description(self) -> &'static str {
        match self {
            Policy::Idt => "IDT memory against writes, and IDTR against reloads",
            Policy::Gdtr => "GDTR against reloads",
            Policy::SyscallMsrs => "LSTAR, STAR, CSTAR, SYSENTER_CS/ESP/EIP against writes",
            Policy::Cr4 => "CR4.SMEP and CR4.SMAP against clearing",
            Policy::Cr0Wp => "CR0.WP against clearing",
            Policy::KernelCode => "kernel code pages against writes",
            Policy::SyscallTable => "the system-call table against writes",
            Policy::UserPage => {
                "protected user pages against writes and execution (reads are logged)"
            }
            Policy::Integrity => {
                "hash of registered regions, checked every second, restored on change"
            }
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
