//! QEMU's firmware-configuration device, the part `-kernel` guests read: the
//! signature, the CPU count and the RAM size (traditional port interface only).

pub const SELECTOR_PORT: u16 = 0x510;
pub const DATA_PORT: u16 = 0x511;

const KEY_SIGNATURE: u16 = 0x00;
const KEY_ID: u16 = 0x01;
const KEY_UUID: u16 = 0x02;
const KEY_RAM_SIZE: u16 = 0x03;
const KEY_NB_CPUS: u16 = 0x05;
const KEY_MAX_CPUS: u16 = 0x0f;
const KEY_FILE_DIR: u16 = 0x19;

pub struct FwCfg {
    items: Vec<(u16, Vec<u8>)>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    pub fn new(cpus: u16, ram: u64) -> Self {
        let items = vec![
            (KEY_SIGNATURE, b"QEMU".to_vec()),
            (KEY_ID, 1u32.to_le_bytes().to_vec()),
            (KEY_UUID, vec![0; 16]),
            (KEY_RAM_SIZE, ram.to_le_bytes().to_vec()),
            (KEY_NB_CPUS, cpus.to_le_bytes().to_vec()),
            (KEY_MAX_CPUS, cpus.to_le_bytes().to_vec()),
            (KEY_FILE_DIR, 0u32.to_be_bytes().to_vec()),
        ];
        FwCfg {
            items,
            selected: 0,
            offset: 0,
        }
    }

    pub fn write(&mut self, port: u16, _size: u8, value: u32) {
        if port == SELECTOR_PORT {
            self.selected = value as u16;
            self.offset = 0;
        }
    }

    /// Reads from the data port return the selected item byte by byte, then zeros.
    pub fn read(&mut self, port: u16, size: u8) -> u32 {
        if port != DATA_PORT {
            return 0;
        }
        let item = self
            .items
            .iter()
            .find(|(k, _)| *k == self.selected)
            .map(|(_, v)| v.as_slice());
        let mut v = 0u32;
        for i in 0..size.min(4) as usize {
            let b = item.and_then(|d| d.get(self.offset)).copied().unwrap_or(0);
            v |= (b as u32) << (8 * i);
            self.offset += 1;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_count_and_ram() {
        let mut f = FwCfg::new(3, 0x400_0000);
        f.write(SELECTOR_PORT, 2, 0);
        let sig: Vec<u8> = (0..4).map(|_| f.read(DATA_PORT, 1) as u8).collect();
        assert_eq!(sig, b"QEMU");
        f.write(SELECTOR_PORT, 2, KEY_NB_CPUS as u32);
        assert_eq!(f.read(DATA_PORT, 1) | f.read(DATA_PORT, 1) << 8, 3);
        f.write(SELECTOR_PORT, 2, KEY_RAM_SIZE as u32);
        let ram: u64 = (0..8)
            .map(|i| (f.read(DATA_PORT, 1) as u64) << (8 * i))
            .sum();
        assert_eq!(ram, 0x400_0000);
        f.write(SELECTOR_PORT, 2, 0x4242);
        assert_eq!(f.read(DATA_PORT, 1), 0, "unknown keys read as zero");
    }
}
