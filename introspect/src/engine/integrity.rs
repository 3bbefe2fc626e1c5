//! Integrity regions on the engine: registering one, and re-hashing them all on
//! the timer (a change is an event for the region's callback).

use super::Engine;
use crate::ctx::{Callback, Ctx};
use crate::event::EventInfo;
use crate::glue::Guest;
use crate::integrity::{Region, hash, read};
use crate::target::{Class, HookId};
use crate::verdict::Verdict;

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
    ) -> Result<u64, super::HookError> {
        // Bounded before anything is allocated: the length may come from an
        // image's symbols.
        crate::engine::check_extent(gva, len, guest.ram_size())?;
        let original = read(guest, gva, len).ok_or(super::HookError::Unmapped(gva))?;
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

    /// Re-hashes every region; a change calls its callback and raises an alert.
    pub(crate) fn check_integrity(&mut self, g: &mut dyn Guest) {
        for i in 0..self.integrity.len() {
            let r = &self.integrity[i];
            let (gva, len, old) = (r.gva, r.len, r.hash);
            let Some(now) = read(g, gva, len) else {
                continue;
            };
            let new = hash(&now);
            if new == old {
                continue;
            }
            let changed = r
                .original
                .iter()
                .zip(&now)
                .position(|(a, b)| a != b)
                .unwrap_or(0) as u64;
            let info = EventInfo::Integrity {
                gva,
                len,
                changed,
                old_hash: old,
                new_hash: new,
            };
            let mut decide = std::mem::replace(
                &mut self.integrity[i].decide,
                Box::new(|_| Default::default()),
            );
            let out = decide(&mut Ctx::new(&mut *g, &info, HookId(0), &mut self.requests));
            self.integrity[i].decide = decide;
            let v = self.conclude(g, Class::Timer, &info, None, &[(HookId(0), out)]);
            if v == Verdict::NotAllowed && self.integrity[i].restore {
                self.integrity[i].put_back(g);
            } else {
                self.integrity[i].hash = new;
            }
        }
    }
}
