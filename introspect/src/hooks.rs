//! Hooks: what the engine watches and who decides. One registry for every class.
//!
//! Removal is flag-then-commit (HVMI's `HOOK_FLG_REMOVE` + `IntHookCommitAllHooks`):
//! a callback may remove its own hook or others while the dispatcher walks the
//! list, and hooks added during a dispatch are seen by the same dispatch because
//! the walk goes by position over a list that only grows until the commit.

use std::collections::HashMap;

pub use crate::ctx::Callback;
pub use crate::target::{Class, HookId, Owner, Rights, Target};

pub struct Hook {
    pub id: HookId,
    pub target: Target,
    pub name: String,
    pub owner: Owner,
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
    pub(crate) fn insert(
        &mut self,
        target: Target,
        owner: Owner,
        name: String,
        callback: Callback,
    ) -> HookId {
        self.next_id.0 += 1;
        let id = self.next_id;
        for p in target.pages() {
            self.by_page.entry(p).or_default().push(id);
        }
        self.list.push(Hook {
            id,
            target,
            name,
            owner,
            enabled: true,
            removed: false,
            hits: 0,
            callback: Some(callback),
        });
        id
    }

    /// The hook `id`, found by binary search: ids only grow and removal keeps
    /// the order, so the list is sorted by id.
    pub fn get(&self, id: HookId) -> Option<&Hook> {
        let i = self.list.binary_search_by_key(&id, |h| h.id).ok()?;
        self.list.get(i)
    }

    pub(crate) fn get_mut(&mut self, id: HookId) -> Option<&mut Hook> {
        let i = self.list.binary_search_by_key(&id, |h| h.id).ok()?;
        self.list.get_mut(i)
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
        let i = self.list.binary_search_by_key(&id, |h| h.id).ok()?;
        if self.list[i].removed {
            return None;
        }
        self.list[i].removed = true;
        self.removed_pending = true;
        Some(&self.list[i])
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
            for p in h.target.pages() {
                if let Some(v) = self.by_page.get_mut(&p) {
                    v.retain(|id| *id != h.id);
                    if v.is_empty() {
                        self.by_page.remove(&p);
                    }
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
