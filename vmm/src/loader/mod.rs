//! Image loaders: ELF64 entered directly in long mode, and multiboot v1 kernels
//! entered in 32-bit protected mode with paging off (as QEMU's `-kernel` does).

mod boot;
mod elf;
mod multiboot;
mod symbols;

pub use boot::{BOOT_AREA_END, EntryState, regs as regs_for, sregs as sregs_for, write_boot_area};
pub use symbols::Symbols;

use crate::error::LoadError;
use crate::memory::GuestRam;

/// A module for a multiboot kernel (QEMU's `-initrd a,b` / GRUB's `module`).
#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    pub data: Vec<u8>,
}

/// A loaded image: how to enter it, and its symbols.
#[derive(Debug)]
pub struct Loaded {
    pub entry: EntryState,
    pub symbols: Symbols,
    pub format: &'static str,
}

/// Loads `image` into `ram`: a multiboot header wins (as in QEMU), else ELF64.
pub fn load(
    ram: &GuestRam,
    image: &[u8],
    cmdline: &str,
    modules: &[Module],
) -> Result<Loaded, LoadError> {
    if image.is_empty() {
        return Err(LoadError::Empty);
    }
    let words = aligned(image);
    let image = as_bytes(&words, image.len());
    let symbols = Symbols::parse(image);
    if let Some(header) = multiboot::find_header(image)? {
        let entry = multiboot::load(ram, image, &header, cmdline, modules)?;
        return Ok(Loaded {
            entry,
            symbols,
            format: "multiboot v1",
        });
    }
    if !modules.is_empty() {
        return Err(LoadError::Module(
            modules[0].name.clone(),
            "modules need a multiboot kernel".into(),
        ));
    }
    let entry = elf::load(ram, image)?;
    Ok(Loaded {
        entry,
        symbols,
        format: "ELF64",
    })
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

/// Checks that `[gpa, gpa+len)` fits in RAM above the boot area.
fn check_range(ram: &GuestRam, gpa: u64, len: u64) -> Result<(), LoadError> {
    if gpa < BOOT_AREA_END {
        return Err(LoadError::OverlapsBootArea(gpa));
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
