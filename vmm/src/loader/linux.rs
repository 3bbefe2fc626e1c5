//! Linux kernels: a bzImage (its payload decompressed on the host) or an ELF
//! vmlinux, entered at `startup_64` through the 64-bit boot protocol with a
//! zero page, an e820 map, a command line and an initrd.
//!
//! Memory the VMM uses (the kernel is linked at 16 MiB, far above it):
//! 0x0–0x8000 GDT, TSS, identity page tables and stack (`boot.rs`); 0x8000 the
//! zero page; 0x9000 the command line; 0xe0000–0x100000 ACPI tables (reserved
//! in the e820 map); the initrd at the top of RAM.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use object::elf::{PT_LOAD, PT_NOTE};
use object::read::elf::{FileHeader, ProgramHeader};
use vm_memory::ByteValued;

use super::boot::EntryState;
use super::bzimage::{self, Compression};
use crate::error::LoadError;
use crate::memory::GuestRam;

pub const ZERO_PAGE: u64 = 0x8000;
const CMDLINE: u64 = 0x9000;
const CMDLINE_MAX: usize = 0x1000;
pub const ACPI_START: u64 = 0xe0000;
const HIGH_MEMORY: u64 = 0x10_0000;
const EBDA: u64 = 0x9_fc00;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

type Header = object::elf::FileHeader64<object::Endianness>;

/// What the caller gives a Linux boot besides the kernel.
#[derive(Debug, Default)]
pub struct LinuxBoot<'a> {
    pub cmdline: &'a str,
    /// How many of `cmdline`'s bytes are the user's.
    pub user_cmdline_bytes: usize,
    pub initrd: Option<&'a [u8]>,
    /// Run the bzImage's own decompressor instead of entering the vmlinux
    /// vmiscope decompressed (for comparison: `bench --linux`).
    pub own_decompressor: bool,
    /// An ACPI MADT names them (the kernel reads no MP tables).
    pub vcpus: u32,
}

/// A kernel loaded for the 64-bit boot protocol.
#[derive(Debug)]
pub struct LinuxLoaded {
    pub entry: EntryState,
    /// The vmlinux that was loaded (decompressed from a bzImage, or the file).
    pub vmlinux: Vec<u8>,
    /// "bzImage (lz4)" or "vmlinux".
    pub format: String,
}

/// The command line a Linux kernel gets: the user's, plus `console=ttyS0`
/// when it names no console, plus what this host needs (`pvm`): KVM's emulator
/// cannot run XRSTOR at CPL0, so the kernel is told not to use XSAVE (it falls
/// back to FXSAVE, which the emulator runs). Returns the line and the additions.
pub fn command_line(user: &str, pvm: bool) -> (String, Vec<&'static str>) {
    let has = |word: &str| {
        user.split_whitespace()
            .any(|w| w == word || w.starts_with(&format!("{word}=")))
    };
    let mut added = vec![];
    if !has("console") {
        added.push("console=ttyS0");
    }
    if pvm && !has("noxsave") {
        added.push("noxsave");
    }
    // Nor SSSE3/SSE4/AES-NI/SHA: the kernel's SIMD crypto (blake2s at boot)
    // would run them at CPL0. Without them it takes the generic C code.
    if pvm && !has("clearcpuid") {
        added.push(PVM_CLEARCPUID);
    }
    let mut line = user.trim().to_string();
    for a in &added {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(a);
    }
    (line, added)
}

const PVM_CLEARCPUID: &str =
    "clearcpuid=ssse3,sse4_1,sse4_2,aes,pclmulqdq,sha_ni,gfni,vaes,vpclmulqdq";

/// Whether `image` is a Linux kernel: a bzImage, or an ELF with the "Linux"
/// (or Xen PVH) notes every vmlinux carries.
pub fn is_linux(image: &[u8]) -> bool {
    bzimage::is_bzimage(image) || is_vmlinux(image)
}

fn is_vmlinux(image: &[u8]) -> bool {
    let Ok(hdr) = Header::parse(image) else {
        return false;
    };
    let Ok(endian) = hdr.endian() else {
        return false;
    };
    let Ok(phdrs) = hdr.program_headers(endian, image) else {
        return false;
    };
    phdrs
        .iter()
        .filter(|p| p.p_type(endian) == PT_NOTE)
        .filter_map(|p| p.notes(endian, image).ok().flatten())
        .any(|mut notes| {
            while let Ok(Some(n)) = notes.next() {
                if n.name() == b"Linux" || n.name() == b"Xen" {
                    return true;
                }
            }
            false
        })
}

/// Loads the kernel in `image` (bzImage or vmlinux) with its zero page.
pub fn load(ram: &GuestRam, image: &[u8], boot: &LinuxBoot) -> Result<LinuxLoaded, LoadError> {
    let (vmlinux, header, format) = if bzimage::is_bzimage(image) {
        let hdr = bzimage::header(image)?;
        if hdr.version >= 0x208 && hdr.payload_length == 0 {
            // Not a Linux kernel: a bzImage-format program with no compressed
            // kernel inside (memtest86+), entered at its own 64-bit code as
            // QEMU's -kernel and GRUB's `linux` do.
            if !boot.own_decompressor {
                return Err(LoadError::Linux(
                    "a bzImage with no compressed payload (not a Linux kernel, e.g. memtest86+): \
                     run it with --own-decompressor, which enters its own code"
                        .into(),
                ));
            }
            let (entry, end) = load_protected_mode(ram, image, &hdr)?;
            let mut params = boot_params {
                hdr,
                ..Default::default()
            };
            fill_zero_page(ram, &mut params, boot, end)?;
            return Ok(LinuxLoaded {
                entry: EntryState::Linux64 {
                    rip: entry,
                    zero_page: ZERO_PAGE,
                },
                vmlinux: vec![],
                format: "bzImage with no payload (its own code)".into(),
            });
        }
        let (elf, kind) = bzimage::vmlinux(image, ram.size() as usize)?;
        let format = match kind {
            Compression::None => "bzImage".to_string(),
            k => format!("bzImage ({}, decompressed by vmiscope)", k.name()),
        };
        (elf, Some(hdr), format)
    } else {
        (image.to_vec(), None, "vmlinux".to_string())
    };
    let (entry, kernel_end, format) = match header {
        Some(hdr) if boot.own_decompressor => {
            let (entry, end) = load_protected_mode(ram, image, &hdr)?;
            (entry, end, "bzImage (its own decompressor)".to_string())
        }
        _ => {
            let copy = super::image::Aligned::copy(&vmlinux);
            let elf = copy.bytes();
            let (entry, end) = load_vmlinux(ram, elf)?;
            (entry, end, format)
        }
    };
    let mut params = boot_params {
        hdr: header.unwrap_or_else(default_header),
        ..Default::default()
    };
    // A MADT for one vCPU too, as every PC and QEMU give: without one the
    // kernel finds "no MADT or MP tables", runs its APIC in virtual-wire mode
    // and never starts its local APIC timer, so the PIT through the 8259 is its
    // only tick for the whole run (on the nested-SVM rig one PIT interrupt never
    // acknowledged then stopped the clock for good: README, "Hosts").
    params.acpi_rsdp_addr = super::acpi::write_tables(ram, ACPI_START, boot.vcpus)?;
    fill_zero_page(ram, &mut params, boot, kernel_end)?;
    Ok(LinuxLoaded {
        entry: EntryState::Linux64 {
            rip: entry,
            zero_page: ZERO_PAGE,
        },
        vmlinux,
        format,
    })
}

/// Where a bzImage's protected-mode part goes (its `code32_start`).
const PROTECTED_MODE: u64 = 0x10_0000;

/// Loads a bzImage's protected-mode part (the decompressor with the payload)
/// at 1 MiB for its 64-bit entry, 0x200 past the start; returns the entry and
/// the end of what the decompressor will use (`init_size` above 16 MiB).
fn load_protected_mode(
    ram: &GuestRam,
    image: &[u8],
    hdr: &setup_header,
) -> Result<(u64, u64), LoadError> {
    const XLF_KERNEL_64: u16 = 1;
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoadError::Linux(
            "the bzImage has no 64-bit entry (XLF_KERNEL_64)".into(),
        ));
    }
    let setup = bzimage::setup_size(hdr);
    let code = image
        .get(setup..)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| LoadError::Linux("the bzImage ends inside its setup code".into()))?;
    super::image::check_range(ram, PROTECTED_MODE, code.len() as u64, HIGH_MEMORY)?;
    write(ram, PROTECTED_MODE, code)?;
    let end = 0x100_0000 + hdr.init_size as u64;
    if end > ram.size() {
        return Err(LoadError::TooBig {
            at: 0x100_0000,
            need: hdr.init_size as u64,
            ram: ram.size() >> 20,
        });
    }
    Ok((PROTECTED_MODE + 0x200, end))
}

/// The setup header a bootloader would hand a kernel that has none (an ELF
/// vmlinux): protocol 2.15, loaded high, a heap.
fn default_header() -> setup_header {
    setup_header {
        boot_flag: 0xaa55,
        header: 0x5372_6448,
        version: 0x20f,
        loadflags: 0x01 | 0x80, // LOADED_HIGH | CAN_USE_HEAP
        kernel_alignment: 0x20_0000,
        initrd_addr_max: 0x7fff_ffff,
        cmdline_size: (CMDLINE_MAX - 1) as u32,
        ..Default::default()
    }
}

/// Loads the vmlinux's PT_LOAD segments at their physical addresses; returns
/// the physical entry (`startup_64`) and where the loaded kernel ends.
fn load_vmlinux(ram: &GuestRam, elf: &[u8]) -> Result<(u64, u64), LoadError> {
    let malformed = |e: object::read::Error| LoadError::Malformed(e.to_string());
    let hdr = Header::parse(elf).map_err(malformed)?;
    let endian = hdr.endian().map_err(malformed)?;
    if hdr.e_machine(endian) != object::elf::EM_X86_64 {
        return Err(LoadError::WrongMachine(format!(
            "machine {}",
            hdr.e_machine(endian)
        )));
    }
    if hdr.e_phnum(endian) == object::elf::PN_XNUM {
        return Err(LoadError::Malformed("e_phnum is PN_XNUM".into()));
    }
    let phdrs = hdr.program_headers(endian, elf).map_err(malformed)?;
    let (mut entry_ok, mut end) = (false, 0u64);
    let entry = hdr.e_entry(endian);
    for ph in phdrs.iter().filter(|p| p.p_type(endian) == PT_LOAD) {
        let (paddr, memsz, filesz, off) = (
            ph.p_paddr(endian),
            ph.p_memsz(endian),
            ph.p_filesz(endian),
            ph.p_offset(endian) as usize,
        );
        let data = off
            .checked_add(filesz as usize)
            .and_then(|e| elf.get(off..e))
            .filter(|_| filesz <= memsz)
            .ok_or_else(|| {
                LoadError::Malformed(format!(
                    "segment at {paddr:#x} lies past the end of the file"
                ))
            })?;
        super::image::check_range(ram, paddr, memsz, HIGH_MEMORY)?;
        ram.write(paddr, data)
            .map_err(|e| LoadError::Malformed(e.to_string()))?;
        // The rest of the segment (.bss) is zero in fresh RAM already.
        entry_ok |= entry >= paddr && entry < paddr + memsz;
        end = end.max(paddr + memsz);
    }
    if end == 0 {
        return Err(LoadError::NoSegments);
    }
    if !entry_ok {
        return Err(LoadError::EntryOutside(entry));
    }
    Ok((entry, end))
}

fn fill_zero_page(
    ram: &GuestRam,
    params: &mut boot_params,
    boot: &LinuxBoot,
    kernel_end: u64,
) -> Result<(), LoadError> {
    let limit = (params.hdr.cmdline_size as usize).clamp(255, CMDLINE_MAX - 1);
    if boot.cmdline.contains('\0') {
        return Err(LoadError::Linux("the command line has a NUL byte".into()));
    }
    if boot.cmdline.len() > limit {
        // The user is told their own budget: what vmiscope adds is not theirs.
        let added = boot.cmdline.len().saturating_sub(boot.user_cmdline_bytes);
        return Err(LoadError::Linux(format!(
            "the command line is {} bytes; this kernel takes at most {limit}, of which vmiscope's \
             additions take {added}: give at most {} bytes",
            boot.user_cmdline_bytes,
            limit.saturating_sub(added)
        )));
    }
    let mut line = boot.cmdline.as_bytes().to_vec();
    line.push(0);
    write(ram, CMDLINE, &line)?;
    let hdr = &mut params.hdr;
    hdr.type_of_loader = 0xff;
    hdr.loadflags |= 0x01 | 0x80;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.heap_end_ptr = 0xfe00;
    hdr.hardware_subarch = 0;
    let ram_end = ram.size();
    if let Some(initrd) = boot.initrd {
        let max = (hdr.initrd_addr_max as u64).min(ram_end - 1);
        let size = initrd.len() as u64;
        let at = (max + 1).checked_sub(size).map(|a| a & !0xfff);
        // The kernel unpacks itself up to init_size past its start; keep clear.
        let reserved = kernel_end.max(0x100_0000 + hdr.init_size as u64);
        let at = at.filter(|a| *a >= reserved).ok_or_else(|| {
            LoadError::Linux(format!(
                "the initrd ({size} bytes) does not fit between the kernel and the end of RAM (try --mem)"
            ))
        })?;
        write(ram, at, initrd)?;
        hdr.ramdisk_image = at as u32;
        hdr.ramdisk_size = size as u32;
    }
    let map = [
        (0, EBDA, E820_RAM),
        (EBDA, 0xa0000 - EBDA, E820_RESERVED),
        (ACPI_START, HIGH_MEMORY - ACPI_START, E820_RESERVED),
        (HIGH_MEMORY, ram_end - HIGH_MEMORY, E820_RAM),
    ];
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    write(ram, ZERO_PAGE, params.as_slice())
}

fn write(ram: &GuestRam, gpa: u64, data: &[u8]) -> Result<(), LoadError> {
    ram.write(gpa, data).map_err(|_| LoadError::TooBig {
        at: gpa,
        need: data.len() as u64,
        ram: ram.size() >> 20,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_gets_a_console_and_what_pvm_needs_once() {
        let (line, added) = command_line("", true);
        assert_eq!(added, vec!["console=ttyS0", "noxsave", PVM_CLEARCPUID]);
        assert_eq!(line, format!("console=ttyS0 noxsave {PVM_CLEARCPUID}"));
        assert_eq!(
            command_line("console=hvc0 noxsave clearcpuid=1", true).1,
            Vec::<&str>::new()
        );
        assert_eq!(command_line(" quiet ", false).0, "quiet console=ttyS0");
    }
}
