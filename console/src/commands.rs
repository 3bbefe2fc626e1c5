//! The command language, shared by the REPL, the TUI's command line, scripts and
//! gdb's `monitor`. `parse` turns a line into a `Command` or a one-line error that
//! says what was expected; nothing here touches the VM.

use vmiscope_introspect::policy::{self, Policy};
use vmiscope_introspect::{Class, Cr, Rights};

/// Usage and summary of every command, for `help` and completion.
pub const HELP: &[(&str, &str)] = &[
    ("continue", "run until the next stop (alias c)"),
    ("pause", "stop every vCPU"),
    ("step", "run one instruction on the selected vCPU (alias s)"),
    (
        "next-event",
        "run until the next handled event; stop before its verdict (alias n)",
    ),
    ("vcpu N", "select vCPU N"),
    ("quit", "end the session (alias q)"),
    (
        "break event [CLASS] [vcpu N]",
        "stop at events of CLASS (ept msr cr dtr xcr breakpoint introcall timer)",
    ),
    ("break hook ID", "stop when hook ID fires"),
    ("breaks", "list event breakpoints"),
    ("delete N", "delete event breakpoint N"),
    ("event", "show the event the vCPU is stopped at"),
    (
        "verdict allow|deny|policy",
        "override the verdict of the stopped event",
    ),
    (
        "hook ept GPA [LEN] [rwx] [deny|log] [force]",
        "hook guest-physical memory",
    ),
    (
        "hook gva GVA [LEN] [rwx] [deny|log] [force]",
        "hook guest-virtual memory (follows remaps)",
    ),
    ("hook msr INDEX [r|w|rw] [deny|log]", "hook an MSR"),
    (
        "hook cr 0|3|4 [MASK] [deny|log]",
        "hook control-register changes",
    ),
    (
        "hook dtr idtr|gdtr [deny|log]",
        "hook descriptor-table loads",
    ),
    ("hook xcr [deny|log]", "hook XCR0 changes"),
    (
        "hook bp ADDR [visible]",
        "breakpoint at ADDR (hidden from guest reads unless visible)",
    ),
    (
        "hook introcall [OP] [VALUE]",
        "answer introcall OP with VALUE",
    ),
    ("hooks", "list hooks with hit counts"),
    (
        "hook enable|disable|delete ID",
        "switch a hook on or off, or remove it",
    ),
    (
        "protect NAME",
        "switch a protection policy on (see `protect list`)",
    ),
    ("unprotect NAME", "switch a protection policy off"),
    ("regs", "general registers of the selected vCPU"),
    ("sregs", "control and segment registers"),
    (
        "ps",
        "a Linux guest's tasks (pid, state, CR3, comm), offsets from its BTF",
    ),
    ("msr INDEX", "read an MSR"),
    (
        "mem read ADDR [LEN] [phys]",
        "dump memory (virtual unless phys)",
    ),
    ("mem write ADDR BYTES… [phys]", "write bytes"),
    (
        "disasm [ADDR] [N]",
        "disassemble N instructions (default: at RIP)",
    ),
    ("translate GVA", "guest-virtual to guest-physical"),
    ("pagewalk GVA", "every page-table entry on the way"),
    ("events [N] [CLASS]", "the last N handled events"),
    ("alerts", "list alerts"),
    ("alert ID", "show one alert"),
    (
        "exception add-from-alert ID",
        "allow what alert ID reported",
    ),
    ("exceptions", "list exception rules"),
    ("exceptions save FILE", "write the rules as JSON"),
    ("log-only on|off", "report denials without enforcing them"),
    ("stats", "hook hits, events per class, handler latency"),
    ("caps", "what this host traps, polls or cannot"),
    (
        "journal save FILE",
        "write the recent events and alerts as JSON lines",
    ),
    ("help [CMD]", "this list, or one command"),
];

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
    Continue,
    Pause,
    Step,
    NextEvent,
    Vcpu(u32),
    Quit,
    BreakEvent {
        class: Option<Class>,
        vcpu: Option<u32>,
    },
    BreakHook(u64),
    Breaks,
    Delete(u32),
    Event,
    Verdict(VerdictChoice),
    Hook(HookSpec),
    Hooks,
    HookEnable(u64, bool),
    HookDelete(u64),
    Protect(ProtectArg),
    Unprotect(Policy),
    Regs,
    Sregs,
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
    /// Scripts: an assertion, with a timeout in seconds.
    Expect(Expect, f64),
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

/// A number of seconds as a `Duration`: finite, above 0 and at most 1e9 (about
/// 31 years; more would overflow the clock arithmetic a timeout does).
pub fn seconds(t: f64) -> Option<std::time::Duration> {
    (t > 0.0 && t <= 1e9)
        .then(|| std::time::Duration::try_from_secs_f64(t).ok())
        .flatten()
}

/// Resolves a number: 0x-hex, decimal, a symbol, or SYMBOL+OFFSET.
pub fn number(s: &str, sym: &dyn Fn(&str) -> Option<u64>) -> Result<u64, ParseError> {
    let parse = |t: &str| -> Option<u64> {
        if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            u64::from_str_radix(&h.replace('_', ""), 16).ok()
        } else if t.chars().all(|c| c.is_ascii_digit() || c == '_') && !t.is_empty() {
            t.replace('_', "").parse().ok()
        } else {
            sym(t)
        }
    };
    if let Some(v) = parse(s) {
        return Ok(v);
    }
    if let Some((a, b)) = s.split_once('+')
        && let (Some(x), Some(y)) = (parse(a), parse(b))
    {
        return Ok(x.wrapping_add(y));
    }
    Err(format!("`{s}` is not a number (0x…, decimal) or a symbol of the image").into())
}

fn class(s: &str) -> Result<Class, ParseError> {
    Class::parse(s)
        .ok_or_else(|| {
            format!("`{s}` is not an event class (ept msr cr dtr xcr breakpoint introcall timer)")
        })
        .map_err(Into::into)
}

fn action(s: Option<&&str>) -> Result<Action, ParseError> {
    match s.copied() {
        None | Some("deny") => Ok(Action::Deny),
        Some("log") => Ok(Action::Log),
        Some(o) => Err(format!("expected deny or log, got `{o}`").into()),
    }
}

/// Parses one line. Empty lines and `#` comments are `Ok(None)`.
pub fn parse(line: &str, sym: &dyn Fn(&str) -> Option<u64>) -> Result<Option<Command>, ParseError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let w: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize, what: &str| -> Result<u64, ParseError> {
        let s = w
            .get(i)
            .ok_or_else(|| format!("`{}` expects {what}", w[0]))?;
        number(s, sym)
    };
    let none_after = |n: usize| -> Result<(), ParseError> {
        match w.get(n) {
            Some(x) => Err(format!("`{}` takes no `{x}` here", w[..n].join(" ")).into()),
            None => Ok(()),
        }
    };
    // A 32-bit number: a larger one is refused, not truncated.
    let num32 = |i: usize, what: &str| -> Result<u32, ParseError> {
        let v = num(i, what)?;
        u32::try_from(v).map_err(|_| format!("`{v:#x}` is too large for {what}").into())
    };
    use Command as C;
    let c = match w[0] {
        "continue" | "c" => none_after(1).map(|_| C::Continue)?,
        "pause" => none_after(1).map(|_| C::Pause)?,
        "step" | "s" | "si" => none_after(1).map(|_| C::Step)?,
        "next-event" | "n" => none_after(1).map(|_| C::NextEvent)?,
        "quit" | "q" | "exit" => none_after(1).map(|_| C::Quit)?,
        "vcpu" => C::Vcpu(num32(1, "a vCPU number")?),
        "break" => parse_break(&w, &num)?,
        "breaks" => none_after(1).map(|_| C::Breaks)?,
        "delete" => C::Delete(num32(1, "a breakpoint number")?),
        "event" => none_after(1).map(|_| C::Event)?,
        "verdict" => C::Verdict(match w.get(1).copied() {
            Some("allow") => VerdictChoice::Allow,
            Some("deny") => VerdictChoice::Deny,
            Some("policy") => VerdictChoice::Policy,
            _ => return Err("expected `verdict allow|deny|policy`".into()),
        }),
        "hooks" => none_after(1).map(|_| C::Hooks)?,
        "hook" => parse_hook(&w, sym)?,
        "protect" | "unprotect" => parse_protect(&w)?,
        "regs" => none_after(1).map(|_| C::Regs)?,
        "sregs" => none_after(1).map(|_| C::Sregs)?,
        "ps" => none_after(1).map(|_| C::Ps)?,
        "lsmod" => none_after(1).map(|_| C::Lsmod)?,
        "msr" => C::Msr(num32(1, "an MSR index")?),
        "mem" => parse_mem(&w, sym)?,
        "disasm" | "x/i" => C::Disasm {
            addr: w.get(1).map(|s| number(s, sym)).transpose()?,
            count: w
                .get(2)
                .map(|s| number(s, sym))
                .transpose()?
                .unwrap_or(8)
                .min(200) as usize,
        },
        "translate" => C::Translate(num(1, "a guest-virtual address")?),
        "pagewalk" => C::Pagewalk(num(1, "a guest-virtual address")?),
        "events" => parse_events(&w)?,
        "alerts" => none_after(1).map(|_| C::Alerts)?,
        "alert" => C::Alert(num(1, "an alert id")?),
        "exception" => match (w.get(1).copied(), w.get(2)) {
            (Some("add-from-alert"), Some(id)) => C::ExceptionFromAlert(number(id, sym)?),
            _ => return Err("expected `exception add-from-alert ID`".into()),
        },
        "exceptions" => match (w.get(1).copied(), w.get(2)) {
            (None, _) => C::Exceptions,
            (Some("save"), Some(f)) => C::ExceptionsSave(f.to_string()),
            _ => return Err("expected `exceptions` or `exceptions save FILE`".into()),
        },
        "log-only" => C::LogOnly(match w.get(1).copied() {
            Some("on") => true,
            Some("off") => false,
            _ => return Err("expected `log-only on|off`".into()),
        }),
        "stats" => none_after(1).map(|_| C::Stats)?,
        "caps" => none_after(1).map(|_| C::Caps)?,
        "journal" => match (w.get(1).copied(), w.get(2)) {
            (Some("save"), Some(f)) => C::JournalSave(f.to_string()),
            _ => return Err("expected `journal save FILE`".into()),
        },
        "help" | "?" => C::Help(w.get(1).map(|s| s.to_string())),
        "expect" => parse_expect(line, &w, sym)?,
        other => return Err(format!("unknown command `{other}` (try `help`)").into()),
    };
    Ok(Some(c))
}

type Num<'a> = dyn Fn(usize, &str) -> Result<u64, ParseError> + 'a;

/// `break event [CLASS] [vcpu N]` or `break hook ID`.
fn parse_break(w: &[&str], num: &Num<'_>) -> Result<Command, ParseError> {
    match w.get(1).copied() {
        Some("event") => {
            let mut cls = None;
            let mut vcpu = None;
            let mut i = 2;
            while i < w.len() {
                if w[i] == "vcpu" {
                    vcpu = Some(num(i + 1, "a vCPU number after `vcpu`")? as u32);
                    i += 2;
                } else {
                    cls = Some(class(w[i])?);
                    i += 1;
                }
            }
            Ok(Command::BreakEvent { class: cls, vcpu })
        }
        Some("hook") => Ok(Command::BreakHook(num(2, "a hook id")?)),
        _ => Err("expected `break event [CLASS] [vcpu N]` or `break hook ID`".into()),
    }
}

/// `protect list`, `protect NAME[,NAME…]|all`, `unprotect NAME`.
fn parse_protect(w: &[&str]) -> Result<Command, ParseError> {
    let parse_err = |e: policy::PolicyError| ParseError(e.to_string());
    match (w[0], w.get(1)) {
        ("protect", Some(&"list")) => Ok(Command::Protect(ProtectArg::List)),
        ("protect", Some(names)) => Ok(Command::Protect(ProtectArg::Policies(
            policy::parse_list(names).map_err(parse_err)?,
        ))),
        ("protect", None) => Err("expected `protect NAME[,NAME…]|all` (or `protect list`)".into()),
        (_, Some(name)) => Ok(Command::Unprotect(name.parse().map_err(parse_err)?)),
        (_, None) => Err("expected `unprotect NAME`".into()),
    }
}

/// `mem read ADDR [LEN] [phys]` or `mem write ADDR BYTES… [phys]`.
fn parse_mem(w: &[&str], sym: &dyn Fn(&str) -> Option<u64>) -> Result<Command, ParseError> {
    let phys = w.last() == Some(&"phys");
    let args: Vec<&str> = w.iter().copied().filter(|x| *x != "phys").collect();
    match args.get(1).copied() {
        Some("read") => Ok(Command::MemRead {
            addr: number(
                args.get(2).ok_or("expected `mem read ADDR [LEN] [phys]`")?,
                sym,
            )?,
            len: match args.get(3) {
                Some(l) => number(l, sym)?.min(4096),
                None => 64,
            },
            phys,
        }),
        Some("write") => {
            let addr = number(
                args.get(2)
                    .ok_or("expected `mem write ADDR BYTES… [phys]`")?,
                sym,
            )?;
            let bytes = hex_bytes(&args[3..])?;
            if bytes.is_empty() {
                return Err("expected bytes after the address (e.g. `de ad be ef`)".into());
            }
            Ok(Command::MemWrite { addr, bytes, phys })
        }
        _ => Err("expected `mem read …` or `mem write …`".into()),
    }
}

/// `events [N] [CLASS]`, in either order.
fn parse_events(w: &[&str]) -> Result<Command, ParseError> {
    let mut n = 20;
    let mut cls = None;
    for a in &w[1..] {
        match number(a, &|_| None) {
            Ok(v) => n = v as usize,
            Err(_) => cls = Some(class(a)?),
        }
    }
    Ok(Command::Events { n, class: cls })
}

/// `hook msr INDEX [r|w|rw] [deny|log]`'s options.
fn msr_hook(index: u32, rest: &[&str]) -> Result<HookSpec, ParseError> {
    let (mut read, mut write, mut act) = (false, true, Action::Deny);
    for t in rest {
        match *t {
            "r" => (read, write) = (true, false),
            "w" => (read, write) = (false, true),
            "rw" => (read, write) = (true, true),
            o => act = action(Some(&o))?,
        }
    }
    Ok(HookSpec::Msr {
        index,
        read,
        write,
        action: act,
    })
}

/// `hook cr N [MASK] [deny|log]`'s options.
fn cr_hook(
    cr: Cr,
    rest: &[&str],
    sym: &dyn Fn(&str) -> Option<u64>,
) -> Result<HookSpec, ParseError> {
    let mut mask = u64::MAX;
    let mut act = Action::Deny;
    for t in rest {
        match *t {
            "deny" | "log" => act = action(Some(t))?,
            m => mask = number(m, sym)?,
        }
    }
    Ok(HookSpec::Cr {
        cr,
        mask,
        action: act,
    })
}

fn hex_bytes(args: &[&str]) -> Result<Vec<u8>, ParseError> {
    let mut out = Vec::new();
    for a in args {
        let a = a.trim_start_matches("0x");
        if a.len() % 2 != 0 || a.is_empty() {
            return Err(format!("`{a}` is not hex bytes (e.g. `de ad` or `dead`)").into());
        }
        for i in (0..a.len()).step_by(2) {
            out.push(
                u8::from_str_radix(&a[i..i + 2], 16)
                    .map_err(|_| format!("`{a}` is not hex bytes"))?,
            );
        }
    }
    Ok(out)
}

fn parse_hook(w: &[&str], sym: &dyn Fn(&str) -> Option<u64>) -> Result<Command, ParseError> {
    let kind = w.get(1).copied().ok_or(
        "expected `hook ept|gva|msr|cr|dtr|xcr|bp|introcall …` or `hook enable|disable|delete ID`",
    )?;
    let arg = |i: usize, what: &str| -> Result<u64, ParseError> {
        number(
            w.get(i)
                .ok_or_else(|| format!("`hook {kind}` expects {what}"))?,
            sym,
        )
    };
    // Optional trailing words: a length (number), rights (rwx letters), an
    // action, `force` (hook a page the CPU itself uses).
    let mem = |rest: &[&str]| -> Result<(u64, Rights, Action, bool), ParseError> {
        let (mut len, mut rights, mut act, mut force) = (8, Rights::W, Action::Deny, false);
        for t in rest {
            if let Some(r) = Rights::parse(t) {
                rights = r;
            } else if *t == "deny" || *t == "log" {
                act = action(Some(t))?;
            } else if *t == "force" {
                force = true;
            } else {
                len = number(t, sym)?;
            }
        }
        Ok((len, rights, act, force))
    };
    let spec = match kind {
        "enable" | "disable" => {
            return Ok(Command::HookEnable(arg(2, "a hook id")?, kind == "enable"));
        }
        "delete" => return Ok(Command::HookDelete(arg(2, "a hook id")?)),
        "ept" => {
            let (len, rights, action, force) = mem(&w[3.min(w.len())..])?;
            HookSpec::Ept {
                gpa: arg(2, "a guest-physical address")?,
                len,
                rights,
                action,
                force,
            }
        }
        "gva" => {
            let (len, rights, action, force) = mem(&w[3.min(w.len())..])?;
            HookSpec::Gva {
                gva: arg(2, "a guest-virtual address")?,
                len,
                rights,
                action,
                force,
            }
        }
        "msr" => msr_hook(arg(2, "an MSR index")? as u32, &w[3.min(w.len())..])?,
        "cr" => {
            let cr = match arg(2, "0, 3 or 4")? {
                0 => Cr::Cr0,
                3 => Cr::Cr3,
                4 => Cr::Cr4,
                _ => return Err("expected CR 0, 3 or 4".into()),
            };
            cr_hook(cr, &w[3.min(w.len())..], sym)?
        }
        "dtr" => HookSpec::Dtr {
            idtr: match w.get(2).copied() {
                Some("idtr") => true,
                Some("gdtr") => false,
                _ => return Err("expected `hook dtr idtr|gdtr`".into()),
            },
            action: action(w.get(3))?,
        },
        "xcr" => HookSpec::Xcr {
            action: action(w.get(2))?,
        },
        "bp" => HookSpec::Bp {
            addr: arg(2, "an address or symbol")?,
            hidden: w.get(3) != Some(&"visible"),
        },
        "introcall" => HookSpec::Introcall {
            op: w.get(2).map(|s| number(s, sym)).transpose()?,
            value: w.get(3).map(|s| number(s, sym)).transpose()?.unwrap_or(0),
        },
        o => {
            return Err(
                format!("unknown hook kind `{o}` (ept gva msr cr dtr xcr bp introcall)").into(),
            );
        }
    };
    Ok(Command::Hook(spec))
}

fn parse_expect(
    line: &str,
    w: &[&str],
    sym: &dyn Fn(&str) -> Option<u64>,
) -> Result<Command, ParseError> {
    // A trailing `timeout SECS` applies to every expectation.
    let (w, timeout) = match w.iter().position(|x| *x == "timeout") {
        Some(i) => {
            let t: f64 = w
                .get(i + 1)
                .and_then(|t| t.parse().ok())
                .filter(|t| seconds(*t).is_some())
                .ok_or("expected `timeout SECS` (more than 0, at most 1e9)")?;
            (&w[..i], t)
        }
        None => (w, 10.0),
    };
    let e = match w.get(1).copied() {
        Some("alert") => Expect::Alert {
            class: w.get(2).map(|c| class(c)).transpose()?,
        },
        Some("event") => Expect::Event {
            class: w.get(2).map(|c| class(c)).transpose()?,
        },
        Some("no-alert") => Expect::NoAlert,
        Some("exit") => Expect::Exit {
            code: w
                .get(2)
                .and_then(|c| c.parse().ok())
                .ok_or("expected `expect exit CODE`")?,
        },
        Some("mem") => {
            let phys = w.contains(&"phys");
            let eq = w
                .iter()
                .position(|x| *x == "=")
                .ok_or("expected `expect mem ADDR = BYTES [phys]`")?;
            let addr = number(w.get(2).ok_or("expected an address")?, sym)?;
            let bytes = hex_bytes(
                &w[eq + 1..]
                    .iter()
                    .copied()
                    .filter(|x| *x != "phys")
                    .collect::<Vec<_>>(),
            )?;
            Expect::Mem { addr, bytes, phys }
        }
        Some("reg") => {
            let (name, eq, v) = (w.get(2), w.get(3), w.get(4));
            match (name, eq, v) {
                (Some(n), Some(&"="), Some(v)) => Expect::Reg {
                    name: n.to_lowercase(),
                    value: number(v, sym)?,
                },
                _ => return Err("expected `expect reg NAME = VALUE`".into()),
            }
        }
        Some("serial") => {
            let text = line
                .split_once('"')
                .and_then(|(_, r)| r.rsplit_once('"'))
                .map(|(t, _)| t.to_string());
            Expect::Serial {
                text: text.ok_or("expected `expect serial \"TEXT\"`")?,
            }
        }
        _ => return Err("expected `expect alert|event|no-alert|mem|reg|exit|serial …`".into()),
    };
    Ok(Command::Expect(e, timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Option<Command>, ParseError> {
        parse(s, &|n| (n == "ept_target").then_some(0x206000))
    }

    #[test]
    fn numbers_symbols_and_offsets() {
        assert_eq!(number("0x10", &|_| None), Ok(16));
        assert_eq!(number("42", &|_| None), Ok(42));
        assert_eq!(
            p("mem read ept_target+8 16 phys"),
            Ok(Some(Command::MemRead {
                addr: 0x206008,
                len: 16,
                phys: true
            }))
        );
        assert!(p("mem read nosuch").unwrap_err().0.contains("not a number"));
    }

    #[test]
    fn every_command_parses_and_malformed_input_says_what_was_expected() {
        let good = [
            "continue",
            "c",
            "pause",
            "step",
            "next-event",
            "n",
            "vcpu 1",
            "quit",
            "break event msr",
            "break event vcpu 1",
            "break hook 3",
            "breaks",
            "delete 1",
            "event",
            "verdict allow",
            "verdict deny",
            "verdict policy",
            "hook ept 0x206000 8 w deny",
            "hook gva ept_target 16 rw log",
            "hook msr 0xc0000082 w",
            "hook cr 4 0x100000",
            "hook dtr idtr",
            "hook xcr log",
            "hook bp ept_target visible",
            "hook introcall 1 0x55",
            "hooks",
            "hook enable 1",
            "hook disable 1",
            "hook delete 1",
            "protect idt",
            "unprotect idt",
            "regs",
            "sregs",
            "ps",
            "lsmod",
            "msr 0xc0000082",
            "mem read 0x1000",
            "mem write 0x1000 de ad be ef",
            "disasm",
            "disasm 0x100000 4",
            "translate 0x200000",
            "pagewalk 0x200000",
            "events",
            "events 5 msr",
            "alerts",
            "alert 1",
            "exception add-from-alert 1",
            "exceptions",
            "exceptions save /tmp/x.json",
            "log-only on",
            "stats",
            "caps",
            "journal save /tmp/j",
            "help",
            "help hook",
            "expect alert msr timeout 5",
            "expect no-alert",
            "expect mem ept_target = c0ffee00",
            "expect reg rax = 0x22",
            "expect exit 0",
            "expect serial \"done\"",
            "# a comment",
            "",
        ];
        for g in good {
            assert!(p(g).is_ok(), "{g}: {:?}", p(g));
        }
        let bad = [
            ("frobnicate", "unknown command"),
            ("vcpu", "expects a vCPU number"),
            ("vcpu x", "not a number"),
            ("break", "expected `break event"),
            ("break event bogus", "not an event class"),
            ("verdict maybe", "expected `verdict allow|deny|policy`"),
            ("hook", "expected `hook ept|gva"),
            ("hook ept", "expects a guest-physical address"),
            ("hook cr 2", "expected CR 0, 3 or 4"),
            ("hook dtr ldtr", "expected `hook dtr idtr|gdtr`"),
            ("hook msr 0x10 deny maybe", "expected deny or log"),
            ("hook nope 1", "unknown hook kind"),
            ("mem", "expected `mem read"),
            ("mem write 0x10", "expected bytes"),
            ("mem write 0x10 xyz", "not hex bytes"),
            ("log-only maybe", "expected `log-only on|off`"),
            ("exception", "expected `exception add-from-alert ID`"),
            ("journal", "expected `journal save FILE`"),
            ("expect", "expected `expect alert"),
            ("expect exit", "expected `expect exit CODE`"),
            ("expect reg rax 1", "expected `expect reg NAME = VALUE`"),
            ("expect alert msr timeout", "expected `timeout SECS`"),
            ("expect exit 0 timeout inf", "expected `timeout SECS`"),
            ("expect exit 0 timeout 1e300", "expected `timeout SECS`"),
            ("vcpu 4294967296", "too large"),
            ("msr 0xffffffffffffffff", "too large"),
            ("regs -1", "takes no `-1`"),
            ("regs hook", "takes no `hook`"),
            ("stats 1 2 3", "takes no `1`"),
            ("event nosuch", "takes no `nosuch`"),
            ("continue now", "takes no `now`"),
        ];
        for (b, want) in bad {
            let e = p(b).unwrap_err();
            assert!(e.0.contains(want), "{b}: {e}");
            assert!(!e.0.contains('\n'), "one line: {e}");
        }
    }
}
