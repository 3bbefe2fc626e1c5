//! ACPI tables for a Linux guest with several vCPUs: an RSDP, an XSDT and a
//! MADT naming each vCPU's local APIC and the in-kernel IOAPIC. Debian's cloud
//! kernel reads no MP tables (`X86_MPPARSE` is off), so without a MADT it
//! boots its BSP only. Built with rust-vmm's `acpi_tables`; placed in the
//! e820-reserved 0xe0000 area, where the kernel also scans for the RSDP.

use acpi_tables::Aml;
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;

use crate::error::LoadError;
use crate::memory::GuestRam;

const OEM_ID: [u8; 6] = *b"VMISCO";
const OEM_TABLE: [u8; 8] = *b"VMISCOPE";
const LAPIC: u32 = 0xfee0_0000;
const IOAPIC: u32 = 0xfec0_0000;

/// Writes the tables at `at` (the RSDP first); returns the RSDP's address.
pub fn write_tables(ram: &GuestRam, at: u64, vcpus: u32) -> Result<u64, LoadError> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    // The IOAPIC's ID after the CPUs'; KVM routes GSI n to its pin n (ISA
    // IRQ 0, the PIT, included), so no interrupt source override is needed.
    madt.add_structure(IoApic::new(vcpus as u8, IOAPIC, 0));
    let madt_bytes = bytes(&madt);
    let madt_at = at + 0x100;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(madt_at);
    let xsdt_at = at + 0x40;
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_at));
    let xsdt_bytes = bytes(&xsdt);
    if rsdp.len() > 0x40 || xsdt_bytes.len() > 0xc0 || madt_bytes.len() > 0x1000 {
        return Err(LoadError::Linux(
            "the ACPI tables outgrew their room".into(),
        ));
    }
    for (gpa, data) in [(at, &rsdp), (xsdt_at, &xsdt_bytes), (madt_at, &madt_bytes)] {
        ram.write(gpa, data)
            .map_err(|e| LoadError::Linux(format!("ACPI tables: {e}")))?;
    }
    Ok(at)
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn the_tables_chain_and_checksum_with_one_lapic_per_vcpu() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let at = write_tables(&ram, 0xe0000, 2).unwrap();
        let mut rsdp = [0u8; 36];
        ram.read(at, &mut rsdp).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let mut x = [0u8; 44];
        ram.read(xsdt, &mut x).unwrap();
        assert_eq!(&x[..4], b"XSDT");
        let madt = u64::from_le_bytes(x[36..44].try_into().unwrap());
        let mut head = [0u8; 8];
        ram.read(madt, &mut head).unwrap();
        assert_eq!(&head[..4], b"APIC");
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let mut m = vec![0u8; len];
        ram.read(madt, &mut m).unwrap();
        assert_eq!(sum(&m), 0);
        // Two local APIC entries (type 0, 8 bytes) then the IOAPIC (type 1).
        assert_eq!((m[44], m[52], m[60]), (0, 0, 1));
        assert_eq!(m[52 + 3], 1); // the second APIC ID
    }
}
