//! The built-in guest images of vmiscope.
//!
//! Each image is a small long-mode guest (a tiny CPL0 kernel plus CPL3 code) built
//! from `guest/` during `cargo build` and embedded here as an ELF64 file with symbols.
//! Guests print what they do on COM1 and end through the exit ports: status 0 (pass)
//! through the power-off port, anything else through the isa-debug-exit port.

/// What an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A general example (`hello`, `smp`, `demo`, `multiboot`).
    Example,
    /// Exercises one class of introspection event.
    EventClass,
    /// A benchmark workload.
    Bench,
    /// Misbehaves on purpose, for the bad-input tests.
    Test,
}

impl Kind {
    /// A short label for listings.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Example => "example",
            Kind::EventClass => "event",
            Kind::Bench => "bench",
            Kind::Test => "test",
        }
    }
}

/// One built-in guest image.
#[derive(Debug)]
pub struct Image {
    pub name: &'static str,
    pub summary: &'static str,
    /// vCPUs the image is meant to run with.
    pub vcpus: u32,
    pub kind: Kind,
    /// The ELF64 file, with symbols.
    pub elf: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/images.rs"));

/// Finds a built-in image by name.
pub fn find(name: &str) -> Option<&'static Image> {
    IMAGES.iter().find(|i| i.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_image_is_an_elf64_x86_64_file() {
        assert!(IMAGES.len() >= 15);
        for i in IMAGES {
            assert_eq!(&i.elf[..4], b"\x7fELF", "{}", i.name);
            assert_eq!(i.elf[4], 2, "{} is not ELF64", i.name);
            assert_eq!(
                u16::from_le_bytes([i.elf[18], i.elf[19]]),
                62,
                "{} is not x86-64",
                i.name
            );
        }
        assert!(find("hello").is_some());
        assert!(find("nope").is_none());
    }
}
