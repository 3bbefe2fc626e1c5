//! The selected vCPU's machine state for the analyst: registers (live, or the
//! final ones after the guest's end), segments, debug registers, and the IDT and
//! GDT decoded — the rootkit analyst's first look.

use std::fmt::Write as _;

use kvm_bindings::{kvm_debugregs, kvm_regs, kvm_segment, kvm_sregs};
use vmiscope_vmm::VcpuCtl;

use super::Session;
use crate::error::Error;

/// One vCPU's registers, read live or kept from its end.
#[derive(Debug, Clone, Copy)]
pub struct CpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub debugregs: Option<kvm_debugregs>,
}

const EFER_LMA: u64 = 1 << 10;

impl Session {
    /// The selected vCPU's registers: from its stop snapshot, from the vCPU,
    /// or, once the guest has ended, as its thread left them.
    pub fn cpu_state(&mut self) -> Result<CpuState, Error> {
        let cpu = self.vcpu;
        if self.ended() {
            let f = self
                .shared
                .final_state(cpu)
                .ok_or_else(|| format!("vCPU {cpu} left no registers"))?;
            return Ok(CpuState {
                regs: f.regs,
                sregs: f.sregs,
                debugregs: f.debugregs,
            });
        }
        if let Some(sn) = self.control.snapshot(cpu) {
            return Ok(CpuState {
                regs: sn.regs,
                sregs: sn.sregs,
                debugregs: None,
            });
        }
        self.on_vcpu(cpu, |c| CpuState {
            regs: VcpuCtl::regs(c),
            sregs: VcpuCtl::sregs(c),
            debugregs: None,
        })
    }

    /// `segments`: every segment register with its hidden part.
    pub(super) fn segments(&mut self) -> Result<String, Error> {
        let s = self.cpu_state()?.sregs;
        let mut out = format!(
            "{:<4} {:>4} {:>18} {:>10} {:<18} dpl p l db g\n",
            "seg", "sel", "base", "limit", "type"
        );
        for (n, seg) in [
            ("cs", &s.cs),
            ("ss", &s.ss),
            ("ds", &s.ds),
            ("es", &s.es),
            ("fs", &s.fs),
            ("gs", &s.gs),
            ("tr", &s.tr),
            ("ldt", &s.ldt),
        ] {
            let _ = writeln!(out, "{}", segment_line(n, seg));
        }
        let _ = write!(
            out,
            "gdtr {:#x} limit {:#x}\nidtr {:#x} limit {:#x}",
            s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit
        );
        Ok(out)
    }

    /// `dregs`: DR0–DR3 with what DR7 makes of them, DR6 and DR7.
    pub(super) fn dregs(&mut self) -> Result<String, Error> {
        let d = self.debugregs()?;
        let mut out = String::new();
        for (i, a) in d.db.iter().enumerate() {
            let enabled = (d.dr7 >> (i * 2)) & 3 != 0;
            let rw = (d.dr7 >> (16 + i * 4)) & 3;
            let len = [1, 2, 8, 4][((d.dr7 >> (18 + i * 4)) & 3) as usize];
            let what = if enabled {
                let kind = ["execute", "write", "io", "read/write"][rw as usize];
                format!("{kind} {len}B at {}", self.addr_name(*a))
            } else {
                "off".into()
            };
            let _ = writeln!(out, "dr{i} {a:#018x}  {what}");
        }
        let hit: Vec<String> = (0..4)
            .filter(|i| d.dr6 & (1 << i) != 0)
            .map(|i| format!("B{i}"))
            .chain((d.dr6 & (1 << 14) != 0).then(|| "BS (single-step)".to_string()))
            .collect();
        let _ = write!(
            out,
            "dr6 {:#018x}  {}\ndr7 {:#018x}",
            d.dr6,
            if hit.is_empty() {
                "no condition".into()
            } else {
                hit.join(" ")
            },
            d.dr7
        );
        Ok(out)
    }

    /// The debug registers, live or final.
    pub(super) fn debugregs(&mut self) -> Result<kvm_debugregs, Error> {
        if self.ended() {
            return self
                .cpu_state()?
                .debugregs
                .ok_or_else(|| "KVM gave no debug registers at the end".into());
        }
        self.on_vcpu(self.vcpu, |c| c.debugregs())?
            .ok_or_else(|| "KVM cannot read the debug registers".into())
    }

    /// `idt [N]`: the gates of the table IDTR points at, each target named.
    pub(super) fn idt(&mut self, n: Option<usize>) -> Result<String, Error> {
        let s = self.cpu_state()?.sregs;
        let long = s.efer & EFER_LMA != 0;
        let size = if long { 16 } else { 8 };
        let gates = ((s.idt.limit as usize + 1) / size).min(256);
        let gates = n.map_or(gates, |n| n.min(gates));
        let mut table = vec![0u8; gates * size];
        self.read(s.idt.base, &mut table, false)?;
        let mut out = format!(
            "IDT at {} limit {:#x} ({gates} gates shown)\n",
            self.addr_name(s.idt.base),
            s.idt.limit
        );
        for (v, g) in table.chunks(size).enumerate() {
            let gate = Gate::decode(g, long);
            if !gate.present {
                let _ = writeln!(out, "{v:3}  not present");
                continue;
            }
            let _ = writeln!(
                out,
                "{v:3}  {:<10} sel {:#06x} dpl {} ist {}  {}",
                gate.kind(),
                gate.selector,
                gate.dpl,
                gate.ist,
                self.addr_name(gate.offset)
            );
        }
        Ok(out)
    }

    /// `gdt`: every descriptor GDTR's limit covers.
    pub(super) fn gdt(&mut self) -> Result<String, Error> {
        let s = self.cpu_state()?.sregs;
        let long = s.efer & EFER_LMA != 0;
        let len = (s.gdt.limit as usize + 1).min(0x10000);
        let mut table = vec![0u8; len];
        self.read(s.gdt.base, &mut table, false)?;
        let mut out = format!(
            "GDT at {} limit {:#x}\n",
            self.addr_name(s.gdt.base),
            s.gdt.limit
        );
        let mut i = 0;
        while i + 8 <= table.len() {
            let d = u64::from_le_bytes(table[i..i + 8].try_into().unwrap_or_default());
            let (text, wide) = descriptor_text(d, table.get(i + 8..i + 16), long);
            if d != 0 {
                let _ = writeln!(out, "{i:#06x}  {text}");
            }
            i += if wide { 16 } else { 8 };
        }
        Ok(out)
    }
}

fn segment_line(name: &str, s: &kvm_segment) -> String {
    let kind = if s.unusable != 0 {
        "unusable".to_string()
    } else if s.s == 0 {
        system_type(s.type_).to_string()
    } else if s.type_ & 8 != 0 {
        format!("code{}", if s.type_ & 2 != 0 { " readable" } else { "" })
    } else {
        format!("data{}", if s.type_ & 2 != 0 { " writable" } else { "" })
    };
    format!(
        "{name:<4} {:04x} {:#18x} {:#10x} {kind:<18} {:>3} {} {} {}  {}",
        s.selector, s.base, s.limit, s.dpl, s.present, s.l, s.db, s.g
    )
}

fn system_type(t: u8) -> &'static str {
    match t {
        2 => "ldt",
        9 => "tss (available)",
        11 => "tss (busy)",
        12 => "call gate",
        14 => "interrupt gate",
        15 => "trap gate",
        _ => "system",
    }
}

/// One GDT descriptor in words; `wide`: a long-mode system descriptor, which
/// takes 16 bytes.
fn descriptor_text(d: u64, high: Option<&[u8]>, long: bool) -> (String, bool) {
    let limit = (d & 0xffff) | ((d >> 32) & 0xf_0000);
    let mut base = ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000);
    let access = (d >> 40) as u8;
    let flags = (d >> 52) as u8;
    let (present, dpl, s, t) = (
        access >> 7,
        (access >> 5) & 3,
        (access >> 4) & 1,
        access & 0xf,
    );
    let g = flags >> 3 & 1;
    let wide = long && s == 0 && matches!(t, 2 | 9 | 11);
    if wide && let Some(h) = high.and_then(|h| <[u8; 4]>::try_from(&h[..4]).ok()) {
        base |= (u32::from_le_bytes(h) as u64) << 32;
    }
    let kind = if s == 0 {
        system_type(t).to_string()
    } else if t & 8 != 0 {
        format!(
            "code{}{}",
            if flags & 2 != 0 { " 64-bit" } else { "" },
            if flags & 4 != 0 { " 32-bit" } else { "" }
        )
    } else {
        format!("data{}", if t & 2 != 0 { " writable" } else { "" })
    };
    (
        format!(
            "{kind:<18} base {base:#x} limit {limit:#x}{} dpl {dpl}{}",
            if g == 1 { " (4 KiB units)" } else { "" },
            if present == 0 { " not present" } else { "" }
        ),
        wide,
    )
}

/// An IDT gate.
struct Gate {
    offset: u64,
    selector: u16,
    ist: u8,
    kind: u8,
    dpl: u8,
    present: bool,
}

impl Gate {
    fn decode(g: &[u8], long: bool) -> Gate {
        let w = |i: usize| u16::from_le_bytes([g[i], g[i + 1]]) as u64;
        let attr = g[5];
        let mut offset = w(0) | (w(6) << 16);
        if long {
            offset |= (u32::from_le_bytes([g[8], g[9], g[10], g[11]]) as u64) << 32;
        }
        Gate {
            offset,
            selector: w(2) as u16,
            ist: if long { g[4] & 7 } else { 0 },
            kind: attr & 0xf,
            dpl: (attr >> 5) & 3,
            present: attr & 0x80 != 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self.kind {
            5 => "task",
            6 | 14 => "interrupt",
            7 | 15 => "trap",
            _ => "invalid",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_and_descriptors_decode() {
        // A long-mode interrupt gate to 0xffffffff81a00b10, selector 0x10, DPL 3, IST 2.
        let g = [
            0x10, 0x0b, 0x10, 0x00, 0x02, 0xee, 0xa0, 0x81, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ];
        let gate = Gate::decode(&g, true);
        assert_eq!(gate.offset, 0xffff_ffff_81a0_0b10);
        assert_eq!(
            (gate.selector, gate.ist, gate.dpl, gate.present),
            (0x10, 2, 3, true)
        );
        assert_eq!(gate.kind(), "interrupt");
        // The flat 64-bit kernel code segment Linux uses.
        let (t, wide) = descriptor_text(0x00af_9b00_0000_ffff, None, true);
        assert!(t.starts_with("code 64-bit"), "{t}");
        assert!(t.contains("limit 0xfffff (4 KiB units) dpl 0"), "{t}");
        assert!(!wide);
        // A 64-bit TSS takes 16 bytes and its base's upper half is in the second.
        let (t, wide) =
            descriptor_text(0x0000_8900_1000_0067, Some(&[0xfe, 0xff, 0xff, 0xff]), true);
        assert!(wide);
        assert!(t.starts_with("tss (available)"), "{t}");
        assert!(t.contains("base 0xfffffffe00001000"), "{t}");
    }
}
