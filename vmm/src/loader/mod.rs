//! Image loaders: ELF64 entered directly in long mode, and multiboot v1 kernels
//! entered in 32-bit protected mode with paging off (as QEMU's `-kernel` does).

mod acpi;
pub(crate) mod boot;
mod bzimage;
mod elf;
mod image;
pub mod kallsyms;
mod linux;
mod multiboot;
mod symbols;

pub use boot::{
    ELF_BOOT_AREA_END, EntryState, MULTIBOOT_BOOT_AREA_END, regs as regs_for, sregs as sregs_for,
    write_boot_area,
};
pub use image::Module;
pub use linux::{LinuxBoot, command_line as linux_command_line, is_linux};
pub use symbols::Symbols;

use image::{aligned, as_bytes};

use crate::error::LoadError;
use crate::memory::GuestRam;

/// What a boot takes besides the image.
#[derive(Debug, Clone, Copy)]
pub struct BootInputs<'a> {
    pub cmdline: &'a str,
    /// Multiboot modules.
    pub modules: &'a [Module],
    /// A Linux kernel's initrd.
    pub initrd: Option<&'a [u8]>,
    /// Run a bzImage's own decompressor.
    pub own_decompressor: bool,
    pub vcpus: u32,
}

/// A loaded image: how to enter it, and its symbols.
#[derive(Debug)]
pub struct Loaded {
    pub entry: EntryState,
    pub symbols: Symbols,
    /// A Linux kernel's layout from its BTF (Err: why there is none).
    pub linux: Option<Result<vmiscope_introspect::linux::Layout, String>>,
    pub format: String,
}

/// Loads `image` into `ram`: a Linux kernel (bzImage, or a vmlinux by its
/// notes) through the 64-bit boot protocol; else a multiboot header wins (as in
/// QEMU), else ELF64.
pub fn load(ram: &GuestRam, image: &[u8], inputs: &BootInputs) -> Result<Loaded, LoadError> {
    let BootInputs {
        cmdline,
        modules,
        initrd,
        own_decompressor,
        vcpus,
    } = *inputs;
    if image.is_empty() {
        return Err(LoadError::Empty);
    }
    if linux::is_linux(image) {
        if !modules.is_empty() {
            return Err(LoadError::Linux(
                "a Linux kernel takes --initrd, not --module".into(),
            ));
        }
        let boot = LinuxBoot {
            cmdline,
            initrd,
            own_decompressor,
            vcpus,
        };
        let l = linux::load(ram, image, &boot)?;
        return Ok(Loaded {
            entry: l.entry,
            symbols: linux_symbols(&l.vmlinux),
            linux: Some(linux::btf_layout(&l.vmlinux)),
            format: l.format,
        });
    }
    if initrd.is_some() {
        return Err(LoadError::Linux("--initrd is for Linux kernels".into()));
    }
    let words = aligned(image);
    let image = as_bytes(&words, image.len());
    let symbols = Symbols::parse(image);
    if let Some(header) = multiboot::find_header(image)? {
        let entry = multiboot::load(ram, image, &header, cmdline, modules)?;
        return Ok(Loaded {
            entry,
            symbols,
            linux: None,
            format: "multiboot v1".into(),
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
        linux: None,
        format: "ELF64".into(),
    })
}

/// A vmlinux's symbols: its ELF symbol table when it kept one, else the
/// kernel's own kallsyms tables.
fn linux_symbols(vmlinux: &[u8]) -> Symbols {
    let elf = Symbols::parse(vmlinux);
    if elf.len() > 1000 {
        return elf;
    }
    kallsyms::read(vmlinux).map_or(elf, Symbols::from_entries)
}

/// The symbols of the kernel in `image` (a bzImage or a vmlinux): its ELF
/// symbols, else its kallsyms tables; None when it is not a Linux kernel.
pub fn kernel_symbols(image: &[u8], limit: usize) -> Result<Option<Symbols>, LoadError> {
    if !linux::is_linux(image) {
        return Ok(None);
    }
    let vmlinux = if bzimage::is_bzimage(image) {
        bzimage::vmlinux(image, limit)?.0
    } else {
        image.to_vec()
    };
    Ok(Some(linux_symbols(&vmlinux)))
}
