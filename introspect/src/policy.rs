//! Protection policies an analyst switches on by name, modelled on HVMI's: each
//! installs hooks named `policy:NAME` whose callbacks deny the act and say why.

use crate::arch::{Cr, DtrKind};
use crate::engine::{Engine, HookError};
use crate::event::{AccessKind, EventInfo};
use crate::glue::Guest;
use crate::hooks::{HookId, Rights, Target};
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
    /// Regions to hash on the timer: (gva, len).
    pub integrity: Vec<(u64, u64)>,
}

pub const POLICIES: &[(&str, &str)] = &[
    ("idt", "IDT memory against writes, and IDTR against reloads"),
    ("gdtr", "GDTR against reloads"),
    (
        "syscall-msrs",
        "LSTAR, STAR, CSTAR, SYSENTER_CS/ESP/EIP against writes",
    ),
    ("cr4", "CR4.SMEP and CR4.SMAP against clearing"),
    ("cr0-wp", "CR0.WP against clearing"),
    ("kernel-code", "kernel code pages against writes"),
    ("syscall-table", "the system-call table against writes"),
    (
        "user-page",
        "protected user pages against writes and execution (reads are logged)",
    ),
    (
        "integrity",
        "hash of registered regions, checked every second, restored on change",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown policy `{0}` (known: {1})")]
    Unknown(String, String),
    #[error("policy {0}: {1}")]
    Hook(&'static str, HookError),
    #[error("policy {0}: the image gives no address for it")]
    NoTarget(&'static str),
}

/// Expands `all` and comma lists into policy names, checking each.
pub fn parse_list(list: &str) -> Result<Vec<&'static str>, PolicyError> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "all" {
            out.extend(POLICIES.iter().map(|p| p.0));
            continue;
        }
        let p = POLICIES.iter().find(|p| p.0 == name).ok_or_else(|| {
            PolicyError::Unknown(
                name.to_string(),
                POLICIES.iter().map(|p| p.0).collect::<Vec<_>>().join(", "),
            )
        })?;
        out.push(p.0);
    }
    out.dedup();
    Ok(out)
}

fn deny(reason: &'static str) -> crate::hooks::Callback {
    Box::new(move |_| Outcome::block(reason))
}

/// Memory hooks over `[gva, gva+len)`, one per page.
fn mem(
    e: &mut Engine,
    g: &mut dyn Guest,
    name: &'static str,
    gva: u64,
    len: u64,
    rights: Rights,
    reason: &'static str,
) -> Result<Vec<HookId>, PolicyError> {
    let mut ids = Vec::new();
    for (va, n) in crate::decode::split_pages(gva, len) {
        let t = Target::Gva {
            gva: va,
            len: n,
            rights,
            cr3: 0,
            gpa: None,
        };
        let cb: crate::hooks::Callback = Box::new(move |ctx| match ctx.event {
            EventInfo::Mem {
                access: AccessKind::Read,
                ..
            } => Outcome::allow(),
            _ => Outcome::block(reason),
        });
        ids.push(
            e.add_hook(g, t, format!("policy:{name}"), cb)
                .map_err(|err| PolicyError::Hook(name, err))?,
        );
    }
    Ok(ids)
}

/// Switches policies on (a name, a comma list, or `all`) for the current guest state.
pub fn enable(
    e: &mut Engine,
    g: &mut dyn Guest,
    names: &str,
    env: &PolicyEnv,
) -> Result<Vec<HookId>, PolicyError> {
    let mut ids = Vec::new();
    for name in parse_list(names)? {
        ids.extend(enable_one(e, g, name, env)?);
    }
    Ok(ids)
}

fn enable_one(
    e: &mut Engine,
    g: &mut dyn Guest,
    name: &'static str,
    env: &PolicyEnv,
) -> Result<Vec<HookId>, PolicyError> {
    let tag = format!("policy:{name}");
    let hook = |e: &mut Engine, g: &mut dyn Guest, t: Target, why: &'static str| {
        e.add_hook(g, t, tag.clone(), deny(why))
            .map_err(|err| PolicyError::Hook(name, err))
    };
    let mut ids = Vec::new();
    match name {
        "idt" => {
            let idtr = g.sregs().idtr;
            ids.extend(mem(
                e,
                g,
                "idt",
                idtr.base,
                idtr.limit as u64 + 1,
                Rights::W,
                "IDT entry modified",
            )?);
            ids.push(hook(
                e,
                g,
                Target::Dtr { dtr: DtrKind::Idtr },
                "IDTR reloaded",
            )?);
        }
        "gdtr" => ids.push(hook(
            e,
            g,
            Target::Dtr { dtr: DtrKind::Gdtr },
            "GDTR reloaded",
        )?),
        "syscall-msrs" => {
            for (index, why) in [
                (0xc000_0082, "LSTAR (64-bit syscall entry) rewritten"),
                (0xc000_0081, "STAR rewritten"),
                (0xc000_0083, "CSTAR rewritten"),
                (0x174, "SYSENTER_CS rewritten"),
                (0x175, "SYSENTER_ESP rewritten"),
                (0x176, "SYSENTER_EIP rewritten"),
            ] {
                ids.push(hook(
                    e,
                    g,
                    Target::Msr {
                        index,
                        read: false,
                        write: true,
                    },
                    why,
                )?);
            }
        }
        "cr4" => {
            let cb: crate::hooks::Callback = Box::new(|ctx| match *ctx.event {
                // Only clearing SMEP/SMAP is an attack; setting them is hardening.
                EventInfo::Cr { old, new, .. } if old & !new & (3 << 20) != 0 => {
                    Outcome::block("CR4.SMEP/SMAP cleared")
                }
                _ => Outcome::allow(),
            });
            ids.push(
                e.add_hook(
                    g,
                    Target::Cr {
                        cr: Cr::Cr4,
                        mask: 3 << 20,
                    },
                    tag.clone(),
                    cb,
                )
                .map_err(|err| PolicyError::Hook(name, err))?,
            );
        }
        "cr0-wp" => {
            let cb: crate::hooks::Callback = Box::new(|ctx| match *ctx.event {
                EventInfo::Cr { old, new, .. } if old & !new & (1 << 16) != 0 => {
                    Outcome::block("CR0.WP cleared")
                }
                _ => Outcome::allow(),
            });
            ids.push(
                e.add_hook(
                    g,
                    Target::Cr {
                        cr: Cr::Cr0,
                        mask: 1 << 16,
                    },
                    tag.clone(),
                    cb,
                )
                .map_err(|err| PolicyError::Hook(name, err))?,
            );
        }
        "kernel-code" => {
            if env.kernel_code.is_empty() {
                return Err(PolicyError::NoTarget(name));
            }
            for &(gva, len) in &env.kernel_code {
                ids.extend(mem(
                    e,
                    g,
                    "kernel-code",
                    gva,
                    len,
                    Rights::W,
                    "kernel code modified",
                )?);
            }
        }
        "syscall-table" => {
            let (gva, len) = env.syscall_table.ok_or(PolicyError::NoTarget(name))?;
            ids.extend(mem(
                e,
                g,
                "syscall-table",
                gva,
                len,
                Rights::W,
                "system-call table entry modified",
            )?);
        }
        "user-page" => {
            if env.user_pages.is_empty() {
                return Err(PolicyError::NoTarget(name));
            }
            for &p in &env.user_pages {
                ids.extend(mem(
                    e,
                    g,
                    "user-page",
                    p & !0xfff,
                    0x1000,
                    Rights::RWX,
                    "protected user page accessed",
                )?);
            }
        }
        "integrity" => {
            for &(gva, len) in &env.integrity {
                e.add_integrity_region(
                    g,
                    "policy:integrity",
                    gva,
                    len,
                    true,
                    deny("integrity region modified"),
                )
                .map_err(|err| PolicyError::Hook(name, err))?;
            }
        }
        _ => unreachable!("parse_list checked the name"),
    }
    Ok(ids)
}

/// Switches a policy off: flags its hooks for removal.
pub fn disable(e: &mut Engine, name: &str) -> usize {
    let tag = format!("policy:{name}");
    let ids: Vec<HookId> = e
        .hooks()
        .iter()
        .filter(|h| h.name == tag)
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
        assert_eq!(parse_list("all").unwrap().len(), POLICIES.len());
        assert_eq!(parse_list("idt, cr4").unwrap(), ["idt", "cr4"]);
        let e = parse_list("idt,nope").unwrap_err();
        assert!(e.to_string().contains("unknown policy `nope`"));
    }

    #[test]
    fn cr4_policy_blocks_clearing_smep_not_setting_it() {
        let (mut e, mut g) = (Engine::new(), MockGuest::new());
        enable(&mut e, &mut g, "cr4", &PolicyEnv::default()).unwrap();
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
        assert_eq!(disable(&mut e, "cr4"), 1);
        e.commit(&mut g).unwrap();
        assert!(e.hooks().is_empty());
    }
}
