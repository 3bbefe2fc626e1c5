//! The parser, line by line.

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
    assert_eq!(number("$rsp-8", &regs), Ok(0x7fe8));
    assert_eq!(number("$rsp-0x10", &regs), Ok(0x7fe0));
    assert!(number("$nosuch-8", &regs).is_err());
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
        // Trailing words the review found ignored (a typo `phy` read virtual memory).
        ("idt 1 2", "takes no `2`"),
        ("bt 1 2", "takes no `2`"),
        ("sym 0x100000 x", "takes no `x`"),
        ("translate 0x100000 x", "takes no `x`"),
        ("pagewalk 0x100000 x", "takes no `x`"),
        ("disasm 0x10 2 x", "takes no `x`"),
        ("mem read 0x10 4 x", "not `x`"),
        ("mem read 0x10 4 phy", "not `phy`"),
        ("vcpu 0 x", "takes no `x`"),
        ("log-only on x", "takes no `x`"),
        ("protect idt x", "takes no `x`"),
        ("help hook x", "takes no `x`"),
        ("wait 1 x", "takes no `x`"),
        ("alert 1 x", "takes no `x`"),
        ("x/4gx 0x10 x", "takes no `x`"),
        ("journal save f x", "takes no `x`"),
    ];
    for (b, want) in bad {
        let e = p(b).unwrap_err();
        assert!(e.0.contains(want), "{b}: {e}");
        assert!(!e.0.contains('\n'), "one line: {e}");
    }
}

#[test]
fn every_help_row_has_a_parser_and_every_parser_a_help_row() {
    let parsers = &super::parse::COMMANDS;
    for w in command_words() {
        assert!(
            parsers.iter().any(|c| c.words.contains(&w)),
            "`help` lists `{w}`, which no parser takes"
        );
    }
    let listed = command_words();
    for c in parsers.iter() {
        assert!(
            listed.contains(&c.words[0]),
            "`{}` is parsed but not in `help`",
            c.words[0]
        );
        // Each alias is taken by this parser alone.
        for w in c.words {
            let owners = parsers.iter().filter(|o| o.words.contains(w)).count();
            assert_eq!(owners, 1, "`{w}` names {owners} commands");
        }
    }
}
