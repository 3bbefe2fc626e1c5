//! Per-4 KiB-page access control of guest RAM, realised as KVM memslots.
//!
//! KVM has no per-page permission call for a user-space VMM, so a page's access is
//! expressed by the memslot that covers it: a normal slot (full access), a
//! read-only slot (writes exit as MMIO writes: the EPT write-violation equivalent),
//! or no slot at all (reads and writes exit as MMIO, instruction fetches fail: the
//! read/execute-violation equivalent). Changes are batched: `set` only records the
//! wish, `commit` computes the runs of equal access and issues the minimal set of
//! slot deletions and creations.

use std::collections::BTreeMap;

/// How the guest may touch one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    /// Normal RAM.
    Full,
    /// Reads and execution run natively; every write exits.
    WriteTrap,
    /// Every access exits (reads/writes as MMIO, fetches as an emulation failure).
    AllTrap,
}

/// One memslot as KVM sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub id: u32,
    pub first_page: u64,
    pub pages: u64,
    pub read_only: bool,
}

/// What a commit did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    pub deleted: u32,
    pub created: u32,
}

impl CommitStats {
    pub fn ioctls(&self) -> u32 {
        self.deleted + self.created
    }
}

/// The slot operations a commit issues (KVM_SET_USER_MEMORY_REGION in the VMM).
pub trait SlotSink {
    fn create(&mut self, slot: &Slot) -> std::io::Result<()>;
    fn delete(&mut self, slot: &Slot) -> std::io::Result<()>;
}

/// The planner: wished access per page and the slots currently installed.
///
/// A page opened for a step-over (`open`) is installed as `Full` until it is
/// closed, whatever its wished access becomes meanwhile: the wish (the
/// engine's, from a hook edit on any thread) and the opening (a vCPU's, for one
/// instruction) are kept apart, so neither undoes the other. Before, the
/// step-over saved the page's access and set it back afterwards: a hook edit
/// made during the step was lost, or a page stayed trapped with no hook left.
#[derive(Debug)]
pub struct SlotMap {
    pages: u64,
    wished: BTreeMap<u64, Access>,
    /// Pages opened for step-overs, with how many are open on each (vCPUs
    /// may step on the same page at once).
    opened: BTreeMap<u64, u32>,
    installed: BTreeMap<u64, Slot>,
    free_ids: Vec<u32>,
    next_id: u32,
    dirty: bool,
}

impl SlotMap {
    /// A map of `pages` pages, all `Full`, with nothing installed yet (commit installs).
    pub fn new(pages: u64) -> Self {
        SlotMap {
            pages,
            wished: BTreeMap::new(),
            opened: BTreeMap::new(),
            installed: BTreeMap::new(),
            free_ids: vec![],
            next_id: 0,
            dirty: true,
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Records the wished access of `page`; returns whether it changed.
    pub fn set(&mut self, page: u64, access: Access) -> bool {
        assert!(page < self.pages, "page {page:#x} outside RAM");
        let old = self.access(page);
        if old == access {
            return false;
        }
        if access == Access::Full {
            self.wished.remove(&page);
        } else {
            self.wished.insert(page, access);
        }
        self.dirty = true;
        true
    }

    /// The wished access of `page` (what the guest sees once committed).
    pub fn access(&self, page: u64) -> Access {
        *self.wished.get(&page).unwrap_or(&Access::Full)
    }

    /// Installs `page` as `Full` until as many `close`s (a step-over runs the
    /// instruction there); its wished access is kept.
    pub fn open(&mut self, page: u64) {
        assert!(page < self.pages, "page {page:#x} outside RAM");
        *self.opened.entry(page).or_default() += 1;
        self.dirty = true;
    }

    /// Ends one `open` of `page`: once none is left, its wished access is
    /// installed again (the one of now, not the one at `open`).
    pub fn close(&mut self, page: u64) {
        if let Some(n) = self.opened.get_mut(&page) {
            *n -= 1;
            if *n == 0 {
                self.opened.remove(&page);
            }
            self.dirty = true;
        }
    }

    /// What is installed for `page` once committed: `Full` while opened. What
    /// an exit on the page is judged by (a fetch fault on a page opened for a
    /// step is not our execute trap).
    pub fn installed_access(&self, page: u64) -> Access {
        match self.opened.contains_key(&page) {
            true => Access::Full,
            false => self.access(page),
        }
    }

    /// Pages whose access is not `Full`.
    pub fn trapped(&self) -> impl Iterator<Item = (u64, Access)> + '_ {
        self.wished.iter().map(|(p, a)| (*p, *a))
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    pub fn installed(&self) -> impl Iterator<Item = &Slot> {
        self.installed.values()
    }

    /// The runs of equal access that slots must cover: (first page, pages, read-only).
    fn wanted_runs(&self) -> Vec<(u64, u64, bool)> {
        let mut runs = Vec::new();
        let mut cursor = 0u64;
        let push = |runs: &mut Vec<(u64, u64, bool)>, first: u64, pages: u64, ro: bool| {
            if pages == 0 {
                return;
            }
            match runs.last_mut() {
                Some((f, n, r)) if *r == ro && *f + *n == first => *n += pages,
                _ => runs.push((first, pages, ro)),
            }
        };
        for &page in self.wished.keys() {
            let access = self.installed_access(page);
            if access == Access::Full {
                continue;
            }
            push(&mut runs, cursor, page - cursor, false);
            if access == Access::WriteTrap {
                push(&mut runs, page, 1, true);
            }
            cursor = page + 1;
        }
        push(&mut runs, cursor, self.pages - cursor, false);
        runs
    }

    /// Brings the installed slots in line with the wished access, deleting and
    /// creating only the slots that differ. Deletions go first: KVM refuses
    /// overlapping slots.
    pub fn commit(&mut self, sink: &mut dyn SlotSink) -> std::io::Result<CommitStats> {
        let mut stats = CommitStats::default();
        if !self.dirty {
            return Ok(stats);
        }
        let wanted = self.wanted_runs();
        let keep = |s: &Slot| {
            wanted
                .iter()
                .any(|&(f, n, ro)| s.first_page == f && s.pages == n && s.read_only == ro)
        };
        let stale: Vec<Slot> = self
            .installed
            .values()
            .filter(|s| !keep(s))
            .copied()
            .collect();
        for s in stale {
            sink.delete(&s)?;
            self.installed.remove(&s.first_page);
            self.free_ids.push(s.id);
            stats.deleted += 1;
        }
        for (first, pages, ro) in wanted {
            if self.installed.contains_key(&first) {
                continue;
            }
            let id = self.free_ids.pop().unwrap_or_else(|| {
                self.next_id += 1;
                self.next_id - 1
            });
            let slot = Slot {
                id,
                first_page: first,
                pages,
                read_only: ro,
            };
            sink.create(&slot)?;
            self.installed.insert(first, slot);
            stats.created += 1;
        }
        self.dirty = false;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<String>);
    impl SlotSink for Recorder {
        fn create(&mut self, s: &Slot) -> std::io::Result<()> {
            self.0.push(format!(
                "+{}:{:#x}+{}{}",
                s.id,
                s.first_page,
                s.pages,
                if s.read_only { "ro" } else { "" }
            ));
            Ok(())
        }
        fn delete(&mut self, s: &Slot) -> std::io::Result<()> {
            self.0.push(format!("-{}", s.id));
            Ok(())
        }
    }

    #[test]
    fn protect_and_unprotect_a_page_in_the_middle() {
        let mut m = SlotMap::new(0x100);
        let mut r = Recorder::default();
        assert_eq!(
            m.commit(&mut r).unwrap(),
            CommitStats {
                deleted: 0,
                created: 1
            }
        );
        assert_eq!(r.0, ["+0:0x0+256"]);
        r.0.clear();
        assert!(m.set(0x10, Access::WriteTrap));
        assert!(!m.set(0x10, Access::WriteTrap));
        let st = m.commit(&mut r).unwrap();
        assert_eq!(st.ioctls(), 4);
        assert_eq!(r.0, ["-0", "+0:0x0+16", "+1:0x10+1ro", "+2:0x11+239"]);
        r.0.clear();
        m.set(0x10, Access::Full);
        m.commit(&mut r).unwrap();
        assert_eq!(r.0.len(), 4);
        assert_eq!(m.installed().count(), 1);
    }

    #[test]
    fn all_trap_leaves_a_hole_and_neighbours_merge() {
        let mut m = SlotMap::new(8);
        let mut r = Recorder::default();
        m.set(3, Access::AllTrap);
        m.set(4, Access::WriteTrap);
        m.set(5, Access::WriteTrap);
        m.commit(&mut r).unwrap();
        assert_eq!(r.0, ["+0:0x0+3", "+1:0x4+2ro", "+2:0x6+2"]);
        assert_eq!(m.access(3), Access::AllTrap);
        // A batch: two changes, one commit, only the slots that differ are touched.
        r.0.clear();
        m.set(3, Access::Full);
        m.set(5, Access::Full);
        m.commit(&mut r).unwrap();
        assert_eq!(
            r.0,
            ["-0", "-1", "-2", "+2:0x0+4", "+1:0x4+1ro", "+0:0x5+3"]
        );
        r.0.clear();
        assert_eq!(m.commit(&mut r).unwrap().ioctls(), 0);
    }

    #[test]
    fn a_hook_edit_during_a_step_over_is_kept_when_the_page_closes() {
        let mut m = SlotMap::new(8);
        let mut r = Recorder::default();
        m.set(3, Access::AllTrap);
        m.commit(&mut r).unwrap();
        // A vCPU opens page 3 to step over an instruction there.
        m.open(3);
        m.commit(&mut r).unwrap();
        assert_eq!(m.installed().count(), 1, "page 3 installed as Full");
        // Meanwhile the last hook there goes (another thread's commit).
        m.set(3, Access::Full);
        m.commit(&mut r).unwrap();
        // The step ends: the page stays Full, as now wished (before, the
        // step-over put back the AllTrap it saw when it began).
        m.close(3);
        m.commit(&mut r).unwrap();
        assert_eq!(m.access(3), Access::Full);
        assert_eq!(m.installed().count(), 1);
        // And a trap added during a step holds once the step ends.
        m.open(5);
        m.set(5, Access::WriteTrap);
        m.commit(&mut r).unwrap();
        assert_eq!(m.installed().count(), 1, "open: Full while the step runs");
        m.close(5);
        m.commit(&mut r).unwrap();
        assert!(m.installed().any(|s| s.first_page == 5 && s.read_only));
        // Two vCPUs on one page: it closes with the second.
        m.set(6, Access::AllTrap);
        m.open(6);
        m.open(6);
        m.close(6);
        m.commit(&mut r).unwrap();
        assert!(
            m.installed()
                .any(|s| s.first_page <= 6 && 6 < s.first_page + s.pages)
        );
        m.close(6);
        m.commit(&mut r).unwrap();
        assert!(
            !m.installed()
                .any(|s| s.first_page <= 6 && 6 < s.first_page + s.pages)
        );
    }
}
