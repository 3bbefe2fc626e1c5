//! The stub's architecture for gdb: x86-64 with the segment bases and the system
//! registers (CR0/2/3/4/8, EFER) a kernel debugger needs, and the target
//! description that names them.

use gdbstub::arch::{Arch, Registers};
use gdbstub_arch::x86::reg::X86_64CoreRegs;

/// x86-64 with the system registers a kernel debugger needs.
pub enum Vmi64 {}

/// Core + SSE (gdb's amd64 layout), then fs_base/gs_base, then CR0/2/3/4/8, EFER.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct VmiRegs {
    pub core: X86_64CoreRegs,
    pub fs_base: u64,
    pub gs_base: u64,
    pub sys: [u64; 6],
}

/// Bytes of the core + SSE block in gdb's amd64 order.
const CORE_BYTES: usize = 16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4;

impl Registers for VmiRegs {
    type ProgramCounter = u64;
    fn pc(&self) -> u64 {
        self.core.rip
    }
    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        for v in [self.fs_base, self.gs_base].iter().chain(self.sys.iter()) {
            v.to_le_bytes().iter().for_each(|b| write_byte(Some(*b)));
        }
    }
    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() < CORE_BYTES + 8 * 8 {
            return Err(());
        }
        self.core.gdb_deserialize(&bytes[..CORE_BYTES])?;
        let word = |i: usize| {
            u64::from_le_bytes(
                bytes[CORE_BYTES + 8 * i..CORE_BYTES + 8 * i + 8]
                    .try_into()
                    .unwrap(),
            )
        };
        self.fs_base = word(0);
        self.gs_base = word(1);
        for (i, r) in self.sys.iter_mut().enumerate() {
            *r = word(2 + i);
        }
        Ok(())
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
    type RegId = gdbstub_arch::x86::reg::id::X86_64CoreRegId;
    type BreakpointKind = usize;
    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}
