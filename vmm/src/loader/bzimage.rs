//! A Linux bzImage: its setup header, and the vmlinux inside it.
//!
//! The protected-mode part of a bzImage is the kernel's own decompressor. On a
//! PVM host every instruction of it runs in KVM's emulator (a minute or more), so
//! vmiscope decompresses the payload on the host and enters the vmlinux it holds
//! through the 64-bit boot protocol, as if the decompressor had just finished.

use std::io::Read;

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

use crate::error::LoadError;

/// Where the setup header starts in the file (and in the zero page).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// "HdrS", the boot protocol's magic, at 0x202.
const HDRS: u32 = 0x5372_6448;
/// No vmlinux we would boot is bigger (Debian's is ~55 MB).
const MAX_VMLINUX: usize = 1 << 30;

/// Whether `image` carries the Linux boot protocol's setup header.
pub fn is_bzimage(image: &[u8]) -> bool {
    image.len() > 0x206
        && image[0x1fe..0x200] == [0x55, 0xaa]
        && u32::from_le_bytes(image[0x202..0x206].try_into().unwrap_or_default()) == HDRS
}

/// The setup header, as the file has it.
pub fn header(image: &[u8]) -> Result<setup_header, LoadError> {
    let size = std::mem::size_of::<setup_header>();
    let bytes = image
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size)
        .ok_or_else(|| bad("the setup header is truncated"))?;
    setup_header::from_slice(bytes)
        .copied()
        .ok_or_else(|| bad("the setup header is truncated"))
}

fn bad(why: &str) -> LoadError {
    LoadError::Linux(why.to_string())
}

/// Where the protected-mode part starts in the file: after the boot sector
/// and `setup_sects` sectors of setup code (0 means 4, as in old kernels).
pub fn setup_size(hdr: &setup_header) -> usize {
    let sects = match hdr.setup_sects {
        0 => 4,
        n => n as usize,
    };
    (sects + 1) * 512
}

/// The compression of a bzImage payload, told by its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Lz4,
    Zstd,
    Xz,
    Bzip2,
    Lzma,
    Lzo,
    None,
}

impl Compression {
    fn of(payload: &[u8]) -> Compression {
        match payload {
            [0x1f, 0x8b, ..] | [0x1f, 0x9e, ..] => Compression::Gzip,
            [0x02, 0x21, 0x4c, 0x18, ..] => Compression::Lz4,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Compression::Xz,
            [b'B', b'Z', b'h', ..] => Compression::Bzip2,
            [0x5d, 0, 0, ..] => Compression::Lzma,
            [0x89, b'L', b'Z', b'O', ..] => Compression::Lzo,
            [0x7f, b'E', b'L', b'F', ..] => Compression::None,
            _ => Compression::None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Lzo => "lzo",
            Compression::None => "none",
        }
    }
}

/// The vmlinux ELF inside a bzImage, decompressed, with the payload's compression.
pub fn vmlinux(image: &[u8], limit: usize) -> Result<(Vec<u8>, Compression), LoadError> {
    let hdr = header(image)?;
    if hdr.version < 0x208 {
        return Err(bad(&format!(
            "boot protocol {:#x} has no payload fields (2.08 or later is needed)",
            { hdr.version }
        )));
    }
    let start = setup_size(&hdr) + hdr.payload_offset as usize;
    let payload = start
        .checked_add(hdr.payload_length as usize)
        .and_then(|end| image.get(start..end))
        .ok_or_else(|| bad("the compressed payload lies past the end of the file"))?;
    let kind = Compression::of(payload);
    // Every kernel compressor but gzip (whose trailer holds it anyway) appends the
    // decompressed size as a little-endian u32: bound the output before allocating.
    let size = payload
        .len()
        .checked_sub(4)
        .map(|at| u32::from_le_bytes(payload[at..].try_into().unwrap_or_default()) as usize)
        .ok_or_else(|| bad("the compressed payload is empty"))?;
    let limit = limit.min(MAX_VMLINUX);
    if size > limit {
        return Err(bad(&format!(
            "the payload says it decompresses to {size} bytes, more than the {limit} allowed (try --mem)"
        )));
    }
    let out = match kind {
        Compression::Lz4 => lz4_legacy(payload, size)?,
        Compression::Gzip => read_all(flate2::read::GzDecoder::new(payload), limit)?,
        // One xz stream (the kernel's carries an x86 BCJ filter, which
        // liblzma undoes); the appended size after it is not read.
        Compression::Xz => read_all(liblzma::read::XzDecoder::new(payload), limit)?,
        Compression::Zstd => {
            let d = ruzstd::decoding::StreamingDecoder::new(payload)
                .map_err(|e| bad(&format!("zstd: {e}")))?;
            read_all(d, limit)?
        }
        Compression::None => payload.to_vec(),
        other => {
            return Err(bad(&format!(
                "a {} payload is not supported (gzip, xz, lz4 and zstd are; boot the vmlinux instead)",
                other.name()
            )));
        }
    };
    if !out.starts_with(b"\x7fELF") {
        return Err(bad("the decompressed payload is not an ELF vmlinux"));
    }
    Ok((out, kind))
}

fn read_all(r: impl Read, limit: usize) -> Result<Vec<u8>, LoadError> {
    let mut out = Vec::new();
    r.take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| bad(&format!("decompression failed: {e}")))?;
    if out.len() > limit {
        return Err(bad("the payload decompresses past the size limit"));
    }
    Ok(out)
}

/// LZ4's legacy frame, as the kernel's `lz4 -l` writes it: the magic, then
/// blocks of (u32 compressed length, data), each at most 8 MiB decompressed; the
/// kernel's build appends the total size, which reads as a length past the end.
fn lz4_legacy(payload: &[u8], size: usize) -> Result<Vec<u8>, LoadError> {
    const MAGIC: u32 = 0x184c_2102;
    const BLOCK: usize = 8 << 20;
    let mut out = vec![0u8; size];
    let mut filled = 0;
    let mut at = 4;
    while let Some(word) = payload.get(at..at + 4) {
        let len = u32::from_le_bytes(word.try_into().unwrap_or_default());
        at += 4;
        if len == MAGIC {
            continue;
        }
        let Some(block) = payload.get(at..at + len as usize) else {
            break;
        };
        at += len as usize;
        let room = &mut out[filled..(filled + BLOCK).min(size)];
        filled += lz4_flex::block::decompress_into(block, room)
            .map_err(|e| bad(&format!("lz4 block at {at:#x}: {e}")))?;
    }
    if filled != size {
        return Err(bad(&format!(
            "lz4 payload gave {filled} bytes, its trailer says {size}"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_or_lying_header_is_refused_before_allocating() {
        let mut img = vec![0u8; 0x400];
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(is_bzimage(&img));
        assert!(header(&img).is_ok());
        // Protocol 2.15 with a payload past the end of the file.
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&0x1000u32.to_le_bytes());
        assert!(matches!(vmlinux(&img, 1 << 20), Err(LoadError::Linux(_))));
        // A payload that claims 4 GiB decompressed.
        img[0x24c..0x250].copy_from_slice(&0x10u32.to_le_bytes());
        let at = 0x400 + 0x10 + 0x10 - 4;
        img.resize(0x500, 0);
        img[0x1f1] = 1; // setup_sects: the payload starts at 0x400 + 0x10
        img[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = vmlinux(&img, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("more than"), "{err}");
        assert!(!is_bzimage(&img[..0x100]));
    }

    /// A bzImage around `payload`: setup_sects 1, protocol 2.15.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 0x400];
        img[0x1f1] = 1;
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend(payload);
        img
    }

    #[test]
    fn an_xz_payload_with_the_kernels_x86_filter_decompresses() {
        use std::io::Write;
        let data: Vec<u8> = b"\x7fELF"
            .iter()
            .copied()
            .chain((0..100_000u32).map(|i| (i % 251) as u8))
            .collect();
        // As scripts/xz_wrap.sh compresses x86 kernels, then the size appended.
        let mut xz = std::process::Command::new("xz")
            .args(["--check=crc32", "--x86", "--lzma2=dict=1MiB", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("xz (xz-utils) runs");
        xz.stdin.take().unwrap().write_all(&data).unwrap();
        let mut payload = xz.wait_with_output().unwrap().stdout;
        payload.extend((data.len() as u32).to_le_bytes());
        let (out, kind) = vmlinux(&bzimage(&payload), 1 << 20).unwrap();
        assert_eq!(kind, Compression::Xz);
        assert_eq!(out, data);
    }

    #[test]
    fn an_lz4_legacy_payload_decompresses() {
        let data: Vec<u8> = b"\x7fELF"
            .iter()
            .copied()
            .chain((0..5000u32).map(|i| (i % 7) as u8))
            .collect();
        let block = lz4_flex::block::compress(&data);
        let mut p = 0x184c_2102u32.to_le_bytes().to_vec();
        p.extend((block.len() as u32).to_le_bytes());
        p.extend(&block);
        p.extend((data.len() as u32).to_le_bytes());
        assert_eq!(lz4_legacy(&p, data.len()).unwrap(), data);
        assert!(lz4_legacy(&p, data.len() + 1).is_err());
    }
}
