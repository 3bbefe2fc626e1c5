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
    // `$rsp-8`, `sym-0x10`, as gdb users type by reflex.
    if let Some((a, b)) = s.rsplit_once('-')
        && let (Some(x), Some(y)) = (parse(a), parse(b))
    {
        return Ok(x.wrapping_sub(y));
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

/// Parses one line. Empty lines and `#` comments are `Ok(None)`. The first
/// word picks the command's parser in `COMMANDS`.
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
    let l = Line {
        text: line,
        w: line.split_whitespace().collect(),
        sym,
    };
    // `x/FMT` carries its format in its first word.
    let word = if l.w[0].starts_with("x/") {
        "x"
    } else {
        l.w[0]
    };
    let spec = COMMANDS
        .iter()
        .find(|c| c.words.contains(&word))
        .ok_or_else(|| format!("unknown command `{}` (try `help`)", l.w[0]))?;
    (spec.parse)(&l).map(Some)
}

/// A line being parsed: its text, its words (at least one) and the symbols
/// numbers may name.
pub(super) struct Line<'a> {
    text: &'a str,
    w: Vec<&'a str>,
    sym: &'a dyn Fn(&str) -> Option<u64>,
}

impl Line<'_> {
    /// Word `i` as a number (see `number`); `what` names it when it is missing.
    fn num(&self, i: usize, what: &str) -> Result<u64, ParseError> {
        let s = self
            .w
            .get(i)
            .ok_or_else(|| format!("`{}` expects {what}", self.w[0]))?;
        number(s, self.sym)
    }

    /// A 32-bit number: a larger one is refused, not truncated.
    fn num32(&self, i: usize, what: &str) -> Result<u32, ParseError> {
        let v = self.num(i, what)?;
        u32::try_from(v).map_err(|_| format!("`{v:#x}` is too large for {what}").into())
    }

    /// Word `i`, if there is one, as a number.
    fn opt_num(&self, i: usize) -> Result<Option<u64>, ParseError> {
        self.w.get(i).map(|s| number(s, self.sym)).transpose()
    }

    /// Refuses any word from `n` on.
    fn none_after(&self, n: usize) -> Result<(), ParseError> {
        match self.w.get(n) {
            Some(x) => Err(format!("`{}` takes no `{x}` here", self.w[..n].join(" ")).into()),
            None => Ok(()),
        }
    }

    /// `cmd` alone: no word after the command's.
    fn bare(&self, cmd: Command) -> Result<Command, ParseError> {
        self.none_after(1).map(|()| cmd)
    }

    /// `parsed`, if the line has at most `n` words (a trailing word such as a
    /// typo `… phy` is refused, not ignored).
    fn upto(&self, n: usize, parsed: Result<Command, ParseError>) -> Result<Command, ParseError> {
        let cmd = parsed?;
        self.none_after(n).map(|()| cmd)
    }

    fn word(&self, i: usize) -> Option<&str> {
        self.w.get(i).copied()
    }
}

/// One command: the words that name it (the first as in `HELP`, then its
/// aliases) and its parser. `help`'s rows and this table are checked against
/// each other (a word here without a row, or a row without a word here, fails
/// `every_help_row_has_a_parser_and_every_parser_a_help_row`).
pub(super) struct Spec {
    pub(super) words: &'static [&'static str],
    parse: fn(&Line<'_>) -> Result<Command, ParseError>,
}

const fn spec(
    words: &'static [&'static str],
    parse: fn(&Line<'_>) -> Result<Command, ParseError>,
) -> Spec {
    Spec { words, parse }
}

use Command as C;

/// Every command the console takes, by its first word.
pub(super) const COMMANDS: &[Spec] = &[
    spec(&["help", "?"], |l| {
        l.upto(2, Ok(C::Help(l.word(1).map(str::to_string))))
    }),
    spec(&["caps"], |l| l.bare(C::Caps)),
    spec(&["protect", "unprotect"], |l| {
        l.upto(2, parse_protect(&l.w))
    }),
    spec(&["hook"], |l| parse_hook(&l.w, l.sym)),
    spec(&["hooks"], |l| l.bare(C::Hooks)),
    spec(&["continue", "c"], |l| match l.word(1) {
        None => Ok(C::Continue { wait: false }),
        Some("--wait") => l.none_after(2).map(|()| C::Continue { wait: true }),
        Some(x) => Err(format!("`continue` takes `--wait`, not `{x}`").into()),
    }),
    spec(&["wait"], |l| {
        l.upto(
            2,
            Ok(C::Wait(match l.word(1) {
                None => 10.0,
                Some(t) => t
                    .parse::<f64>()
                    .ok()
                    .filter(|t| seconds(*t).is_some())
                    .ok_or("expected `wait [SECS]` (more than 0, at most 1e9)")?,
            })),
        )
    }),
    spec(&["pause"], |l| l.bare(C::Pause)),
    spec(&["step", "s", "si"], |l| l.bare(C::Step)),
    spec(&["next-event", "n"], |l| match l.word(1) {
        None => Ok(C::NextEvent { all: false }),
        Some("all") => l.none_after(2).map(|()| C::NextEvent { all: true }),
        Some(x) => Err(format!("`next-event` takes `all`, not `{x}`").into()),
    }),
    spec(&["quit", "q", "exit"], |l| l.bare(C::Quit)),
    spec(&["vcpu"], |l| {
        l.upto(2, Ok(C::Vcpu(l.num32(1, "a vCPU number")?)))
    }),
    spec(&["break"], |l| parse_break(&l.w, &|i, what| l.num(i, what))),
    spec(&["breaks"], |l| l.bare(C::Breaks)),
    spec(&["delete"], |l| {
        l.upto(
            2,
            Ok(C::Delete(BreakId(l.num32(1, "a breakpoint number")?))),
        )
    }),
    spec(&["event"], |l| l.bare(C::Event)),
    spec(&["verdict"], |l| {
        l.upto(
            2,
            Ok(C::Verdict(match l.word(1) {
                Some("allow") => VerdictChoice::Allow,
                Some("deny") => VerdictChoice::Deny,
                Some("policy") => VerdictChoice::Policy,
                _ => return Err("expected `verdict allow|deny|policy`".into()),
            })),
        )
    }),
    spec(&["events"], |l| parse_events(&l.w)),
    spec(&["alerts"], |l| l.bare(C::Alerts)),
    spec(&["alert"], |l| {
        l.upto(2, Ok(C::Alert(l.num(1, "an alert id")?)))
    }),
    spec(&["exception"], |l| match (l.word(1), l.w.get(2)) {
        _ if l.w.len() > 3 => l.none_after(3).map(|()| C::Exceptions),
        (Some("add-from-alert"), Some(id)) => Ok(C::ExceptionFromAlert(number(id, l.sym)?)),
        _ => Err("expected `exception add-from-alert ID`".into()),
    }),
    spec(&["exceptions"], |l| match (l.word(1), l.w.get(2)) {
        _ if l.w.len() > 3 => l.none_after(3).map(|()| C::Exceptions),
        (None, _) => Ok(C::Exceptions),
        (Some("save"), Some(f)) => Ok(C::ExceptionsSave(f.to_string())),
        _ => Err("expected `exceptions` or `exceptions save FILE`".into()),
    }),
    spec(&["log-only"], |l| {
        l.upto(
            2,
            Ok(C::LogOnly(match l.word(1) {
                Some("on") => true,
                Some("off") => false,
                _ => return Err("expected `log-only on|off`".into()),
            })),
        )
    }),
    spec(&["stats"], |l| l.bare(C::Stats)),
    spec(&["journal"], |l| match (l.word(1), l.w.get(2)) {
        _ if l.w.len() > 3 => l.none_after(3).map(|()| C::Exceptions),
        (Some("save"), Some(f)) => Ok(C::JournalSave(f.to_string())),
        _ => Err("expected `journal save FILE`".into()),
    }),
    spec(&["expect"], |l| parse_expect(l.text, &l.w, l.sym)),
    // `json CMD` is taken before the table; here is `json` alone.
    spec(&["json"], |_| {
        Err("expected `json CMD` (or `CMD --json`)".into())
    }),
    // The guest's state: registers, memory, tables, symbols.
    spec(&["regs"], |l| l.bare(C::Regs)),
    spec(&["sregs"], |l| l.bare(C::Sregs)),
    spec(&["segments"], |l| l.bare(C::Segments)),
    spec(&["dregs"], |l| l.bare(C::Dregs)),
    spec(&["idt"], |l| {
        l.upto(2, Ok(C::Idt(l.opt_num(1)?.map(|n| n.min(256) as usize))))
    }),
    spec(&["gdt"], |l| l.bare(C::Gdt)),
    spec(&["vmmap"], |l| l.bare(C::Vmmap)),
    spec(&["kaslr"], |l| l.bare(C::Kaslr)),
    spec(&["bt"], |l| {
        l.upto(
            2,
            Ok(C::Bt(
                l.opt_num(1)?
                    .map(|n| n.clamp(1, 256) as usize)
                    .unwrap_or(32),
            )),
        )
    }),
    spec(&["sym"], |l| l.upto(2, Ok(C::Sym(l.num(1, "an address")?)))),
    spec(&["addr"], |l| match (l.w.get(1), l.w.get(2)) {
        (Some(n), None) => Ok(C::Addr(n.to_string())),
        _ => Err("expected `addr SYMBOL`".into()),
    }),
    spec(&["ps"], |l| l.bare(C::Ps)),
    spec(&["lsmod"], |l| l.bare(C::Lsmod)),
    spec(&["msr"], |l| {
        l.upto(
            2,
            Ok(C::Msr(u32::try_from(l.num(1, "an MSR index")?).map_err(
                |_| format!("`{}` is too large for an MSR index", l.w[1]),
            )?)),
        )
    }),
    spec(&["mem"], |l| parse_mem(l.text, &l.w, l.sym)),
    spec(&["x"], |l| {
        l.upto(
            2,
            Ok(C::Examine {
                fmt: XFormat::parse(l.w[0].strip_prefix("x/").unwrap_or(""))?,
                addr: l.num(1, "an address (`x/FMT ADDR`)")?,
            }),
        )
    }),
    spec(&["tele", "telescope"], |l| {
        l.upto(
            3,
            Ok(C::Tele {
                addr: l.num(1, "an address")?,
                count: l.opt_num(2)?.unwrap_or(8).clamp(1, 256) as usize,
            }),
        )
    }),
    spec(&["disasm"], |l| {
        l.upto(
            3,
            Ok(C::Disasm {
                addr: l.opt_num(1)?,
                count: l.opt_num(2)?.unwrap_or(8).min(200) as usize,
            }),
        )
    }),
    spec(&["translate"], |l| {
        l.upto(2, Ok(C::Translate(l.num(1, "a guest-virtual address")?)))
    }),
    spec(&["pagewalk"], |l| {
        l.upto(2, Ok(C::Pagewalk(l.num(1, "a guest-virtual address")?)))
    }),
];

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

/// `mem find BYTES|"TEXT"|-b|-w|-d|-q|-p VALUE [ADDR LEN] [phys]`.
fn parse_find(line: &str, sym: &dyn Fn(&str) -> Option<u64>) -> Result<Command, ParseError> {
    let usage = "expected `mem find BYTES|\"TEXT\"|-b|-w|-d|-q|-p VALUE [ADDR LEN] [phys]`";
    let rest = line
        .trim_start_matches("mem")
        .trim_start()
        .trim_start_matches("find");
    let width = |flag: &str| match flag {
        "-b" => Some(1),
        "-w" => Some(2),
        "-d" => Some(4),
        "-q" | "-p" => Some(8),
        _ => None,
    };
    let first = rest.split_whitespace().next().unwrap_or_default();
    let (pattern, after): (Vec<u8>, String) = if let Some(n) = width(first) {
        // An integer (or a pointer: a symbol, `$rsp`), little-endian, as
        // pwndbg's `search -q`; one that does not fit the width is refused.
        let words: Vec<&str> = rest.split_whitespace().collect();
        let v = number(words.get(1).ok_or(usage)?, sym)?;
        if n < 8 && v >> (8 * n) != 0 {
            return Err(format!("{v:#x} does not fit in {n} byte(s) (`{first}`)").into());
        }
        (v.to_le_bytes()[..n].to_vec(), words[2..].join(" "))
    } else {
        match rest.trim_start().strip_prefix('"') {
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
        Some("read") if args.len() > 4 => {
            Err(format!("`mem read` takes ADDR [LEN] [phys], not `{}`", args[4]).into())
        }
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
