//! Pages the CPU itself reads and writes: a vCPU's live page-table root, its GDT
//! and IDT, and the page of its current stack. A memory hook there traps the
//! CPU's own accesses (page walks, the accessed bit of a segment load, exception
//! frames), which on this host are not routed to the VMM: the guest triple-faults
//! or livelocks with no word. `hook ept|gva` refuses such a hook unless told
//! `force` (adversarial finding F11).

use std::fmt;

use vmiscope_introspect::Rights;

use super::Session;
use crate::error::Error;

/// What a vCPU uses a page for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuUse {
    PageTableRoot,
    /// A lower-level table on the walk to the vCPU's code or stack.
    PageTable,
    Gdt,
    Idt,
    Stack,
}

impl CpuUse {
    /// Whether a hook with `rights` traps the CPU's own use of the page. A hook
    /// is a memslot change: a write hook makes the page read-only to the CPU, a
    /// read or execute hook takes it out of the memory map (KVM offers no
    /// per-page execute permission). So any hook traps what the CPU writes by
    /// itself (accessed/dirty bits of page tables and descriptors, exception
    /// frames on the stack), and a read or execute hook also what it only reads:
    /// the IDT, read at event delivery, keeps working under a write hook (the
    /// `idt` policy's).
    fn trapped_by(self, rights: Rights) -> bool {
        match self {
            CpuUse::Idt => rights.read || rights.exec,
            _ => rights.read || rights.write || rights.exec,
        }
    }
}

impl fmt::Display for CpuUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuUse::PageTableRoot => "live page-table root (CR3)",
            CpuUse::PageTable => "live page table (on the walk to its code or stack)",
            CpuUse::Gdt => "GDT",
            CpuUse::Idt => "IDT",
            CpuUse::Stack => "current stack",
        })
    }
}

/// A guest-physical page (its address, 4 KiB aligned) that vCPU `cpu` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuPage {
    pub page: u64,
    pub cpu: u32,
    pub what: CpuUse,
}

/// The first page of `uses` that a hook with `rights` on the guest-physical
/// pages `hooked` says it covers would trap, as the refusal's text.
pub fn conflict(hooked: impl Fn(u64) -> bool, rights: Rights, uses: &[CpuPage]) -> Option<String> {
    uses.iter()
        .find(|u| u.what.trapped_by(rights) && hooked(u.page))
        .map(|u| {
            format!(
                "gpa {:#x} is vCPU {}'s {}: the CPU itself uses that page, and a hook there \
                 breaks the guest on this host (a triple fault or a livelock); add `force` \
                 to hook it anyway",
                u.page, u.cpu, u.what
            )
        })
}

/// The 4 KiB pages of `[start, start+len)` (len ≥ 1, bounded by the caller).
pub fn pages_of(start: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = start & !0xfff;
    let last = start.saturating_add(len.max(1) - 1) & !0xfff;
    (first..=last).step_by(0x1000)
}

impl Session {
    /// Every page each vCPU uses by itself, read on each vCPU's thread.
    pub(super) fn cpu_pages(&self) -> Result<Vec<CpuPage>, Error> {
        let mut out = Vec::new();
        for cpu in 0..self.shared.vcpu_count() {
            let found = self.on_vcpu(cpu, move |c| {
                let s = c.sregs();
                let mut v = Vec::new();
                let mut add = |page: u64, what: CpuUse| v.push(CpuPage { page, cpu, what });
                if s.cr0 & (1 << 31) != 0 {
                    add(s.cr3 & 0x000f_ffff_ffff_f000, CpuUse::PageTableRoot);
                }
                for (table, what) in [(s.gdt, CpuUse::Gdt), (s.idt, CpuUse::Idt)] {
                    if table.base == 0 && table.limit == 0 {
                        continue;
                    }
                    for va in pages_of(table.base, table.limit as u64 + 1).take(16) {
                        if let Ok(t) = c.translate(va) {
                            add(t.gpa & !0xfff, what);
                        }
                    }
                }
                let regs = c.regs();
                if let Ok(t) = c.translate(regs.rsp) {
                    add(t.gpa & !0xfff, CpuUse::Stack);
                }
                for va in [regs.rip, regs.rsp] {
                    for step in c.translate(va).map(|t| t.steps).unwrap_or_default() {
                        if step.table & !0xfff != s.cr3 & 0x000f_ffff_ffff_f000 {
                            add(step.table & !0xfff, CpuUse::PageTable);
                        }
                    }
                }
                v
            })?;
            out.extend(found);
        }
        Ok(out)
    }

    /// Refuses a memory hook with `rights` on the guest-physical pages `hooked`
    /// says it covers if it would trap a vCPU's own use of a page (see the
    /// module); a warning instead with `force`.
    pub(super) fn check_cpu_pages(
        &self,
        hooked: impl Fn(u64) -> bool,
        rights: Rights,
        force: bool,
    ) -> Result<Option<String>, Error> {
        match conflict(hooked, rights, &self.cpu_pages()?) {
            Some(why) if force => Ok(Some(format!("warning (forced): {why}"))),
            Some(why) => Err(why.into()),
            None => Ok(None),
        }
    }
}

impl Session {
    /// `check_cpu_pages` for a guest-virtual range, where the selected vCPU maps
    /// it (up to 64 Ki pages; the engine refuses an unmapped or oversized range
    /// itself). Used by `hook gva` and by gdb's watchpoints.
    pub(crate) fn check_gva_cpu_pages(
        &self,
        gva: u64,
        len: u64,
        rights: Rights,
        force: bool,
    ) -> Result<Option<String>, Error> {
        let pages: std::collections::HashSet<u64> = self.with_guest(move |c| {
            pages_of(gva, len)
                .take(1 << 16)
                .filter_map(|va| c.translate(va).ok().map(|t| t.gpa & !0xfff))
                .collect()
        })?;
        self.check_cpu_pages(|p| pages.contains(&p), rights, force)
    }
}

/// The 4 KiB pages of `[start, start+len)` as a test (len ≥ 1).
pub fn page_range(start: u64, len: u64) -> impl Fn(u64) -> bool {
    let first = start & !0xfff;
    let last = start.saturating_add(len.max(1) - 1) & !0xfff;
    move |p| p >= first && p <= last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uses() -> Vec<CpuPage> {
        vec![
            CpuPage {
                page: 0x1000,
                cpu: 0,
                what: CpuUse::PageTableRoot,
            },
            CpuPage {
                page: 0x7000,
                cpu: 1,
                what: CpuUse::Stack,
            },
            CpuPage {
                page: 0x9000,
                cpu: 0,
                what: CpuUse::Idt,
            },
        ]
    }

    #[test]
    fn hooks_that_trap_the_cpu_itself_are_named() {
        let rw = Rights::parse("rw").unwrap();
        let w = Rights::parse("w").unwrap();
        let x = Rights::parse("x").unwrap();
        let on = |pages: &'static [u64]| move |p: u64| pages.contains(&p);
        let why = conflict(on(&[0x1000]), rw, &uses()).unwrap();
        assert!(why.contains("vCPU 0's live page-table root"), "{why}");
        assert!(why.contains("force"), "{why}");
        let why = conflict(page_range(0x6800, 0x1000), w, &uses()).unwrap();
        assert!(why.contains("vCPU 1's current stack"), "{why}");
        // Any hook there takes the page from the CPU (even execute-only), but a
        // write hook on the IDT leaves event delivery alone.
        assert!(conflict(on(&[0x9000]), x, &uses()).is_some());
        assert_eq!(conflict(on(&[0x9000]), w, &uses()), None);
        // Pages beside them are fine.
        assert_eq!(conflict(page_range(0x2000, 0x5000), rw, &uses()), None);
        assert_eq!(conflict(on(&[0x8000, 0xa000]), x, &uses()), None);
    }

    #[test]
    fn pages_of_a_range_cover_its_ends() {
        assert_eq!(
            pages_of(0x1ffe, 4).collect::<Vec<_>>(),
            vec![0x1000, 0x2000]
        );
        assert_eq!(pages_of(0x1000, 0x1000).collect::<Vec<_>>(), vec![0x1000]);
        assert_eq!(pages_of(u64::MAX - 1, 2).count(), 1, "no overflow");
    }
}
