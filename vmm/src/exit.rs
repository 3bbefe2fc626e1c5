//! KVM exits decoded into an owned value (kvm-ioctls' `VcpuExit` borrows kvm_run),
//! so exit handling is a plain function of data and can be tested with synthetic
//! exits.

use kvm_ioctls::VcpuExit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawExit {
    IoIn { port: u16, size: u8 },
    IoOut { port: u16, size: u8, value: u32 },
    MmioRead { gpa: u64, len: u8 },
    MmioWrite { gpa: u64, len: u8, data: u64 },
    RdMsr { index: u32 },
    WrMsr { index: u32, value: u64 },
    Debug { exception: u32, pc: u64, dr6: u64 },
    InternalError,
    Hlt,
    Shutdown,
    Intr,
    FailEntry { reason: u64 },
    SystemEvent { kind: u32 },
    Other(&'static str),
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

pub fn decode(exit: &VcpuExit<'_>) -> RawExit {
    match exit {
        VcpuExit::IoIn(port, data) => RawExit::IoIn {
            port: *port,
            size: data.len() as u8,
        },
        VcpuExit::IoOut(port, data) => RawExit::IoOut {
            port: *port,
            size: data.len() as u8,
            value: le(data) as u32,
        },
        VcpuExit::MmioRead(gpa, data) => RawExit::MmioRead {
            gpa: *gpa,
            len: data.len() as u8,
        },
        VcpuExit::MmioWrite(gpa, data) => RawExit::MmioWrite {
            gpa: *gpa,
            len: data.len() as u8,
            data: le(data),
        },
        VcpuExit::X86Rdmsr(m) => RawExit::RdMsr { index: m.index },
        VcpuExit::X86Wrmsr(m) => RawExit::WrMsr {
            index: m.index,
            value: m.data,
        },
        VcpuExit::Debug(d) => RawExit::Debug {
            exception: d.exception,
            pc: d.pc,
            dr6: d.dr6,
        },
        VcpuExit::InternalError => RawExit::InternalError,
        VcpuExit::Hlt => RawExit::Hlt,
        VcpuExit::Shutdown => RawExit::Shutdown,
        VcpuExit::Intr => RawExit::Intr,
        VcpuExit::FailEntry(r, _) => RawExit::FailEntry { reason: *r },
        VcpuExit::SystemEvent(k, _) => RawExit::SystemEvent { kind: *k },
        _ => RawExit::Other("unexpected exit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_exits_decode_to_owned_values() {
        let out = [0x34u8, 0x12];
        assert_eq!(
            decode(&VcpuExit::IoOut(0xf4, &out)),
            RawExit::IoOut {
                port: 0xf4,
                size: 2,
                value: 0x1234
            }
        );
        let mut inp = [0u8; 4];
        assert_eq!(
            decode(&VcpuExit::IoIn(0x511, &mut inp)),
            RawExit::IoIn {
                port: 0x511,
                size: 4
            }
        );
        let w = 0x1122_3344_5566_7788u64.to_le_bytes();
        assert_eq!(
            decode(&VcpuExit::MmioWrite(0x20_6008, &w)),
            RawExit::MmioWrite {
                gpa: 0x20_6008,
                len: 8,
                data: 0x1122_3344_5566_7788
            }
        );
        assert_eq!(decode(&VcpuExit::Shutdown), RawExit::Shutdown);
        assert_eq!(decode(&VcpuExit::Hlt), RawExit::Hlt);
        assert!(matches!(decode(&VcpuExit::Unknown), RawExit::Other(_)));
    }
}
