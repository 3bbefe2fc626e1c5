//! `p`/`P`: one register. gdb and LLDB use them for what a short `g` leaves out
//! (x87/SSE, the segment bases, the system registers; see `Extent`), and LLDB
//! for every register once `p` works.

use gdbstub::arch::Registers;
use gdbstub::common::Tid;
use gdbstub::target::ext::base::single_register_access::SingleRegisterAccess;
use gdbstub::target::{TargetError, TargetResult};

use super::*;
use crate::gdb::arch::{Extent, GENERAL_BYTES, VmiRegId, VmiRegs};
use crate::gdb::base::{apply, from_kvm};

impl SingleRegisterAccess<Tid> for GdbTarget {
    fn read_register(
        &mut self,
        t: Tid,
        reg: VmiRegId,
        buf: &mut [u8],
    ) -> TargetResult<usize, Self> {
        let Some(cpu) = self.cpu(t) else {
            return err("no such thread");
        };
        let regs = self
            .registers(cpu, reg.in_fpu())
            .ok_or(TargetError::NonFatal)?;
        if reg.in_fpu() && regs.extent != Extent::Full {
            return err("the x87/SSE state could not be read");
        }
        let bytes = regs.to_bytes();
        let value = &bytes[reg.range()];
        let n = value.len().min(buf.len());
        buf[..n].copy_from_slice(&value[..n]);
        Ok(n)
    }

    /// Read, change one, write back: on the vCPU's thread in one go, so nothing
    /// runs between the read and the write. The x87/SSE state (an ioctl each
    /// way) is read and written only for one of its registers, the segment and
    /// system registers only for one of theirs.
    fn write_register(&mut self, t: Tid, reg: VmiRegId, val: &[u8]) -> TargetResult<(), Self> {
        let Some(cpu) = self.cpu(t) else {
            return err("no such thread");
        };
        if val.len() != reg.range().len() {
            return err("wrong size");
        }
        let extent = match reg.range().end {
            _ if reg.in_fpu() => Extent::Full,
            end if end <= GENERAL_BYTES => Extent::General,
            _ => Extent::System,
        };
        let (range, val) = (reg.range(), val.to_vec());
        let done = self.on_cpu(cpu, move |c| {
            let f = match extent {
                Extent::Full => Some(c.fpu()?),
                _ => None,
            };
            let mut bytes = from_kvm(&VcpuCtl::regs(c), &VcpuCtl::sregs(c), f.as_ref()).to_bytes();
            bytes[range].copy_from_slice(&val);
            let mut regs = VmiRegs::default();
            regs.gdb_deserialize(&bytes).ok()?;
            apply(c, &VmiRegs { extent, ..regs });
            Some(())
        });
        done.flatten().ok_or(TargetError::NonFatal)
    }
}
