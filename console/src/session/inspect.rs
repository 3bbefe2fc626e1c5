//! Guest state: registers, MSRs, memory, disassembly, translation, page walks.

use std::fmt::Write as _;

use crate::error::Error;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Formatter};

use vmiscope_introspect::Target;

use super::{Output, Session};
use crate::format::*;

/// One disassembled instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisLine {
    pub ip: u64,
    /// Intel syntax, a call or jump's target named.
    pub text: String,
    /// `symbol+off` of the instruction.
    pub label: Option<String>,
    /// A call or jump's target (follow-the-call in the TUI).
    pub target: Option<u64>,
    /// At the vCPU's RIP.
    pub current: bool,
    /// One of our breakpoints is here.
    pub breakpoint: bool,
}

impl std::fmt::Display for DisLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}{:x} {:<36}{}",
            if self.current { "=>" } else { "  " },
            if self.breakpoint { "*" } else { " " },
            self.ip,
            self.text,
            self.label
                .as_deref()
                .map(|l| format!("  <{l}>"))
                .unwrap_or_default()
        )
    }
}

impl Session {
    pub(super) fn msr(&mut self, i: u32) -> Result<Output, Error> {
        Ok(match self.with_guest(move |cpu| cpu.msr(i))? {
            Some(v) => Output::text(format!("msr {i:#x} = {v:#018x}")),
            None => return Err(format!("KVM cannot read MSR {i:#x}").into()),
        })
    }

    pub(super) fn mem_read(&mut self, addr: u64, len: u64, phys: bool) -> Result<Output, Error> {
        let mut buf = vec![0u8; len as usize];
        self.read(addr, &mut buf, phys)?;
        Ok(Output::text(hexdump(addr, &buf)))
    }

    pub(super) fn mem_write(
        &mut self,
        addr: u64,
        bytes: Vec<u8>,
        phys: bool,
    ) -> Result<Output, Error> {
        // Page by page: consecutive virtual pages need not be consecutive
        // in guest-physical memory. Checked before any byte is written.
        let pieces: Vec<(u64, u64)> = if phys {
            vec![(addr, bytes.len() as u64)]
        } else {
            vmiscope_introspect::decode::split_pages(addr, bytes.len() as u64)
                .into_iter()
                .map(|(va, n)| self.translate(va).map(|gpa| (gpa, n)))
                .collect::<Result<_, _>>()?
        };
        let mut done = 0;
        for (gpa, n) in pieces {
            self.shared
                .write_around_breakpoints(gpa, &bytes[done..done + n as usize])?;
            done += n as usize;
        }
        Ok(Output::text(format!(
            "wrote {} bytes at {addr:#x}",
            bytes.len()
        )))
    }

    pub(super) fn pagewalk(&mut self, gva: u64) -> Result<Output, Error> {
        let mode = self.paging()?;
        let t = vmiscope_introspect::paging::translate(self.shared.ram(), mode, gva)
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        for s in &t.steps {
            let _ = writeln!(
                out,
                "PML{} table {:#x} [{:3}] = {:#018x}",
                s.level, s.table, s.index, s.entry
            );
        }
        let _ = write!(
            out,
            "-> {:#x} ({} page, {}{}{})",
            t.gpa,
            size_name(t.page_size),
            if t.writable { "w" } else { "r" },
            if t.user { "u" } else { "s" },
            if t.no_exec { " nx" } else { "" }
        );
        Ok(Output::text(out))
    }

    /// The selected vCPU's RIP: from its stop snapshot (a step at CPL3 is
    /// caught in the guest's #DB entry, but the snapshot is the user code's),
    /// its final registers after the end, else its last exit.
    pub fn current_rip(&self) -> u64 {
        if let Some(sn) = self.control.snapshot(self.vcpu) {
            return sn.regs.rip;
        }
        if let Some(f) = self.shared.final_state(self.vcpu) {
            return f.regs.rip;
        }
        self.shared.last_position(self.vcpu).unwrap_or_default().0
    }

    /// `count` instructions from `addr` (default: RIP), decoded with our
    /// breakpoints shown as the original bytes.
    pub fn disasm_lines(&self, addr: Option<u64>, count: usize) -> Result<Vec<DisLine>, Error> {
        let rip = self.current_rip();
        let start = addr.unwrap_or(rip);
        let mut bytes = vec![0u8; count * 15];
        // Read what is mapped: stop at the first unreadable page.
        let mut n = 0;
        while n < bytes.len() {
            let page_left = (0x1000 - ((start + n as u64) & 0xfff)) as usize;
            let k = page_left.min(bytes.len() - n);
            if self
                .read(start + n as u64, &mut bytes[n..n + k], false)
                .is_err()
            {
                break;
            }
            n += k;
        }
        if n == 0 {
            return Err(format!("{start:#x} is not mapped").into());
        }
        let bps: Vec<u64> = self
            .intro
            .hooks()
            .into_iter()
            .filter_map(|h| match h.target {
                Target::Breakpoint { gva, .. } => Some(gva),
                _ => None,
            })
            .collect();
        // Show our INT3s as the original instruction, with a marker.
        for (i, b) in bytes[..n].iter_mut().enumerate() {
            if let Some(orig) = self
                .shared
                .sw_breakpoint_at(self.translate(start + i as u64).unwrap_or(u64::MAX))
            {
                *b = orig;
            }
        }
        let mut d = Decoder::with_ip(64, &bytes[..n], start, DecoderOptions::NONE);
        let mut f = vmiscope_introspect::decode::formatter();
        let sym = self.intro.symbols();
        let mut out = Vec::new();
        for instr in d.iter().take(count) {
            let mut text = String::new();
            f.format(&instr, &mut text);
            let target = matches!(
                instr.flow_control(),
                FlowControl::Call
                    | FlowControl::UnconditionalBranch
                    | FlowControl::ConditionalBranch
            )
            .then(|| instr.near_branch_target())
            .filter(|t| *t != 0);
            if let Some(t) = target
                && let Some(n) = vmiscope_monitor::journal::symbol_of(sym, t)
            {
                text.push_str(&format!(" <{n}>"));
            }
            out.push(DisLine {
                ip: instr.ip(),
                text,
                label: vmiscope_monitor::journal::symbol_of(sym, instr.ip()),
                target,
                current: instr.ip() == rip,
                breakpoint: bps.contains(&instr.ip()),
            });
        }
        Ok(out)
    }

    pub fn disasm(&self, addr: Option<u64>, count: usize) -> Result<String, Error> {
        let mut out = String::new();
        for l in self.disasm_lines(addr, count)? {
            let _ = writeln!(out, "{l}");
        }
        Ok(out)
    }

    /// Reads guest memory through the selected vCPU's page tables (or
    /// guest-physical memory with `phys`).
    pub fn read_mem(&self, addr: u64, buf: &mut [u8], phys: bool) -> Result<(), Error> {
        self.read(addr, buf, phys)
    }

    pub(super) fn read(&self, addr: u64, buf: &mut [u8], phys: bool) -> Result<(), Error> {
        if phys {
            self.shared
                .ram()
                .read(addr, buf)
                .map_err(|e| e.to_string())
                .map_err(Into::into)
        } else {
            self.shared
                .read_virt(self.vcpu, addr, buf)
                .map_err(|e| e.to_string())
                .map_err(Into::into)
        }
    }

    /// `lsmod`: a Linux guest's modules, from the kernel's `modules` list.
    pub(super) fn lsmod(&self) -> Result<String, Error> {
        let layout = self.linux_layout()?;
        let head = self
            .intro
            .symbols()
            .get("modules")
            .ok_or("the kernel has no `modules` symbol")?;
        let read = |a: u64, buf: &mut [u8]| self.read(a, buf, false).is_ok();
        let list =
            vmiscope_introspect::linux::modules(&layout, head, &read).map_err(|e| e.to_string())?;
        let mut out = format!("{} modules\n", list.len());
        for m in list {
            out.push_str(&format!("{:#18x} {}\n", m.addr, m.name));
        }
        Ok(out)
    }

    /// A Linux guest's BTF layout, or why there is none.
    fn linux_layout(&self) -> Result<vmiscope_introspect::linux::Layout, Error> {
        match self.intro.linux() {
            None => Err("this needs a Linux guest".into()),
            Some(Err(why)) => Err(why.clone().into()),
            Some(Ok(l)) => Ok(*l),
        }
    }

    /// `ps`: a Linux guest's tasks, walked from `init_task` with the offsets
    /// of its own BTF.
    pub(super) fn ps(&self) -> Result<String, Error> {
        use vmiscope_introspect::linux;
        let layout = self.linux_layout()?;
        let sym = self.intro.symbols();
        let init = sym
            .get("init_task")
            .ok_or("the kernel has no init_task symbol")?;
        // The direct map's base: the kernel's own variable (it moves with
        // KASLR), else its fixed default for 4-level paging.
        let mut word = [0u8; 8];
        let page_offset = sym
            .get("page_offset_base")
            .filter(|a| self.read(*a, &mut word, false).is_ok())
            .map_or(0xffff_8880_0000_0000, |_| u64::from_le_bytes(word));
        let read = |a: u64, buf: &mut [u8]| self.read(a, buf, false).is_ok();
        let tasks = linux::tasks(&layout, init, page_offset, &read).map_err(|e| e.to_string())?;
        let mut out = format!("{:>7} S {:>16} {:>18} COMM\n", "PID", "CR3", "TASK");
        for t in tasks {
            let cr3 = t.cr3.map_or("-".to_string(), |c| format!("{c:#x}"));
            out.push_str(&format!(
                "{:>7} {} {cr3:>16} {:#18x} {}\n",
                t.pid,
                t.state_letter(),
                t.addr,
                t.comm
            ));
        }
        Ok(out)
    }

    /// The task vCPU `cpu` runs (`comm[pid]`) in a Linux guest, given the
    /// vCPU's GS base (the per-CPU base while it runs kernel code).
    pub fn current_task(&self, cpu: u32, gs_base: u64) -> Option<String> {
        let Some(Ok(layout)) = self.intro.linux() else {
            return None;
        };
        let off = self.intro.symbols().get("current_task")?;
        let read = |a: u64, buf: &mut [u8]| self.shared.read_virt(cpu, a, buf).is_ok();
        vmiscope_introspect::linux::current(layout, off, gs_base, 0, &read)
            .ok()
            .map(|t| t.to_string())
    }
}
