//! A symbol-only ELF for gdb and LLDB: a kernel whose image is not an ELF with
//! symbols (a Linux bzImage, or a stripped vmlinux whose names come from its
//! kallsyms tables) is described to the debugger by this file instead, served
//! through `qXfer:exec-file`. Its sections hold no bytes (SHT_NOBITS): code and
//! data are read from the guest.

use vmiscope_vmm::Symbols;

const SHT_SYMTAB: u32 = 2;
const SHT_STRTAB: u32 = 3;
const SHT_NOBITS: u32 = 8;
const SHF_ALLOC: u64 = 2;
const SHF_EXECINSTR: u64 = 4;
const SHN_ABS: u16 = 0xfff1;
const STT_OBJECT: u8 = 1;
const STT_FUNC: u8 = 2;
const STB_GLOBAL: u8 = 1;

/// Code ranges a Linux kernel names: (section, start symbol, end symbol).
const TEXT: [(&str, &str, &str); 2] = [
    (".text", "_stext", "_etext"),
    (".init.text", "_sinittext", "_einittext"),
];

/// A section header: name offset, type, flags, addr, offset, size, link, info,
/// align, entsize.
type Shdr = (u32, u32, u64, u64, u64, u64, u32, u32, u64, u64);

/// A code range: start, end, its section's index.
type Text = (u64, u64, u16);

/// Section names, as `.shstrtab` holds them.
#[derive(Default)]
struct Names(Vec<u8>);

impl Names {
    fn add(&mut self, n: &str) -> u32 {
        if self.0.is_empty() {
            self.0.push(0);
        }
        let at = self.0.len() as u32;
        self.0.extend(n.as_bytes());
        self.0.push(0);
        at
    }
}

/// The ELF file: one code section (and PT_LOAD) per range in `TEXT` the
/// symbols give, its symbols functions there; every other symbol absolute
/// (data, per-CPU offsets), which gdb still reads and prints by name.
pub fn elf(symbols: &Symbols) -> Vec<u8> {
    let mut names = Names::default();
    let mut sections: Vec<Shdr> = vec![(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)];
    let mut text: Vec<Text> = vec![];
    for (section, start, end) in TEXT {
        if let (Some(s), Some(e)) = (symbols.get(start), symbols.get(end))
            && e > s
        {
            let flags = SHF_ALLOC | SHF_EXECINSTR;
            sections.push((
                names.add(section),
                SHT_NOBITS,
                flags,
                s,
                0,
                e - s,
                0,
                0,
                16,
                0,
            ));
            text.push((s, e, sections.len() as u16 - 1));
        }
    }
    let (symtab, strtab) = symbol_table(symbols, &text);
    let mut out = vec![0u8; 64];
    out.extend(program_headers(&text));
    let symtab_index = sections.len() as u32;
    let (n_symtab, n_strtab) = (names.add(".symtab"), names.add(".strtab"));
    let n_shstrtab = names.add(".shstrtab");
    let mut place = |bytes: &[u8]| {
        let at = out.len() as u64;
        out.extend(bytes);
        (at, bytes.len() as u64)
    };
    let (symtab_at, symtab_len) = place(&symtab);
    let (strtab_at, strtab_len) = place(&strtab);
    let (names_at, names_len) = place(&names.0);
    // sh_info of .symtab: the first global symbol (all but the null one are).
    let link = symtab_index + 1;
    sections.push((
        n_symtab, SHT_SYMTAB, 0, 0, symtab_at, symtab_len, link, 1, 8, 24,
    ));
    sections.push((
        n_strtab, SHT_STRTAB, 0, 0, strtab_at, strtab_len, 0, 0, 1, 0,
    ));
    sections.push((
        n_shstrtab, SHT_STRTAB, 0, 0, names_at, names_len, 0, 0, 1, 0,
    ));
    while !out.len().is_multiple_of(8) {
        out.push(0);
    }
    let shoff = out.len() as u64;
    for sh in &sections {
        out.extend(section_header(sh));
    }
    let entry = text.first().map_or(0, |t| t.0);
    out[..64].copy_from_slice(&file_header(entry, text.len(), shoff, sections.len()));
    out
}

/// `.symtab` and `.strtab`: every symbol global, a function inside `text`.
fn symbol_table(symbols: &Symbols, text: &[Text]) -> (Vec<u8>, Vec<u8>) {
    let mut strtab = vec![0u8];
    let mut symtab = vec![0u8; 24];
    for (sym, addr, size) in symbols.entries() {
        let (shndx, kind) = text
            .iter()
            .find(|(s, e, _)| addr >= *s && addr < *e)
            .map_or((SHN_ABS, STT_OBJECT), |t| (t.2, STT_FUNC));
        symtab.extend((strtab.len() as u32).to_le_bytes());
        symtab.push(STB_GLOBAL << 4 | kind);
        symtab.push(0);
        symtab.extend(shndx.to_le_bytes());
        symtab.extend(addr.to_le_bytes());
        symtab.extend(size.to_le_bytes());
        strtab.extend(sym.as_bytes());
        strtab.push(0);
    }
    (symtab, strtab)
}

/// One PT_LOAD per code range, with no bytes in the file, as an executable
/// has: LLDB sizes the module from its segments.
fn program_headers(text: &[Text]) -> Vec<u8> {
    let mut out = vec![];
    for (start, end, _) in text {
        out.extend(1u32.to_le_bytes()); // PT_LOAD
        out.extend(5u32.to_le_bytes()); // R | X
        out.extend(0u64.to_le_bytes()); // p_offset
        out.extend(start.to_le_bytes()); // p_vaddr
        out.extend(start.to_le_bytes()); // p_paddr
        out.extend(0u64.to_le_bytes()); // p_filesz
        out.extend((end - start).to_le_bytes()); // p_memsz
        out.extend(0x1000u64.to_le_bytes()); // p_align
    }
    out
}

fn section_header(sh: &Shdr) -> Vec<u8> {
    let &(name, kind, flags, addr, off, size, link, info, align, entsize) = sh;
    let mut out = Vec::with_capacity(64);
    out.extend(name.to_le_bytes());
    out.extend(kind.to_le_bytes());
    out.extend(flags.to_le_bytes());
    out.extend(addr.to_le_bytes());
    out.extend(off.to_le_bytes());
    out.extend(size.to_le_bytes());
    out.extend(link.to_le_bytes());
    out.extend(info.to_le_bytes());
    out.extend(align.to_le_bytes());
    out.extend(entsize.to_le_bytes());
    out
}

/// The ELF header of an x86-64 executable whose program headers follow it and
/// whose last section is `.shstrtab`.
fn file_header(entry: u64, phnum: usize, shoff: u64, shnum: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(64);
    h.extend(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    h.extend(2u16.to_le_bytes()); // ET_EXEC
    h.extend(62u16.to_le_bytes()); // EM_X86_64
    h.extend(1u32.to_le_bytes());
    h.extend(entry.to_le_bytes());
    h.extend(64u64.to_le_bytes()); // e_phoff
    h.extend(shoff.to_le_bytes());
    h.extend(0u32.to_le_bytes()); // e_flags
    h.extend(64u16.to_le_bytes()); // e_ehsize
    h.extend(56u16.to_le_bytes()); // e_phentsize
    h.extend((phnum as u16).to_le_bytes());
    h.extend(64u16.to_le_bytes()); // e_shentsize
    h.extend((shnum as u16).to_le_bytes());
    h.extend((shnum as u16 - 1).to_le_bytes()); // e_shstrndx
    h
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
