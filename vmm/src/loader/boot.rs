//! The VMM-built boot state: a GDT, a TSS and identity page tables below 0x8000,
//! and the registers each entry mode starts with.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::memory::GuestRam;

/// What the VMM's boot structures really occupy, by entry mode; a kernel's
/// segment may not overlap them. An ELF64 image runs on the VMM's GDT, TSS,
/// page tables and stacks (all below 0x8000). A multiboot kernel starts with
/// paging off and sets up its own stack, so it uses only the GDT and TSS in the
/// first page; its information structure goes after the kernel and its modules,
/// where the kernel is not (as QEMU places it).
pub const ELF_BOOT_AREA_END: u64 = 0x8000;
pub const MULTIBOOT_BOOT_AREA_END: u64 = 0x1000;

const GDT: u64 = 0x500;
const TSS: u64 = 0x600;
/// The page tables the VMM builds for a guest it enters in long mode.
pub(crate) const PML4: u64 = 0x1000;
pub(crate) const PDPT: u64 = 0x2000;
pub(crate) const PD: u64 = 0x3000; // four PDs: 0x3000..0x7000, 4 GiB of 2 MiB pages
/// Where Linux's `__START_KERNEL_map` puts physical 0 (its text is linked there).
pub(crate) const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
const STACK_TOP: u64 = 0x7ff0;

pub const SEL_CODE64: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_CODE32: u16 = 0x18;
pub const SEL_TSS: u16 = 0x20;

/// How a vCPU enters the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// 64-bit mode on the VMM's page tables; RDI = vCPU index, RSI = vCPU count.
    Long64 { rip: u64 },
    /// Linux's 64-bit boot protocol: 64-bit mode on the VMM's identity page
    /// tables, RSI = the zero page; only the BSP starts here (APs wait for
    /// INIT/SIPI, as on a PC).
    Linux64 { rip: u64, zero_page: u64 },
    /// Multiboot: 32-bit protected mode, paging off, EAX = magic, EBX = info.
    Protected32 { eip: u32, eax: u32, ebx: u32 },
}

/// Writes the GDT, TSS and page tables into the boot area.
pub fn write_boot_area(ram: &GuestRam) -> Result<(), crate::error::VmError> {
    let gdt: [u64; 6] = [
        0,
        0x00af_9a00_0000_ffff, // 0x08: 64-bit code
        0x00cf_9200_0000_ffff, // 0x10: flat data
        0x00cf_9a00_0000_ffff, // 0x18: flat 32-bit code
        // 0x20: 64-bit TSS at TSS (busy type 0xb), limit 0x67.
        0x0000_8b00_0000_0067 | (TSS << 16),
        0,
    ];
    for (i, d) in gdt.iter().enumerate() {
        ram.write(GDT + 8 * i as u64, &d.to_le_bytes())?;
    }
    ram.write(TSS, &[0u8; 0x68])?;
    ram.write(PML4, &(PDPT | 3).to_le_bytes())?;
    for i in 0..4u64 {
        ram.write(PDPT + 8 * i, &((PD + i * 0x1000) | 3).to_le_bytes())?;
    }
    for i in 0..2048u64 {
        // Present, writable, 2 MiB, supervisor: images that run CPL3 code build their own.
        ram.write(PD + 8 * i, &((i << 21) | 0x83).to_le_bytes())?;
    }
    // The first GiB again at KERNEL_MAP, where Linux links its text (as its own
    // early page tables map it, phys_base 0). The boot protocol asks only for
    // the identity map, and the kernel leaves these tables at once; but at its
    // entry a debugger can then read, and break on, `start_kernel` by name where
    // no debug register fires (an SVM host without DR exits, say).
    let (l4, l3) = ((KERNEL_MAP >> 39) & 511, (KERNEL_MAP >> 30) & 511);
    ram.write(PML4 + 8 * l4, &(PDPT | 3).to_le_bytes())?;
    ram.write(PDPT + 8 * l3, &(PD | 3).to_le_bytes())?;
    Ok(())
}

fn seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for `entry`, on top of what KVM created the vCPU with.
pub fn sregs(entry: &EntryState, mut s: kvm_sregs) -> kvm_sregs {
    s.gdt.base = GDT;
    s.gdt.limit = 6 * 8 - 1;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        s: 0,
        g: 0,
        ..seg(0, 0, 0, 0)
    };
    s.ldt = kvm_segment {
        selector: 0,
        type_: 2,
        present: 1,
        s: 0,
        limit: 0xffff,
        g: 0,
        ..seg(0, 0, 0, 0)
    };
    let data = seg(SEL_DATA, 3, 0, 1);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    match entry {
        EntryState::Long64 { .. } | EntryState::Linux64 { .. } => {
            s.cs = seg(SEL_CODE64, 11, 1, 0);
            s.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
            s.cr3 = PML4;
            s.cr4 = 0x620; // OSXMMEXCPT | OSFXSR | PAE
            s.efer = 0xd01; // NXE | LMA | LME | SCE
        }
        EntryState::Protected32 { .. } => {
            s.cs = seg(SEL_CODE32, 11, 0, 1);
            s.cr0 = 0x11; // ET | PE
            s.cr3 = 0;
            s.cr4 = 0;
            s.efer = 0;
        }
    }
    s
}

/// General registers for vCPU `cpu` of `ncpus` entering at `entry`.
pub fn regs(entry: &EntryState, cpu: u32, ncpus: u32) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: 2,
        rsp: STACK_TOP - 0x400 * cpu as u64,
        ..Default::default()
    };
    match *entry {
        EntryState::Long64 { rip } => {
            r.rip = rip;
            r.rdi = cpu as u64;
            r.rsi = ncpus as u64;
        }
        EntryState::Linux64 { rip, zero_page } => {
            r.rip = rip;
            r.rsi = zero_page;
        }
        EntryState::Protected32 { eip, eax, ebx } => {
            r.rip = eip as u64;
            r.rax = eax as u64;
            r.rbx = ebx as u64;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmiscope_introspect::paging::{PagingMode, translate};

    #[test]
    fn the_boot_tables_map_ram_at_zero_and_where_linux_links_its_text() {
        let ram = GuestRam::new(64 << 20).unwrap();
        write_boot_area(&ram).unwrap();
        let mode = PagingMode::from_regs(1 << 31, PML4, 1 << 5, 1 << 10);
        let at = |gva| translate(&ram, mode, gva).map(|t| t.gpa);
        assert_eq!(at(0x100_0000), Ok(0x100_0000), "identity");
        // start_kernel of a kernel loaded at 16 MiB, before it switches tables.
        assert_eq!(at(KERNEL_MAP + 0x304_ee41), Ok(0x304_ee41));
        assert!(at(0xffff_8880_0000_0000).is_err(), "nothing else");
    }
}
