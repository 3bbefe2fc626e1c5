//! Guest page-table walks (4- and 5-level, 4 KiB / 2 MiB / 1 GiB pages), done in
//! guest memory by software, so no hypervisor call is needed per translation.

use thiserror::Error;

/// Reads guest-physical memory, 8 bytes at a time.
pub trait PhysRead {
    /// The little-endian u64 at `gpa`, or `None` outside guest RAM.
    fn read_u64(&self, gpa: u64) -> Option<u64>;
}

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WalkError {
    #[error("{gva:#x} is not mapped (level {level} entry {entry:#x} not present)")]
    NotPresent { gva: u64, level: u8, entry: u64 },
    #[error("{0:#x} is not canonical")]
    NonCanonical(u64),
    #[error("page table at {0:#x} is outside guest RAM")]
    TableOutsideRam(u64),
}

/// One level of a walk: the table, the index used and the entry found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkStep {
    /// 5 = PML5 ... 1 = PT.
    pub level: u8,
    pub table: u64,
    pub index: u16,
    pub entry: u64,
}

/// A successful translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    pub page_size: u64,
    pub writable: bool,
    pub user: bool,
    pub no_exec: bool,
    /// The entries visited, top level first (empty when paging is off).
    pub steps: Vec<WalkStep>,
}

const PRESENT: u64 = 1;
const WRITE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The paging mode a walk runs in, from CR0/CR4/EFER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingMode {
    pub cr3: u64,
    pub paging: bool,
    pub la57: bool,
    /// CR4.SMEP: CPL0 cannot run code on user-accessible pages.
    pub smep: bool,
}

impl PagingMode {
    /// Long-mode paging as the registers say (`paging` = CR0.PG && EFER.LMA).
    pub fn from_regs(cr0: u64, cr3: u64, cr4: u64, efer: u64) -> Self {
        PagingMode {
            cr3,
            paging: cr0 & (1 << 31) != 0 && efer & (1 << 10) != 0,
            la57: cr4 & (1 << 12) != 0,
            smep: cr4 & (1 << 20) != 0,
        }
    }
}

/// Translates `gva` through the guest's own tables.
pub fn translate(
    mem: &impl PhysRead,
    mode: PagingMode,
    gva: u64,
) -> Result<Translation, WalkError> {
    if !mode.paging {
        return Ok(Translation {
            gpa: gva,
            page_size: 4096,
            writable: true,
            user: true,
            no_exec: false,
            steps: vec![],
        });
    }
    let bits = if mode.la57 { 57 } else { 48 };
    let top = (gva as i64) >> (bits - 1);
    if top != 0 && top != -1 {
        return Err(WalkError::NonCanonical(gva));
    }
    let mut table = mode.cr3 & ADDR_MASK;
    let (mut writable, mut user, mut no_exec) = (true, true, false);
    let mut steps = Vec::with_capacity(5);
    let first = if mode.la57 { 5 } else { 4 };
    for level in (1..=first).rev() {
        let shift = 12 + 9 * (level as u32 - 1);
        let index = ((gva >> shift) & 0x1ff) as u16;
        let addr = table + index as u64 * 8;
        let entry = mem
            .read_u64(addr)
            .ok_or(WalkError::TableOutsideRam(table))?;
        steps.push(WalkStep {
            level,
            table,
            index,
            entry,
        });
        if entry & PRESENT == 0 {
            return Err(WalkError::NotPresent { gva, level, entry });
        }
        writable &= entry & WRITE != 0;
        user &= entry & USER != 0;
        no_exec |= entry & NX != 0;
        if level == 1 || (entry & LARGE != 0 && (level == 2 || level == 3)) {
            let page_size = 1u64 << shift;
            let base = entry & ADDR_MASK & !(page_size - 1);
            return Ok(Translation {
                gpa: base | (gva & (page_size - 1)),
                page_size,
                writable,
                user,
                no_exec,
                steps,
            });
        }
        table = entry & ADDR_MASK;
    }
    unreachable!("the loop returns at level 1")
}

/// A run of guest-virtual pages mapped to contiguous guest-physical memory with
/// the same rights (one line of `vmmap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub gva: u64,
    pub gpa: u64,
    pub len: u64,
    pub writable: bool,
    pub user: bool,
    pub no_exec: bool,
}

/// Every mapping of the address space `mode` describes, coalesced, lowest
/// address first. The guest owns its tables: a walk visits at most `budget`
/// entries (a table that points at itself would otherwise fan out without end),
/// and says whether it stopped early.
pub fn mappings(mem: &impl PhysRead, mode: PagingMode, budget: u64) -> (Vec<Mapping>, bool) {
    let mut w = MapWalk {
        mem,
        out: Vec::new(),
        budget,
        truncated: false,
    };
    if !mode.paging {
        return (w.out, false);
    }
    let top = if mode.la57 { 5 } else { 4 };
    w.table(mode.cr3 & ADDR_MASK, top, 0, (true, true, false), mode.la57);
    (w.out, w.truncated)
}

struct MapWalk<'a, M> {
    mem: &'a M,
    out: Vec<Mapping>,
    budget: u64,
    truncated: bool,
}

impl<M: PhysRead> MapWalk<'_, M> {
    fn table(&mut self, table: u64, level: u8, base: u64, rights: (bool, bool, bool), la57: bool) {
        let shift = 12 + 9 * (level as u32 - 1);
        for i in 0..512u64 {
            if self.budget == 0 {
                self.truncated = true;
                return;
            }
            self.budget -= 1;
            let Some(entry) = self.mem.read_u64(table + i * 8) else {
                return;
            };
            if entry & PRESENT == 0 {
                continue;
            }
            let r = (
                rights.0 && entry & WRITE != 0,
                rights.1 && entry & USER != 0,
                rights.2 || entry & NX != 0,
            );
            let mut gva = base | (i << shift);
            // The top level's upper half is sign-extended (canonical form).
            let bits = if la57 { 57 } else { 48 };
            if gva >> (bits - 1) & 1 == 1 {
                gva |= !((1u64 << bits) - 1);
            }
            if level == 1 || (entry & LARGE != 0 && (level == 2 || level == 3)) {
                let len = 1u64 << shift;
                self.push(Mapping {
                    gva,
                    gpa: entry & ADDR_MASK & !(len - 1),
                    len,
                    writable: r.0,
                    user: r.1,
                    no_exec: r.2,
                });
            } else {
                self.table(entry & ADDR_MASK, level - 1, gva, r, la57);
            }
        }
    }

    fn push(&mut self, m: Mapping) {
        if let Some(last) = self.out.last_mut()
            && last.gva.wrapping_add(last.len) == m.gva
            && last.gpa.wrapping_add(last.len) == m.gpa
            && (last.writable, last.user, last.no_exec) == (m.writable, m.user, m.no_exec)
        {
            last.len += m.len;
            return;
        }
        self.out.push(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Mem(HashMap<u64, u64>);
    impl PhysRead for Mem {
        fn read_u64(&self, gpa: u64) -> Option<u64> {
            if gpa >= 0x100_0000 {
                None
            } else {
                Some(*self.0.get(&gpa).unwrap_or(&0))
            }
        }
    }

    fn mode(cr3: u64) -> PagingMode {
        PagingMode {
            cr3,
            paging: true,
            la57: false,
            smep: false,
        }
    }

    #[test]
    fn walks_4k_2m_and_reports_rights() {
        let mut m = HashMap::new();
        m.insert(0x1000, 0x2000 | 7); // PML4[0]
        m.insert(0x2000, 0x3000 | 7); // PDPT[0]
        m.insert(0x3000, 0x83); // PD[0]: 2 MiB supervisor page at 0
        m.insert(0x3008, 0x4000 | 7); // PD[1] -> PT
        m.insert(0x4000 + 5 * 8, 0x9000 | 5 | NX); // PT[5]: user, read-only, NX
        let mem = Mem(m);
        let t = translate(&mem, mode(0x1000), 0x1234).unwrap();
        assert_eq!((t.gpa, t.page_size, t.user), (0x1234, 2 << 20, false));
        let t = translate(&mem, mode(0x1000), 0x205123).unwrap();
        assert_eq!(
            (t.gpa, t.page_size, t.user, t.writable, t.no_exec),
            (0x9123, 4096, true, false, true)
        );
        assert_eq!(t.steps.len(), 4);
        let e = translate(&mem, mode(0x1000), 0x206000).unwrap_err();
        assert!(matches!(e, WalkError::NotPresent { level: 1, .. }));
        assert_eq!(
            translate(&mem, mode(0x1000), 0x8000_0000_0000),
            Err(WalkError::NonCanonical(0x8000_0000_0000))
        );
        assert_eq!(
            translate(&mem, mode(0x200_0000), 0),
            Err(WalkError::TableOutsideRam(0x200_0000))
        );
        let off = PagingMode {
            cr3: 0,
            paging: false,
            la57: false,
            smep: false,
        };
        assert_eq!(translate(&mem, off, 0xabc).unwrap().gpa, 0xabc);
        let (maps, cut) = mappings(&mem, mode(0x1000), 1 << 20);
        assert!(!cut);
        assert_eq!(
            maps,
            vec![
                Mapping {
                    gva: 0,
                    gpa: 0,
                    len: 2 << 20,
                    writable: true,
                    user: false,
                    no_exec: false
                },
                Mapping {
                    gva: 0x205000,
                    gpa: 0x9000,
                    len: 0x1000,
                    writable: false,
                    user: true,
                    no_exec: true
                },
            ]
        );
    }

    #[test]
    fn a_table_that_points_at_itself_ends_within_the_budget() {
        let mut m = HashMap::new();
        for i in 0..512 {
            m.insert(0x1000 + i * 8, 0x1000 | 7);
        }
        let (_, cut) = mappings(&Mem(m), mode(0x1000), 100_000);
        assert!(cut);
    }
}
