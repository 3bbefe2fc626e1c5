//! A symbol-only ELF for gdb and LLDB: a kernel whose image is not an ELF with
//! symbols (a Linux bzImage, or a stripped vmlinux whose names come from its
//! kallsyms tables) is described to the debugger by this file instead, served
//! through `qXfer:exec-file`. Its sections hold no bytes (SHT_NOBITS): code and
//! data are read from the guest. Written with `object`'s ELF writer.

use object::elf;
use object::write::StringId;
use object::write::elf::{FileHeader, ProgramHeader, SectionHeader, SectionIndex, Sym, Writer};
use vmiscope_monitor::Symbols;

/// Code ranges a Linux kernel names: (section, start symbol, end symbol).
const TEXT: [(&str, &str, &str); 2] = [
    (".text", "_stext", "_etext"),
    (".init.text", "_sinittext", "_einittext"),
];

/// A code range the symbols give: its section's name, start and end.
struct Text {
    name: &'static str,
    start: u64,
    end: u64,
}

/// The ELF file: one code section (and PT_LOAD) per range in `TEXT` the
/// symbols give, its symbols functions there; every other symbol absolute
/// (data, per-CPU offsets), which gdb still reads and prints by name.
pub fn elf(symbols: &Symbols) -> Vec<u8> {
    let text: Vec<Text> = TEXT
        .iter()
        .filter_map(|&(name, s, e)| {
            let (start, end) = (symbols.get(s)?, symbols.get(e)?);
            (end > start).then_some(Text { name, start, end })
        })
        .collect();
    let entries: Vec<(&str, u64, u64)> = symbols.entries().collect();
    let mut out = Vec::new();
    let mut w = Writer::new(object::Endianness::Little, true, &mut out);
    // Reserve: headers, sections, symbols, then the tables, in file order.
    w.reserve_file_header();
    w.reserve_program_headers(text.len() as u32);
    w.reserve_null_section_index();
    let sections: Vec<(SectionIndex, StringId)> = text
        .iter()
        .map(|t| {
            (
                w.reserve_section_index(),
                w.add_section_name(t.name.as_bytes()),
            )
        })
        .collect();
    w.reserve_null_symbol_index();
    let syms = reserve_symbols(&mut w, &entries, &text, &sections);
    w.reserve_symtab_section_index();
    w.reserve_strtab_section_index();
    w.reserve_shstrtab_section_index();
    w.reserve_symtab();
    w.reserve_strtab();
    w.reserve_shstrtab();
    w.reserve_section_headers();
    // Write, in the same order.
    let header = FileHeader {
        os_abi: elf::ELFOSABI_NONE,
        abi_version: 0,
        e_type: elf::ET_EXEC,
        e_machine: elf::EM_X86_64,
        e_entry: text.first().map_or(0, |t| t.start),
        e_flags: 0,
    };
    if w.write_file_header(&header).is_err() {
        return Vec::new();
    }
    w.write_align_program_headers();
    // One PT_LOAD per code range, with no bytes in the file, as an
    // executable has: LLDB sizes the module from its segments.
    for t in &text {
        w.write_program_header(&ProgramHeader {
            p_type: elf::PT_LOAD,
            p_flags: elf::PF_R | elf::PF_X,
            p_offset: 0,
            p_vaddr: t.start,
            p_paddr: t.start,
            p_filesz: 0,
            p_memsz: t.end - t.start,
            p_align: 0x1000,
        });
    }
    w.write_null_symbol();
    for s in &syms {
        w.write_symbol(s);
    }
    w.write_strtab();
    w.write_shstrtab();
    w.write_null_section_header();
    for (t, (_, name)) in text.iter().zip(&sections) {
        w.write_section_header(&text_header(t, *name));
    }
    // Every symbol but the null one is global: the first global is 1.
    w.write_symtab_section_header(1);
    w.write_strtab_section_header();
    w.write_shstrtab_section_header();
    out
}

/// Reserves a symbol for each entry: a function in the code section that holds
/// it, else an absolute object.
fn reserve_symbols<'a>(
    w: &mut Writer<'a>,
    entries: &[(&'a str, u64, u64)],
    text: &[Text],
    sections: &[(SectionIndex, StringId)],
) -> Vec<Sym> {
    let section_of = |addr: u64| {
        text.iter()
            .position(|t| addr >= t.start && addr < t.end)
            .map(|i| sections[i].0)
    };
    entries
        .iter()
        .map(|&(name, addr, size)| {
            let section = section_of(addr);
            w.reserve_symbol_index(section);
            let kind = match section {
                Some(_) => elf::STT_FUNC,
                None => elf::STT_OBJECT,
            };
            Sym {
                name: Some(w.add_string(name.as_bytes())),
                section,
                st_info: (elf::STB_GLOBAL << 4) | kind,
                st_other: 0,
                st_shndx: if section.is_some() { 0 } else { elf::SHN_ABS },
                st_value: addr,
                st_size: size,
            }
        })
        .collect()
}

/// A code range's section: no bytes in the file (code is read from the guest).
fn text_header(t: &Text, name: StringId) -> SectionHeader {
    SectionHeader {
        name: Some(name),
        sh_type: elf::SHT_NOBITS,
        sh_flags: (elf::SHF_ALLOC | elf::SHF_EXECINSTR) as u64,
        sh_addr: t.start,
        sh_offset: 0,
        sh_size: t.end - t.start,
        sh_link: 0,
        sh_info: 0,
        sh_addralign: 16,
        sh_entsize: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_symbol_file_reads_back_with_every_symbol_at_its_address() {
        let syms = Symbols::from_entries(vec![
            (0xffff_ffff_8100_0000, 0x10, "_stext".into()),
            (0xffff_ffff_8100_0010, 0x20, "start_kernel".into()),
            (0xffff_ffff_8200_0000, 0, "_etext".into()),
            (0xffff_ffff_8210_0000, 0, "_sinittext".into()),
            (0xffff_ffff_8210_0040, 0, "start_kernel_init".into()),
            (0xffff_ffff_8220_0000, 0, "_einittext".into()),
            (0xffff_ffff_8200_0360, 8, "sys_call_table".into()),
            (0xffff_ffff_8300_0000, 0, "_end".into()),
            (0x1000, 0, "fixed_percpu_data".into()),
        ]);
        let back = Symbols::parse(&elf(&syms));
        for (name, addr) in syms.iter() {
            assert_eq!(back.get(name), Some(addr), "{name}");
        }
        assert_eq!(back.size("start_kernel"), Some(0x20));
    }
}
