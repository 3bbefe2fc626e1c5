//! `help`'s table: every command's usage, what it does and an example.

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
        "mem find BYTES|\"TEXT\"|-b|-w|-d|-q|-p VALUE [ADDR LEN] [phys]",
        "search memory for bytes, text or a 1/2/4/8-byte integer or pointer (default: every mapped page, or all RAM with phys)",
        "mem find -p kprintf",
    ),
    h(
        "tele ADDR [N]",
        "N 8-byte slots from ADDR, each followed as a pointer chain with symbols and strings (pwndbg's telescope)",
        "tele $rsp 8",
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
        "expect WHAT [timeout SECS]",
        "wait until WHAT holds (alert|event [CLASS], no-alert, serial \"TEXT\", mem ADDR = BYTES [phys], reg NAME = VALUE, exit CODE) or say what was seen; at most SECS (10)",
        "expect serial \"demo: starting\"",
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
