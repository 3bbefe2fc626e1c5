//! The symbols of an image or a kernel, moved by its KASLR slide once known.

use object::{Object, ObjectSymbol, SymbolKind};

#[derive(Debug, Default, Clone)]
pub struct Symbols {
    /// (address, size, name), sorted by address: link addresses.
    by_addr: Vec<(u64, u64, String)>,
    /// How far the running kernel sits from its link addresses (KASLR), once
    /// known: every address given or taken here is shifted by it. Unknown (0
    /// meanwhile) only for a kernel whose own decompressor picks its base,
    /// until `slide_from` sees the kernel's IDT. Shared by clones (a
    /// journal's copy learns it too).
    slide: std::sync::Arc<std::sync::OnceLock<u64>>,
}

/// KASLR moves the x86-64 kernel by a multiple of its 2 MiB alignment
/// (CONFIG_PHYSICAL_ALIGN is at least that), within its 1 GiB image space.
const SLIDE_ALIGN: u64 = 2 << 20;
const SLIDE_MAX: u64 = 1 << 30;
/// Where the kernel image is mapped (`__START_KERNEL_map`): KASLR moves what
/// lies above it. Per-CPU symbols (offsets from 0) and fixed areas stay put.
const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// How far past a symbol of unknown size (an assembler label, the last
/// symbol before a gap) an address is still named after it.
const UNSIZED_REACH: u64 = 0x1000;

impl Symbols {
    /// Reads the symbol table; an image without one (or not ELF) has no symbols.
    pub fn parse(image: &[u8]) -> Self {
        let copy = vmiscope_vmm::loader::Aligned::copy(image);
        let image = copy.bytes();
        let Ok(file) = object::File::parse(image) else {
            return Symbols::default();
        };
        let by_addr: Vec<(u64, u64, String)> = file
            .symbols()
            .filter(|s| {
                matches!(
                    s.kind(),
                    SymbolKind::Text | SymbolKind::Data | SymbolKind::Unknown
                )
            })
            .filter(|s| s.address() != 0)
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
            .filter(|(_, _, n)| !n.is_empty() && !n.starts_with('.'))
            .collect();
        Symbols::from_entries(by_addr)
    }

    /// Symbols from a list of (address, size, name), any order.
    pub fn from_entries(mut by_addr: Vec<(u64, u64, String)>) -> Self {
        by_addr.sort();
        Symbols {
            by_addr,
            slide: Default::default(),
        }
    }

    /// The kernel's KASLR slide, once known.
    pub fn slide(&self) -> Option<u64> {
        self.slide.get().copied()
    }

    /// Says the kernel runs at its link addresses (no KASLR).
    pub fn set_unslid(&self) {
        let _ = self.slide.set(0);
    }

    /// Learns the slide from a running kernel's IDTR base: the table it points
    /// at must be at one of `links` (tables' link addresses), moved by a whole
    /// multiple of the kernel's alignment within its image space. Returns the
    /// slide when this call found it; a base that fits none leaves it unknown.
    pub fn slide_from(&self, idtr_base: u64, links: impl IntoIterator<Item = u64>) -> Option<u64> {
        if self.slide().is_some() {
            return None;
        }
        let slide = links
            .into_iter()
            .map(|link| idtr_base.wrapping_sub(link))
            .find(|d| d % SLIDE_ALIGN == 0 && *d < SLIDE_MAX)?;
        self.slide.set(slide).ok().map(|()| slide)
    }

    /// `link` as the running kernel has it.
    fn moved(&self, link: u64) -> u64 {
        match link >= KERNEL_MAP {
            true => link.wrapping_add(self.slide().unwrap_or(0)),
            false => link,
        }
    }

    /// The link address of `addr` in the running kernel.
    fn unmoved(&self, addr: u64) -> u64 {
        let d = self.slide().unwrap_or(0);
        match addr >= KERNEL_MAP.wrapping_add(d) {
            true => addr - d,
            false => addr,
        }
    }

    fn link_address(&self, name: &str) -> Option<u64> {
        self.by_addr
            .iter()
            .find(|(_, _, n)| n == name)
            .map(|(a, _, _)| *a)
    }

    /// The symbol's size in bytes (0 when the ELF file does not say).
    pub fn size(&self, name: &str) -> Option<u64> {
        self.by_addr
            .iter()
            .find(|(_, _, n)| n == name)
            .map(|(_, s, _)| *s)
    }

    /// Where the symbol is in the running kernel (its link address plus the slide).
    pub fn get(&self, name: &str) -> Option<u64> {
        self.link_address(name).map(|a| self.moved(a))
    }

    /// The symbol containing `addr`, with the offset. A symbol holds its
    /// size (the ELF's, or the distance to the next for kallsyms and a
    /// System.map); one of unknown size (0) is given `UNSIZED_REACH`. An
    /// address past the end is no symbol's: `sym+0xffdbdfff` would send an
    /// analyst to the wrong place.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let addr = self.unmoved(addr);
        let i = self.by_addr.partition_point(|(a, _, _)| *a <= addr);
        // Several symbols may share an address (aliases, a label at a
        // function's start): the largest size among them decides the reach.
        let (a, _, n) = self.by_addr.get(i.checked_sub(1)?)?;
        let size = self.by_addr[..i]
            .iter()
            .rev()
            .take_while(|(b, _, _)| b == a)
            .map(|(_, s, _)| *s)
            .max()?;
        let reach = if size == 0 { UNSIZED_REACH } else { size };
        (addr - a < reach).then_some((n.as_str(), addr - a))
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// (name, address, size) of every symbol, by address.
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.by_addr
            .iter()
            .map(|(a, s, n)| (n.as_str(), self.moved(*a), *s))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries().map(|(n, a, _)| (n, a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `slide_from` with the tables named.
    fn find_slide(s: &Symbols, base: u64, tables: &[&str]) -> Option<u64> {
        s.slide_from(base, tables.iter().filter_map(|t| s.link_address(t)))
    }

    fn kernel() -> Symbols {
        Symbols::from_entries(vec![
            (0xffff_ffff_8100_0000, 0x10, "startup_64".into()),
            (0xffff_ffff_8200_1000, 0x1000, "idt_table".into()),
            (0xffff_ffff_8300_3000, 0x1000, "bringup_idt_table".into()),
            (0x1_fd40, 8, "current_task".into()),
        ])
    }

    #[test]
    fn a_slide_found_from_the_idt_moves_every_address() {
        let s = kernel();
        let early = s.clone();
        assert_eq!(
            s.get("idt_table"),
            Some(0xffff_ffff_8200_1000),
            "link address until known"
        );
        // IDTR at bringup_idt_table moved by 0x1e00_0000 (a multiple of 2 MiB).
        let found = find_slide(
            &s,
            0xffff_ffff_a100_3000,
            &["idt_table", "bringup_idt_table"],
        );
        assert_eq!(found, Some(0x1e00_0000));
        assert_eq!(s.slide(), Some(0x1e00_0000));
        assert_eq!(s.get("startup_64"), Some(0xffff_ffff_9f00_0000));
        assert_eq!(s.lookup(0xffff_ffff_9f00_0004), Some(("startup_64", 4)));
        assert!(s.iter().any(|e| e == ("startup_64", 0xffff_ffff_9f00_0000)));
        assert_eq!(
            early.get("idt_table"),
            Some(0xffff_ffff_a000_1000),
            "a copy learns it"
        );
        assert_eq!(
            s.get("current_task"),
            Some(0x1_fd40),
            "per-CPU offsets stay"
        );
        assert_eq!(s.lookup(0x1_fd40), Some(("current_task", 0)));
        assert_eq!(find_slide(&s, 0, &["idt_table"]), None, "found once, kept");
    }

    /// An address past a symbol's end is not named after it (the review saw
    /// `sym+0xffdbdfff`); a symbol of unknown size reaches one page.
    #[test]
    fn an_address_past_a_symbols_end_has_no_symbol() {
        let s = Symbols::from_entries(vec![
            (0x1000, 0x10, "f".into()),
            (0x1000, 0, "f_alias".into()),
            (0x3000, 0, "label".into()),
        ]);
        assert_eq!(s.lookup(0x100f).map(|l| l.1), Some(0xf));
        assert_eq!(s.lookup(0x1010), None);
        assert_eq!(s.lookup(0xffff_0000), None);
        assert_eq!(s.lookup(0x3fff), Some(("label", 0xfff)));
        assert_eq!(s.lookup(0x4000), None);
        assert_eq!(s.lookup(0xfff), None);
    }

    #[test]
    fn an_idtr_that_fits_no_table_leaves_the_slide_unknown() {
        let s = kernel();
        // Not a multiple of 2 MiB away, below the table, or beyond 1 GiB.
        for base in [
            0xffff_ffff_8200_2000,
            0xffff_ffff_8000_1000,
            0xffff_ffff_c300_1000,
            0,
        ] {
            assert_eq!(find_slide(&s, base, &["idt_table"]), None, "{base:#x}");
        }
        assert_eq!(s.slide(), None);
        let t = kernel();
        t.set_unslid();
        assert_eq!(find_slide(&t, 0xffff_ffff_8420_1000, &["idt_table"]), None);
        assert_eq!(t.get("idt_table"), Some(0xffff_ffff_8200_1000));
    }
}
