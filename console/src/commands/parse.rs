//! The parser: a line's words into a `Command`, or a `ParseError` that says
//! what was expected.

use vmiscope_introspect::policy;
use vmiscope_introspect::{Class, Cr, HookId, Rights};
use vmiscope_monitor::BreakId;

use super::types::*;

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
        "delete" => C::Delete(BreakId(num32(1, "a breakpoint number")?)),
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
        Some("hook") => Ok(Command::BreakHook(HookId(num(2, "a hook id")?))),
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
            return Ok(Command::HookEnable(
                HookId(arg(2, "a hook id")?),
                kind == "enable",
            ));
        }
        "delete" => return Ok(Command::HookDelete(HookId(arg(2, "a hook id")?))),
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
