//! ELF symbols of an image (for scripts, tests, benchmarks and the console).

use object::{Object, ObjectSymbol, SymbolKind};

#[derive(Debug, Default, Clone)]
pub struct Symbols {
    /// (address, size, name), sorted by address.
    by_addr: Vec<(u64, u64, String)>,
}

impl Symbols {
    /// Reads the symbol table; an image without one (or not ELF) has no symbols.
    pub fn parse(image: &[u8]) -> Self {
        let words = super::image::aligned(image);
        let image = super::image::as_bytes(&words, image.len());
        let Ok(file) = object::File::parse(image) else {
            return Symbols::default();
        };
        let mut by_addr: Vec<(u64, u64, String)> = file
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
        by_addr.sort();
        Symbols { by_addr }
    }

    /// Symbols from a list of (address, size, name), any order.
    pub fn from_entries(mut by_addr: Vec<(u64, u64, String)>) -> Self {
        by_addr.sort();
        Symbols { by_addr }
    }

    /// The symbol's size in bytes (0 when the ELF file does not say).
    pub fn size(&self, name: &str) -> Option<u64> {
        self.by_addr
            .iter()
            .find(|(_, _, n)| n == name)
            .map(|(_, s, _)| *s)
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.by_addr
            .iter()
            .find(|(_, _, n)| n == name)
            .map(|(a, _, _)| *a)
    }

    /// The symbol containing (or the nearest below) `addr`, with the offset.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.by_addr.partition_point(|(a, _, _)| *a <= addr);
        let (a, _, n) = self.by_addr.get(i.checked_sub(1)?)?;
        Some((n.as_str(), addr - a))
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// (name, address, size) of every symbol, by address.
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.by_addr.iter().map(|(a, s, n)| (n.as_str(), *a, *s))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.by_addr.iter().map(|(a, _, n)| (n.as_str(), *a))
    }
}
