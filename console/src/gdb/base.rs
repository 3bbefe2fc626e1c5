//! The target and its base operations: registers, memory, threads (vCPUs).

use crate::error::Error;

use gdbstub::common::Tid;
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::multithread::{MultiThreadBase, MultiThreadResumeOps};
use gdbstub::target::ext::breakpoints::BreakpointsOps;
use gdbstub::target::ext::exec_file::ExecFileOps;
use gdbstub::target::ext::monitor_cmd::MonitorCmdOps;
use gdbstub::target::{Target, TargetError, TargetResult};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vmiscope_vmm::VcpuCtl;

use super::*;
use crate::gdb::arch::{Extent, Vmi64, VmiRegs};

impl Target for GdbTarget {
    type Arch = Vmi64;
    type Error = Error;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }
    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
    fn support_exec_file(&mut self) -> Option<ExecFileOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for GdbTarget {
    /// `g`: the general registers (see `Extent::General`), from the held vCPU's
    /// copy taken at its stop (no round trip), else read on its thread.
    fn read_registers(&mut self, regs: &mut VmiRegs, t: Tid) -> TargetResult<(), Self> {
        let Some(cpu) = self.cpu(t) else {
            return err("no such thread");
        };
        let all = self.registers(cpu, false).ok_or(TargetError::NonFatal)?;
        *regs = VmiRegs {
            extent: Extent::General,
            ..all
        };
        Ok(())
    }

    /// `G`: what gdb sent (the general registers after a short `g`, or all).
    fn write_registers(&mut self, regs: &VmiRegs, t: Tid) -> TargetResult<(), Self> {
        let Some(cpu) = self.cpu(t) else {
            return err("no such thread");
        };
        let g = regs.clone();
        self.on_cpu(cpu, move |c| apply(c, &g))
            .ok_or(TargetError::NonFatal)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], t: Tid) -> TargetResult<usize, Self> {
        let Some(cpu) = self.cpu(t) else {
            return err("no such thread");
        };
        let bps = self.s.shared().sw_breakpoints();
        let mut done = 0;
        // Page by page through the vCPU's tables; stop at the first unmapped page.
        for (va, n) in vmiscope_introspect::decode::split_pages(start, data.len() as u64) {
            let Some(gpa) = self.translate(cpu, va) else {
                break;
            };
            let chunk = &mut data[done..done + n as usize];
            if self.s.shared().ram().read(gpa, chunk).is_err() {
                break;
            }
            // Our INT3s read as the original bytes.
            for (bp, orig) in &bps {
                if (gpa..gpa + n).contains(bp) {
                    chunk[(bp - gpa) as usize] = *orig;
                }
            }
            done += n as usize;
        }
        if done == 0 { err("unmapped") } else { Ok(done) }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], t: Tid) -> TargetResult<(), Self> {
        let Some(cpu) = self.cpu(t) else {
            return err("no such thread");
        };
        // All or nothing: every page is translated and checked first, so `E`
        // means nothing changed and `OK` that all of it did (a write running
        // off the end of RAM changed the first part and answered `E`; one
        // wrapping past 2^64 wrote nothing and answered `OK`).
        let len = data.len() as u64;
        if start.checked_add(len).is_none() {
            return err("wraps past the end of the address space");
        }
        let ram = self.s.shared().ram().size();
        let mut pieces = Vec::new();
        let mut done = 0;
        for (va, n) in vmiscope_introspect::decode::split_pages(start, len) {
            let Some(gpa) = self.translate(cpu, va) else {
                return err("unmapped");
            };
            if gpa.checked_add(n).is_none_or(|end| end > ram) {
                return err("outside RAM");
            }
            pieces.push((gpa, &data[done..done + n as usize]));
            done += n as usize;
        }
        for (gpa, bytes) in pieces {
            if self
                .s
                .shared()
                .write_around_breakpoints(gpa, bytes)
                .is_err()
            {
                return err("outside RAM");
            }
        }
        Ok(())
    }

    fn list_active_threads(&mut self, f: &mut dyn FnMut(Tid)) -> Result<(), Error> {
        (0..self.s.shared().vcpu_count()).for_each(|c| f(tid(c)));
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_single_register_access(
        &mut self,
    ) -> Option<
        gdbstub::target::ext::base::single_register_access::SingleRegisterAccessOps<'_, Tid, Self>,
    > {
        Some(self)
    }

    fn support_thread_extra_info(
        &mut self,
    ) -> Option<gdbstub::target::ext::thread_extra_info::ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl GdbTarget {
    /// The registers of `cpu`: the held vCPU's copy taken at its stop when there
    /// is one, else read on its thread; with `fpu`, the x87/SSE state too (an
    /// ioctl on the vCPU's thread, so only when asked).
    pub(super) fn registers(&self, cpu: u32, fpu: bool) -> Option<VmiRegs> {
        let held = self.s.control().snapshot(cpu).filter(|_| !fpu);
        let (r, s, f) = match held {
            Some(sn) => (sn.regs, sn.sregs, None),
            None => self.on_cpu(cpu, move |c| {
                (
                    VcpuCtl::regs(c),
                    VcpuCtl::sregs(c),
                    fpu.then(|| c.fpu()).flatten(),
                )
            })?,
        };
        Some(from_kvm(&r, &s, f.as_ref()))
    }
}

/// gdb's register set from KVM's: the whole set with `fpu` (`Extent::Full`),
/// else all but x87/SSE (`Extent::System`).
pub(super) fn from_kvm(r: &kvm_regs, s: &kvm_sregs, fpu: Option<&kvm_fpu>) -> VmiRegs {
    let mut regs = VmiRegs {
        extent: match fpu {
            Some(_) => Extent::Full,
            None => Extent::System,
        },
        ..Default::default()
    };
    if let Some(f) = fpu {
        crate::gdb::fpu::to_gdb(f, &mut regs.core);
    }
    regs.core.regs = [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ];
    regs.core.rip = r.rip;
    regs.core.eflags = r.rflags as u32;
    let seg = &mut regs.core.segments;
    (seg.cs, seg.ss, seg.ds, seg.es, seg.fs, seg.gs) = (
        s.cs.selector as u32,
        s.ss.selector as u32,
        s.ds.selector as u32,
        s.es.selector as u32,
        s.fs.selector as u32,
        s.gs.selector as u32,
    );
    regs.fs_base = s.fs.base;
    regs.gs_base = s.gs.base;
    regs.sys = [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer];
    regs
}

/// Writes `g` into the vCPU as far as its extent goes: the general registers
/// always (segment selectors stay: a selector without its descriptor means
/// nothing to KVM); beyond them the segment bases and system registers; with
/// the whole set, the x87/SSE state too when it changed (one ioctl saved
/// otherwise).
pub(super) fn apply(c: &mut VcpuCtl<'_>, g: &VmiRegs) {
    let mut r = VcpuCtl::regs(c);
    let v = g.core.regs;
    (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) =
        (v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
    (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
        (v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]);
    r.rip = g.core.rip;
    r.rflags = g.core.eflags as u64;
    c.set_regs(&r);
    if g.extent == Extent::General {
        return;
    }
    let mut s = VcpuCtl::sregs(c);
    (s.fs.base, s.gs.base) = (g.fs_base, g.gs_base);
    (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer) =
        (g.sys[0], g.sys[1], g.sys[2], g.sys[3], g.sys[4], g.sys[5]);
    c.set_sregs(&s);
    if g.extent != Extent::Full {
        return;
    }
    if let Some(old) = c.fpu() {
        let new = crate::gdb::fpu::from_gdb(&g.core, old);
        if new != old {
            let _ = c.set_fpu(&new);
        }
    }
}

impl gdbstub::target::ext::thread_extra_info::ThreadExtraInfo for GdbTarget {
    /// What `info threads` shows beside each thread: the vCPU, its privilege
    /// level, the task it runs (a Linux guest, at CPL0) and why it is stopped.
    fn thread_extra_info(&self, t: Tid, buf: &mut [u8]) -> Result<usize, Error> {
        // An error here would end the session: a thread that does not exist says so.
        let text = match self.cpu(t) {
            None => "no such vCPU".to_string(),
            Some(cpu) => {
                let (_, cpl) = self.s.shared().last_position(cpu).unwrap_or_default();
                let why = match self.s.control().stop() {
                    Some(st) if st.vcpu == cpu => st.cause.to_string(),
                    _ => "paused".into(),
                };
                let task = (cpl == 0)
                    .then(|| self.on_cpu(cpu, |c| c.sregs().gs.base))
                    .flatten()
                    .and_then(|gs| self.s.current_task(cpu, gs))
                    .map(|t| format!("{t}, "))
                    .unwrap_or_default();
                format!("vCPU {cpu}, CPL{cpl}, {task}{why}")
            }
        };
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(n)
    }
}
