//! KVM's x87/SSE state (`kvm_fpu`, the FXSAVE layout) in gdb's register terms and
//! back. FXSAVE keeps an abridged tag (one "not empty" bit per physical register);
//! gdb shows the full x87 tag word (valid / zero / special / empty), which is
//! derived from each register's contents, as the CPU's FSTENV would.

use gdbstub_arch::x86::reg::{X86_64CoreRegs, X87FpuInternalRegs};
use kvm_bindings::kvm_fpu;

const EMPTY: u32 = 3;

/// The full tag of an 80-bit register that the abridged tag says is in use.
fn classify(r: &[u8]) -> u32 {
    let exponent = u16::from_le_bytes([r[8], r[9]]) & 0x7fff;
    let integer = r[7] & 0x80 != 0;
    let fraction_zero = r[..7].iter().all(|b| *b == 0) && r[7] & 0x7f == 0;
    match exponent {
        0x7fff => 2,
        0 if !integer && fraction_zero => 1,
        0 => 2,
        _ if integer => 0,
        _ => 2,
    }
}

fn top(fsw: u16) -> usize {
    (fsw as usize >> 11) & 7
}

/// Fills the x87/SSE part of `core` from KVM's state.
pub fn to_gdb(f: &kvm_fpu, core: &mut X86_64CoreRegs) {
    let top = top(f.fsw);
    let mut ftag = 0u32;
    for phys in 0..8 {
        let st = (phys + 8 - top) % 8;
        let tag = if f.ftwx & (1 << phys) == 0 {
            EMPTY
        } else {
            classify(&f.fpr[st])
        };
        ftag |= tag << (2 * phys);
    }
    for (st, r) in core.st.iter_mut().enumerate() {
        r.copy_from_slice(&f.fpr[st][..10]);
    }
    core.fpu = X87FpuInternalRegs {
        fctrl: f.fcw as u32,
        fstat: f.fsw as u32,
        ftag,
        fiseg: (f.last_ip >> 32) as u32 & 0xffff,
        fioff: f.last_ip as u32,
        foseg: (f.last_dp >> 32) as u32 & 0xffff,
        fooff: f.last_dp as u32,
        fop: f.last_opcode as u32,
    };
    for (x, k) in core.xmm.iter_mut().zip(f.xmm.iter()) {
        *x = u128::from_le_bytes(*k);
    }
    core.mxcsr = f.mxcsr;
}

/// KVM's state with the x87/SSE part of `core` written over `f`.
pub fn from_gdb(core: &X86_64CoreRegs, mut f: kvm_fpu) -> kvm_fpu {
    for (st, r) in core.st.iter().enumerate() {
        f.fpr[st][..10].copy_from_slice(r);
    }
    let fpu = &core.fpu;
    f.fcw = fpu.fctrl as u16;
    f.fsw = fpu.fstat as u16;
    f.ftwx = (0..8)
        .filter(|p| (fpu.ftag >> (2 * p)) & 3 != EMPTY)
        .fold(0u8, |a, p| a | 1 << p);
    f.last_ip = (fpu.fiseg as u64 & 0xffff) << 32 | fpu.fioff as u64;
    f.last_dp = (fpu.foseg as u64 & 0xffff) << 32 | fpu.fooff as u64;
    f.last_opcode = fpu.fop as u16;
    for (k, x) in f.xmm.iter_mut().zip(core.xmm.iter()) {
        *k = x.to_le_bytes();
    }
    f.mxcsr = core.mxcsr;
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1.0 as an 80-bit extended value: exponent 0x3fff, integer bit set.
    const ONE: [u8; 10] = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f];

    #[test]
    fn tags_follow_top_and_contents_and_everything_round_trips() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            // TOP = 6: ST(0) is physical register 6, ST(1) is 7.
            fsw: 6 << 11,
            ftwx: 0b1100_0000,
            last_ip: 0x33_0040_1000,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        f.fpr[0][..10].copy_from_slice(&ONE);
        // ST(1) stays all zero: tag "zero".
        f.xmm[3] = 0x1122_3344_5566_7788_99aa_bbcc_ddee_ff00u128.to_le_bytes();
        let mut core = X86_64CoreRegs::default();
        to_gdb(&f, &mut core);
        assert_eq!(
            core.fpu.ftag, 0b0100_1111_1111_1111,
            "6 valid, 7 zero, others empty"
        );
        assert_eq!(core.st[0], ONE);
        assert_eq!(core.fpu.fioff, 0x0040_1000);
        assert_eq!(core.fpu.fiseg, 0x33);
        assert_eq!(core.xmm[3], 0x1122_3344_5566_7788_99aa_bbcc_ddee_ff00);
        assert_eq!(core.mxcsr, 0x1f80);
        let back = from_gdb(&core, kvm_fpu::default());
        assert_eq!(back.ftwx, f.ftwx);
        assert_eq!(
            (back.fcw, back.fsw, back.last_ip),
            (f.fcw, f.fsw, f.last_ip)
        );
        assert_eq!(back.fpr, f.fpr);
        assert_eq!(back.xmm, f.xmm);
    }

    #[test]
    fn special_values_are_tagged_special() {
        let inf = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x7f];
        let unnormal = [0, 0, 0, 0, 0, 0, 0, 0x00, 0xff, 0x3f];
        let denormal = [1, 0, 0, 0, 0, 0, 0, 0x00, 0, 0];
        assert_eq!(classify(&inf), 2);
        assert_eq!(classify(&unnormal), 2);
        assert_eq!(classify(&denormal), 2);
        assert_eq!(classify(&[0; 10]), 1);
        assert_eq!(classify(&ONE), 0);
    }
}
