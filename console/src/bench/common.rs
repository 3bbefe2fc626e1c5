//! What every bench figure needs: the figure itself, the `spin` image with its
//! mode and count patched in (as a bare VM or a console session), medians.

use serde::Serialize;
use vmiscope_vmm::{Vm, VmConfig};

use crate::error::Error;

pub use crate::stats::median;

#[derive(Debug, Serialize)]
pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    pub value: f64,
    /// The raw-KVM figure for the same thing, where one exists.
    pub baseline: Option<f64>,
    pub ratio: Option<f64>,
    pub note: String,
}

/// The `spin` image with its mode and count patched in.
pub fn spin_vm(mode: u64, n: u64, vcpus: u32) -> Result<Vm, Error> {
    let img = vmiscope_images::find("spin").ok_or("missing image")?;
    let vm = Vm::new(
        &VmConfig {
            vcpus,
            ..VmConfig::default()
        },
        img.elf,
    )?;
    for (sym, v) in [("spin_mode", mode), ("spin_count", n)] {
        let at = spin_sym(sym)?;
        vm.shared().ram().write(at, &v.to_le_bytes())?;
    }
    Ok(vm)
}

pub fn spin_sym(name: &str) -> Result<u64, Error> {
    let img = vmiscope_images::find("spin").ok_or("missing image")?;
    let sym = vmiscope_monitor::Symbols::parse(img.elf).get(name);
    Ok(sym.ok_or_else(|| format!("spin lacks {name}"))?)
}

/// One console run of `spin` (hooked CPL3 writes, logged) with or without the TUI
/// rendering (off screen, the real drawing code, at its frame rate). Returns events
/// per second and, with the TUI, every event's delay until a frame showed it (ms).
/// A console session on `spin`, paused at its entry, with its mode and count
/// patched in through the console's own `mem write`.
pub fn spin_session(mode: u64, n: u64) -> Result<crate::session::Session, Error> {
    let mut s = crate::session::Session::start(&crate::cli::RunArgs::for_image("spin"))?;
    let le = |v: u64| {
        v.to_le_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    s.exec(&format!("mem write spin_mode {}", le(mode)))?;
    s.exec(&format!("mem write spin_count {}", le(n)))?;
    Ok(s)
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub host: String,
    /// What the baseline column is.
    pub baseline: &'static str,
    pub iterations: u64,
    pub repeat: usize,
    pub figures: Vec<Figure>,
}
