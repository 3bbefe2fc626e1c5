//! Image loaders: ELF64 entered directly in long mode, and multiboot v1 kernels
//! entered in 32-bit protected mode with paging off (as QEMU's `-kernel` does).

mod acpi;
pub(crate) mod boot;
mod bzimage;
mod elf;
mod image;
mod linux;
mod multiboot;

pub use boot::{
    ELF_BOOT_AREA_END, EntryState, MULTIBOOT_BOOT_AREA_END, regs as regs_for, sregs as sregs_for,
    write_boot_area,
};
pub use image::Aligned;
pub use image::Module;
pub use linux::{LinuxBoot, command_line as linux_command_line, is_linux};

use crate::error::LoadError;
use crate::memory::GuestRam;

/// What a boot takes besides the image.
#[derive(Debug, Clone, Copy)]
pub struct BootInputs<'a> {
    pub cmdline: &'a str,
    /// How many of `cmdline`'s bytes are the user's (the rest vmiscope
    /// added): the limit a user is told is theirs.
    pub user_cmdline_bytes: usize,
    /// Multiboot modules.
    pub modules: &'a [Module],
    /// A Linux kernel's initrd.
    pub initrd: Option<&'a [u8]>,
    /// Run a bzImage's own decompressor.
    pub own_decompressor: bool,
    pub vcpus: u32,
}

/// A loaded image: how to enter it.
#[derive(Debug)]
pub struct Loaded {
    pub entry: EntryState,
    /// A Linux kernel's ELF (decompressed from a bzImage, or the file): what
    /// the monitor reads the kernel's symbols and BTF from. The VMM keeps no
    /// knowledge of the OS.
    pub vmlinux: Option<Vec<u8>>,
    pub format: String,
}

/// Loads `image` into `ram`: a Linux kernel (bzImage, or a vmlinux by its
/// notes) through the 64-bit boot protocol; else a multiboot header wins (as in
/// QEMU), else ELF64.
pub fn load(ram: &GuestRam, image: &[u8], inputs: &BootInputs) -> Result<Loaded, LoadError> {
    let BootInputs {
        cmdline,
        user_cmdline_bytes,
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
            user_cmdline_bytes,
            initrd,
            own_decompressor,
            vcpus,
        };
        let l = linux::load(ram, image, &boot)?;
        return Ok(Loaded {
            entry: l.entry,
            vmlinux: Some(l.vmlinux),
            format: l.format,
        });
    }
    if initrd.is_some() {
        return Err(LoadError::Linux("--initrd is for Linux kernels".into()));
    }
    let copy = Aligned::copy(image);
    let image = copy.bytes();
    if let Some(header) = multiboot::find_header(image)? {
        let entry = multiboot::load(ram, image, &header, cmdline, modules)?;
        return Ok(Loaded {
            entry,
            vmlinux: None,
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
        vmlinux: None,
        format: "ELF64".into(),
    })
}

/// The ELF of the Linux kernel in `image` (a bzImage, decompressed to at most
/// `limit` bytes, or a vmlinux); None when it is not a Linux kernel.
pub fn vmlinux(image: &[u8], limit: usize) -> Result<Option<Vec<u8>>, LoadError> {
    if !linux::is_linux(image) {
        return Ok(None);
    }
    Ok(Some(if bzimage::is_bzimage(image) {
        bzimage::vmlinux(image, limit)?.0
    } else {
        image.to_vec()
    }))
}
