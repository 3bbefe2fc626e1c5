//! What the monitor knows of the guest's OS from its symbols: where the
//! policies find what they protect (`policy_env`), and for a Linux kernel its
//! entry points, IDTs and the functions of its own text patching.

use vmiscope_introspect::policy::{LinuxEnv, Policy, PolicyEnv};
use vmiscope_vmm::Symbols;

/// Where the image's symbols put the things policies protect. Each region is
/// checked first (the image is as hostile as the guest): one whose end is below
/// its start, that wraps, or that is larger than the guest's RAM (`ram` bytes) is
/// left out with the reason, which a policy that needs it reports.
pub fn policy_env(sym: &Symbols, ram: u64) -> PolicyEnv {
    let mut env = PolicyEnv::default();
    let mut region = |policies: &[Policy], what: &str, start: u64, len: Option<u64>| {
        let checked = len
            .ok_or_else(|| format!("{what} ends below its start {start:#x}"))
            .and_then(|len| {
                vmiscope_introspect::engine::check_extent(start, len, ram)
                    .map(|()| (start, len))
                    .map_err(|e| format!("{what}: {e}"))
            });
        let problems = &mut env.problems;
        checked
            .map_err(|p| problems.extend(policies.iter().map(|&q| (q, p.clone()))))
            .ok()
    };
    let sized = |name: &str| {
        sym.get(name)
            .map(|a| (a, sym.size(name).filter(|s| *s > 0).unwrap_or(8)))
    };
    let mut kernel_code = None;
    if let (Some(start), Some(end)) = (sym.get("__image_start"), sym.get("__ktext_end")) {
        kernel_code = region(
            &[Policy::KernelCode],
            "kernel text __image_start..__ktext_end",
            start,
            end.checked_sub(start),
        );
    }
    // Our images call the table `sys_table`, Linux `sys_call_table` (its
    // length is the distance to the next symbol: kallsyms keeps no sizes).
    let table = ["sys_call_table", "sys_table"]
        .into_iter()
        .find_map(|name| sized(name).map(|r| (name, r)))
        .and_then(|(name, (a, n))| {
            region(&[Policy::SyscallTable, Policy::Integrity], name, a, Some(n)).map(|r| (name, r))
        });
    env.linux = linux_env(sym);
    env.kernel_code.extend(kernel_code);
    env.syscall_table = table.map(|(_, r)| r);
    env.user_pages.extend(sym.get("user_secret"));
    env.integrity
        .extend(table.map(|(name, (a, n))| (name.to_string(), a, n)));
    env
}

/// Where the kernel's read-only IDT alias lives (the CPU entry area's first
/// page, 4-level paging): `idt_setup_apic_and_irq_gates` loads IDTR there.
pub(crate) const LINUX_CEA_RO_IDT: u64 = 0xffff_fe00_0000_0000;

/// A Linux kernel's set-up, from its symbols (None: not a Linux kernel).
fn linux_env(sym: &Symbols) -> Option<LinuxEnv> {
    let lstar = sym.get("entry_SYSCALL_64")?;
    let idt_table = sym.get("idt_table")?;
    let mut msr_values = vec![(0xc000_0082, lstar)];
    msr_values.extend(sym.get("entry_SYSCALL_compat").map(|a| (0xc000_0083, a)));
    msr_values.extend(sym.get("entry_SYSENTER_compat").map(|a| (0x176, a)));
    let mut idt_bases = vec![idt_table, LINUX_CEA_RO_IDT];
    idt_bases.extend(sym.get("bringup_idt_table"));
    let idt_writers = functions(
        sym,
        |n| {
            n.starts_with("idt_setup_")
                || matches!(n, "set_intr_gate" | "update_intr_gate" | "alloc_intr_gate")
        },
        0x10000,
    );
    let idt_helpers = functions(
        sym,
        |n| matches!(n, "native_write_idt_entry" | "write_idt_entry"),
        0x1000,
    );
    let text = match (sym.get("_stext"), sym.get("_etext")) {
        (Some(s), Some(e)) if e > s => Some((s, e - s)),
        _ => None,
    };
    Some(LinuxEnv {
        msr_values,
        idt_bases,
        idt_table: (idt_table, 0x1000),
        idt_writers,
        idt_helpers,
        text,
        text_writers: functions(sym, is_text_patcher, 0x10000),
        text_helpers: functions(sym, |n| TEXT_HELPERS.contains(&n), 0x1000),
        gdt_area: LINUX_CEA,
        gdt_page: sym.get("gdt_page").zip(sym.get("__per_cpu_offset")),
    })
}

/// The CPU entry area (4-level and 5-level paging alike): the read-only IDT
/// alias and each CPU's read-only GDT alias live here.
const LINUX_CEA: (u64, u64) = (0xffff_fe00_0000_0000, 0xffff_fe80_0000_0000);

/// The leaf functions the kernel's text patching stores through.
const TEXT_HELPERS: [&str; 10] = [
    "memcpy",
    "__memcpy",
    "memcpy_orig",
    "memcpy_erms",
    "memset",
    "__memset",
    "memset_orig",
    "memset_erms",
    "memmove",
    "__memmove",
];

/// The kernel's own text patching: alternatives, retpolines and returns at
/// boot, jump labels, static calls, ftrace, kprobes, kgdb, BPF trampolines,
/// all through `text_poke*` (HVMI's Linux exceptions name the same families).
fn is_text_patcher(name: &str) -> bool {
    const PREFIXES: [&str; 25] = [
        "text_poke",
        "__text_poke",
        "smp_text_poke",
        "apply_alternatives",
        "apply_retpolines",
        "apply_returns",
        "apply_paravirt",
        "apply_ibt_endbr",
        "apply_fineibt",
        "apply_seal_endbr",
        "apply_relocation",
        "optimize_nops",
        "alternative",
        "__jump_label",
        "arch_jump_label",
        "jump_label_",
        "__static_call",
        "arch_static_call",
        "static_call_",
        "ftrace_",
        "arch_ftrace",
        "arch_arm_kprobe",
        "arch_disarm_kprobe",
        "kgdb_arch_",
        "bpf_arch_text_poke",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
}

/// [start, end) of every function `wanted` names, its size capped at `cap`
/// (kallsyms gives none: the distance to the next symbol).
fn functions(sym: &Symbols, wanted: impl Fn(&str) -> bool, cap: u64) -> Vec<(u64, u64)> {
    sym.entries()
        .filter(|(n, _, _)| wanted(n))
        .map(|(_, a, size)| (a, a + size.min(cap)))
        .collect()
}
