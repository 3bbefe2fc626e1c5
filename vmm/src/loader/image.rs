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

/// The ELF parser reads headers in place and needs 8-byte alignment, which an
/// `include_bytes!` or a sub-slice does not promise: copy into u64 words.
pub(crate) fn aligned(image: &[u8]) -> Vec<u64> {
    image
        .chunks(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            u64::from_ne_bytes(b)
        })
        .collect()
}

pub(crate) fn as_bytes(words: &[u64], len: usize) -> &[u8] {
    assert!(len <= words.len() * 8);
    // SAFETY: `words` holds at least `len` initialised bytes, u8 has no alignment
    // requirement, and the returned slice borrows `words`.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, len) }
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
