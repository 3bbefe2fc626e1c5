//! The stub's architecture for gdb: x86-64 with the segment bases and the system
//! registers (CR0/2/3/4/8, EFER) a kernel debugger needs, and the target
//! description that names them.

use gdbstub::arch::{Arch, Registers};
use gdbstub_arch::x86::reg::X86_64CoreRegs;

/// x86-64 with the system registers a kernel debugger needs.
pub enum Vmi64 {}

/// How much of the register set a `VmiRegs` carries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// The general registers alone (GPRs, RIP, EFLAGS, segment selectors): what
    /// `g` carries. gdb and LLDB take a shorter `g` as "fetch the rest with `p`"
    /// (gdb's `process_g_packet`), so a stop needs no x87/SSE read (an ioctl on
    /// the vCPU's thread) unless a debugger asks for one of those registers.
    #[default]
    General,
    /// The general registers, the segment bases and the system registers: all
    /// but x87/SSE, which were not read (and are not written back).
    System,
    /// Everything in the target description (single-register access).
    Full,
}

/// Core + SSE (gdb's amd64 layout), then fs_base/gs_base, then CR0/2/3/4/8, EFER.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct VmiRegs {
    pub core: X86_64CoreRegs,
    pub fs_base: u64,
    pub gs_base: u64,
    pub sys: [u64; 6],
    /// Which part is meant: serialised, and written back.
    pub extent: Extent,
}

/// Bytes of the general registers: 16 GPRs, RIP, EFLAGS, 6 segment selectors.
pub const GENERAL_BYTES: usize = 16 * 8 + 8 + 4 + 6 * 4;
/// Bytes of the core + SSE block in gdb's amd64 order.
const CORE_BYTES: usize = GENERAL_BYTES + 8 * 10 + 8 * 4 + 16 * 16 + 4;
/// Bytes of the whole set.
pub const FULL_BYTES: usize = CORE_BYTES + 8 * 8;

impl VmiRegs {
    /// The whole set in gdb's order (single-register access reads a slice of it).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(FULL_BYTES);
        let full = VmiRegs {
            extent: Extent::Full,
            ..self.clone()
        };
        full.gdb_serialize(|b| v.push(b.unwrap_or(0)));
        v
    }
}

impl Registers for VmiRegs {
    type ProgramCounter = u64;
    fn pc(&self) -> u64 {
        self.core.rip
    }
    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        // A System set is never sent (`g` is General): serialised (`to_bytes`),
        // its x87/SSE part reads as zero.
        let limit = match self.extent {
            Extent::General => GENERAL_BYTES,
            Extent::System | Extent::Full => FULL_BYTES,
        };
        let mut n = 0;
        let mut put = |b| {
            if n < limit {
                write_byte(b);
            }
            n += 1;
        };
        self.core.gdb_serialize(&mut put);
        for v in [self.fs_base, self.gs_base].iter().chain(self.sys.iter()) {
            v.to_le_bytes().iter().for_each(|b| put(Some(*b)));
        }
    }
    /// The general registers alone (a `G` after a short `g`) or the whole set.
    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        let mut core = vec![0u8; CORE_BYTES];
        match bytes.len() {
            GENERAL_BYTES => {
                core[..GENERAL_BYTES].copy_from_slice(bytes);
                self.core.gdb_deserialize(&core)?;
                self.extent = Extent::General;
                return Ok(());
            }
            n if n >= FULL_BYTES => self.core.gdb_deserialize(&bytes[..CORE_BYTES])?,
            _ => return Err(()),
        }
        let word = |i: usize| {
            let at = CORE_BYTES + 8 * i;
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        self.fs_base = word(0);
        self.gs_base = word(1);
        for (i, r) in self.sys.iter_mut().enumerate() {
            *r = word(2 + i);
        }
        self.extent = Extent::Full;
        Ok(())
    }
}

/// A register by gdb's number in the target description below (0..=64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmiRegId(u8);

/// Registers in the target description.
const REGS: usize = 65;
/// rbp, rsp and rip: what gdb needs to show where a step ended, sent with the
/// stop (as gdbserver does), in this order.
pub const EXPEDITED: [VmiRegId; 3] = [VmiRegId(6), VmiRegId(7), VmiRegId(16)];

impl VmiRegId {
    /// Bytes of register `n`.
    fn size_of(n: usize) -> usize {
        match n {
            0..=16 => 8,
            17..=23 => 4,
            24..=31 => 10,
            32..=39 => 4,
            40..=55 => 16,
            56 => 4,
            _ => 8,
        }
    }

    /// Where this register sits in the whole set (`VmiRegs::to_bytes`).
    pub fn range(self) -> std::ops::Range<usize> {
        let at = (0..self.0 as usize).map(Self::size_of).sum();
        at..at + Self::size_of(self.0 as usize)
    }

    /// Whether the value lives in the x87/SSE state (KVM's FPU, read apart).
    pub fn in_fpu(self) -> bool {
        (24..=56).contains(&self.0)
    }
}

impl gdbstub::arch::RegId for VmiRegId {
    fn from_raw_id(id: usize) -> Option<(Self, Option<std::num::NonZeroUsize>)> {
        (id < REGS).then(|| {
            (
                VmiRegId(id as u8),
                std::num::NonZeroUsize::new(Self::size_of(id)),
            )
        })
    }

    fn to_raw_id(&self) -> Option<usize> {
        Some(self.0 as usize)
    }
}

/// The target description, written for this stub: gdb's amd64 core and SSE
/// features, the segment bases, and a system feature of our own.
const TARGET_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
<architecture>i386:x86-64</architecture>
<feature name="org.gnu.gdb.i386.core">
<reg name="rax" bitsize="64" type="int64" regnum="0"/>
<reg name="rbx" bitsize="64" type="int64"/>
<reg name="rcx" bitsize="64" type="int64"/>
<reg name="rdx" bitsize="64" type="int64"/>
<reg name="rsi" bitsize="64" type="int64"/>
<reg name="rdi" bitsize="64" type="int64"/>
<reg name="rbp" bitsize="64" type="data_ptr"/>
<reg name="rsp" bitsize="64" type="data_ptr"/>
<reg name="r8" bitsize="64" type="int64"/>
<reg name="r9" bitsize="64" type="int64"/>
<reg name="r10" bitsize="64" type="int64"/>
<reg name="r11" bitsize="64" type="int64"/>
<reg name="r12" bitsize="64" type="int64"/>
<reg name="r13" bitsize="64" type="int64"/>
<reg name="r14" bitsize="64" type="int64"/>
<reg name="r15" bitsize="64" type="int64"/>
<reg name="rip" bitsize="64" type="code_ptr"/>
<reg name="eflags" bitsize="32" type="int32"/>
<reg name="cs" bitsize="32" type="int32"/>
<reg name="ss" bitsize="32" type="int32"/>
<reg name="ds" bitsize="32" type="int32"/>
<reg name="es" bitsize="32" type="int32"/>
<reg name="fs" bitsize="32" type="int32"/>
<reg name="gs" bitsize="32" type="int32"/>
<reg name="st0" bitsize="80" type="i387_ext"/>
<reg name="st1" bitsize="80" type="i387_ext"/>
<reg name="st2" bitsize="80" type="i387_ext"/>
<reg name="st3" bitsize="80" type="i387_ext"/>
<reg name="st4" bitsize="80" type="i387_ext"/>
<reg name="st5" bitsize="80" type="i387_ext"/>
<reg name="st6" bitsize="80" type="i387_ext"/>
<reg name="st7" bitsize="80" type="i387_ext"/>
<reg name="fctrl" bitsize="32" type="int" group="float"/>
<reg name="fstat" bitsize="32" type="int" group="float"/>
<reg name="ftag" bitsize="32" type="int" group="float"/>
<reg name="fiseg" bitsize="32" type="int" group="float"/>
<reg name="fioff" bitsize="32" type="int" group="float"/>
<reg name="foseg" bitsize="32" type="int" group="float"/>
<reg name="fooff" bitsize="32" type="int" group="float"/>
<reg name="fop" bitsize="32" type="int" group="float"/>
</feature>
<feature name="org.gnu.gdb.i386.sse">
<vector id="v2d" type="ieee_double" count="2"/>
<vector id="v2u64" type="uint64" count="2"/>
<vector id="v4i32" type="int32" count="4"/>
<vector id="v16i8" type="int8" count="16"/>
<union id="vec128"><field name="v2_double" type="v2d"/><field name="v2_int64" type="v2u64"/><field name="v4_int32" type="v4i32"/><field name="v16_int8" type="v16i8"/><field name="uint128" type="uint128"/></union>
<reg name="xmm0" bitsize="128" type="vec128" regnum="40"/>
<reg name="xmm1" bitsize="128" type="vec128"/>
<reg name="xmm2" bitsize="128" type="vec128"/>
<reg name="xmm3" bitsize="128" type="vec128"/>
<reg name="xmm4" bitsize="128" type="vec128"/>
<reg name="xmm5" bitsize="128" type="vec128"/>
<reg name="xmm6" bitsize="128" type="vec128"/>
<reg name="xmm7" bitsize="128" type="vec128"/>
<reg name="xmm8" bitsize="128" type="vec128"/>
<reg name="xmm9" bitsize="128" type="vec128"/>
<reg name="xmm10" bitsize="128" type="vec128"/>
<reg name="xmm11" bitsize="128" type="vec128"/>
<reg name="xmm12" bitsize="128" type="vec128"/>
<reg name="xmm13" bitsize="128" type="vec128"/>
<reg name="xmm14" bitsize="128" type="vec128"/>
<reg name="xmm15" bitsize="128" type="vec128"/>
<reg name="mxcsr" bitsize="32" type="int" group="vector"/>
</feature>
<feature name="org.gnu.gdb.i386.segments">
<reg name="fs_base" bitsize="64" type="int64" regnum="57"/>
<reg name="gs_base" bitsize="64" type="int64"/>
</feature>
<feature name="org.vmiscope.x86.system">
<reg name="cr0" bitsize="64" type="int64" regnum="59" group="system"/>
<reg name="cr2" bitsize="64" type="int64" group="system"/>
<reg name="cr3" bitsize="64" type="int64" group="system"/>
<reg name="cr4" bitsize="64" type="int64" group="system"/>
<reg name="cr8" bitsize="64" type="int64" group="system"/>
<reg name="efer" bitsize="64" type="int64" group="system"/>
</feature>
</target>
"#;

impl Arch for Vmi64 {
    type Usize = u64;
    type Registers = VmiRegs;
    type RegId = VmiRegId;
    type BreakpointKind = usize;
    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gdbstub::arch::RegId;

    #[test]
    fn ids_cover_the_whole_set_in_order() {
        let last = VmiRegId::from_raw_id(REGS - 1).unwrap().0;
        assert_eq!(last.range().end, FULL_BYTES);
        assert!(VmiRegId::from_raw_id(REGS).is_none());
        assert_eq!(VmiRegId(24).range().start, GENERAL_BYTES, "st0 follows gs");
        assert_eq!(
            VmiRegId(57).range().start,
            CORE_BYTES,
            "fs_base follows mxcsr"
        );
        let regs = VmiRegs {
            fs_base: 0x1234,
            sys: [1, 2, 3, 4, 5, 6],
            ..Default::default()
        };
        let b = regs.to_bytes();
        assert_eq!(b.len(), FULL_BYTES);
        assert_eq!(b[VmiRegId(57).range()], 0x1234u64.to_le_bytes());
        assert_eq!(b[VmiRegId(61).range()], 3u64.to_le_bytes(), "cr3");
        assert!((24..=56).all(|n| VmiRegId(n).in_fpu()));
        assert!(!VmiRegId(23).in_fpu() && !VmiRegId(57).in_fpu());
    }

    #[test]
    fn g_carries_the_general_registers_and_g_writes_back_either_extent() {
        let mut regs = VmiRegs::default();
        regs.core.rip = 0x100000;
        regs.core.xmm[0] = 7;
        let mut g = vec![];
        regs.gdb_serialize(|b| g.push(b.unwrap()));
        assert_eq!(g.len(), GENERAL_BYTES);
        let mut back = VmiRegs::default();
        back.gdb_deserialize(&g).unwrap();
        assert_eq!((back.core.rip, back.extent), (0x100000, Extent::General));
        let full = regs.to_bytes();
        back.gdb_deserialize(&full).unwrap();
        assert_eq!((back.core.xmm[0], back.extent), (7, Extent::Full));
        assert!(back.gdb_deserialize(&full[..GENERAL_BYTES + 1]).is_err());
    }
}
