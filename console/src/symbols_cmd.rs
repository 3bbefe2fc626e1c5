//! `vmiscope symbols IMAGE [--elf FILE]`: the symbols a run would use, as a
//! System.map, or as a symbol-only ELF file for debuggers that do not fetch
//! one from the stub (LLDB: `lldb FILE -o 'gdb-remote PORT'`).

/// `vmiscope symbols IMAGE`: the symbols vmiscope would use, as a System.map.
pub fn symbols(a: &crate::cli::SymbolsArgs) -> i32 {
    match list_symbols(a) {
        Ok(()) => 0,
        Err(e) => {
            crate::errln!("vmiscope: error: {e}");
            2
        }
    }
}

fn list_symbols(a: &crate::cli::SymbolsArgs) -> Result<(), crate::error::Error> {
    let syms = match &a.symbols {
        Some(map) => vmiscope_monitor::os::maps::read_map(map)?,
        None => {
            let (image, _) =
                crate::launch::load_image(&a.image, vmiscope_vmm::config::MAX_MEM_MIB)?;
            vmiscope_monitor::os::maps::for_image(&a.image, &image, None)?
        }
    };
    if syms.is_empty() {
        return Err(format!("{}: no symbols found", a.image).into());
    }
    if let Some(path) = &a.elf {
        std::fs::write(path, crate::gdb::symbol_elf(&syms))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        crate::errln!(
            "vmiscope: wrote {} symbols to {}",
            syms.len(),
            path.display()
        );
        return Ok(());
    }
    for (name, addr) in syms.iter() {
        crate::outln!("{addr:016x} {name}");
    }
    Ok(())
}
