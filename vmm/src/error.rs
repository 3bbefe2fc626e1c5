//! Error types of the VMM, one narrow enum per concern.

use thiserror::Error;

/// Building or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    #[error("/dev/kvm: {0}")]
    Kvm(String),
    #[error("KVM {op} failed: {err}")]
    Ioctl {
        op: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("guest-physical {0:#x} is outside RAM")]
    OutsideRam(u64),
    #[error("no vCPU {0}")]
    NoVcpu(u32),
    #[error("bad image: {0}")]
    Image(#[from] LoadError),
    #[error("{0}")]
    Config(String),
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
}

impl VmError {
    pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        move |err| VmError::Ioctl { op, err }
    }
}

/// Why an image cannot be loaded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LoadError {
    #[error("the image is empty")]
    Empty,
    #[error("not an ELF64 x86-64 executable or a multiboot v1 kernel ({0})")]
    UnknownFormat(String),
    #[error("ELF {0}, expected x86-64 (EM_X86_64)")]
    WrongMachine(String),
    #[error("the ELF file is truncated or malformed: {0}")]
    Malformed(String),
    #[error("the image needs {need} bytes at {at:#x}, beyond the {ram} MiB of RAM (try --mem)")]
    TooBig { at: u64, need: u64, ram: u64 },
    #[error("segment at {0:#x} overlaps the VMM's boot structures below {1:#x}")]
    OverlapsBootArea(u64, u64),
    #[error("entry point {0:#x} is not inside a loaded segment")]
    EntryOutside(u64),
    #[error("the image has no loadable segment")]
    NoSegments,
    #[error("multiboot header: {0}")]
    Multiboot(String),
    #[error("Linux kernel: {0}")]
    Linux(String),
    #[error("module {0}: {1}")]
    Module(String, String),
}
