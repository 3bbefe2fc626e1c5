//! Hooks and policies: hook, hooks, hook enable/disable/delete, protect, unprotect.

use std::fmt::Write as _;

use crate::error::Error;

use vmiscope_introspect::Policy;
use vmiscope_introspect::{DtrKind, HookId, Outcome, Target};
use vmiscope_vmm::VcpuCtl;

use super::{Output, Session};
use crate::commands::{Action, HookSpec, ProtectArg};
use crate::format::*;

impl Session {
    /// `protect list`, or policies on: at once when the guest has its IDT, else
    /// armed for when it loads one (as `--protect` does).
    pub(super) fn protect(&mut self, arg: ProtectArg) -> Result<Output, Error> {
        let policies = match arg {
            ProtectArg::List => {
                return Ok(Output::text(
                    Policy::ALL
                        .iter()
                        .map(|p| format!("{:<14} {}\n", p.name(), p.description()))
                        .collect::<String>(),
                ));
            }
            ProtectArg::Policies(p) => p,
        };
        let names = policies
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(",");
        if self.with_guest(|cpu| VcpuCtl::sregs(cpu).idt.base)? == 0 {
            // At entry the guest has no IDT yet: arm the policy for when it does,
            // as `--protect` does.
            self.record_policies(&policies);
            self.intro.enable_when_ready(policies);
            return Ok(Output::text(format!(
                "policy {names} armed: it switches on when the guest loads its own IDT"
            )));
        }
        let intro = self.intro.clone();
        let wanted = policies.clone();
        let ids = self.with_guest(move |cpu| intro.enable_policies(cpu, &wanted))??;
        self.record_policies(&policies);
        Ok(Output::text(format!("policy {names} on: hooks {ids:?}")))
    }

    /// Policies the console switches on go in the journal (`protect`
    /// records) and in `journal save`'s header, as `--protect`'s do.
    fn record_policies(&mut self, policies: &[Policy]) {
        self.intro.journal_protect(policies);
        let mut info = self.info.lock().unwrap();
        for p in policies {
            if !info.policies.iter().any(|n| n == p.name()) {
                info.policies.push(p.name().to_string());
            }
        }
    }

    pub(super) fn hook_enable(&mut self, id: HookId, on: bool) -> Result<Output, Error> {
        self.intro.set_hook_enabled(id, on)?;
        Ok(Output::text(format!(
            "hook {id} {}",
            if on { "enabled" } else { "disabled" }
        )))
    }

    pub(super) fn hook_delete(&mut self, id: HookId) -> Result<Output, Error> {
        self.intro.remove_hook(&self.shared, id)?;
        Ok(Output::text(format!("hook {id} deleted")))
    }

    pub(super) fn unprotect(&mut self, name: Policy) -> Result<Output, Error> {
        let n = self.intro.disable_policy(&self.shared, name)?;
        if n == 0 {
            return Err(format!("policy {name} is not on").into());
        }
        Ok(Output::text(format!(
            "policy {name} off ({n} hooks removed)"
        )))
    }

    pub(super) fn add_hook(&mut self, spec: HookSpec) -> Result<Output, Error> {
        // Named by who made it and what it watches; `hooks` shows its id.
        let action = spec.action();
        let name = format!(
            "console:{}",
            match &spec {
                HookSpec::Ept { .. } => "ept",
                HookSpec::Gva { .. } => "gva",
                HookSpec::Msr { .. } => "msr",
                HookSpec::Cr { .. } => "cr",
                HookSpec::Dtr { .. } => "dtr",
                HookSpec::Xcr { .. } => "xcr",
                HookSpec::Bp { .. } => "bp",
                HookSpec::Introcall { .. } => "introcall",
            },
        );
        let deny_cb = |act: Action| -> vmiscope_introspect::Callback {
            match act {
                Action::Log => Box::new(|_| Outcome::allow()),
                Action::Deny => {
                    Box::new(|ctx| Outcome::block(format!("console hook {} denied it", ctx.hook)))
                }
            }
        };
        let warning = self.check_hook_pages(&spec)?;
        let (target, cb): (Target, vmiscope_introspect::Callback) = match spec {
            HookSpec::Ept {
                gpa,
                len,
                rights,
                action,
                ..
            } => (Target::Gpa { gpa, len, rights }, deny_cb(action)),
            HookSpec::Gva {
                gva,
                len,
                rights,
                action,
                ..
            } => (
                Target::Gva {
                    gva,
                    len,
                    rights,
                    cr3: 0,
                    gpa: None,
                },
                deny_cb(action),
            ),
            HookSpec::Msr {
                index,
                read,
                write,
                action,
            } => (Target::Msr { index, read, write }, deny_cb(action)),
            HookSpec::Cr { cr, mask, action } => (Target::Cr { cr, mask }, deny_cb(action)),
            HookSpec::Dtr { idtr, action } => (
                Target::Dtr {
                    dtr: if idtr { DtrKind::Idtr } else { DtrKind::Gdtr },
                },
                deny_cb(action),
            ),
            HookSpec::Xcr { action } => (Target::Xcr { index: 0 }, deny_cb(action)),
            HookSpec::Bp { addr, hidden } => (
                Target::Breakpoint {
                    gva: addr,
                    gpa: 0,
                    hidden,
                },
                Box::new(|_| Outcome::allow()),
            ),
            HookSpec::Introcall { op, value } => (
                Target::Introcall { op },
                Box::new(move |ctx| {
                    ctx.answer_introcall(value);
                    Outcome::allow()
                }),
            ),
        };
        // VM-wide: made here while the vCPUs run on (a guest-virtual target
        // is resolved with the selected vCPU's page tables at its last exit).
        let id = self
            .intro
            .add_hook(&self.shared, self.vcpu, target, name, cb)?;
        if let Some(a) = action {
            self.hook_actions.lock().unwrap().insert(id, a);
        }
        Ok(Output::text(match warning {
            Some(w) => format!("{w}\nhook {id} added"),
            None => format!("hook {id} added"),
        }))
    }

    /// A memory hook's check against the pages the vCPUs use by themselves
    /// (`cpu_pages`); other hooks pass.
    fn check_hook_pages(&self, spec: &HookSpec) -> Result<Option<String>, Error> {
        let in_use = self.check_pages_in_use(spec)?;
        // The pages in use now are checked; those the guest takes later (its
        // stacks, page tables, IDT) cannot be: a range this wide will hold
        // some. One over all RAM above 4 MiB crawled `hello` and killed a
        // third-party kernel at its first exception, with no word.
        let len = match *spec {
            HookSpec::Ept { len, .. } | HookSpec::Gva { len, .. } => len,
            _ => 0,
        };
        let wide = (len > WIDE_HOOK).then(|| {
            format!(
                "warning: this hook spans {} MiB: pages the guest takes later for its stacks, page \
                 tables or IDT are likely in it, and every access to them becomes an event (the \
                 guest slows to a crawl; with deny it may fault at its first exception)",
                len >> 20
            )
        });
        Ok(match (in_use, wide) {
            (Some(a), Some(b)) => Some(format!("{a}\n{b}")),
            (a, b) => a.or(b),
        })
    }

    /// The pages the vCPUs use by themselves now (see `cpu_pages`).
    fn check_pages_in_use(&self, spec: &HookSpec) -> Result<Option<String>, Error> {
        match *spec {
            HookSpec::Ept {
                gpa,
                len,
                rights,
                force,
                ..
            } => self.check_cpu_pages(super::cpu_pages::page_range(gpa, len), rights, force),
            HookSpec::Gva {
                gva,
                len,
                rights,
                force,
                ..
            } => self.check_gva_cpu_pages(gva, len, rights, force),
            _ => Ok(None),
        }
    }

    pub fn hooks_text(&self) -> String {
        let mut t = String::new();
        for r in hook_rows(
            &self.intro.hooks(),
            self.intro.log_only(),
            &self.hook_actions(),
        ) {
            let _ = writeln!(
                t,
                "{:>4} {:<10} {:<22} hits {:<6} {} {:<4} {}",
                r.ids,
                r.class,
                r.name,
                r.hits,
                if r.enabled { "on " } else { "off" },
                r.action,
                r.what
            );
        }
        if !t.is_empty() {
            return t;
        }
        match self.intro.armed() {
            0 => "no hooks".into(),
            n => format!(
                "no hooks yet: {n} policy set-up(s) armed, switching on when the guest loads its own IDT"
            ),
        }
    }
}

/// A memory hook wider than this is warned about (see `check_hook_pages`).
const WIDE_HOOK: u64 = 16 << 20;

/// One line of `hooks` or `stats`: a hook, or a policy's hooks of one class
/// together (`kernel-code` puts one on every page of a kernel's text: 3,596
/// lines for Debian's).
pub(crate) struct HookRow {
    pub ids: String,
    pub class: &'static str,
    pub name: String,
    pub hits: u64,
    pub enabled: bool,
    /// `deny` or `log`: what a hit does (a policy's hooks only log in
    /// log-only mode; a console hook was made one or the other).
    pub action: &'static str,
    pub what: String,
}

/// `actions`: what each console hook was made to do (see `Session::hook_actions`).
pub(crate) fn hook_rows(
    hooks: &[vmiscope_monitor::HookInfo],
    log_only: bool,
    actions: &std::collections::HashMap<HookId, Action>,
) -> Vec<HookRow> {
    use vmiscope_introspect::Owner;
    let mut rows: Vec<HookRow> = vec![];
    let mut groups: std::collections::BTreeMap<
        (String, &'static str),
        Vec<&vmiscope_monitor::HookInfo>,
    > = Default::default();
    for h in hooks {
        let class = h.target.class().name();
        match h.owner {
            Owner::Policy(_) => groups.entry((h.name.clone(), class)).or_default().push(h),
            _ => rows.push(HookRow {
                ids: h.id.to_string(),
                class,
                name: h.name.clone(),
                hits: h.hits,
                enabled: h.enabled,
                action: match (&h.target, actions.get(&h.id)) {
                    (Target::Breakpoint { .. } | Target::Introcall { .. }, _) => "",
                    (_, Some(Action::Deny)) => "deny",
                    _ => "log",
                },
                what: target_text(&h.target),
            }),
        }
    }
    for ((name, class), hs) in groups {
        let (first, last) = (hs[0], hs[hs.len() - 1]);
        rows.push(HookRow {
            ids: match hs.len() {
                1 => first.id.to_string(),
                _ => format!("{}-{}", first.id, last.id),
            },
            class,
            name,
            hits: hs.iter().map(|h| h.hits).sum(),
            enabled: hs.iter().any(|h| h.enabled),
            action: if log_only { "log" } else { "deny" },
            what: match hs.len() {
                1 => target_text(&first.target),
                n => format!("{n} hooks, the first {}", target_text(&first.target)),
            },
        });
    }
    rows.sort_by_key(|r| r.ids.split('-').next().and_then(|i| i.parse::<u64>().ok()));
    rows
}
