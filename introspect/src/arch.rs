//! x86-64 register state as the engine sees it (no hypervisor types).

use serde::{Deserialize, Serialize};

/// General registers of one vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

impl Regs {
    /// The 64-bit general register holding `r` (RAX for EAX/AX/AL …), if any.
    pub fn gpr_mut(&mut self, r: iced_x86::Register) -> Option<&mut u64> {
        use iced_x86::Register::*;
        Some(match r.full_register() {
            RAX => &mut self.rax,
            RBX => &mut self.rbx,
            RCX => &mut self.rcx,
            RDX => &mut self.rdx,
            RSI => &mut self.rsi,
            RDI => &mut self.rdi,
            RSP => &mut self.rsp,
            RBP => &mut self.rbp,
            R8 => &mut self.r8,
            R9 => &mut self.r9,
            R10 => &mut self.r10,
            R11 => &mut self.r11,
            R12 => &mut self.r12,
            R13 => &mut self.r13,
            R14 => &mut self.r14,
            R15 => &mut self.r15,
            _ => return Option::None,
        })
    }

    /// The 64-bit value of the general register holding `r`.
    pub fn gpr(&self, r: iced_x86::Register) -> Option<u64> {
        let mut copy = *self;
        copy.gpr_mut(r).map(|v| *v)
    }
}

/// A descriptor-table register.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dtr {
    pub base: u64,
    pub limit: u16,
}

/// Control and system registers of one vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SRegs {
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub idtr: Dtr,
    pub gdtr: Dtr,
    pub cs_selector: u16,
    pub cs_base: u64,
    pub fs_base: u64,
    pub gs_base: u64,
}

impl SRegs {
    /// Current privilege level (0 with protection off).
    pub fn cpl(&self) -> u8 {
        if self.cr0 & 1 == 0 {
            0
        } else {
            (self.cs_selector & 3) as u8
        }
    }

    /// Whether a vCPU has finished its own set-up, as far as its registers say:
    /// long mode with paging on, and an IDT of its own loaded (a vCPU starts
    /// with none, or with the real-mode reset IDTR at 0). Each vCPU's baseline
    /// for the polled CR and DTR checks is taken from then on, so one vCPU's
    /// set-up is never judged against another's state.
    pub fn set_up(&self) -> bool {
        const CR0_PG: u64 = 1 << 31;
        const EFER_LMA: u64 = 1 << 10;
        self.cr0 & CR0_PG != 0
            && self.efer & EFER_LMA != 0
            && self.idtr.base != 0
            && self.idtr.limit != 0
    }

    pub fn paging(&self) -> crate::paging::PagingMode {
        crate::paging::PagingMode::from_regs(self.cr0, self.cr3, self.cr4, self.efer)
    }
}

/// Control registers the engine watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Cr {
    Cr0,
    Cr3,
    Cr4,
}

impl Cr {
    pub fn get(self, s: &SRegs) -> u64 {
        match self {
            Cr::Cr0 => s.cr0,
            Cr::Cr3 => s.cr3,
            Cr::Cr4 => s.cr4,
        }
    }

    pub fn set(self, s: &mut SRegs, v: u64) {
        match self {
            Cr::Cr0 => s.cr0 = v,
            Cr::Cr3 => s.cr3 = v,
            Cr::Cr4 => s.cr4 = v,
        }
    }

    pub const ALL: [Cr; 3] = [Cr::Cr0, Cr::Cr3, Cr::Cr4];
}

/// Descriptor-table registers the engine watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DtrKind {
    Idtr,
    Gdtr,
}

impl DtrKind {
    pub fn get(self, s: &SRegs) -> Dtr {
        match self {
            DtrKind::Idtr => s.idtr,
            DtrKind::Gdtr => s.gdtr,
        }
    }

    pub fn set(self, s: &mut SRegs, v: Dtr) {
        match self {
            DtrKind::Idtr => s.idtr = v,
            DtrKind::Gdtr => s.gdtr = v,
        }
    }

    pub const ALL: [DtrKind; 2] = [DtrKind::Idtr, DtrKind::Gdtr];
}
