//! What the loaders share: modules, the aligned copy of an image, and the check
//! that a load lands in RAM above the boot area.

use crate::error::LoadError;
use crate::memory::GuestRam;

/// A module for a multiboot kernel (QEMU's `-initrd a,b` / GRUB's `module`).
#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    pub data: Vec<u8>,
}

/// A copy of an image on an 8-byte boundary. The ELF parser reads headers in
/// place and needs that alignment, which an `include_bytes!` or a sub-slice
/// does not promise.
pub struct Aligned {
    words: Vec<u64>,
    len: usize,
}

impl Aligned {
    pub fn copy(image: &[u8]) -> Aligned {
        let words = image
            .chunks(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..c.len()].copy_from_slice(c);
                u64::from_ne_bytes(b)
            })
            .collect();
        Aligned {
            words,
            len: image.len(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds `len` initialised bytes (`copy` made it from
        // them: len <= words.len() * 8), u8 has no alignment requirement, and
        // the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

/// Checks that `[gpa, gpa+len)` fits in RAM above the VMM's boot structures,
/// which end at `boot_end` (see `boot::ELF_BOOT_AREA_END`).
pub(super) fn check_range(
    ram: &GuestRam,
    gpa: u64,
    len: u64,
    boot_end: u64,
) -> Result<(), LoadError> {
    if gpa < boot_end {
        return Err(LoadError::OverlapsBootArea(gpa, boot_end));
    }
    if !ram.contains(gpa, len) {
        return Err(LoadError::TooBig {
            at: gpa,
            need: len,
            ram: ram.size() >> 20,
        });
    }
    Ok(())
}
