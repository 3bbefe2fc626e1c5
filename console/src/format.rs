//! Text for the console: hex dumps, register dumps, one-line events and alerts,
//! hook targets.

use std::fmt::Write as _;

use vmiscope_introspect::Target;

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

pub fn event_line(r: &vmiscope_introspect::EventRecord) -> String {
    let what = match &r.event {
        vmiscope_introspect::EventInfo::Mem {
            gla,
            gpa,
            size,
            access,
            data,
            ..
        } => {
            format!(
                "{access:?} {size}B at {gla:#x} (gpa {gpa:#x}){}",
                data.map(|d| format!(" data {d:#x}")).unwrap_or_default()
            )
        }
        other => format!("{other:x?}"),
    };
    format!(
        "#{:<6} vcpu{} {:<10} {:<14} rip {:#x} cpl{} {}{}",
        r.event_id,
        r.vcpu,
        r.class.name(),
        format!("{:?}", r.verdict),
        r.rip,
        r.cpl,
        what,
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
        "alert {} {} {}: {} (vcpu {} rip {:#x}{}{})",
        a.id,
        a.class.name(),
        if a.enforced { "blocked" } else { "log-only" },
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
        Target::Gpa { gpa, len, rights } => format!("gpa {gpa:#x}+{len} {rights}"),
        Target::Gva {
            gva,
            len,
            rights,
            gpa,
            ..
        } => format!(
            "gva {gva:#x}+{len} {rights} -> {}",
            gpa.map(|g| format!("{g:#x}")).unwrap_or("unmapped".into())
        ),
        Target::Msr { index, read, write } => format!(
            "msr {index:#x} {}{}",
            if *read { "r" } else { "" },
            if *write { "w" } else { "" }
        ),
        Target::Cr { cr, mask } => format!("{cr:?} mask {mask:#x}"),
        Target::Dtr { dtr } => format!("{dtr:?}"),
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
