//! Text for the console: hex dumps, register dumps, one-line events and alerts,
//! hook targets.

use std::fmt::Write as _;

use vmiscope_introspect::arch::DtrKind;
use vmiscope_introspect::event::{AccessKind, Detection, EventInfo};
use vmiscope_introspect::{Cr, EventRecord, Target, Verdict};
use vmiscope_monitor::Symbols;
use vmiscope_vmm::{Event, Reply};

pub fn size_name(n: u64) -> &'static str {
    match n {
        0x1000 => "4 KiB",
        0x20_0000 => "2 MiB",
        _ => "1 GiB",
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn hexdump(addr: u64, b: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in b.chunks(16).enumerate() {
        let ascii: String = chunk
            .iter()
            .map(|c| {
                if (32..127).contains(c) {
                    *c as char
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "{:#010x}  {:<48} {ascii}",
            addr + 16 * i as u64,
            hex(chunk)
        );
    }
    out
}

/// `0x1234 <symbol+0x10>`, or the bare address when the image does not name it.
pub fn at(sym: &Symbols, a: u64) -> String {
    match vmiscope_monitor::journal::symbol_of(sym, a) {
        Some(n) => format!("{a:#x} <{n}>"),
        None => format!("{a:#x}"),
    }
}

/// A verdict as the console says it.
pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allowed => "allowed",
        Verdict::AllowedVirtual => "allowed-virtual",
        Verdict::AllowedPatched => "allowed-patched",
        Verdict::NotAllowed => "denied",
    }
}

/// The well-known MSRs by name.
pub fn msr_name(index: u32) -> Option<&'static str> {
    Some(match index {
        0x174 => "SYSENTER_CS",
        0x175 => "SYSENTER_ESP",
        0x176 => "SYSENTER_EIP",
        0x1b => "APIC_BASE",
        0xc000_0080 => "EFER",
        0xc000_0081 => "STAR",
        0xc000_0082 => "LSTAR",
        0xc000_0083 => "CSTAR",
        0xc000_0084 => "SFMASK",
        0xc000_0100 => "FS_BASE",
        0xc000_0101 => "GS_BASE",
        0xc000_0102 => "KERNEL_GS_BASE",
        _ => return None,
    })
}

fn msr_text(index: u32) -> String {
    match msr_name(index) {
        Some(n) => format!("{n} ({index:#x})"),
        None => format!("{index:#x}"),
    }
}

/// What an event was, in words (no Rust `Debug`).
pub fn info_text(e: &EventInfo, sym: &Symbols) -> String {
    let how = |d: &Detection| match d {
        Detection::Exit => "",
        Detection::Polled => " (polled)",
    };
    match e {
        EventInfo::Mem {
            gla,
            gpa,
            size,
            access,
            data,
            old,
        } => format!(
            "{} {size}B at {} (gpa {gpa:#x}){}{}",
            access_name(*access),
            at(sym, *gla),
            data.map(|d| format!(" data {d:#x}")).unwrap_or_default(),
            old.map(|d| format!(" old {d:#x}")).unwrap_or_default()
        ),
        EventInfo::Msr { index, write } => match write {
            Some(v) => format!("wrmsr {} = {}", msr_text(*index), at(sym, *v)),
            None => format!("rdmsr {}", msr_text(*index)),
        },
        EventInfo::Cr {
            cr,
            old,
            new,
            detection,
        } => format!("{} {old:#x} -> {new:#x}{}", cr_name(*cr), how(detection)),
        EventInfo::Dtr {
            dtr,
            old,
            new,
            detection,
        } => format!(
            "{} {:#x}/{:#x} -> {}/{:#x}{}",
            match dtr {
                DtrKind::Idtr => "idtr",
                DtrKind::Gdtr => "gdtr",
            },
            old.base,
            old.limit,
            at(sym, new.base),
            new.limit,
            how(detection)
        ),
        EventInfo::Xcr {
            index,
            old,
            new,
            detection,
        } => format!("xcr{index} {old:#x} -> {new:#x}{}", how(detection)),
        EventInfo::Breakpoint { gva, gpa } => {
            format!("breakpoint at {} (gpa {gpa:#x})", at(sym, *gva))
        }
        EventInfo::Introcall { op, args } => format!(
            "introcall {op:#x} ({:#x}, {:#x}, {:#x})",
            args[0], args[1], args[2]
        ),
        EventInfo::Integrity {
            gva,
            len,
            changed,
            old_hash,
            new_hash,
        } => format!(
            "{len}B at {} changed at +{changed:#x} (hash {old_hash:#x} -> {new_hash:#x})",
            at(sym, *gva)
        ),
    }
}

pub fn access_name(a: AccessKind) -> &'static str {
    match a {
        AccessKind::Read => "read",
        AccessKind::Write => "write",
        AccessKind::Exec => "exec",
    }
}

pub fn cr_name(c: Cr) -> &'static str {
    match c {
        Cr::Cr0 => "cr0",
        Cr::Cr3 => "cr3",
        Cr::Cr4 => "cr4",
    }
}

/// A VM exit as the VMM reported it, in words (`run --events`, `event`).
/// What happens to a stopped event unless overridden, in words.
pub fn proposed(p: &vmiscope_monitor::Proposed) -> String {
    use vmiscope_monitor::Proposed;
    match p {
        Proposed::Nothing => "-".into(),
        Proposed::WriteLanded => "allow (applied)".into(),
        Proposed::Polled(v) => format!(
            "{} (already applied: the change was polled)",
            verdict_name(*v)
        ),
        Proposed::Reply(r) => match r {
            Reply::Continue => "allow".into(),
            Reply::Drop => "deny (dropped)".into(),
            Reply::Deny => "deny (#GP)".into(),
            Reply::Data(v) => format!("allow, the read returns {v:#x}"),
            Reply::Retry => "retry".into(),
            Reply::Skip(n) => format!("skip the {n}-byte instruction"),
            Reply::Stop(cause) => format!("stop: {cause}"),
        },
    }
}

pub fn exit_text(e: &Event, sym: &Symbols) -> String {
    let mem = |kind: &str, m: &vmiscope_vmm::MemAccess| {
        format!(
            "{kind} {} {}B at gpa {:#x}{} (rip after {} cpl{})",
            if m.write { "write" } else { "read" },
            m.len,
            m.gpa,
            if m.write {
                format!(" data {:#x}", m.data)
            } else {
                String::new()
            },
            at(sym, m.rip),
            m.cpl
        )
    };
    match e {
        Event::Mem(m) => mem("memory", m),
        Event::Mmio(m) => mem("mmio", m),
        Event::Msr { index, write, rip } => match write {
            Some(v) => format!("wrmsr {} = {v:#x} at {}", msr_text(*index), at(sym, *rip)),
            None => format!("rdmsr {} at {}", msr_text(*index), at(sym, *rip)),
        },
        Event::Port { port, size, write } => match write {
            Some(v) => format!("out {port:#x} ({size}B) = {v:#x}"),
            None => format!("in {port:#x} ({size}B)"),
        },
        Event::Introcall(c) => format!(
            "introcall {:#x} ({:#x}, {:#x}, {:#x}) at {} cpl{}",
            c.op,
            c.args[0],
            c.args[1],
            c.args[2],
            at(sym, c.rip),
            c.cpl
        ),
        Event::Breakpoint { rip, ours, cpl, .. } => format!(
            "int3 at {} cpl{cpl} ({})",
            at(sym, *rip),
            if *ours { "ours" } else { "the guest's own" }
        ),
        Event::SingleStep { rip } => format!("single-step to {}", at(sym, *rip)),
        Event::HwBreakpoint { rip, slot } => {
            format!("hardware breakpoint {slot} at {}", at(sym, *rip))
        }
        Event::ExecFault { gva, gpa, cpl } => format!(
            "fetch at {} (gpa {gpa:#x}) cpl{cpl} from a trapped page",
            at(sym, *gva)
        ),
        Event::EmulationFailure {
            rip,
            bytes,
            len,
            cpl,
        } => format!(
            "KVM cannot emulate {} at {} cpl{cpl}",
            hex(&bytes[..(*len as usize).min(15)]),
            at(sym, *rip)
        ),
        Event::Halt => "hlt".into(),
        Event::Shutdown => "triple fault (shutdown)".into(),
        Event::Kicked => "kicked".into(),
    }
}

/// The hooks an event fired, for people, labelled so that an id does not read
/// as a count (`hook 11`, `hooks 3, 7`), or why there are none.
pub fn hook_list(hooks: &[vmiscope_introspect::HookId]) -> String {
    let ids: Vec<String> = hooks.iter().map(|h| h.to_string()).collect();
    match ids.len() {
        0 => "hooks: none (an unhooked access on a hooked page)".into(),
        1 => format!("hook {}", ids[0]),
        _ => format!("hooks {}", ids.join(", ")),
    }
}

/// Microseconds as seconds with three decimals (`67.163`).
pub fn seconds(us: u64) -> String {
    format!("{}.{:03}", us / 1_000_000, us % 1_000_000 / 1000)
}

/// One handled event in full (the TUI's details popup).
pub fn event_detail(r: &EventRecord, sym: &Symbols) -> String {
    format!(
        "event #{} ({} s into the run)\n  class {}  vCPU {}  cpl{}{}\n  rip {}\n  instruction: {}\n  what: {}\n  {}\n  verdict: {}",
        r.event_id,
        seconds(r.at_us),
        r.class.name(),
        r.vcpu,
        r.cpl,
        r.task
            .as_deref()
            .map(|t| format!("  task {t}"))
            .unwrap_or_default(),
        at(sym, r.rip),
        r.instruction.as_deref().unwrap_or("(unknown: polled)"),
        info_text(&r.event, sym),
        hook_list(&r.hooks),
        verdict_name(r.verdict)
    )
}

/// One handled event, on one line.
pub fn event_line(r: &EventRecord, sym: &Symbols) -> String {
    format!(
        "#{:<6} vcpu{} {:<10} {:<9} rip {} cpl{} {}{}",
        r.event_id,
        r.vcpu,
        r.class.name(),
        match r.overridden {
            Some(_) => format!("{} (analyst)", verdict_name(r.verdict)),
            None => verdict_name(r.verdict).to_string(),
        },
        at(sym, r.rip),
        r.cpl,
        info_text(&r.event, sym),
        r.task
            .as_deref()
            .map(|t| format!(" task {t}"))
            .unwrap_or_default()
    )
}

/// An alert as batch mode prints it on stderr, as it happens.
pub fn batch_alert_line(a: &vmiscope_introspect::Alert) -> String {
    format!(
        "ALERT {} {}: {} (vcpu {} rip {:#x}{} cpl {}{}{})",
        a.id,
        a.class.name(),
        a.reason,
        a.vcpu,
        a.rip,
        writer(a),
        a.cpl,
        a.instruction
            .as_deref()
            .map(|i| format!(", `{i}`"))
            .unwrap_or_default(),
        if a.enforced {
            ""
        } else {
            ", log-only: allowed"
        }
    )
}

/// " <symbol+off>" for the alert's RIP, and " task comm[pid]", when known.
fn writer(a: &vmiscope_introspect::Alert) -> String {
    let sym = a.writer.as_deref().map(|w| format!(" <{w}>"));
    let task = a.task.as_deref().map(|t| format!(" task {t}"));
    sym.unwrap_or_default() + &task.unwrap_or_default()
}

pub fn alert_line(a: &vmiscope_introspect::Alert) -> String {
    format!(
        "alert {}{} {} {}: {} (vcpu {} rip {:#x}{}{})",
        a.id,
        if a.repeats > 0 {
            format!(" (x{})", a.repeats + 1)
        } else {
            String::new()
        },
        a.class.name(),
        match (a.overridden, a.enforced) {
            (Some(true), _) => "allowed by the analyst",
            (Some(false), _) => "denied by the analyst",
            (None, true) => "blocked",
            (None, false) => "log-only",
        },
        a.reason,
        a.vcpu,
        a.rip,
        writer(a),
        a.instruction
            .as_deref()
            .map(|i| format!(" `{i}`"))
            .unwrap_or_default()
    )
}

pub fn target_text(t: &Target) -> String {
    match t {
        Target::Gpa { gpa, len, rights } => format!("gpa {gpa:#x}+{len:#x} {rights}"),
        Target::Gva {
            gva,
            len,
            rights,
            gpa,
            ..
        } => format!(
            "gva {gva:#x}+{len:#x} {rights} -> {}",
            gpa.map(|g| format!("{g:#x}")).unwrap_or("unmapped".into())
        ),
        Target::Msr { index, read, write } => format!(
            "msr {index:#x} {}{}",
            if *read { "r" } else { "" },
            if *write { "w" } else { "" }
        ),
        Target::Cr { cr, mask } => format!("{} mask {mask:#x}", cr_name(*cr)),
        Target::Dtr { dtr } => match dtr {
            DtrKind::Idtr => "idtr".into(),
            DtrKind::Gdtr => "gdtr".into(),
        },
        Target::Xcr { index } => format!("xcr{index}"),
        Target::Breakpoint { gva, hidden, .. } => {
            format!("bp {gva:#x}{}", if *hidden { " hidden" } else { "" })
        }
        Target::Introcall { op } => format!(
            "introcall {}",
            op.map(|o| o.to_string()).unwrap_or("any".into())
        ),
    }
}

pub fn fmt_regs(r: &kvm_bindings::kvm_regs) -> String {
    format!(
        "rax {:016x} rbx {:016x} rcx {:016x} rdx {:016x}\nrsi {:016x} rdi {:016x} rbp {:016x} rsp {:016x}\nr8  {:016x} r9  {:016x} r10 {:016x} r11 {:016x}\nr12 {:016x} r13 {:016x} r14 {:016x} r15 {:016x}\nrip {:016x} rflags {:08x}",
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp,
        r.rsp,
        r.r8,
        r.r9,
        r.r10,
        r.r11,
        r.r12,
        r.r13,
        r.r14,
        r.r15,
        r.rip,
        r.rflags
    )
}

pub fn fmt_sregs(s: &kvm_bindings::kvm_sregs) -> String {
    format!(
        "cr0 {:016x} cr2 {:016x} cr3 {:016x} cr4 {:016x} cr8 {:x}\nefer {:x}  idtr {:x}/{:x}  gdtr {:x}/{:x}\ncs {:04x} ss {:04x} ds {:04x} es {:04x} fs {:04x} gs {:04x} tr {:04x}\nfs_base {:x} gs_base {:x}",
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.cr8,
        s.efer,
        s.idt.base,
        s.idt.limit,
        s.gdt.base,
        s.gdt.limit,
        s.cs.selector,
        s.ss.selector,
        s.ds.selector,
        s.es.selector,
        s.fs.selector,
        s.gs.selector,
        s.tr.selector,
        s.fs.base,
        s.gs.base
    )
}

/// A general, segment or system register by name (`cpl` is CS's low bits).
pub fn reg_by_name(
    r: &kvm_bindings::kvm_regs,
    s: &kvm_bindings::kvm_sregs,
    n: &str,
) -> Option<u64> {
    Some(match n {
        "cs" => s.cs.selector as u64,
        "ss" => s.ss.selector as u64,
        "ds" => s.ds.selector as u64,
        "es" => s.es.selector as u64,
        "fs" => s.fs.selector as u64,
        "gs" => s.gs.selector as u64,
        "fs_base" => s.fs.base,
        "gs_base" => s.gs.base,
        "cr0" => s.cr0,
        "cr2" => s.cr2,
        "cr3" => s.cr3,
        "cr4" => s.cr4,
        "cr8" => s.cr8,
        "efer" => s.efer,
        "cpl" => (s.cs.selector & 3) as u64,
        "rax" => r.rax,
        "rbx" => r.rbx,
        "rcx" => r.rcx,
        "rdx" => r.rdx,
        "rsi" => r.rsi,
        "rdi" => r.rdi,
        "rbp" => r.rbp,
        "rsp" => r.rsp,
        "r8" => r.r8,
        "r9" => r.r9,
        "r10" => r.r10,
        "r11" => r.r11,
        "r12" => r.r12,
        "r13" => r.r13,
        "r14" => r.r14,
        "r15" => r.r15,
        "rip" => r.rip,
        "rflags" => r.rflags,
        _ => return None,
    })
}

pub trait Pipe: Sized {
    fn pipe<R>(self, f: impl FnOnce(Self) -> R) -> R {
        f(self)
    }
}
impl<T> Pipe for T {}

/// Alerts on stderr as they are raised: what a run with no console shows
/// (plain `--batch`, and `--batch --gdb`).
pub fn stderr_alert_sink() -> vmiscope_monitor::AlertSink {
    Box::new(|a| crate::errln!("[vmiscope] {}", batch_alert_line(a)))
}
