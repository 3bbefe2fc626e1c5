//! Hooks: what the engine watches and who decides. One registry for every class.
//!
//! Removal is flag-then-commit (HVMI's `HOOK_FLG_REMOVE` + `IntHookCommitAllHooks`):
//! a callback may remove its own hook or others while the dispatcher walks the
//! list, and hooks added during a dispatch are seen by the same dispatch because
//! the walk goes by position over a list that only grows until the commit.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::arch::{Cr, DtrKind};
use crate::event::Ctx;
use crate::verdict::Outcome;

pub type HookId = u64;

/// Which accesses a memory hook wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Rights {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Rights {
    pub const W: Rights = Rights {
        read: false,
        write: true,
        exec: false,
    };
    pub const R: Rights = Rights {
        read: true,
        write: false,
        exec: false,
    };
    pub const X: Rights = Rights {
        read: false,
        write: false,
        exec: true,
    };
    pub const RWX: Rights = Rights {
        read: true,
        write: true,
        exec: true,
    };

    pub fn parse(s: &str) -> Option<Rights> {
        let mut r = Rights::default();
        for c in s.chars() {
            match c {
                'r' => r.read = true,
                'w' => r.write = true,
                'x' => r.exec = true,
                _ => return None,
            }
        }
        (r != Rights::default()).then_some(r)
    }

    pub fn any(self, other: Rights) -> bool {
        (self.read && other.read) || (self.write && other.write) || (self.exec && other.exec)
    }
}

impl std::fmt::Display for Rights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = |b: bool, ch: char| if b { ch } else { '-' };
        write!(
            f,
            "{}{}{}",
            c(self.read, 'r'),
            c(self.write, 'w'),
            c(self.exec, 'x')
        )
    }
}

/// What a hook watches.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "class", rename_all = "kebab-case")]
pub enum Target {
    /// Guest-physical range inside one page.
    Gpa {
        gpa: u64,
        len: u64,
        rights: Rights,
    },
    /// Guest-virtual range inside one page, translated through `cr3`; `gpa` is
    /// where it is mapped now (None: not present). The hook follows remaps.
    Gva {
        gva: u64,
        len: u64,
        rights: Rights,
        cr3: u64,
        gpa: Option<u64>,
    },
    Msr {
        index: u32,
        read: bool,
        write: bool,
    },
    /// A control-register write changing any bit of `mask`.
    Cr {
        cr: Cr,
        mask: u64,
    },
    Dtr {
        dtr: DtrKind,
    },
    Xcr {
        index: u32,
    },
    /// An INT3 at `gva` (mapped at `gpa`). `hidden`: guest reads of the byte return
    /// the original (the page is read-trapped for that, so every instruction
    /// fetched from it also exits: expensive on code pages, see `vmiscope bench`).
    Breakpoint {
        gva: u64,
        gpa: u64,
        hidden: bool,
    },
    /// Introcall sub-op (None: every one).
    Introcall {
        op: Option<u64>,
    },
}

impl Target {
    pub fn class(&self) -> Class {
        match self {
            Target::Gpa { .. } | Target::Gva { .. } => Class::Ept,
            Target::Msr { .. } => Class::Msr,
            Target::Cr { .. } => Class::Cr,
            Target::Dtr { .. } => Class::Dtr,
            Target::Xcr { .. } => Class::Xcr,
            Target::Breakpoint { .. } => Class::Breakpoint,
            Target::Introcall { .. } => Class::Introcall,
        }
    }

    /// The guest-physical page this hook occupies, for memory hooks.
    pub fn page(&self) -> Option<u64> {
        match self {
            Target::Gpa { gpa, .. } => Some(gpa & !0xfff),
            Target::Gva { gpa: Some(g), .. } => Some(g & !0xfff),
            Target::Breakpoint { gpa, .. } => Some(gpa & !0xfff),
            _ => None,
        }
    }

    /// For memory hooks: (offset in page, length, rights).
    pub fn range(&self) -> Option<(u64, u64, Rights)> {
        match *self {
            Target::Gpa { gpa, len, rights } => Some((gpa & 0xfff, len, rights)),
            Target::Gva {
                gva,
                len,
                rights,
                gpa: Some(_),
                ..
            } => Some((gva & 0xfff, len, rights)),
            // A hidden breakpoint hides its byte from reads.
            Target::Breakpoint {
                gpa, hidden: true, ..
            } => Some((gpa & 0xfff, 1, Rights::R)),
            _ => None,
        }
    }
}

/// Event classes, each with its own exit switched on by the first hook of the
/// class and off by the last (HVMI's IntEnable*/IntDisable*Notifications).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    Ept,
    Msr,
    Cr,
    Dtr,
    Xcr,
    Breakpoint,
    Introcall,
    Timer,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Ept => "ept",
            Class::Msr => "msr",
            Class::Cr => "cr",
            Class::Dtr => "dtr",
            Class::Xcr => "xcr",
            Class::Breakpoint => "breakpoint",
            Class::Introcall => "introcall",
            Class::Timer => "timer",
        }
    }

    pub fn parse(s: &str) -> Option<Class> {
        Some(match s {
            "ept" | "mem" => Class::Ept,
            "msr" => Class::Msr,
            "cr" => Class::Cr,
            "dtr" => Class::Dtr,
            "xcr" => Class::Xcr,
            "breakpoint" | "bp" => Class::Breakpoint,
            "introcall" => Class::Introcall,
            "timer" => Class::Timer,
            _ => return None,
        })
    }
}

/// A hook callback. It gets the event, the guest, and the engine (to add or remove
/// hooks, including its own).
pub type Callback = Box<dyn FnMut(&mut Ctx<'_>) -> Outcome + Send>;

pub struct Hook {
    pub id: HookId,
    pub target: Target,
    pub name: String,
    pub enabled: bool,
    /// Flagged for removal; deleted at the next commit.
    pub removed: bool,
    pub hits: u64,
    pub(crate) callback: Option<Callback>,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("id", &self.id)
            .field("target", &self.target)
            .field("name", &self.name)
            .finish()
    }
}

/// The registry: hooks in insertion order plus a per-page index.
#[derive(Default)]
pub struct Hooks {
    list: Vec<Hook>,
    next_id: HookId,
    by_page: HashMap<u64, Vec<HookId>>,
    removed_pending: bool,
}

impl Hooks {
    pub(crate) fn insert(&mut self, target: Target, name: String, callback: Callback) -> HookId {
        self.next_id += 1;
        let id = self.next_id;
        if let Some(p) = target.page() {
            self.by_page.entry(p).or_default().push(id);
        }
        self.list.push(Hook {
            id,
            target,
            name,
            enabled: true,
            removed: false,
            hits: 0,
            callback: Some(callback),
        });
        id
    }

    pub fn get(&self, id: HookId) -> Option<&Hook> {
        self.list.iter().find(|h| h.id == id)
    }

    pub(crate) fn get_mut(&mut self, id: HookId) -> Option<&mut Hook> {
        self.list.iter_mut().find(|h| h.id == id)
    }

    /// Live hooks (not flagged for removal).
    pub fn iter(&self) -> impl Iterator<Item = &Hook> {
        self.list.iter().filter(|h| !h.removed)
    }

    /// The id at `pos` among hooks on `page` (None past the end): the dispatcher
    /// walks by position, so hooks appended meanwhile are visited too.
    pub(crate) fn on_page_at(&self, page: u64, pos: usize) -> Option<HookId> {
        self.by_page.get(&page).and_then(|v| v.get(pos)).copied()
    }

    pub(crate) fn at(&self, pos: usize) -> Option<HookId> {
        self.list.get(pos).map(|h| h.id)
    }

    /// Flags a hook for removal; it stops firing at once.
    pub(crate) fn flag_removed(&mut self, id: HookId) -> Option<&Hook> {
        let h = self.list.iter_mut().find(|h| h.id == id && !h.removed)?;
        h.removed = true;
        self.removed_pending = true;
        Some(h)
    }

    pub fn has_removed(&self) -> bool {
        self.removed_pending
    }

    /// Deletes every flagged hook; returns them (the engine undoes their controls).
    pub(crate) fn commit(&mut self) -> Vec<Hook> {
        if !self.removed_pending {
            return vec![];
        }
        self.removed_pending = false;
        let (gone, keep): (Vec<Hook>, Vec<Hook>) = std::mem::take(&mut self.list)
            .into_iter()
            .partition(|h| h.removed);
        self.list = keep;
        for h in &gone {
            if let Some(p) = h.target.page()
                && let Some(v) = self.by_page.get_mut(&p)
            {
                v.retain(|id| *id != h.id);
                if v.is_empty() {
                    self.by_page.remove(&p);
                }
            }
        }
        gone
    }

    /// Moves a GVA hook to a new page (the guest remapped it).
    pub(crate) fn repage(&mut self, id: HookId, new_gpa: Option<u64>) {
        let Some(h) = self.list.iter_mut().find(|h| h.id == id) else {
            return;
        };
        if let Some(p) = h.target.page()
            && let Some(v) = self.by_page.get_mut(&p)
        {
            v.retain(|x| *x != id);
        }
        if let Target::Gva { gpa, .. } = &mut h.target {
            *gpa = new_gpa;
        }
        if let Some(p) = h.target.page() {
            self.by_page.entry(p).or_default().push(id);
        }
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
