//! MSR interception through KVM's MSR filter: an intercepted MSR is *denied* by
//! the filter, which with `KVM_MSR_EXIT_REASON_FILTER` turns the access into a
//! user-space exit instead of a #GP.

use std::collections::BTreeMap;

use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

/// Whether WRMSR of `value` to `index` raises #GP on the CPU itself: the MSRs
/// that hold a linear address take only canonical ones (48-bit, or 57-bit with
/// CR4.LA57).
pub fn write_faults(index: u32, value: u64, la57: bool) -> bool {
    const ADDRESS_MSRS: [u32; 7] = [
        0x175,       // SYSENTER_ESP
        0x176,       // SYSENTER_EIP
        0xc000_0082, // LSTAR
        0xc000_0083, // CSTAR
        0xc000_0100, // FS_BASE
        0xc000_0101, // GS_BASE
        0xc000_0102, // KERNEL_GS_BASE
    ];
    let bits = if la57 { 57 } else { 48 };
    let canonical = ((value as i64) << (64 - bits) >> (64 - bits)) as u64 == value;
    ADDRESS_MSRS.contains(&index) && !canonical
}

/// KVM accepts at most 16 ranges.
const MAX_RANGES: usize = 16;
/// MSRs closer than this share one range (a bitmap of this many bits).
const WINDOW: u32 = 256;

#[derive(Debug, Default)]
pub struct MsrIntercepts {
    /// index -> (read, write)
    msrs: BTreeMap<u32, (bool, bool)>,
}

impl MsrIntercepts {
    pub fn set(&mut self, index: u32, read: bool, write: bool) {
        if read || write {
            self.msrs.insert(index, (read, write));
        } else {
            self.msrs.remove(&index);
        }
    }

    pub fn get(&self, index: u32) -> (bool, bool) {
        *self.msrs.get(&index).unwrap_or(&(false, false))
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, bool, bool)> + '_ {
        self.msrs.iter().map(|(i, (r, w))| (*i, *r, *w))
    }

    /// Groups intercepted MSRs into (flags, base, bitmap) ranges; a 0 bit denies
    /// (= exits), a 1 bit allows.
    fn ranges(&self) -> Result<Vec<(MsrFilterRangeFlags, u32, Vec<u8>)>, String> {
        let mut out = Vec::new();
        for (flag, pick) in [
            (MsrFilterRangeFlags::READ, 0),
            (MsrFilterRangeFlags::WRITE, 1),
        ] {
            let idx: Vec<u32> = self
                .msrs
                .iter()
                .filter(|(_, rw)| if pick == 0 { rw.0 } else { rw.1 })
                .map(|(i, _)| *i)
                .collect();
            let mut i = 0;
            while i < idx.len() {
                let base = idx[i];
                let mut bitmap = vec![0xffu8; (WINDOW / 8) as usize];
                while i < idx.len() && idx[i] - base < WINDOW {
                    let bit = idx[i] - base;
                    bitmap[(bit / 8) as usize] &= !(1 << (bit % 8));
                    i += 1;
                }
                out.push((flag, base, bitmap));
            }
        }
        if out.len() > MAX_RANGES {
            return Err(format!(
                "too many scattered MSRs to intercept ({} filter ranges, KVM allows 16)",
                out.len()
            ));
        }
        Ok(out)
    }

    /// Installs the filter on `vm`.
    pub fn apply(&self, vm: &VmFd) -> Result<(), String> {
        let ranges = self.ranges()?;
        let r: Vec<MsrFilterRange<'_>> = ranges
            .iter()
            .map(|(flags, base, bitmap)| MsrFilterRange {
                flags: *flags,
                base: *base,
                msr_count: WINDOW,
                bitmap,
            })
            .collect();
        vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &r)
            .map_err(|e| format!("KVM_X86_SET_MSR_FILTER: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_nearby_msrs_and_splits_read_write() {
        let mut m = MsrIntercepts::default();
        m.set(0xc000_0081, false, true);
        m.set(0xc000_0082, true, true);
        m.set(0x176, false, true);
        let r = m.ranges().unwrap();
        assert_eq!(r.len(), 3);
        let (flags, base, bitmap) = &r[0];
        assert_eq!((*flags, *base), (MsrFilterRangeFlags::READ, 0xc000_0082));
        assert_eq!(bitmap[0], 0xfe);
        let w: Vec<_> = r
            .iter()
            .filter(|x| x.0 == MsrFilterRangeFlags::WRITE)
            .map(|x| (x.1, x.2[0]))
            .collect();
        assert_eq!(w, [(0x176, 0xfe), (0xc000_0081, 0xfc)]);
        m.set(0x176, false, false);
        assert_eq!(m.ranges().unwrap().len(), 2);
        for i in 0..20 {
            m.set(0x1000 * i, false, true);
        }
        assert!(m.ranges().is_err());
    }
}
