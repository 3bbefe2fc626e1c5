//! Guest RAM: one anonymous mapping from vm-memory, at guest-physical 0.

use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileMemory,
};
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

    /// `lock cmpxchg` of `width` bytes (1, 2, 4 or 8, naturally aligned) at
    /// `gpa`: replaces `old` by `new` if memory still holds `old`; returns
    /// whether it did. The guest's vCPUs use the same memory with their own
    /// atomic instructions, so the host's access is atomic too (vm-memory checks
    /// the bounds and the alignment).
    pub fn compare_exchange(
        &self,
        gpa: u64,
        width: usize,
        old: u64,
        new: u64,
    ) -> Result<bool, VmError> {
        let outside = || VmError::OutsideRam(gpa);
        let slice = self
            .mem
            .get_slice(GuestAddress(gpa), width)
            .map_err(|_| outside())?;
        let (o, s) = (Ordering::SeqCst, Ordering::SeqCst);
        let swapped = match width {
            1 => slice
                .get_atomic_ref::<AtomicU8>(0)
                .map(|a| a.compare_exchange(old as u8, new as u8, o, s).is_ok()),
            2 => slice
                .get_atomic_ref::<AtomicU16>(0)
                .map(|a| a.compare_exchange(old as u16, new as u16, o, s).is_ok()),
            4 => slice
                .get_atomic_ref::<AtomicU32>(0)
                .map(|a| a.compare_exchange(old as u32, new as u32, o, s).is_ok()),
            8 => slice
                .get_atomic_ref::<AtomicU64>(0)
                .map(|a| a.compare_exchange(old, new, o, s).is_ok()),
            _ => return Err(outside()),
        };
        swapped.map_err(|_| outside())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_exchange_swaps_only_what_it_expects_and_checks_its_bounds() {
        let ram = GuestRam::new(0x2000).unwrap();
        ram.write(0x100, &7u32.to_le_bytes()).unwrap();
        assert!(
            !ram.compare_exchange(0x100, 4, 8, 9).unwrap(),
            "memory holds 7"
        );
        assert!(ram.compare_exchange(0x100, 4, 7, 9).unwrap());
        assert_eq!(ram.read_u64_at(0x100).unwrap() as u32, 9);
        assert!(ram.compare_exchange(0x1ff8, 8, 0, 1).unwrap());
        // Misaligned, past the end, or an odd width: refused, nothing written.
        assert!(ram.compare_exchange(0x101, 4, 0, 1).is_err());
        assert!(ram.compare_exchange(0x2000, 1, 0, 1).is_err());
        assert!(ram.compare_exchange(0x108, 3, 0, 1).is_err());
        assert_eq!(ram.read_u64_at(0x108).unwrap(), 0);
    }
}
