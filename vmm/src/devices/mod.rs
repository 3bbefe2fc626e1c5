//! The small PC the guests see: COM1, exit ports, fw_cfg, the introcall doorbell.
//! Every other port reads as all-ones and ignores writes.

mod fwcfg;
mod serial;

pub use fwcfg::FwCfg;
pub use serial::{LiveSink, SerialLog, SerialPort};

/// COM1.
pub const SERIAL_BASE: u16 = 0x3f8;
/// QEMU's `isa-debug-exit`: a write of v ends the run with status (v << 1) | 1.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The ACPI PM1a control port of QEMU's q35 machine: writing 0x2000 (SLP_EN, S5)
/// powers off, status 0. Our images' "pass" path.
pub const POWEROFF_PORT: u16 = 0x604;
pub const POWEROFF_VALUE: u32 = 0x2000;
/// i8042 command port: 0xfe pulses the reset line.
pub const I8042_PORT: u16 = 0x64;
/// The introcall doorbell: `out 0x9a, al` with RAX = INTROCALL_MAGIC.
/// Register ABI (modelled on HVMI's VMCALL ABI, which used RAX = 0x22 for Xen's
/// HVMOP_guest_request_vm_event): RDI = sub-op, RSI/RDX/RBX = arguments; on return
/// RAX = status (0 handled, -1 nobody handled it), RBX = result.
pub const INTROCALL_PORT: u16 = 0x9a;
pub const INTROCALL_MAGIC: u64 = 0x22;

/// What a port write means for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEffect {
    None,
    /// The guest ended the run with this exit status.
    Exit(i32),
    /// The guest asked for a reset (i8042 0xfe).
    Reset,
    /// The introcall doorbell rang (the caller checks RAX for the magic).
    Doorbell,
    /// Nobody claims this port.
    Unclaimed,
}

/// The port-I/O devices of one VM.
pub struct Devices {
    pub serial: SerialPort,
    pub fwcfg: FwCfg,
}

impl Devices {
    pub fn new(serial: SerialPort, fwcfg: FwCfg) -> Self {
        Devices { serial, fwcfg }
    }

    /// A guest `out`.
    pub fn write(&mut self, port: u16, size: u8, value: u32) -> PortEffect {
        match port {
            SERIAL_BASE..=0x3ff => {
                self.serial.write((port - SERIAL_BASE) as u8, value as u8);
                PortEffect::None
            }
            DEBUG_EXIT_PORT => PortEffect::Exit((((value & 0xff) << 1) | 1) as i32),
            POWEROFF_PORT if size == 2 && value == POWEROFF_VALUE => PortEffect::Exit(0),
            I8042_PORT if value & 0xff == 0xfe => PortEffect::Reset,
            fwcfg::SELECTOR_PORT..=fwcfg::DATA_PORT => {
                self.fwcfg.write(port, size, value);
                PortEffect::None
            }
            INTROCALL_PORT => PortEffect::Doorbell,
            _ => PortEffect::Unclaimed,
        }
    }

    /// A guest `in`: the value, or `None` if no device claims the port (reads as 0xff…).
    pub fn read(&mut self, port: u16, size: u8) -> Option<u32> {
        match port {
            SERIAL_BASE..=0x3ff => Some(self.serial.read((port - SERIAL_BASE) as u8) as u32),
            fwcfg::SELECTOR_PORT..=fwcfg::DATA_PORT => Some(self.fwcfg.read(port, size)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn devices() -> (Devices, Arc<SerialLog>) {
        let log = Arc::new(SerialLog::default());
        (
            Devices::new(SerialPort::new(log.clone(), None), FwCfg::new(2, 64 << 20)),
            log,
        )
    }

    #[test]
    fn exit_ports_and_serial() {
        let (mut d, log) = devices();
        for b in b"hi\n" {
            assert_eq!(d.write(0x3f8, 1, *b as u32), PortEffect::None);
        }
        assert_eq!(log.text(), "hi\n");
        assert_eq!(d.write(0xf4, 1, 0x10), PortEffect::Exit(0x21));
        assert_eq!(d.write(0x604, 2, 0x2000), PortEffect::Exit(0));
        assert_eq!(
            d.write(0x604, 1, 0x20),
            PortEffect::Unclaimed,
            "garbage must not power off"
        );
        assert_eq!(d.write(0x64, 1, 0xfe), PortEffect::Reset);
        assert_eq!(d.write(0x9a, 1, 0x22), PortEffect::Doorbell);
        assert_eq!(d.write(0x1234, 4, 7), PortEffect::Unclaimed);
        assert_eq!(d.read(0x1234, 1), None);
        // LSR: transmitter empty, so polling guests make progress.
        assert_eq!(d.read(0x3fd, 1).unwrap() & 0x60, 0x60);
    }
}
