//! ELF64 x86-64 executables, entered in 64-bit mode at `e_entry`.

use std::io::Cursor;

use linux_loader::loader::{KernelLoader, elf::Elf};
use object::elf::{ELFCLASS64, EM_X86_64, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader};

use super::boot::EntryState;
use crate::error::LoadError;
use crate::memory::GuestRam;

type Header = object::elf::FileHeader64<object::Endianness>;

pub(super) fn load(ram: &GuestRam, image: &[u8]) -> Result<EntryState, LoadError> {
    if image.len() < 4 || &image[..4] != b"\x7fELF" {
        return Err(LoadError::UnknownFormat(
            "no ELF magic, no multiboot header".into(),
        ));
    }
    if image.len() < 5 || image[4] != ELFCLASS64 {
        return Err(LoadError::UnknownFormat(
            "32-bit ELF without a multiboot header".into(),
        ));
    }
    let hdr = Header::parse(image).map_err(|e| LoadError::Malformed(e.to_string()))?;
    let endian = hdr
        .endian()
        .map_err(|e| LoadError::Malformed(e.to_string()))?;
    let machine = hdr.e_machine(endian);
    if machine != EM_X86_64 {
        return Err(LoadError::WrongMachine(format!("machine {machine}")));
    }
    let phdrs = hdr
        .program_headers(endian, image)
        .map_err(|e| LoadError::Malformed(e.to_string()))?;
    // linux-loader loads the `e_phnum` headers as they stand, while the object
    // crate takes the count from section 0 when `e_phnum` is PN_XNUM (0xffff):
    // headers past that count would be loaded unchecked (onto the boot page
    // tables, say). Check exactly what will be loaded.
    let raw_count = hdr.e_phnum(endian);
    if raw_count == object::elf::PN_XNUM || phdrs.len() != usize::from(raw_count) {
        return Err(LoadError::Malformed(format!(
            "e_phnum {raw_count:#x} (PN_XNUM, program headers counted elsewhere) is not supported"
        )));
    }
    let entry = hdr.e_entry(endian);
    let mut any = false;
    let mut entry_inside = false;
    for ph in phdrs.iter().filter(|p| p.p_type(endian) == PT_LOAD) {
        let (addr, memsz, filesz, off) = (
            ph.p_paddr(endian),
            ph.p_memsz(endian),
            ph.p_filesz(endian),
            ph.p_offset(endian),
        );
        if off
            .checked_add(filesz)
            .is_none_or(|end| end > image.len() as u64)
        {
            return Err(LoadError::Malformed(format!(
                "segment at {addr:#x} extends past the end of the file"
            )));
        }
        super::image::check_range(ram, addr, memsz, super::boot::ELF_BOOT_AREA_END)?;
        any = true;
        let vaddr = ph.p_vaddr(endian);
        entry_inside |= entry >= vaddr && vaddr.checked_add(memsz).is_some_and(|end| entry < end);
    }
    if !any {
        return Err(LoadError::NoSegments);
    }
    if !entry_inside {
        return Err(LoadError::EntryOutside(entry));
    }
    let res = Elf::load(ram.inner(), None, &mut Cursor::new(image), None)
        .map_err(|e| LoadError::Malformed(e.to_string()))?;
    Ok(EntryState::Long64 {
        rip: res.kernel_load.0,
    })
}
