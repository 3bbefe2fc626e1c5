//! The command language, shared by the REPL, the TUI's command line, scripts and
//! gdb's `monitor`. `parse` turns a line into a `Command` or a one-line error that
//! says what was expected; nothing here touches the VM.

use vmiscope_introspect::policy::{self, Policy};
use vmiscope_introspect::{Class, Cr, Rights};

/// One command's usage, what it does, and an example (the README's console
/// table is these rows; a test runs its examples on the demo guest).
pub struct HelpEntry {
    pub usage: &'static str,
    pub what: &'static str,
    pub example: &'static str,
}

const fn h(usage: &'static str, what: &'static str, example: &'static str) -> HelpEntry {
    HelpEntry {
        usage,
        what,
        example,
    }
}

/// Every command, for `help`, completion and the README.
pub const HELP: &[HelpEntry] = &[
    h("help [CMD]", "this list, or one command", "help hook"),
    h("caps", "what this host traps, polls or cannot", "caps"),
    h(
        "protect NAME[,NAME…]|all|list",
        "switch protection policies on (`protect list` names them)",
        "protect idt,syscall-msrs",
    ),
    h(
        "hook ept GPA [LEN] [rwx] [log|deny] [force]",
        "hook guest-physical memory, any length inside RAM (log unless deny)",
        "hook ept 0x207000 0x1000 w",
    ),
    h(
        "hook gva GVA [LEN] [rwx] [log|deny] [force]",
        "hook guest-virtual memory within one page, following remaps",
        "hook gva user_secret 8 w",
    ),
    h(
        "hook msr INDEX [r|w|rw] [log|deny]",
        "hook an MSR",
        "hook msr 0x176 w",
    ),
    h(
        "hook cr 0|3|4 [MASK] [log|deny]",
        "hook control-register changes",
        "hook cr 4 0x100000",
    ),
    h(
        "hook dtr idtr|gdtr [log|deny]",
        "hook descriptor-table loads",
        "hook dtr idtr",
    ),
    h("hook xcr [log|deny]", "hook XCR0 changes", "hook xcr"),
    h(
        "hook bp ADDR [visible]",
        "breakpoint at ADDR (hidden from guest reads unless visible)",
        "hook bp kprintf visible",
    ),
    h(
        "hook introcall [OP] [VALUE]",
        "answer introcall OP with VALUE",
        "hook introcall 1 0x55",
    ),
    h("hooks", "list hooks with hit counts", "hooks"),
    h(
        "hook enable|disable|delete ID",
        "switch a hook on or off, or remove it",
        "hook disable 1",
    ),
    h(
        "break event [CLASS] [vcpu N]",
        "stop at events of CLASS (ept msr cr dtr xcr breakpoint introcall timer)",
        "break event msr",
    ),
    h("break hook ID", "stop when hook ID fires", "break hook 3"),
    h("breaks", "list event breakpoints", "breaks"),
    h("delete N", "delete event breakpoint N", "delete 2"),
    h(
        "continue [--wait]",
        "run until the next stop; --wait: until it comes (alias c)",
        "continue --wait",
    ),
    h("event", "the event the vCPU is stopped at", "event"),
    h(
        "unprotect NAME",
        "switch a protection policy off",
        "unprotect idt",
    ),
    h(
        "regs",
        "general registers of the selected vCPU (also after the end)",
        "regs",
    ),
    h(
        "sregs",
        "control registers, EFER, descriptor tables, selectors",
        "sregs",
    ),
    h(
        "segments",
        "segment registers with base, limit and attributes",
        "segments",
    ),
    h(
        "dregs",
        "debug registers DR0–DR3, DR6, DR7, decoded",
        "dregs",
    ),
    h(
        "idt [N]",
        "the IDT's first N gates (default all), targets with symbols",
        "idt 4",
    ),
    h("gdt", "the GDT's descriptors, decoded", "gdt"),
    h("msr INDEX", "read an MSR", "msr 0xc0000080"),
    h(
        "mem read ADDR [LEN] [phys]",
        "hexdump memory (virtual unless phys)",
        "mem read _start 32",
    ),
    h(
        "mem write ADDR BYTES… [phys]",
        "write bytes",
        "mem write user_secret de ad be ef",
    ),
    h(
        "mem find BYTES|\"TEXT\" [ADDR LEN] [phys]",
        "search memory (default: every mapped page, or all RAM with phys)",
        "mem find \"demo\"",
    ),
    h(
        "x/FMT ADDR",
        "examine: [count][b|h|w|g][x|d|u|i|s|c], as gdb",
        "x/4gx $rsp",
    ),
    h(
        "disasm [ADDR] [N]",
        "disassemble N instructions (default: at RIP)",
        "disasm kprintf 5",
    ),
    h("bt [N]", "backtrace by frame pointers, with symbols", "bt"),
    h("sym ADDR", "the symbol an address is in", "sym 0x100030"),
    h("addr SYMBOL", "a symbol's address", "addr kprintf"),
    h(
        "translate GVA",
        "guest-virtual to guest-physical",
        "translate _start",
    ),
    h(
        "pagewalk GVA",
        "every page-table entry on the way",
        "pagewalk _start",
    ),
    h(
        "vmmap",
        "the selected vCPU's address space with permissions",
        "vmmap",
    ),
    h(
        "ps",
        "a Linux guest's tasks (pid, state, CR3, comm), from its BTF",
        "ps",
    ),
    h("lsmod", "a Linux guest's modules, from its BTF", "lsmod"),
    h(
        "kaslr",
        "the kernel's KASLR slide (found from its IDT) and how to give it to gdb",
        "kaslr",
    ),
    h("vcpu N", "select vCPU N", "vcpu 0"),
    h(
        "verdict allow|deny|policy",
        "decide the stopped event and let its vCPU go on",
        "verdict allow",
    ),
    h("pause", "stop every vCPU", "pause"),
    h(
        "step",
        "run one instruction on the selected vCPU (alias s, si)",
        "step",
    ),
    h(
        "next-event [all]",
        "run to the next event a hook or policy asked for (all: any exit the engine saw) and stop before its verdict (alias n)",
        "next-event",
    ),
    h(
        "wait [SECS]",
        "wait for the next stop or the guest's end (default 10 s)",
        "wait 5",
    ),
    h(
        "events [N] [CLASS]",
        "the last N handled events",
        "events 5 msr",
    ),
    h(
        "alerts",
        "list alerts (repeats folded, with a count)",
        "alerts",
    ),
    h("alert ID", "one alert in full", "alert 1"),
    h(
        "exception add-from-alert ID",
        "allow what alert ID reported",
        "exception add-from-alert 1",
    ),
    h("exceptions", "list exception rules", "exceptions"),
    h(
        "exceptions save FILE",
        "write the rules as JSON",
        "exceptions save /tmp/vmiscope-exceptions.json",
    ),
    h(
        "log-only on|off",
        "report denials without enforcing them",
        "log-only off",
    ),
    h(
        "stats",
        "hook hits, events per class, handler latency",
        "stats",
    ),
    h(
        "journal save FILE",
        "write the session as JSON lines (the --journal schema)",
        "journal save /tmp/vmiscope-journal.jsonl",
    ),
    h(
        "json CMD",
        "CMD's answer as JSON (regs sregs events alerts hooks stats caps); also `CMD --json`",
        "json regs",
    ),
    h(
        "quit",
        "end the session (alias q); exit status 0, or the guest's if it had ended",
        "quit",
    ),
];

/// `help`'s first words, for completion.
pub fn command_words() -> Vec<&'static str> {
    let mut v: Vec<&str> = HELP
        .iter()
        .filter_map(|e| e.usage.split(['/', ' ']).next())
        .collect();
    v.dedup();
    v
}

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
    if s.starts_with('$') {
        return Err(format!("`{s}` is not a register (rax … r15, rip, rflags, cr3 …)").into());
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

/// A hook's action: `log` unless told `deny` (an ad-hoc hook observes; denying
/// a write the kernel needs can kill the guest).
fn action(s: Option<&&str>) -> Result<Action, ParseError> {
    match s.copied() {
        Some("deny") => Ok(Action::Deny),
        None | Some("log") => Ok(Action::Log),
        Some(o) => Err(format!("expected deny or log, got `{o}`").into()),
    }
}

/// Parses one line. Empty lines and `#` comments are `Ok(None)`.
pub fn parse(line: &str, sym: &dyn Fn(&str) -> Option<u64>) -> Result<Option<Command>, ParseError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    // `json CMD` and `CMD --json`.
    if let Some(rest) = line.strip_prefix("json ") {
        return json_of(parse(rest, sym)?);
    }
    if let Some(rest) = line.strip_suffix(" --json") {
        return json_of(parse(rest, sym)?);
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
        "continue" | "c" => match w.get(1).copied() {
            None => C::Continue { wait: false },
            Some("--wait") => none_after(2).map(|_| C::Continue { wait: true })?,
            Some(x) => return Err(format!("`continue` takes `--wait`, not `{x}`").into()),
        },
        "wait" => C::Wait(match w.get(1) {
            None => 10.0,
            Some(t) => t
                .parse::<f64>()
                .ok()
                .filter(|t| seconds(*t).is_some())
                .ok_or("expected `wait [SECS]` (more than 0, at most 1e9)")?,
        }),
        "pause" => none_after(1).map(|_| C::Pause)?,
        "step" | "s" | "si" => none_after(1).map(|_| C::Step)?,
        "next-event" | "n" => match w.get(1).copied() {
            None => C::NextEvent { all: false },
            Some("all") => none_after(2).map(|_| C::NextEvent { all: true })?,
            Some(x) => return Err(format!("`next-event` takes `all`, not `{x}`").into()),
        },
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
        _ => return parse_state(line, &w, sym).map(Some),
    };
    Ok(Some(c))
}

/// The commands that read or write the guest's state (registers, memory,
/// tables, symbols).
fn parse_state(
    line: &str,
    w: &[&str],
    sym: &dyn Fn(&str) -> Option<u64>,
) -> Result<Command, ParseError> {
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
    use Command as C;
    Ok(match w[0] {
        "regs" => none_after(1).map(|_| C::Regs)?,
        "sregs" => none_after(1).map(|_| C::Sregs)?,
        "segments" => none_after(1).map(|_| C::Segments)?,
        "dregs" => none_after(1).map(|_| C::Dregs)?,
        "idt" => C::Idt(
            w.get(1)
                .map(|n| number(n, sym).map(|n| n.min(256) as usize))
                .transpose()?,
        ),
        "gdt" => none_after(1).map(|_| C::Gdt)?,
        "vmmap" => none_after(1).map(|_| C::Vmmap)?,
        "kaslr" => none_after(1).map(|_| C::Kaslr)?,
        "bt" => C::Bt(
            w.get(1)
                .map(|n| number(n, sym).map(|n| n.clamp(1, 256) as usize))
                .transpose()?
                .unwrap_or(32),
        ),
        "sym" => C::Sym(num(1, "an address")?),
        "addr" => match (w.get(1), w.get(2)) {
            (Some(n), None) => C::Addr(n.to_string()),
            _ => return Err("expected `addr SYMBOL`".into()),
        },
        "ps" => none_after(1).map(|_| C::Ps)?,
        "lsmod" => none_after(1).map(|_| C::Lsmod)?,
        "msr" => C::Msr(
            u32::try_from(num(1, "an MSR index")?)
                .map_err(|_| format!("`{}` is too large for an MSR index", w[1]))?,
        ),
        "mem" => parse_mem(line, w, sym)?,
        x if x.starts_with("x/") || x == "x" => C::Examine {
            fmt: XFormat::parse(x.strip_prefix("x/").unwrap_or(""))?,
            addr: num(1, "an address (`x/FMT ADDR`)")?,
        },
        "disasm" => C::Disasm {
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
        other => return Err(format!("unknown command `{other}` (try `help`)").into()),
    })
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

/// Commands `json` can answer.
fn json_of(c: Option<Command>) -> Result<Option<Command>, ParseError> {
    use Command as C;
    match c {
        Some(
            c @ (C::Regs
            | C::Sregs
            | C::Events { .. }
            | C::Alerts
            | C::Alert(_)
            | C::Hooks
            | C::Stats
            | C::Caps
            | C::Segments
            | C::Dregs),
        ) => Ok(Some(C::Json(Box::new(c)))),
        _ => Err(
            "`json` answers regs, sregs, segments, dregs, events, alerts, alert, hooks, stats, caps"
                .into(),
        ),
    }
}

/// `mem find BYTES|"TEXT" [ADDR LEN] [phys]`.
fn parse_find(line: &str, sym: &dyn Fn(&str) -> Option<u64>) -> Result<Command, ParseError> {
    let usage = "expected `mem find BYTES|\"TEXT\" [ADDR LEN] [phys]`";
    let rest = line
        .trim_start_matches("mem")
        .trim_start()
        .trim_start_matches("find");
    let (pattern, after): (Vec<u8>, String) = match rest.trim_start().strip_prefix('"') {
        Some(r) => {
            let (text, after) = r.split_once('"').ok_or(usage)?;
            (text.as_bytes().to_vec(), after.to_string())
        }
        None => {
            // Hex bytes up to the first word that is not (an address: `0x…`).
            let words: Vec<&str> = rest.split_whitespace().collect();
            let n = words
                .iter()
                .take_while(|x| !x.starts_with("0x") && hex_bytes(&[x]).is_ok())
                .count();
            (hex_bytes(&words[..n])?, words[n..].join(" "))
        }
    };
    if pattern.is_empty() || pattern.len() > 256 {
        return Err("the pattern is 1 to 256 bytes".into());
    }
    let words: Vec<&str> = after.split_whitespace().collect();
    let phys = words.last() == Some(&"phys");
    let args: Vec<&str> = words.into_iter().filter(|x| *x != "phys").collect();
    let range = match args.as_slice() {
        [] => None,
        [a, l] => Some((number(a, sym)?, number(l, sym)?)),
        _ => return Err(usage.into()),
    };
    Ok(Command::MemFind {
        pattern,
        range,
        phys,
    })
}

/// `mem read ADDR [LEN] [phys]` or `mem write ADDR BYTES… [phys]`.
fn parse_mem(
    line: &str,
    w: &[&str],
    sym: &dyn Fn(&str) -> Option<u64>,
) -> Result<Command, ParseError> {
    if w.get(1) == Some(&"find") {
        return parse_find(line, sym);
    }
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
        _ => Err("expected `mem read …`, `mem write …` or `mem find …`".into()),
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
    let (mut read, mut write, mut act) = (false, true, Action::Log);
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
    let mut act = Action::Log;
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
        let (mut len, mut rights, mut act, mut force) = (8, Rights::W, Action::Log, false);
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
    fn new_forms_parse_to_what_they_say() {
        assert_eq!(
            p("mem find \"ab c\" 0x10 0x20"),
            Ok(Some(Command::MemFind {
                pattern: b"ab c".to_vec(),
                range: Some((0x10, 0x20)),
                phys: false
            }))
        );
        assert_eq!(
            p("mem find dead beef phys"),
            Ok(Some(Command::MemFind {
                pattern: vec![0xde, 0xad, 0xbe, 0xef],
                range: None,
                phys: true
            }))
        );
        assert_eq!(
            p("x/4gx ept_target"),
            Ok(Some(Command::Examine {
                fmt: XFormat {
                    count: 4,
                    size: 8,
                    kind: XKind::Hex
                },
                addr: 0x206000
            }))
        );
        assert_eq!(
            p("json hooks"),
            Ok(Some(Command::Json(Box::new(Command::Hooks))))
        );
        // An ad-hoc hook observes unless told to deny.
        assert!(matches!(
            p("hook msr 0x10"),
            Ok(Some(Command::Hook(HookSpec::Msr {
                action: Action::Log,
                ..
            })))
        ));
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
        assert!(
            p("x/4gx $nosuch")
                .unwrap_err()
                .0
                .contains("is not a register")
        );
        // Registers resolve through the same resolver as symbols.
        let regs = |n: &str| (n == "$rsp").then_some(0x7ff0);
        assert_eq!(number("$rsp+8", &regs), Ok(0x7ff8));
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
            "continue --wait",
            "wait",
            "wait 2.5",
            "next-event all",
            "segments",
            "dregs",
            "idt",
            "idt 32",
            "gdt",
            "vmmap",
            "bt",
            "bt 5",
            "sym 0x100000",
            "addr kprintf",
            "x/4gx 0x1000",
            "x/s ept_target",
            "x/10i 0x1000",
            "x/bx 0x1000",
            "x 0x1000",
            "mem find de ad be ef",
            "mem find \"hello world\" 0x1000 0x2000",
            "mem find c0ffee 0 0x100000 phys",
            "json regs",
            "events 5 --json",
            "json alert 1",
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
            ("continue now", "takes `--wait`, not `now`"),
            ("next-event some", "takes `all`"),
            ("wait forever", "expected `wait [SECS]`"),
            ("x/4q 0x10", "not an `x/` letter"),
            ("x/0x 0x10", "count of `x/`"),
            ("x/4gx", "expects an address"),
            ("mem find", "the pattern is 1 to 256 bytes"),
            ("mem find \"abc", "expected `mem find"),
            ("mem find de ad 0x10", "expected `mem find"),
            ("addr", "expected `addr SYMBOL`"),
            ("json step", "`json` answers"),
            ("gdt 1", "takes no `1`"),
        ];
        for (b, want) in bad {
            let e = p(b).unwrap_err();
            assert!(e.0.contains(want), "{b}: {e}");
            assert!(!e.0.contains('\n'), "one line: {e}");
        }
    }
}
