//! An in-memory `Guest` that records every call and can fail any one of them, so
//! engine logic (and the VMM's adapter, with the `mock` feature) is tested without
//! a hypervisor, in the manner of vmi-rs's mock driver.

use std::collections::{BTreeMap, BTreeSet};

use crate::arch::{Regs, SRegs};
use crate::glue::{BreakpointKind, GlueError, PageRights, VcpuView, VmControl};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    SetRights(u64, PageRights),
    CommitRights,
    InterceptMsr(u32, bool, bool),
    SetBreakpoint(u64, bool),
    Inject(u8),
    SetRegs,
    SetSregs,
    SetXcr0(u64),
    WritePhys(u64, usize),
    Cmpxchg(u64, bool),
}

/// The kinds of calls that change hypervisor state (and can be made to fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reads of guest-physical memory (not recorded: there are many).
    ReadPhys,
    SetRights,
    CommitRights,
    InterceptMsr,
    SetBreakpoint,
    Inject,
    SetXcr0,
    WritePhys,
    Cmpxchg,
}

impl Call {
    pub fn op(&self) -> Option<Op> {
        Some(match self {
            Call::SetRights(..) => Op::SetRights,
            Call::CommitRights => Op::CommitRights,
            Call::InterceptMsr(..) => Op::InterceptMsr,
            Call::SetBreakpoint(..) => Op::SetBreakpoint,
            Call::Inject(_) => Op::Inject,
            Call::SetXcr0(_) => Op::SetXcr0,
            Call::WritePhys(..) => Op::WritePhys,
            Call::Cmpxchg(..) => Op::Cmpxchg,
            Call::SetRegs | Call::SetSregs => return None,
        })
    }
}

pub struct MockGuest {
    /// Fail the n-th (from 1) call of this kind, counted from when it was set.
    /// Interior mutability: reads (`&self`) can be made to fail too.
    fault: std::cell::Cell<Option<(Op, usize)>>,
    pub vcpu: u32,
    pub vcpus: u32,
    pub regs: Regs,
    pub sregs: SRegs,
    pub xcr0: u64,
    pub ram: Vec<u8>,
    pub rights: BTreeMap<u64, PageRights>,
    pub msrs: BTreeMap<u32, (bool, bool)>,
    pub breakpoints: BTreeSet<u64>,
    /// Hidden breakpoints go to debug registers (as on a host with a free slot).
    pub register_breakpoints: bool,
    /// INT3s the host does not report (QEMU's emulated SVM): every patched
    /// breakpoint is `Trapped`, its page execute-trapped.
    pub int3_unreported: bool,
    /// Edits come from outside any exit (a VM-wide hook edit): no vCPU gives
    /// a polled class its baseline.
    pub vm_wide: bool,
    pub calls: Vec<Call>,
}

/// Page tables of the mock: PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000
/// mapping the first 2 MiB with 4 KiB pages, identity, user, writable.
pub const MOCK_CR3: u64 = 0x1000;

impl MockGuest {
    pub fn new() -> Self {
        let mut g = MockGuest {
            fault: std::cell::Cell::new(None),
            vcpu: 0,
            vcpus: 1,
            regs: Regs::default(),
            sregs: SRegs {
                cr0: 0x8005_0033,
                cr3: MOCK_CR3,
                cr4: 0x620,
                efer: 0xd01,
                cs_selector: 0x08,
                ..SRegs::default()
            },
            xcr0: 1,
            ram: vec![0; 4 << 20],
            rights: BTreeMap::new(),
            msrs: BTreeMap::new(),
            breakpoints: BTreeSet::new(),
            register_breakpoints: false,
            int3_unreported: false,
            vm_wide: false,
            calls: vec![],
        };
        g.put_u64(0x1000, 0x2000 | 7);
        g.put_u64(0x2000, 0x3000 | 7);
        g.put_u64(0x3000, 0x4000 | 7);
        for i in 0..512u64 {
            g.put_u64(0x4000 + 8 * i, (i << 12) | 7);
        }
        g
    }

    pub fn put(&mut self, gpa: u64, data: &[u8]) {
        self.ram[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
    }

    pub fn put_u64(&mut self, gpa: u64, v: u64) {
        self.put(gpa, &v.to_le_bytes());
    }

    pub fn u64_at(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.ram[gpa as usize..gpa as usize + 8].try_into().unwrap())
    }

    /// Maps the 4 KiB virtual page `gva` (< 2 MiB) to `gpa`.
    pub fn map(&mut self, gva: u64, gpa: u64) {
        self.put_u64(0x4000 + 8 * (gva >> 12), gpa | 7);
    }

    pub fn take_calls(&mut self) -> Vec<Call> {
        std::mem::take(&mut self.calls)
    }

    /// Makes the `nth` (from 1) next call of kind `op` fail with
    /// `GlueError::Failed`; it is still recorded.
    pub fn fail_nth(&mut self, op: Op, nth: usize) {
        self.fault.set(Some((op, nth)));
    }

    /// Records `call`, then fails it if it is the one `fail_nth` picked.
    fn record(&mut self, call: Call) -> Result<(), GlueError> {
        let op = call.op();
        self.calls.push(call);
        op.map_or(Ok(()), |op| self.check(op))
    }

    /// Fails this call of kind `op` if it is the one `fail_nth` picked.
    fn check(&self, op: Op) -> Result<(), GlueError> {
        match self.fault.get() {
            Some((f, 1)) if f == op => {
                self.fault.set(None);
                Err(GlueError::Failed(format!("injected {op:?} failure")))
            }
            Some((f, n)) if f == op => {
                self.fault.set(Some((f, n - 1)));
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl Default for MockGuest {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuView for MockGuest {
    fn vcpu(&self) -> u32 {
        self.vcpu
    }
    fn vcpu_count(&self) -> u32 {
        self.vcpus
    }
    fn regs(&self) -> Regs {
        self.regs
    }
    fn set_regs(&mut self, regs: &Regs) {
        self.regs = *regs;
        self.calls.push(Call::SetRegs);
    }
    fn sregs(&self) -> SRegs {
        self.sregs
    }
    fn set_sregs(&mut self, sregs: &SRegs) {
        self.sregs = *sregs;
        self.calls.push(Call::SetSregs);
    }
    fn xcr0(&self) -> Option<u64> {
        Some(self.xcr0)
    }
    fn set_xcr0(&mut self, value: u64) -> Result<(), GlueError> {
        self.record(Call::SetXcr0(value))?;
        self.xcr0 = value;
        Ok(())
    }
    fn inject_exception(&mut self, vector: u8, _error_code: Option<u32>) -> Result<(), GlueError> {
        self.record(Call::Inject(vector))
    }
}

impl VmControl for MockGuest {
    fn ram_size(&self) -> u64 {
        self.ram.len() as u64
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GlueError> {
        self.check(Op::ReadPhys)?;
        let end = gpa
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.ram.len() as u64)
            .ok_or(GlueError::OutsideRam(gpa))?;
        buf.copy_from_slice(&self.ram[gpa as usize..end as usize]);
        Ok(())
    }
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), GlueError> {
        let end = gpa
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.ram.len() as u64)
            .ok_or(GlueError::OutsideRam(gpa))?;
        self.record(Call::WritePhys(gpa, data.len()))?;
        self.ram[gpa as usize..end as usize].copy_from_slice(data);
        Ok(())
    }
    fn cmpxchg_phys(&mut self, gpa: u64, expected: &[u8], new: &[u8]) -> Result<bool, GlueError> {
        let mut cur = vec![0; expected.len()];
        self.read_phys(gpa, &mut cur)?;
        let ok = cur == expected;
        self.record(Call::Cmpxchg(gpa, ok))?;
        if ok {
            self.ram[gpa as usize..gpa as usize + new.len()].copy_from_slice(new);
        }
        Ok(ok)
    }
    fn set_page_rights(&mut self, gpa: u64, rights: PageRights) -> Result<(), GlueError> {
        if gpa >= self.ram.len() as u64 {
            return Err(GlueError::OutsideRam(gpa));
        }
        let page = gpa & !0xfff;
        self.record(Call::SetRights(page, rights))?;
        if rights == PageRights::Full {
            self.rights.remove(&page);
        } else {
            self.rights.insert(page, rights);
        }
        Ok(())
    }
    fn commit_rights(&mut self) -> Result<(), GlueError> {
        self.record(Call::CommitRights)
    }
    fn intercept_msr(&mut self, index: u32, read: bool, write: bool) -> Result<(), GlueError> {
        self.record(Call::InterceptMsr(index, read, write))?;
        if read || write {
            self.msrs.insert(index, (read, write));
        } else {
            self.msrs.remove(&index);
        }
        Ok(())
    }
    fn set_breakpoint(
        &mut self,
        gpa: u64,
        _gva: u64,
        on: bool,
        hidden: bool,
    ) -> Result<BreakpointKind, GlueError> {
        self.record(Call::SetBreakpoint(gpa, on))?;
        if on {
            self.breakpoints.insert(gpa);
        } else {
            self.breakpoints.remove(&gpa);
        }
        // A mock with debug-register slots places hidden breakpoints in them.
        Ok(if hidden && self.register_breakpoints {
            BreakpointKind::Register
        } else if self.int3_unreported {
            BreakpointKind::Trapped
        } else {
            BreakpointKind::Patched
        })
    }

    fn paging(&self) -> crate::paging::PagingMode {
        self.sregs.paging()
    }

    fn polled_baseline(&self) -> Option<(u32, SRegs, Option<u64>)> {
        (!self.vm_wide).then_some((self.vcpu, self.sregs, Some(self.xcr0)))
    }
}
