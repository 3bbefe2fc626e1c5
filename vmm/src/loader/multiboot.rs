//! Multiboot v1: header search, kernel loading (a.out kludge or ELF program
//! headers) and the multiboot information structure with memory map, command line
//! and modules.

use object::elf::PT_LOAD;
use object::read::elf::{FileHeader, ProgramHeader};

use super::boot::{EntryState, MULTIBOOT_BOOT_AREA_END};
use super::image::{Module, check_range};
use crate::error::LoadError;
use crate::memory::GuestRam;

/// Where the extended BIOS data area starts: the end of base memory, as on
/// a PC with 639 KiB of it.
const EBDA: u64 = 0x9_fc00;

const MAGIC: u32 = 0x1BAD_B002;
const BOOT_MAGIC: u32 = 0x2BAD_B002;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Bits 0-15 the loader must honour; we support page-aligned modules (0) and
/// memory info (1). Video mode (2) is not supported.
const SUPPORTED_REQUIRED: u32 = 0b11;

#[derive(Debug, Clone, Copy)]
pub(super) struct Header {
    offset: usize,
    flags: u32,
    header_addr: u32,
    load_addr: u32,
    load_end_addr: u32,
    bss_end_addr: u32,
    entry_addr: u32,
}

fn word(image: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        image.get(off..off + 4)?.try_into().ok()?,
    ))
}

/// The multiboot header in the first 8 KiB, if any.
pub(super) fn find_header(image: &[u8]) -> Result<Option<Header>, LoadError> {
    let end = image.len().min(8192);
    let mut off = 0;
    while off + 12 <= end {
        if word(image, off) == Some(MAGIC) {
            let flags = word(image, off + 4).unwrap_or(0);
            let sum = word(image, off + 8).unwrap_or(0);
            if MAGIC.wrapping_add(flags).wrapping_add(sum) == 0 {
                let need = |i: usize| {
                    word(image, off + 12 + 4 * i)
                        .ok_or_else(|| LoadError::Multiboot("header truncated".into()))
                };
                if flags & 0xffff & !SUPPORTED_REQUIRED != 0 {
                    return Err(LoadError::Multiboot(format!(
                        "required flags {flags:#x} are not supported"
                    )));
                }
                let kludge = flags & FLAG_AOUT_KLUDGE != 0;
                let h = Header {
                    offset: off,
                    flags,
                    header_addr: if kludge { need(0)? } else { 0 },
                    load_addr: if kludge { need(1)? } else { 0 },
                    load_end_addr: if kludge { need(2)? } else { 0 },
                    bss_end_addr: if kludge { need(3)? } else { 0 },
                    entry_addr: if kludge { need(4)? } else { 0 },
                };
                return Ok(Some(h));
            }
        }
        off += 4;
    }
    Ok(None)
}

/// Loads the kernel; returns its entry and the end of what it occupies.
fn load_kernel(ram: &GuestRam, image: &[u8], h: &Header) -> Result<(u32, u64), LoadError> {
    if h.flags & FLAG_AOUT_KLUDGE != 0 {
        let bad = |m: &str| LoadError::Multiboot(m.to_string());
        let start = (h.offset as u64)
            .checked_sub(
                (h.header_addr as u64)
                    .checked_sub(h.load_addr as u64)
                    .ok_or_else(|| bad("load_addr > header_addr"))?,
            )
            .ok_or_else(|| bad("load_addr is before the file start"))? as usize;
        let len = if h.load_end_addr == 0 {
            image.len() - start
        } else {
            (h.load_end_addr
                .checked_sub(h.load_addr)
                .ok_or_else(|| bad("load_end_addr < load_addr"))?) as usize
        };
        let data = image
            .get(start..start + len)
            .ok_or_else(|| bad("load range extends past the end of the file"))?;
        let end = (h.bss_end_addr as u64).max(h.load_addr as u64 + len as u64);
        check_range(
            ram,
            h.load_addr as u64,
            end - h.load_addr as u64,
            MULTIBOOT_BOOT_AREA_END,
        )?;
        ram.write(h.load_addr as u64, data)
            .map_err(|e| bad(&e.to_string()))?;
        ram.write(
            h.load_addr as u64 + len as u64,
            &vec![0; (end - h.load_addr as u64 - len as u64) as usize],
        )
        .map_err(|e| bad(&e.to_string()))?;
        if !(h.load_addr as u64..end).contains(&(h.entry_addr as u64)) {
            return Err(LoadError::EntryOutside(h.entry_addr as u64));
        }
        return Ok((h.entry_addr, end));
    }
    // ELF kernel (ELF32, or ELF64 with 32-bit addresses): load by physical address.
    match image.get(4) {
        Some(1) => load_elf::<object::elf::FileHeader32<object::Endianness>>(ram, image),
        Some(2) => load_elf::<object::elf::FileHeader64<object::Endianness>>(ram, image),
        _ => Err(LoadError::Multiboot(
            "no a.out kludge and not an ELF file".into(),
        )),
    }
}

fn load_elf<H: FileHeader<Endian = object::Endianness>>(
    ram: &GuestRam,
    image: &[u8],
) -> Result<(u32, u64), LoadError> {
    let hdr = H::parse(image).map_err(|e| LoadError::Malformed(e.to_string()))?;
    let en = hdr
        .endian()
        .map_err(|e| LoadError::Malformed(e.to_string()))?;
    let phdrs = hdr
        .program_headers(en, image)
        .map_err(|e| LoadError::Malformed(e.to_string()))?;
    let mut end = 0u64;
    for ph in phdrs.iter().filter(|p| p.p_type(en) == PT_LOAD) {
        let (addr, memsz): (u64, u64) = (ph.p_paddr(en).into(), ph.p_memsz(en).into());
        let data = ph
            .data(en, image)
            .map_err(|_| LoadError::Malformed("segment past the end of the file".into()))?;
        check_range(ram, addr, memsz, MULTIBOOT_BOOT_AREA_END)?;
        ram.write(addr, data)
            .map_err(|e| LoadError::Malformed(e.to_string()))?;
        end = end.max(addr + memsz);
    }
    if end == 0 {
        return Err(LoadError::NoSegments);
    }
    let entry: u64 = hdr.e_entry(en).into();
    let entry = u32::try_from(entry).map_err(|_| LoadError::EntryOutside(entry))?;
    Ok((entry, end))
}

/// Loads a multiboot kernel and its modules, and writes the information structure.
/// The memory map at `mmap` (3 entries: base memory, the EBDA and ROM area,
/// the rest of RAM) and the BIOS data area a PC's firmware leaves: the EBDA's
/// segment (0x40e) and the base memory below it in KiB (0x413). Xen places
/// its trampoline below the smaller of these and `mem_lower`: with zeros there
/// it copied ~4 GiB from address 0 and hung silently.
const MMAP_ENTRIES: usize = 3;

/// Writes bytes at a guest-physical address.
type Write<'a> = dyn Fn(u64, &[u8]) -> Result<(), LoadError> + 'a;

fn write_memory_map(w: &Write<'_>, mmap: u64, ram_size: u64) -> Result<(), LoadError> {
    w(0x40e, &((EBDA >> 4) as u16).to_le_bytes())?;
    w(0x413, &((EBDA >> 10) as u16).to_le_bytes())?;
    let regions: [(u64, u64, u32); MMAP_ENTRIES] = [
        (0, EBDA, 1),
        (EBDA, 0x100000 - EBDA, 2),
        (0x100000, ram_size - 0x100000, 1),
    ];
    for (i, (base, len, ty)) in regions.iter().enumerate() {
        let at = mmap + 24 * i as u64;
        w(at, &20u32.to_le_bytes())?;
        w(at + 4, &base.to_le_bytes())?;
        w(at + 12, &len.to_le_bytes())?;
        w(at + 20, &ty.to_le_bytes())?;
    }
    Ok(())
}

pub(super) fn load(
    ram: &GuestRam,
    image: &[u8],
    h: &Header,
    cmdline: &str,
    modules: &[Module],
) -> Result<EntryState, LoadError> {
    let (entry, kernel_end) = load_kernel(ram, image, h)?;
    let w = |gpa: u64, d: &[u8]| {
        ram.write(gpa, d)
            .map_err(|e| LoadError::Multiboot(e.to_string()))
    };
    if modules.len() > 32 {
        return Err(LoadError::Multiboot("at most 32 modules".into()));
    }
    // The modules go after the kernel, and the information structure after them
    // (as QEMU places it): nowhere the kernel is. Its layout: info, memory map,
    // module list (32 at most), strings (up to MBI_SIZE).
    let mut next = (kernel_end + 0xfff) & !0xfff;
    let mut placed = Vec::with_capacity(modules.len());
    for m in modules {
        check_range(ram, next, m.data.len() as u64, MULTIBOOT_BOOT_AREA_END)
            .map_err(|e| LoadError::Module(m.name.clone(), e.to_string()))?;
        w(next, &m.data)?;
        placed.push(next);
        next = (next + m.data.len() as u64 + 0xfff) & !0xfff;
    }
    const MBI_SIZE: u64 = 0x8000;
    let mbi = next;
    check_range(ram, mbi, MBI_SIZE, MULTIBOOT_BOOT_AREA_END)
        .map_err(|e| LoadError::Multiboot(format!("no room for the boot information: {e}")))?;
    if mbi + MBI_SIZE > u32::MAX as u64 {
        return Err(LoadError::Multiboot(
            "the boot information would lie above 4 GiB".into(),
        ));
    }
    let (mmap, mods, mut strings) = (mbi + 0x100, mbi + 0x200, mbi + 0x400);
    let mut put_str = |s: &str| -> Result<u32, LoadError> {
        let at = strings;
        if at + s.len() as u64 + 1 > mbi + MBI_SIZE {
            return Err(LoadError::Multiboot(
                "command line and module names are too long".into(),
            ));
        }
        w(at, s.as_bytes())?;
        w(at + s.len() as u64, &[0])?;
        strings += s.len() as u64 + 1;
        Ok(at as u32)
    };
    let cmd_addr = put_str(cmdline)?;
    for (i, (m, at)) in modules.iter().zip(placed).enumerate() {
        let name = put_str(&m.name)?;
        let entry = [at as u32, (at + m.data.len() as u64) as u32, name, 0];
        for (j, v) in entry.iter().enumerate() {
            w(mods + 16 * i as u64 + 4 * j as u64, &v.to_le_bytes())?;
        }
    }
    let ram_size = ram.size();
    write_memory_map(&w, mmap, ram_size)?;
    let flags: u32 = 1 | (1 << 2) | (1 << 3) | (1 << 6);
    let info: [u32; 13] = [
        flags,
        (EBDA >> 10) as u32,
        ((ram_size - 0x100000) >> 10) as u32,
        0,
        cmd_addr,
        modules.len() as u32,
        mods as u32,
        0,
        0,
        0,
        0,
        (MMAP_ENTRIES * 24) as u32,
        mmap as u32,
    ];
    for (i, v) in info.iter().enumerate() {
        w(mbi + 4 * i as u64, &v.to_le_bytes())?;
    }
    Ok(EntryState::Protected32 {
        eip: entry,
        eax: BOOT_MAGIC,
        ebx: mbi as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32, extra: &[u32]) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        let words = [MAGIC, flags, 0u32.wrapping_sub(MAGIC.wrapping_add(flags))];
        for (i, x) in words.iter().chain(extra).enumerate() {
            v[16 + 4 * i..20 + 4 * i].copy_from_slice(&x.to_le_bytes());
        }
        v
    }

    #[test]
    fn header_search_and_validation() {
        assert!(find_header(&[0u8; 100]).unwrap().is_none());
        let h = find_header(&header(
            FLAG_AOUT_KLUDGE,
            &[0x100010, 0x100000, 0, 0, 0x100020],
        ))
        .unwrap()
        .unwrap();
        assert_eq!((h.offset, h.entry_addr), (16, 0x100020));
        let e = find_header(&header(1 << 2, &[])).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        let e = find_header(&header(FLAG_AOUT_KLUDGE, &[0x100010])[..32]).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn kludge_load_writes_info() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let mut img = header(
            FLAG_AOUT_KLUDGE,
            &[0x100010, 0x100000, 0, 0x101000, 0x100020],
        );
        img.extend_from_slice(&[0x90; 32]);
        let h = find_header(&img).unwrap().unwrap();
        let m = [Module {
            name: "initrd".into(),
            data: b"payload".to_vec(),
        }];
        let e = load(&ram, &img, &h, "console=ttyS0", &m).unwrap();
        // The information goes after the kernel (bss to 0x101000) and the module.
        let mbi = 0x102000;
        assert_eq!(
            e,
            EntryState::Protected32 {
                eip: 0x100020,
                eax: BOOT_MAGIC,
                ebx: mbi as u32
            }
        );
        let mut b = [0u8; 4];
        ram.read(mbi + 20, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 1, "mods_count");
        ram.read(mbi + 24, &mut b).unwrap();
        let mods = u32::from_le_bytes(b) as u64;
        ram.read(mods, &mut b).unwrap();
        let start = u32::from_le_bytes(b) as u64;
        assert_eq!(
            start, 0x101000,
            "module after the kernel's bss, page aligned"
        );
        let mut p = [0u8; 7];
        ram.read(start, &mut p).unwrap();
        assert_eq!(&p, b"payload");
        // A PC's BIOS data area, agreeing with mem_lower and the memory map:
        // Xen's early code hung when it read zeros there.
        let mut w = [0u8; 2];
        ram.read(0x40e, &mut w).unwrap();
        assert_eq!(u16::from_le_bytes(w), 0x9fc0, "EBDA segment");
        ram.read(0x413, &mut w).unwrap();
        assert_eq!(u16::from_le_bytes(w), 639, "base memory KiB");
        ram.read(mbi + 4, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 639, "mem_lower");
    }
}
