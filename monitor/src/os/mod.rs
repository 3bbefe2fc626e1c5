//! What the monitor knows of the guest's OS from its symbols: where the
//! policies find what they protect (`policy_env`), and for a Linux kernel its
//! entry points, IDTs and the functions of its own text patching.

pub mod kallsyms;
pub mod maps;
mod symbols;

pub use symbols::Symbols;

use vmiscope_introspect::linux::Layout;
use vmiscope_introspect::policy::{LinuxEnv, Policy, PolicyEnv};

/// What the monitor knows of the guest's OS before it runs: the image's
/// symbols (moved by the KASLR slide once it is found), and a Linux kernel's
/// layout from its BTF. The VMM knows none of it: it hands over the kernel's
/// ELF it read (`Vm::take_vmlinux`).
#[derive(Debug, Default, Clone)]
pub struct OsKnowledge {
    symbols: Symbols,
    linux: Option<Result<Layout, String>>,
}

impl OsKnowledge {
    /// From the image's bytes and, for a Linux kernel, its ELF (`vmlinux`);
    /// `map`: symbols to use instead of the kernel's own (a System.map).
    /// `may_slide`: whether the kernel may run away from its link addresses
    /// (see `may_slide`); if not, the symbols hold as they are from the start.
    pub fn read(
        image: &[u8],
        vmlinux: Option<&[u8]>,
        map: Option<Symbols>,
        may_slide: bool,
    ) -> OsKnowledge {
        let own = || match vmlinux {
            Some(v) => linux_symbols(v),
            None => Symbols::parse(image),
        };
        let symbols = map.unwrap_or_else(own);
        if !may_slide {
            symbols.set_unslid();
        }
        OsKnowledge {
            symbols,
            linux: vmlinux.map(btf_layout),
        }
    }

    /// Symbols of an image that runs where it was linked (tests, benchmarks).
    pub fn of_image(image: &[u8]) -> OsKnowledge {
        OsKnowledge::read(image, None, None, false)
    }

    pub fn symbols(&self) -> &Symbols {
        &self.symbols
    }

    /// A Linux guest's layout (from its BTF), or why there is none; None for
    /// a guest that is not Linux.
    pub fn linux(&self) -> Option<&Result<Layout, String>> {
        self.linux.as_ref()
    }
}

/// Whether a kernel may not run at its link addresses: one that its own
/// decompressor places may be anywhere (KASLR), unless told `nokaslr`; its
/// slide is then found from the first IDT it loads (`Introspection`). Every
/// other image runs where it was linked.
pub fn may_slide(own_decompressor: bool, image: &[u8], cmdline: &str) -> bool {
    own_decompressor
        && vmiscope_vmm::loader::is_linux(image)
        && !cmdline.split_whitespace().any(|w| w == "nokaslr")
}

/// A vmlinux's symbols: its ELF symbol table when it kept one, else the
/// kernel's own kallsyms tables.
pub fn linux_symbols(vmlinux: &[u8]) -> Symbols {
    let elf = Symbols::parse(vmlinux);
    if elf.len() > 1000 {
        return elf;
    }
    kallsyms::read(vmlinux).map_or(elf, Symbols::from_entries)
}

/// The offsets `ps` needs, from the vmlinux's own `.BTF` section.
pub fn btf_layout(vmlinux: &[u8]) -> Result<Layout, String> {
    use object::{Object, ObjectSection};
    let copy = vmiscope_vmm::loader::Aligned::copy(vmlinux);
    let file = object::File::parse(copy.bytes()).map_err(|e| e.to_string())?;
    let btf = file
        .section_by_name(".BTF")
        .ok_or("the kernel has no .BTF section (CONFIG_DEBUG_INFO_BTF)")?;
    let bytes = btf.data().map_err(|e| e.to_string())?;
    Layout::from_btf(bytes).map_err(|e| e.to_string())
}

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
    // The page of `user_secret` (the demo's), checked as every region is.
    let user_page = sym.get("user_secret").and_then(|a| {
        region(
            &[Policy::UserPage],
            "user_secret's page",
            a & !0xfff,
            Some(0x1000),
        )
    });
    env.linux = linux_env(sym);
    env.kernel_code.extend(kernel_code);
    env.syscall_table = table.map(|(_, r)| r);
    env.user_pages.extend(user_page.map(|(a, _)| a));
    env.integrity
        .extend(table.map(|(name, (a, n))| (name.to_string(), a, n)));
    env
}

/// The policies that run on this guest, of those `wanted` (`named`: the ones
/// the user named, not through `all`), with what to tell the user.
///
/// A Linux kernel whose symbols were not found (no kallsyms in the image, no
/// System.map) is not recognised by its symbols, so the policies that know
/// a Linux kernel's own set-up would fall back to the generic guest's rules:
/// arm at its boot IDT and deny every later IDTR change, its own `lidt` of
/// `idt_table` included, and the kernel triple-faults (Debian's PREEMPT_RT
/// kernel did, before its kallsyms were read). Those policies are not armed
/// there, and the user is told so loudly; CR4 and CR0.WP need no symbol. On
/// a Linux kernel `all` leaves out `user-page` (the demo's user page): only
/// naming it asks for it.
pub fn usable_policies(
    os: &OsKnowledge,
    env: &PolicyEnv,
    wanted: &[Policy],
    named: &[Policy],
) -> (Vec<Policy>, Option<String>) {
    if os.linux().is_none() {
        return (wanted.to_vec(), None);
    }
    let wanted = wanted
        .iter()
        .copied()
        .filter(|p| *p != Policy::UserPage || named.contains(p));
    if env.linux.is_some() {
        return (wanted.collect(), None);
    }
    let (kept, dropped): (Vec<Policy>, Vec<Policy>) =
        wanted.partition(|p| matches!(p, Policy::Cr4 | Policy::Cr0Wp));
    let warning = (!dropped.is_empty()).then(|| {
        let names: Vec<&str> = dropped.iter().map(|p| p.name()).collect();
        format!(
            "WARNING: no symbols found for this Linux kernel (no kallsyms in it, no System.map given \
             or beside it): the policies {} are NOT armed, since without the kernel's symbols they \
             would deny its own set-up (give --symbols System.map)",
            names.join(", ")
        )
    });
    (kept, warning)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A Linux kernel (it came with a vmlinux) whose symbols were not found:
    /// only the policies that need no symbol arm, and the user is told loudly
    /// which do not. With its symbols every policy arms but `all`'s
    /// `user-page`; a guest that is not Linux keeps them all.
    #[test]
    fn a_linux_kernel_without_symbols_arms_no_policy_that_needs_them() {
        let all = Policy::ALL.to_vec();
        let linux = OsKnowledge::read(b"bzImage", Some(b"no ELF, no kallsyms"), None, false);
        let env = policy_env(linux.symbols(), 64 << 20);
        let (kept, warning) = usable_policies(&linux, &env, &all, &[]);
        assert_eq!(kept, [Policy::Cr4, Policy::Cr0Wp]);
        let warning = warning.expect("said");
        assert!(
            warning.contains("NOT armed") && warning.contains("idt"),
            "{warning}"
        );
        assert!(!warning.contains("user-page"), "{warning}");

        let named = usable_policies(&linux, &env, &[Policy::UserPage], &[Policy::UserPage]);
        assert_eq!(named.0, []);
        assert!(named.1.unwrap().contains("user-page"));

        let mut with_symbols = env.clone();
        with_symbols.linux = Some(LinuxEnv::default());
        let (kept, warning) = usable_policies(&linux, &with_symbols, &all, &[]);
        assert_eq!(kept.len(), all.len() - 1);
        assert!(!kept.contains(&Policy::UserPage) && warning.is_none());

        let other = OsKnowledge::of_image(b"not linux");
        assert_eq!(usable_policies(&other, &env, &all, &[]).0, all);
    }

    /// `user_secret`'s page is checked as every region is: one beyond RAM is
    /// a problem the policy reports (and the run is refused), not a notice.
    #[test]
    fn an_unusable_user_secret_is_a_problem_of_the_user_page_policy() {
        let sym = Symbols::from_entries(vec![(u64::MAX, 8, "user_secret".into())]);
        let env = policy_env(&sym, 64 << 20);
        assert!(env.user_pages.is_empty());
        assert!(env.check(&[Policy::UserPage]).is_err());
    }
}
