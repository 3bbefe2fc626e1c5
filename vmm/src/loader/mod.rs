//! Image loaders: ELF64 entered directly in long mode, and multiboot v1 kernels
//! entered in 32-bit protected mode with paging off (as QEMU's `-kernel` does).

mod boot;
mod elf;
mod image;
mod multiboot;
mod symbols;

pub use boot::{
    ELF_BOOT_AREA_END, EntryState, MULTIBOOT_BOOT_AREA_END, regs as regs_for, sregs as sregs_for,
    write_boot_area,
};
pub use image::Module;
pub use symbols::Symbols;

use image::{aligned, as_bytes};

use crate::error::LoadError;
use crate::memory::GuestRam;

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
