//! Protection policies an analyst switches on by name, modelled on HVMI's: each
//! installs hooks owned by it (`Owner::Policy`) whose callbacks deny the act and
//! say why. One function per policy.

use crate::arch::{Cr, DtrKind};
use crate::engine::{Engine, HookError};
use crate::event::{AccessKind, EventInfo};
use crate::glue::Guest;
use crate::hooks::{HookId, Owner, Rights, Target};
pub use crate::target::Policy;
use crate::verdict::Outcome;

/// Addresses a policy needs that only the image knows (from its symbols).
#[derive(Debug, Clone, Default)]
pub struct PolicyEnv {
    /// Kernel code: (gva, len).
    pub kernel_code: Vec<(u64, u64)>,
    /// The system-call table: (gva, len).
    pub syscall_table: Option<(u64, u64)>,
    /// User pages to protect against writes and execution.
    pub user_pages: Vec<u64>,
    /// Tables of 8-byte entries to hash on the timer: (name, gva, len).
    pub integrity: Vec<(String, u64, u64)>,
    /// A Linux kernel's own set-up, when the image is one (from its symbols).
    pub linux: Option<LinuxEnv>,
    /// Why a region the image names was left out (a size larger than RAM, an
    /// end below its start), by the policies that needed it.
    pub problems: Vec<(Policy, String)>,
}

/// What a Linux kernel does to the protected state while it boots, from its
/// symbols: the policies let exactly that through on every vCPU, so they can
/// be armed from its first instruction and its own set-up is never an alert.
#[derive(Debug, Clone, Default)]
pub struct LinuxEnv {
    /// MSR index and the one value the kernel writes there (LSTAR =
    /// `entry_SYSCALL_64`, …).
    pub msr_values: Vec<(u32, u64)>,
    /// The IDTR bases the kernel loads: its boot table, `idt_table`, and the
    /// read-only alias in the CPU entry area.
    pub idt_bases: Vec<u64>,
    /// `idt_table`: (gva, len).
    pub idt_table: (u64, u64),
    /// The functions that fill `idt_table` while the kernel sets it up,
    /// [start, end); the kernel makes it read-only after.
    pub idt_writers: Vec<(u64, u64)>,
    /// Leaf helpers those functions call to store a gate
    /// (`native_write_idt_entry`): a write from one counts as its caller's.
    pub idt_helpers: Vec<(u64, u64)>,
    /// The kernel's text, `_stext`..`_etext`: (gva, len).
    pub text: Option<(u64, u64)>,
    /// The kernel's text patching (alternatives, jump labels, static calls,
    /// `text_poke*`, ftrace, kprobes), [start, end): the only writers of its text.
    pub text_writers: Vec<(u64, u64)>,
    /// Leaf helpers they store through (`memcpy`, `memset`): a write from one
    /// counts as its caller's.
    pub text_helpers: Vec<(u64, u64)>,
    /// Where a vCPU's GDTR may point once the kernel has set it up: the CPU
    /// entry area (the read-only GDT aliases, one per CPU), [start, end) ...
    pub gdt_area: (u64, u64),
    /// ... or a CPU's own `gdt_page`: its per-CPU offset, and the address of
    /// `__per_cpu_offset` (the per-CPU bases, read from the guest at the check).
    pub gdt_page: Option<(u64, u64)>,
}

impl PolicyEnv {
    /// Refuses a policy whose region the image names but gives wrongly: it would
    /// install nothing and look on silently. (A region the image does not name
    /// at all is said when the policy is switched on, and `all` goes on without
    /// it.)
    pub fn check(&self, policies: &[Policy]) -> Result<(), PolicyError> {
        match policies
            .iter()
            .find(|p| self.problems.iter().any(|(q, _)| q == *p))
        {
            Some(&p) => Err(self.no_target(p)),
            None => Ok(()),
        }
    }

    fn no_target(&self, p: Policy) -> PolicyError {
        let why: Vec<&str> = self
            .problems
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, w)| w.as_str())
            .collect();
        PolicyError::NoTarget(p, why.join("; "))
    }
}

impl std::str::FromStr for Policy {
    type Err = PolicyError;

    fn from_str(name: &str) -> Result<Policy, PolicyError> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
                PolicyError::Unknown(name.to_string(), known.join(", "))
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown policy `{0}` (known: {1})")]
    Unknown(String, String),
    #[error("policy {0}: {1}")]
    Hook(Policy, HookError),
    #[error("policy {0}: the image gives no valid address for it{why}", why = reason(.1))]
    NoTarget(Policy, String),
}

fn reason(problems: &str) -> String {
    if problems.is_empty() {
        String::new()
    } else {
        format!(" ({problems})")
    }
}

/// Expands `all` and comma lists into policies, checking each.
pub fn parse_list(list: &str) -> Result<Vec<Policy>, PolicyError> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "all" {
            out.extend(Policy::ALL);
        } else {
            out.push(name.parse()?);
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Whether the write being handled comes from one of `writers`, directly or
/// through one of `helpers` (leaf functions: the caller's return address is
/// at the top of the stack when they store).
fn kernel_writer(g: &dyn Guest, writers: &[(u64, u64)], helpers: &[(u64, u64)]) -> bool {
    let inside = |list: &[(u64, u64)], a: u64| list.iter().any(|&(s, e)| a >= s && a < e);
    let r = g.regs();
    if inside(writers, r.rip) {
        return true;
    }
    inside(helpers, r.rip)
        && crate::integrity::read(g, r.rsp, 8)
            .and_then(|b| Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)))
            .is_some_and(|ret| inside(writers, ret))
}

/// Whether `base` is some CPU's `gdt_page`: its per-CPU offset `page.0` plus
/// one of the per-CPU bases in the array at `page.1` (one per vCPU).
fn is_gdt_page(g: &dyn Guest, page: Option<(u64, u64)>, base: u64) -> bool {
    let Some((offset, bases)) = page else {
        return false;
    };
    (0..g.vcpu_count() as u64).any(|cpu| {
        crate::integrity::read(g, bases + cpu * 8, 8)
            .and_then(|b| Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)))
            .is_some_and(|pcpu| pcpu.wrapping_add(offset) == base)
    })
}

fn deny(reason: &'static str) -> crate::hooks::Callback {
    Box::new(move |_| Outcome::block(reason))
}

/// One policy's hooks being installed.
struct Installer<'a> {
    e: &'a mut Engine,
    g: &'a mut dyn Guest,
    policy: Policy,
    ids: Vec<HookId>,
}

impl Installer<'_> {
    fn hook(&mut self, target: Target, cb: crate::hooks::Callback) -> Result<(), PolicyError> {
        let owner = Owner::Policy(self.policy);
        let id = self
            .e
            .add_owned_hook(self.g, target, owner, cb)
            .map_err(|err| PolicyError::Hook(self.policy, err))?;
        self.ids.push(id);
        Ok(())
    }

    /// Memory hooks over `[gva, gva+len)`, one per page, each with a callback
    /// from `callback`.
    fn pages(
        &mut self,
        gva: u64,
        len: u64,
        rights: Rights,
        callback: impl Fn() -> crate::hooks::Callback,
    ) -> Result<(), PolicyError> {
        for (va, n) in crate::decode::split_pages(gva, len) {
            let t = Target::Gva {
                gva: va,
                len: n,
                rights,
                cr3: 0,
                gpa: None,
            };
            self.hook(t, callback())?;
        }
        Ok(())
    }

    /// Memory hooks over `[gva, gva+len)` that deny all but reads.
    fn mem(
        &mut self,
        gva: u64,
        len: u64,
        rights: Rights,
        reason: &'static str,
    ) -> Result<(), PolicyError> {
        self.pages(gva, len, rights, || {
            Box::new(move |ctx| match ctx.event {
                EventInfo::Mem {
                    access: AccessKind::Read,
                    ..
                } => Outcome::allow(),
                _ => Outcome::block(reason),
            })
        })
    }

    /// A hook on `bits` of `cr` that denies clearing them (setting them hardens).
    fn cr_bits(&mut self, cr: Cr, bits: u64, reason: &'static str) -> Result<(), PolicyError> {
        let cb: crate::hooks::Callback = Box::new(move |ctx| match *ctx.event {
            EventInfo::Cr { old, new, .. } if old & !new & bits != 0 => Outcome::block(reason),
            _ => Outcome::allow(),
        });
        self.hook(Target::Cr { cr, mask: bits }, cb)
    }

    /// The IDT's pages and the IDTR. A kernel that loads its IDT before filling
    /// it in keeps filling it: a gate that was not present when the policy armed
    /// is the kernel's to set up; rewriting a gate that was present is tampering.
    fn idt(&mut self) -> Result<(), PolicyError> {
        let idtr = self.g.sregs().idtr;
        let len = idtr.limit as u64 + 1;
        let table = crate::integrity::read(self.g, idtr.base, len).unwrap_or_default();
        // 16-byte gates; P is bit 7 of byte 5.
        let empty: Vec<bool> = table
            .chunks(16)
            .map(|g| g.len() < 6 || g[5] & 0x80 == 0)
            .collect();
        let base = idtr.base;
        self.pages(base, len, Rights::W, || {
            let empty = empty.clone();
            Box::new(move |ctx| match ctx.event {
                EventInfo::Mem {
                    access: AccessKind::Write,
                    gla,
                    ..
                } => {
                    let gate = (gla.wrapping_sub(base) / 16) as usize;
                    if empty.get(gate).copied().unwrap_or(false) {
                        Outcome::allow()
                    } else {
                        Outcome::block("IDT entry modified")
                    }
                }
                _ => Outcome::allow(),
            })
        })?;
        self.hook(Target::Dtr { dtr: DtrKind::Idtr }, deny("IDTR reloaded"))
    }

    /// Linux: each syscall MSR may only receive the value the kernel itself
    /// writes (on every vCPU, at each `syscall_init`).
    fn linux_msrs(&mut self, l: &LinuxEnv) -> Result<(), PolicyError> {
        if l.msr_values.is_empty() {
            return Err(PolicyError::NoTarget(
                self.policy,
                "no entry_SYSCALL_64 symbol".into(),
            ));
        }
        for &(index, want) in &l.msr_values {
            let t = Target::Msr {
                index,
                read: false,
                write: true,
            };
            self.hook(
                t,
                Box::new(move |ctx| match *ctx.event {
                    EventInfo::Msr { write: Some(v), .. } if v != want => Outcome::block(format!(
                        "MSR {index:#x} set to {v:#x}, not the kernel's {want:#x}"
                    )),
                    _ => Outcome::allow(),
                }),
            )?;
        }
        Ok(())
    }

    /// Linux: IDTR may only point at the kernel's own tables; `idt_table` may
    /// only be written by the kernel's IDT set-up functions.
    fn linux_idt(&mut self, l: &LinuxEnv) -> Result<(), PolicyError> {
        let bases = l.idt_bases.clone();
        self.hook(
            Target::Dtr { dtr: DtrKind::Idtr },
            Box::new(move |ctx| match ctx.event {
                EventInfo::Dtr { new, .. } if new.base != 0 && !bases.contains(&new.base) => {
                    Outcome::block(format!("IDTR moved to {:#x}, not a kernel IDT", new.base))
                }
                _ => Outcome::allow(),
            }),
        )?;
        let (table, len) = l.idt_table;
        self.pages(table, len, Rights::W, || {
            let (writers, helpers) = (l.idt_writers.clone(), l.idt_helpers.clone());
            Box::new(move |ctx| {
                let by_kernel = kernel_writer(&*ctx.guest, &writers, &helpers);
                match ctx.event {
                    EventInfo::Mem {
                        access: AccessKind::Write,
                        gla,
                        ..
                    } if !by_kernel => Outcome::block(format!(
                        "idt_table gate {} written",
                        gla.wrapping_sub(table) / 16
                    )),
                    _ => Outcome::allow(),
                }
            })
        })
    }

    /// Linux: the kernel's text is written only by its own text patching
    /// (alternatives at boot, jump labels, static calls, ftrace, kprobes through
    /// `text_poke*`, directly or through `memcpy`/`memset` by return address).
    fn linux_text(&mut self, l: &LinuxEnv) -> Result<(), PolicyError> {
        let Some((text, len)) = l.text else {
            return Err(PolicyError::NoTarget(
                self.policy,
                "no _stext/_etext symbols".into(),
            ));
        };
        crate::engine::check_extent(text, len, self.g.ram_size())
            .map_err(|err| PolicyError::Hook(self.policy, err))?;
        // One hook a page (thousands over a kernel's text): they share the lists.
        let writers: std::sync::Arc<[(u64, u64)]> = l.text_writers.clone().into();
        let helpers: std::sync::Arc<[(u64, u64)]> = l.text_helpers.clone().into();
        self.pages(text, len, Rights::W, || {
            let (writers, helpers) = (writers.clone(), helpers.clone());
            Box::new(move |ctx| match ctx.event {
                EventInfo::Mem {
                    access: AccessKind::Write,
                    ..
                } if !kernel_writer(&*ctx.guest, &writers, &helpers) => {
                    Outcome::block("kernel code modified")
                }
                _ => Outcome::allow(),
            })
        })
    }

    /// Linux: once a vCPU's GDTR has reached the kernel's final table (its
    /// read-only alias in the CPU entry area), it may only point there or at a
    /// CPU's own `gdt_page`. Before that each vCPU is in its own set-up (an AP
    /// starts on the real-mode trampoline's table), which is no attack.
    fn linux_gdtr(&mut self, l: &LinuxEnv) -> Result<(), PolicyError> {
        let ((area_start, area_end), page) = (l.gdt_area, l.gdt_page);
        let mut settled = std::collections::BTreeSet::new();
        self.hook(
            Target::Dtr { dtr: DtrKind::Gdtr },
            Box::new(move |ctx| {
                let EventInfo::Dtr { old, new, .. } = *ctx.event else {
                    return Outcome::allow();
                };
                let in_area = |b: u64| b >= area_start && b < area_end;
                let cpu = ctx.guest.vcpu();
                if !settled.contains(&cpu) {
                    if in_area(new.base) || in_area(old.base) {
                        settled.insert(cpu);
                    }
                    return Outcome::allow();
                }
                if in_area(new.base) || is_gdt_page(&*ctx.guest, page, new.base) {
                    return Outcome::allow();
                }
                Outcome::block(format!("GDTR moved to {:#x}, not a kernel GDT", new.base))
            }),
        )
    }

    fn syscall_msrs(&mut self) -> Result<(), PolicyError> {
        for (index, why) in [
            (0xc000_0082, "LSTAR (64-bit syscall entry) rewritten"),
            (0xc000_0081, "STAR rewritten"),
            (0xc000_0083, "CSTAR rewritten"),
            (0x174, "SYSENTER_CS rewritten"),
            (0x175, "SYSENTER_ESP rewritten"),
            (0x176, "SYSENTER_EIP rewritten"),
        ] {
            let t = Target::Msr {
                index,
                read: false,
                write: true,
            };
            self.hook(t, deny(why))?;
        }
        Ok(())
    }

    fn regions(
        &mut self,
        list: &[(u64, u64)],
        rights: Rights,
        why: &'static str,
    ) -> Result<(), PolicyError> {
        if list.is_empty() {
            return Err(PolicyError::NoTarget(self.policy, String::new()));
        }
        for &(gva, len) in list {
            crate::engine::check_extent(gva, len, self.g.ram_size())
                .map_err(|err| PolicyError::Hook(self.policy, err))?;
            self.mem(gva, len, rights, why)?;
        }
        Ok(())
    }

    fn integrity(&mut self, env: &PolicyEnv) -> Result<(), PolicyError> {
        if env.integrity.is_empty() {
            return Err(PolicyError::NoTarget(self.policy, String::new()));
        }
        for (name, gva, len) in &env.integrity {
            // The alert names the entry that changed (the first, if several).
            let table = name.clone();
            let why: crate::hooks::Callback = Box::new(move |ctx| match *ctx.event {
                EventInfo::Integrity { changed, .. } => Outcome::block(format!(
                    "{table}[{}] modified ({table}+{changed:#x})",
                    changed / 8
                )),
                _ => Outcome::allow(),
            });
            self.e
                .add_integrity_region(self.g, name.clone(), *gva, *len, true, why)
                .map_err(|err| PolicyError::Hook(self.policy, err))?;
        }
        Ok(())
    }
}

/// Switches policies on for the current guest state.
pub fn enable(
    e: &mut Engine,
    g: &mut dyn Guest,
    policies: &[Policy],
    env: &PolicyEnv,
) -> Result<Vec<HookId>, PolicyError> {
    let mut ids = Vec::new();
    for &p in policies {
        ids.extend(enable_one(e, g, p, env)?);
    }
    Ok(ids)
}

fn enable_one(
    e: &mut Engine,
    g: &mut dyn Guest,
    policy: Policy,
    env: &PolicyEnv,
) -> Result<Vec<HookId>, PolicyError> {
    // A region the image names wrongly: refused with the reason.
    env.check(&[policy])?;
    let mut i = Installer {
        e,
        g,
        policy,
        ids: Vec::new(),
    };
    match (policy, &env.linux) {
        (Policy::Idt, Some(l)) => i.linux_idt(l)?,
        (Policy::Idt, None) => i.idt()?,
        (Policy::SyscallMsrs, Some(l)) => i.linux_msrs(l)?,
        (Policy::SyscallMsrs, None) => i.syscall_msrs()?,
        (Policy::Gdtr, Some(l)) => i.linux_gdtr(l)?,
        (Policy::Gdtr, None) => {
            i.hook(Target::Dtr { dtr: DtrKind::Gdtr }, deny("GDTR reloaded"))?
        }
        (Policy::KernelCode, Some(l)) => i.linux_text(l)?,
        // Only clearing SMEP/SMAP is an attack; setting them is hardening.
        (Policy::Cr4, _) => i.cr_bits(Cr::Cr4, 3 << 20, "CR4.SMEP/SMAP cleared")?,
        (Policy::Cr0Wp, _) => i.cr_bits(Cr::Cr0, 1 << 16, "CR0.WP cleared")?,
        (Policy::KernelCode, None) => {
            i.regions(&env.kernel_code, Rights::W, "kernel code modified")?
        }
        (Policy::SyscallTable, _) => {
            let table: Vec<(u64, u64)> = env.syscall_table.into_iter().collect();
            i.regions(&table, Rights::W, "system-call table entry modified")?
        }
        (Policy::UserPage, _) => {
            let pages: Vec<(u64, u64)> = env
                .user_pages
                .iter()
                .map(|p| (p & !0xfff, 0x1000))
                .collect();
            i.regions(&pages, Rights::RWX, "protected user page accessed")?
        }
        (Policy::Integrity, _) => i.integrity(env)?,
    }
    Ok(i.ids)
}

/// Switches a policy off: flags its hooks for removal; returns how many.
pub fn disable(e: &mut Engine, policy: Policy) -> usize {
    let ids: Vec<HookId> = e
        .hooks()
        .iter()
        .filter(|h| h.owner == Owner::Policy(policy) && !h.removed)
        .map(|h| h.id)
        .collect();
    for id in &ids {
        let _ = e.remove_hook(*id);
    }
    ids.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::*;
    use crate::mock::MockGuest;
    use crate::verdict::Verdict;

    #[test]
    fn parse_all_and_unknown() {
        assert_eq!(parse_list("all").unwrap(), Policy::ALL);
        assert_eq!(parse_list("idt, cr4").unwrap(), [Policy::Idt, Policy::Cr4]);
        for p in Policy::ALL {
            assert_eq!(p.name().parse::<Policy>().unwrap(), p, "names round-trip");
        }
        let e = parse_list("idt,nope").unwrap_err();
        assert!(e.to_string().contains("unknown policy `nope`"));
    }

    #[test]
    fn the_idt_policy_lets_the_kernel_fill_empty_gates_and_guards_present_ones() {
        use crate::event::AccessKind;
        use crate::handlers::{MemExit, handle_ept_violation};
        let (mut e, mut g) = (Engine::new(), MockGuest::new());
        // An IDT at 0x50000 whose gate 0 is present (P in byte 5) and gate 1 not:
        // the kernel loaded it before filling it in.
        g.ram[0x50005] = 0x8e;
        g.sregs.idtr = crate::arch::Dtr {
            base: 0x50000,
            limit: 0xff,
        };
        enable(&mut e, &mut g, &[Policy::Idt], &PolicyEnv::default()).unwrap();
        let write = |gpa| MemExit {
            gpa,
            len: 8,
            access: AccessKind::Write,
            data: Some(0x1234),
            rip: 0x20002,
        };
        // The kernel's own gate writes used to be denied from the first LIDT on.
        let (v, _) = handle_ept_violation(&mut e, &mut g, &write(0x50010));
        assert_eq!(v, Verdict::Allowed, "filling an empty gate");
        let (v, _) = handle_ept_violation(&mut e, &mut g, &write(0x50000));
        assert_eq!(v, Verdict::NotAllowed, "rewriting a present gate");
        assert_eq!(e.alerts().len(), 1);
        assert_eq!(e.alerts()[0].reason, "IDT entry modified");
    }

    #[test]
    fn cr4_policy_blocks_clearing_smep_not_setting_it() {
        let (mut e, mut g) = (Engine::new(), MockGuest::new());
        enable(&mut e, &mut g, &[Policy::Cr4], &PolicyEnv::default()).unwrap();
        assert!(
            e.hooks()
                .iter()
                .all(|h| h.owner == Owner::Policy(Policy::Cr4))
        );
        let smep = 1u64 << 20;
        assert_eq!(
            handle_cr_write(
                &mut e,
                &mut g,
                Cr::Cr4,
                0x620,
                0x620 | smep,
                crate::Detection::Polled
            ),
            Verdict::Allowed
        );
        assert_eq!(
            handle_cr_write(
                &mut e,
                &mut g,
                Cr::Cr4,
                0x620 | smep,
                0x620,
                crate::Detection::Polled
            ),
            Verdict::NotAllowed
        );
        assert_eq!(e.alerts().len(), 1);
        assert_eq!(e.alerts()[0].reason, "CR4.SMEP/SMAP cleared");
        assert_eq!(
            disable(&mut e, Policy::Idt),
            0,
            "another policy's hooks stay"
        );
        assert_eq!(disable(&mut e, Policy::Cr4), 1);
        e.commit(&mut g).unwrap();
        assert!(e.hooks().is_empty());
    }

    fn linux_env() -> PolicyEnv {
        PolicyEnv {
            linux: Some(LinuxEnv {
                text: Some((0x10_0000, 0x2000)),
                text_writers: vec![(0x12_0000, 0x12_0100)],
                text_helpers: vec![(0x13_0000, 0x13_0040)],
                gdt_area: (0x1f_0000, 0x1f_8000),
                // gdt_page at per-CPU offset 0x40; the bases array at 0x1e0000.
                gdt_page: Some((0x40, 0x1e_0000)),
                ..LinuxEnv::default()
            }),
            ..PolicyEnv::default()
        }
    }

    #[test]
    fn linux_kernel_text_is_written_only_by_its_own_patching() {
        use crate::event::AccessKind;
        use crate::handlers::{MemExit, handle_ept_violation};
        let (mut e, mut g) = (Engine::new(), MockGuest::new());
        enable(&mut e, &mut g, &[Policy::KernelCode], &linux_env()).unwrap();
        e.commit(&mut g).unwrap();
        let mut write = |g: &mut MockGuest, rip: u64, ret: u64| {
            g.regs.rip = rip;
            g.regs.rsp = 0x15_0000;
            g.put_u64(0x15_0000, ret);
            let w = MemExit {
                gpa: 0x10_1008,
                len: 8,
                access: AccessKind::Write,
                data: Some(0xcc),
                rip,
            };
            handle_ept_violation(&mut e, g, &w).0
        };
        assert_eq!(
            write(&mut g, 0x12_0010, 0),
            Verdict::Allowed,
            "text_poke itself"
        );
        assert_eq!(
            write(&mut g, 0x13_0008, 0x12_0020),
            Verdict::Allowed,
            "memcpy called by text_poke"
        );
        assert_eq!(
            write(&mut g, 0x14_0000, 0x12_0020),
            Verdict::NotAllowed,
            "anyone else"
        );
        assert_eq!(
            write(&mut g, 0x13_0008, 0x14_0000),
            Verdict::NotAllowed,
            "memcpy called by anyone else"
        );
        assert_eq!(e.alerts().len(), 2);
        assert_eq!(e.alerts()[0].reason, "kernel code modified");
    }

    #[test]
    fn linux_gdtr_settles_per_vcpu_then_stays_on_kernel_tables() {
        use crate::arch::Dtr;
        use crate::handlers::handle_dtr_violation;
        let (mut e, mut g) = (Engine::new(), MockGuest::new());
        g.vcpus = 2;
        // CPU 0's per-CPU base: its gdt_page is at 0x1e8000 + 0x40.
        g.put_u64(0x1e_0000, 0x1e_8000);
        g.put_u64(0x1e_0008, 0x1e_c000);
        enable(&mut e, &mut g, &[Policy::Gdtr], &linux_env()).unwrap();
        let mut load = |g: &mut MockGuest, cpu: u32, old: u64, new: u64| {
            g.vcpu = cpu;
            let d = |base| Dtr { base, limit: 0x7f };
            handle_dtr_violation(
                &mut e,
                g,
                DtrKind::Gdtr,
                d(old),
                d(new),
                crate::Detection::Polled,
            )
        };
        // vCPU 0's own set-up: the boot table, then its per-CPU one, then the
        // read-only alias in the CPU entry area.
        assert_eq!(load(&mut g, 0, 0x9000, 0x2000), Verdict::Allowed);
        assert_eq!(load(&mut g, 0, 0x2000, 0x1f_0000), Verdict::Allowed);
        // Settled: its direct gdt_page and the alias are kernel tables ...
        assert_eq!(load(&mut g, 0, 0x1f_0000, 0x1e_8040), Verdict::Allowed);
        assert_eq!(load(&mut g, 0, 0x1e_8040, 0x1f_0000), Verdict::Allowed);
        // ... and so is another CPU's.
        assert_eq!(load(&mut g, 0, 0x1f_0000, 0x1e_c040), Verdict::Allowed);
        // Anything else is not.
        assert_eq!(load(&mut g, 0, 0x1e_c040, 0x3000), Verdict::NotAllowed);
        // vCPU 1 is still in its own set-up (an AP on the trampoline's table).
        assert_eq!(load(&mut g, 1, 0x9000, 0x5000), Verdict::Allowed);
        assert_eq!(e.alerts().len(), 1);
        assert!(
            e.alerts()[0].reason.starts_with("GDTR moved to 0x3000"),
            "{:?}",
            e.alerts()[0]
        );
    }
}
