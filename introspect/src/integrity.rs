//! Integrity regions: guest memory too hot to trap, hashed on the timer (the
//! engine's side is `engine/integrity.rs`).

use crate::ctx::Callback;
use crate::glue::Guest;

pub struct Region {
    pub id: u64,
    pub name: String,
    pub gva: u64,
    pub len: u64,
    pub hash: u64,
    /// The bytes at registration, to put back on a violation when `restore`.
    pub original: Vec<u8>,
    pub restore: bool,
    pub(crate) decide: Callback,
}

/// FNV-1a: cheap and good enough to notice a change.
pub fn hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

pub(crate) fn read(g: &dyn Guest, gva: u64, len: u64) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len as usize];
    let mode = g.sregs().paging();
    for (va, n) in crate::decode::split_pages(gva, len) {
        let t = crate::paging::translate(&crate::decode::phys(g), mode, va).ok()?;
        let off = (va - gva) as usize;
        g.read_phys(t.gpa, &mut out[off..off + n as usize]).ok()?;
    }
    Some(out)
}

impl Region {
    /// Writes the registered bytes back (a denied change).
    pub(crate) fn put_back(&self, g: &mut dyn Guest) {
        let mode = g.sregs().paging();
        for (va, n) in crate::decode::split_pages(self.gva, self.len) {
            let gpa = crate::paging::translate(&crate::decode::phys(g), mode, va)
                .ok()
                .map(|t| t.gpa);
            if let Some(gpa) = gpa {
                let off = (va - self.gva) as usize;
                let _ = g.write_phys(gpa, &self.original[off..off + n as usize]);
            }
        }
    }
}
