//! Integrity regions: guest memory too hot to trap, hashed on the timer.

use crate::engine::Engine;
use crate::event::EventInfo;
use crate::glue::Guest;
use crate::hooks::{Callback, Class};
use crate::verdict::Verdict;

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

fn read(g: &dyn Guest, gva: u64, len: u64) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len as usize];
    let mode = g.sregs().paging();
    for (va, n) in crate::decode::split_pages(gva, len) {
        let t = crate::paging::translate(&crate::decode::phys(g), mode, va).ok()?;
        let off = (va - gva) as usize;
        g.read_phys(t.gpa, &mut out[off..off + n as usize]).ok()?;
    }
    Some(out)
}

impl Engine {
    /// Registers a region; `decide` is called with an `EventInfo::Integrity` when
    /// its hash changes.
    pub fn add_integrity_region(
        &mut self,
        guest: &dyn Guest,
        name: impl Into<String>,
        gva: u64,
        len: u64,
        restore: bool,
        decide: Callback,
    ) -> Result<u64, crate::engine::HookError> {
        let original = read(guest, gva, len).ok_or(crate::engine::HookError::Unmapped(gva))?;
        let id = self.integrity.len() as u64 + 1;
        self.integrity.push(Region {
            id,
            name: name.into(),
            gva,
            len,
            hash: hash(&original),
            original,
            restore,
            decide,
        });
        Ok(id)
    }
}

/// Re-hashes every region; a change calls its callback and raises an alert.
pub(crate) fn check(e: &mut Engine, g: &mut dyn Guest) {
    for i in 0..e.integrity.len() {
        let (gva, len, old) = (e.integrity[i].gva, e.integrity[i].len, e.integrity[i].hash);
        let Some(now) = read(g, gva, len) else {
            continue;
        };
        let new = hash(&now);
        if new == old {
            continue;
        }
        let info = EventInfo::Integrity {
            gva,
            len,
            old_hash: old,
            new_hash: new,
        };
        let mut decide =
            std::mem::replace(&mut e.integrity[i].decide, Box::new(|_| Default::default()));
        let out = {
            let mut ctx = crate::event::Ctx {
                engine: e,
                guest: &mut *g,
                event: &info,
                hook: 0,
            };
            decide(&mut ctx)
        };
        e.integrity[i].decide = decide;
        let v = e.conclude(g, Class::Timer, &info, None, &[(0, out)]);
        if v == Verdict::NotAllowed && e.integrity[i].restore {
            let orig = e.integrity[i].original.clone();
            let mode = g.sregs().paging();
            for (va, n) in crate::decode::split_pages(gva, len) {
                let gpa = crate::paging::translate(&crate::decode::phys(g), mode, va)
                    .ok()
                    .map(|t| t.gpa);
                if let Some(gpa) = gpa {
                    let off = (va - gva) as usize;
                    let _ = g.write_phys(gpa, &orig[off..off + n as usize]);
                }
            }
        } else {
            e.integrity[i].hash = new;
        }
    }
}
