//! `vmiscope symbols IMAGE`: the symbols a run would use, as a System.map.

/// `vmiscope symbols IMAGE`: the symbols vmiscope would use, as a System.map.
pub fn symbols(a: &crate::cli::SymbolsArgs) -> i32 {
    match list_symbols(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vmiscope: {e}");
            2
        }
    }
}

fn list_symbols(a: &crate::cli::SymbolsArgs) -> Result<(), crate::error::Error> {
    let syms = match &a.symbols {
        Some(map) => crate::symbols::read_map(map)?,
        None => {
            let (image, _) =
                crate::launch::load_image(&a.image, vmiscope_vmm::config::MAX_MEM_MIB)?;
            crate::symbols::for_image(&a.image, &image, None)?
        }
    };
    if syms.is_empty() {
        return Err(format!("{}: no symbols found", a.image).into());
    }
    for (name, addr) in syms.iter() {
        crate::outln!("{addr:016x} {name}");
    }
    Ok(())
}
