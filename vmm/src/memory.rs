//! Guest RAM: one anonymous mapping from vm-memory, at guest-physical 0.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmiscope_introspect::paging::PhysRead;

use crate::error::VmError;

pub const PAGE_SIZE: u64 = 4096;

/// Guest RAM and the host address it lives at.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
    host: u64,
}

impl GuestRam {
    /// Maps `size` bytes (a multiple of 4 KiB) of zeroed RAM.
    pub fn new(size: u64) -> Result<Self, VmError> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|e| VmError::Memory(e.to_string()))?;
        let host = mem
            .iter()
            .next()
            .and_then(|r| r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok());
        let host = host.ok_or_else(|| VmError::Memory("no host mapping".into()))? as u64;
        Ok(GuestRam { mem, size, host })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host virtual address of guest-physical 0.
    pub fn host_base(&self) -> u64 {
        self.host
    }

    pub fn inner(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| VmError::OutsideRam(gpa))
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| VmError::OutsideRam(gpa))
    }

    pub fn read_u64_at(&self, gpa: u64) -> Result<u64, VmError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

impl PhysRead for GuestRam {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        self.read_u64_at(gpa).ok()
    }
}
