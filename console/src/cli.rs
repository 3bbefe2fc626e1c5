//! The command line (see README.md for the contract).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use vmiscope_images::IMAGES;

#[derive(Parser, Debug)]
#[command(
    name = "vmiscope",
    version,
    about = "A debugger-style VM introspection console on KVM"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the built-in guest images (and write their ELF files to DIR).
    Images(ImagesArgs),
    /// Run an image: a built-in name or a path to an ELF64 / multiboot v1 file.
    Run(Box<RunArgs>),
    /// What this host's KVM can trap, measured on scratch VMs.
    Caps(CapsArgs),
    /// Performance figures, each beside a raw-KVM baseline from the same run.
    Bench(BenchArgs),
    /// The symbols vmiscope finds for an image ("ADDRESS NAME" lines): ELF
    /// symbols, or a Linux kernel's own kallsyms tables.
    Symbols(SymbolsArgs),
}

#[derive(Args, Debug)]
pub struct SymbolsArgs {
    /// Built-in image name or path (a bzImage, a vmlinux, an ELF).
    pub image: String,
    /// Read this System.map instead of the image.
    #[arg(long, value_name = "FILE")]
    pub symbols: Option<PathBuf>,
    /// Write them as a symbol-only ELF file (for `lldb FILE`, `gdb FILE`)
    /// instead of listing them.
    #[arg(long, value_name = "FILE")]
    pub elf: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// Write every image's ELF file into this directory.
    #[arg(long, value_name = "DIR")]
    pub export: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Built-in image name or path.
    pub image: String,
    /// Number of vCPUs (default: what the image wants).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem: u64,
    /// No UI: guest serial on stdout, events and the stop on stderr; exit status =
    /// the guest's exit code, or non-zero on a VMM error.
    #[arg(long)]
    pub batch: bool,
    /// Stop the run after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Kernel command line (multiboot and Linux kernels).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// A System.map for a Linux kernel (default: one found beside the kernel,
    /// else the kernel's own kallsyms tables).
    #[arg(long, value_name = "FILE")]
    pub symbols: Option<PathBuf>,
    /// Boot a bzImage through its own decompressor (slow under emulation; by
    /// default vmiscope decompresses it and enters the vmlinux).
    #[arg(long)]
    pub own_decompressor: bool,
    /// A Linux kernel's initial RAM disk (initramfs).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// A multiboot module (repeatable), as QEMU's -initrd.
    #[arg(long = "module", value_name = "FILE")]
    pub modules: Vec<PathBuf>,
    /// Print one line per handled event.
    #[arg(long)]
    pub events: bool,
    /// Switch on protection policies: NAME[,NAME...] or `all` (see README).
    #[arg(long, value_name = "NAMES")]
    pub protect: Option<String>,
    /// Report what would be denied, enforce nothing.
    #[arg(long)]
    pub log_only: bool,
    /// Allow-list rules (JSON).
    #[arg(long, value_name = "FILE")]
    pub exceptions: Option<PathBuf>,
    /// Every handled event and alert as JSON lines.
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,
    /// Run console commands from FILE without a UI; `expect` lines assert.
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,
    /// The line-oriented console (default on a terminal: the TUI).
    #[arg(long, conflicts_with_all = ["batch", "script"])]
    pub repl: bool,
    /// The full-screen console.
    #[arg(long, conflicts_with_all = ["batch", "script", "repl"])]
    pub tui: bool,
    /// gdb remote stub on ADDR (`PORT` binds 127.0.0.1); the guest waits for gdb.
    #[arg(long, value_name = "ADDR")]
    pub gdb: Option<String>,
    /// Let gdb's `monitor` write host files (`journal save`, `exceptions save`);
    /// refused by default, since whoever reaches the stub would get the writes.
    #[arg(long)]
    pub gdb_host_writes: bool,
    /// Run without the in-kernel irqchip/PIT (HLT then exits to the VMM).
    #[arg(long)]
    pub no_irqchip: bool,
    /// Keep KVM's fix-hypercall quirk (a CPL0 VMCALL then livelocks a PVM vCPU and
    /// the watchdog stops it); by default VMCALL raises #UD in the guest.
    #[arg(long)]
    pub hypercall_quirk: bool,
}

#[derive(Args, Debug)]
pub struct CapsArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Exits per measurement.
    #[arg(long, default_value_t = 20000)]
    pub iterations: u64,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Only the Linux figure, on this kernel: process start to its banner,
    /// host-decompressed vmlinux vs the bzImage's own decompressor.
    #[arg(long, value_name = "KERNEL")]
    pub linux: Option<String>,
    /// With --linux: also process start to the kernel's `Run /init` with this
    /// initramfs, beside QEMU+KVM (qemu-system-x86_64) booting the same files.
    #[arg(long, value_name = "FILE", requires = "linux")]
    pub initrd: Option<String>,
    /// Only this group of figures.
    #[arg(long, value_enum, value_name = "GROUP")]
    pub only: Option<BenchGroup>,
}

/// The groups of `vmiscope bench` figures, in the order they run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchGroup {
    /// I/O and MMIO exits, page protection.
    Exits,
    /// Hooks, breakpoints, engine throughput.
    Engine,
    /// The TUI attached to a running session.
    Console,
    /// The gdb stub: stepi, packets, continue to a breakpoint, memory reads.
    Gdb,
    /// Process start to a guest's exit.
    Hello,
}

impl RunArgs {
    /// `vmiscope run NAME` with every option at its default.
    pub fn for_image(name: &str) -> RunArgs {
        RunArgs {
            image: name.into(),
            vcpus: None,
            mem: 128,
            batch: false,
            timeout: None,
            cmdline: String::new(),
            initrd: None,
            own_decompressor: false,
            symbols: None,
            modules: vec![],
            events: false,
            protect: None,
            log_only: false,
            exceptions: None,
            journal: None,
            script: None,
            repl: false,
            tui: false,
            gdb: None,
            gdb_host_writes: false,
            no_irqchip: false,
            hypercall_quirk: false,
        }
    }
}

pub fn images(a: &ImagesArgs) -> i32 {
    if let Some(dir) = &a.export {
        if let Err(e) = std::fs::create_dir_all(dir) {
            crate::errln!("vmiscope: error: cannot create {}: {e}", dir.display());
            return 2;
        }
        for i in IMAGES {
            let p = dir.join(format!("{}.elf", i.name));
            if let Err(e) = std::fs::write(&p, i.elf) {
                crate::errln!("vmiscope: error: cannot write {}: {e}", p.display());
                return 2;
            }
        }
        crate::errln!(
            "vmiscope: wrote {} images to {}",
            IMAGES.len(),
            dir.display()
        );
        // The table was asked for by `images` alone, not by an export.
        return 0;
    }
    crate::outln!("{:<14} {:<8} {:>5}  WHAT IT DOES", "IMAGE", "KIND", "VCPUS");
    for i in IMAGES {
        crate::outln!(
            "{:<14} {:<8} {:>5}  {}",
            i.name,
            i.kind.label(),
            i.vcpus,
            i.summary
        );
    }
    0
}

/// Which interactive front end runs (and `Quit` once the user leaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tui,
    Repl,
    Quit,
}
