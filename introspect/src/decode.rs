//! Instruction decoding (iced-x86) and the list of every linear address an
//! instruction touches. HVMI analyses *all* of them, not just the faulting one:
//! `PUSH [rax]` reads `[rax]` and writes the stack, and if the read were allowed on
//! its own, the implicit stack write would never be looked at.

use iced_x86::{
    Decoder, DecoderOptions, Formatter, Instruction, InstructionInfoFactory, IntelFormatter,
    OpAccess, Register,
};

use crate::arch::{Regs, SRegs};
use crate::glue::{Guest, VmControl};
use crate::paging;

/// One memory access of an instruction, in linear addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearAccess {
    pub gla: u64,
    pub size: u64,
    pub read: bool,
    pub write: bool,
}

/// A decoded instruction with what it touches.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub rip: u64,
    pub bytes: Vec<u8>,
    pub instr: Instruction,
    pub text: String,
    pub accesses: Vec<LinearAccess>,
}

impl Decoded {
    pub fn len(&self) -> usize {
        self.instr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instr.len() == 0
    }

    pub fn is_locked(&self) -> bool {
        self.instr.has_lock_prefix() || self.instr.mnemonic() == iced_x86::Mnemonic::Xchg
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the instruction bytes at {0:#x} are not mapped")]
    Unmapped(u64),
    #[error("invalid instruction at {0:#x}")]
    Invalid(u64),
}

/// Reads up to 15 bytes at `rip` through the guest's page tables (stopping at an
/// unmapped page) and decodes them.
pub fn decode_at(guest: &dyn Guest, rip: u64) -> Result<Decoded, DecodeError> {
    let s = guest.sregs();
    let mut bytes = Vec::with_capacity(15);
    let mut va = rip;
    while bytes.len() < 15 {
        let Ok(t) = paging::translate(&PhysOf(guest), s.paging(), va) else {
            break;
        };
        let n = ((0x1000 - (va & 0xfff)) as usize).min(15 - bytes.len());
        let mut chunk = vec![0u8; n];
        if guest.read_phys(t.gpa, &mut chunk).is_err() {
            break;
        }
        bytes.extend_from_slice(&chunk);
        va += n as u64;
    }
    if bytes.is_empty() {
        return Err(DecodeError::Unmapped(rip));
    }
    decode_bytes(&bytes, rip, &guest.regs(), &s)
}

/// Builds iced-x86's formatter tables (lazily made on first use, about a
/// millisecond) so the first handled event is not that much slower than the rest.
pub fn warm_up() {
    let _ = decode_bytes(&[0x90], 0, &Regs::default(), &SRegs::default());
}

/// The one instruction formatter: Intel syntax with C hex (`[rbx+0x140]`),
/// so an alert's instruction reads as the disassembly does, not in MASM's
/// `140h`.
pub fn formatter() -> IntelFormatter {
    let mut f = IntelFormatter::new();
    let o = f.options_mut();
    o.set_hex_prefix("0x");
    o.set_hex_suffix("");
    o.set_uppercase_hex(false);
    o.set_show_branch_size(false);
    o.set_branch_leading_zeros(false);
    f
}

/// Decodes `bytes` as the instruction at `rip` and computes its accesses with `regs`.
pub fn decode_bytes(
    bytes: &[u8],
    rip: u64,
    regs: &Regs,
    sregs: &SRegs,
) -> Result<Decoded, DecodeError> {
    let mut d = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let instr = d.decode();
    if instr.is_invalid() {
        return Err(DecodeError::Invalid(rip));
    }
    let mut text = String::new();
    formatter().format(&instr, &mut text);
    let accesses = accesses(&instr, regs, sregs);
    Ok(Decoded {
        rip,
        bytes: bytes[..instr.len()].to_vec(),
        instr,
        text,
        accesses,
    })
}

fn reg_value(r: Register, regs: &Regs, sregs: &SRegs, next_ip: u64) -> Option<u64> {
    let v = match r {
        Register::RIP => next_ip,
        Register::ES | Register::CS | Register::SS | Register::DS => 0,
        Register::FS => sregs.fs_base,
        Register::GS => sregs.gs_base,
        _ => regs.gpr(r)?,
    };
    Some(match r.size() {
        4 if r.is_gpr() => v & 0xffff_ffff,
        2 if r.is_gpr() => v & 0xffff,
        _ => v,
    })
}

/// Every memory access of `instr`; a REP string instruction covers RCX elements.
pub fn accesses(instr: &Instruction, regs: &Regs, sregs: &SRegs) -> Vec<LinearAccess> {
    if instr.is_string_instruction() {
        return string_accesses(instr, regs, sregs);
    }
    let mut factory = InstructionInfoFactory::new();
    let info = factory.info(instr);
    let rep = instr.has_rep_prefix() || instr.has_repne_prefix();
    let count = if rep && instr.is_string_instruction() {
        regs.rcx.max(1)
    } else {
        1
    };
    let backwards = regs.rflags & (1 << 10) != 0;
    let mut out = Vec::new();
    for m in info.used_memory() {
        let (read, write) = match m.access() {
            OpAccess::Read | OpAccess::CondRead => (true, false),
            OpAccess::Write | OpAccess::CondWrite => (false, true),
            OpAccess::ReadWrite | OpAccess::ReadCondWrite => (true, true),
            _ => continue, // NoMemAccess (LEA), None
        };
        let Some(gla) = m.virtual_address(0, |r, _, _| reg_value(r, regs, sregs, instr.next_ip()))
        else {
            continue;
        };
        let elem = m.memory_size().size() as u64;
        if elem == 0 {
            continue;
        }
        let size = elem * count;
        let start = if backwards && count > 1 {
            gla.wrapping_sub(size - elem)
        } else {
            gla
        };
        out.push(LinearAccess {
            gla: start,
            size,
            read,
            write,
        });
    }
    out
}

/// String instructions: [RSI] and/or [RDI] (ES-based), RCX elements under REP,
/// downwards when RFLAGS.DF is set. (iced reports no memory for REP forms.)
fn string_accesses(instr: &Instruction, regs: &Regs, sregs: &SRegs) -> Vec<LinearAccess> {
    use iced_x86::Mnemonic::*;
    let elem = instr.memory_size().size().max(1) as u64;
    let rep = instr.has_rep_prefix() || instr.has_repne_prefix();
    let count = if rep { regs.rcx } else { 1 };
    if count == 0 {
        return vec![];
    }
    let size = elem * count;
    let backwards = regs.rflags & (1 << 10) != 0;
    let span = |base: u64| {
        if backwards {
            base.wrapping_sub(size - elem)
        } else {
            base
        }
    };
    let seg_rsi = match instr.segment_prefix() {
        Register::FS => sregs.fs_base,
        Register::GS => sregs.gs_base,
        _ => 0,
    }
    .wrapping_add(regs.rsi);
    let src = LinearAccess {
        gla: span(seg_rsi),
        size,
        read: true,
        write: false,
    };
    let dst = |read: bool, write: bool| LinearAccess {
        gla: span(regs.rdi),
        size,
        read,
        write,
    };
    match instr.mnemonic() {
        Movsb | Movsw | Movsd | Movsq => vec![src, dst(false, true)],
        Cmpsb | Cmpsw | Cmpsd | Cmpsq => vec![src, dst(true, false)],
        Stosb | Stosw | Stosd | Stosq | Insb | Insw | Insd => vec![dst(false, true)],
        Scasb | Scasw | Scasd | Scasq => vec![dst(true, false)],
        Lodsb | Lodsw | Lodsd | Lodsq | Outsb | Outsw | Outsd => vec![src],
        _ => vec![],
    }
}

/// Splits `[gla, gla+size)` at page boundaries: (address, length) pieces.
pub fn split_pages(gla: u64, size: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let (mut a, end) = (gla, gla.wrapping_add(size));
    while a < end {
        let next = (a | 0xfff).wrapping_add(1).min(end);
        v.push((a, next - a));
        if next == 0 {
            break;
        }
        a = next;
    }
    v
}

struct PhysOf<'a>(&'a dyn VmControl);

impl paging::PhysRead for PhysOf<'_> {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.0
            .read_phys(gpa, &mut b)
            .ok()
            .map(|_| u64::from_le_bytes(b))
    }
}

/// Reads the guest's memory for page walks.
pub fn phys(guest: &dyn VmControl) -> impl paging::PhysRead + '_ {
    PhysOf(guest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instruction_reads_with_c_hex_as_the_disassembly_does() {
        // mov [rbx+0x140],ax: MASM hex (`140h`) before.
        let d = decode_bytes(
            &[0x66, 0x89, 0x83, 0x40, 0x01, 0, 0],
            0x1000,
            &regs(),
            &SRegs::default(),
        )
        .unwrap();
        assert_eq!(d.text, "mov [rbx+0x140],ax");
    }

    fn regs() -> Regs {
        Regs {
            rax: 0x5000,
            rsp: 0x8000,
            rsi: 0x6000,
            rdi: 0x7ffe,
            rcx: 4,
            ..Regs::default()
        }
    }

    #[test]
    fn push_mem_reads_the_operand_and_writes_the_stack() {
        let d = decode_bytes(&[0xff, 0x30], 0x1000, &regs(), &SRegs::default()).unwrap(); // push qword [rax]
        assert_eq!(d.text, "push qword ptr [rax]");
        assert_eq!(d.accesses.len(), 2, "{:?}", d.accesses);
        assert!(d.accesses.contains(&LinearAccess {
            gla: 0x5000,
            size: 8,
            read: true,
            write: false
        }));
        assert!(d.accesses.contains(&LinearAccess {
            gla: 0x7ff8,
            size: 8,
            read: false,
            write: true
        }));
    }

    #[test]
    fn rep_movs_covers_rcx_elements_both_sides() {
        let d = decode_bytes(&[0xf3, 0xa4], 0x1000, &regs(), &SRegs::default()).unwrap(); // rep movsb
        assert!(d.accesses.contains(&LinearAccess {
            gla: 0x6000,
            size: 4,
            read: true,
            write: false
        }));
        assert!(d.accesses.contains(&LinearAccess {
            gla: 0x7ffe,
            size: 4,
            read: false,
            write: true
        }));
        // Page-crossing: 0x7ffe..0x8002 is two pieces.
        assert_eq!(split_pages(0x7ffe, 4), [(0x7ffe, 2), (0x8000, 2)]);
        assert_eq!(split_pages(0x7000, 0x1000), [(0x7000, 0x1000)]);
    }

    #[test]
    fn rmw_rip_relative_and_lea() {
        // lock add dword [rip+0x10], 1 at 0x1000 (7 bytes + imm8 = 8 bytes): target 0x1018
        let d = decode_bytes(
            &[0xf0, 0x83, 0x05, 0x10, 0, 0, 0, 1],
            0x1000,
            &regs(),
            &SRegs::default(),
        )
        .unwrap();
        assert!(d.is_locked());
        assert_eq!(
            d.accesses,
            [LinearAccess {
                gla: 0x1018,
                size: 4,
                read: true,
                write: true
            }]
        );
        let d = decode_bytes(
            &[0x48, 0x8d, 0x40, 0x08],
            0x1000,
            &regs(),
            &SRegs::default(),
        )
        .unwrap(); // lea rax,[rax+8]
        assert!(d.accesses.is_empty());
    }
}
