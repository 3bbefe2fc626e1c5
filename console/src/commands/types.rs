//! What a parsed command line is: `Command` and the values it carries.

use vmiscope_introspect::policy::Policy;
use vmiscope_introspect::{Class, Cr, HookId, Rights};
use vmiscope_monitor::BreakId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Allow, and record the event.
    Log,
    /// Deny: NotAllowed, with an alert.
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookSpec {
    Ept {
        gpa: u64,
        len: u64,
        rights: Rights,
        action: Action,
        /// Hook it even on a page the CPU itself uses (`session::cpu_pages`).
        force: bool,
    },
    Gva {
        gva: u64,
        len: u64,
        rights: Rights,
        action: Action,
        force: bool,
    },
    Msr {
        index: u32,
        read: bool,
        write: bool,
        action: Action,
    },
    Cr {
        cr: Cr,
        mask: u64,
        action: Action,
    },
    Dtr {
        idtr: bool,
        action: Action,
    },
    Xcr {
        action: Action,
    },
    Bp {
        addr: u64,
        hidden: bool,
    },
    Introcall {
        op: Option<u64>,
        value: u64,
    },
}

impl HookSpec {
    /// What a hit does, for hooks that decide (breakpoints and introcalls
    /// only observe or answer).
    pub fn action(&self) -> Option<Action> {
        match self {
            HookSpec::Ept { action, .. }
            | HookSpec::Gva { action, .. }
            | HookSpec::Msr { action, .. }
            | HookSpec::Cr { action, .. }
            | HookSpec::Dtr { action, .. }
            | HookSpec::Xcr { action } => Some(*action),
            HookSpec::Bp { .. } | HookSpec::Introcall { .. } => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictChoice {
    Allow,
    Deny,
    Policy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    Alert {
        class: Option<Class>,
    },
    Event {
        class: Option<Class>,
    },
    NoAlert,
    Mem {
        addr: u64,
        bytes: Vec<u8>,
        phys: bool,
    },
    Reg {
        name: String,
        value: u64,
    },
    Exit {
        code: i32,
    },
    Serial {
        text: String,
    },
}

/// What `protect` was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtectArg {
    /// `protect list`: the policies and what they protect.
    List,
    Policies(Vec<Policy>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Continue {
        /// Wait for the stop (or the end) before answering.
        wait: bool,
    },
    /// Wait up to this many seconds for a stop or the guest's end.
    Wait(f64),
    Pause,
    Step,
    NextEvent {
        /// Stop at any handled event, not only those a hook or policy asked for.
        all: bool,
    },
    Vcpu(u32),
    Quit,
    BreakEvent {
        class: Option<Class>,
        vcpu: Option<u32>,
    },
    BreakHook(HookId),
    Breaks,
    Delete(BreakId),
    Event,
    Verdict(VerdictChoice),
    Hook(HookSpec),
    Hooks,
    HookEnable(HookId, bool),
    HookDelete(HookId),
    Protect(ProtectArg),
    Unprotect(Policy),
    Regs,
    Sregs,
    Segments,
    Dregs,
    /// The first N gates (None: as many as IDTR's limit holds).
    Idt(Option<usize>),
    Gdt,
    Ps,
    Lsmod,
    Msr(u32),
    MemRead {
        addr: u64,
        len: u64,
        phys: bool,
    },
    MemWrite {
        addr: u64,
        bytes: Vec<u8>,
        phys: bool,
    },
    Disasm {
        addr: Option<u64>,
        count: usize,
    },
    MemFind {
        pattern: Vec<u8>,
        /// Start and length; None: every mapped page (or all RAM with phys).
        range: Option<(u64, u64)>,
        phys: bool,
    },
    Examine {
        fmt: XFormat,
        addr: u64,
    },
    /// `tele ADDR [N]`: pointer chains from N 8-byte slots.
    Tele {
        addr: u64,
        count: usize,
    },
    Bt(usize),
    Sym(u64),
    Addr(String),
    Vmmap,
    Kaslr,
    Translate(u64),
    Pagewalk(u64),
    Events {
        n: usize,
        class: Option<Class>,
    },
    Alerts,
    Alert(u64),
    ExceptionFromAlert(u64),
    Exceptions,
    ExceptionsSave(String),
    LogOnly(bool),
    Stats,
    Caps,
    JournalSave(String),
    Help(Option<String>),
    /// The answer as JSON (`json CMD` or `CMD --json`).
    Json(Box<Command>),
    /// Scripts: an assertion, with a timeout in seconds.
    Expect(Expect, f64),
}

/// `x/FMT`: how many units, of what size, shown how (gdb's letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XFormat {
    pub count: usize,
    /// 1, 2, 4 or 8 bytes (b h w g).
    pub size: u8,
    pub kind: XKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XKind {
    Hex,
    Signed,
    Unsigned,
    Char,
    Instruction,
    String,
}

impl XFormat {
    /// Parses `4gx`, `s`, `10i`, `bx` … (the part after `x/`).
    pub fn parse(f: &str) -> Result<XFormat, ParseError> {
        let digits = f.chars().take_while(char::is_ascii_digit).count();
        let count = if digits == 0 {
            1
        } else {
            f[..digits]
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=4096).contains(n))
                .ok_or("the count of `x/` is 1 to 4096")?
        };
        let (mut size, mut kind) = (4, XKind::Hex);
        for c in f[digits..].chars() {
            match c {
                'b' => size = 1,
                'h' => size = 2,
                'w' => size = 4,
                'g' => size = 8,
                'x' => kind = XKind::Hex,
                'd' => kind = XKind::Signed,
                'u' => kind = XKind::Unsigned,
                'c' => (kind, size) = (XKind::Char, 1),
                'i' => kind = XKind::Instruction,
                's' => kind = XKind::String,
                o => {
                    return Err(format!(
                        "`{o}` is not an `x/` letter (sizes b h w g, formats x d u c i s)"
                    )
                    .into());
                }
            }
        }
        Ok(XFormat { count, size, kind })
    }
}

/// A command line the parser could not take: what it expected, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

impl From<String> for ParseError {
    fn from(why: String) -> ParseError {
        ParseError(why)
    }
}

impl From<&str> for ParseError {
    fn from(why: &str) -> ParseError {
        ParseError(why.to_string())
    }
}
