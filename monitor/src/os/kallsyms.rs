//! A Linux kernel's own symbol table (kallsyms), read from the vmlinux image, so
//! a stripped distribution kernel gives every symbol with no debug package.
//!
//! `scripts/kallsyms` emits, each label 8-byte aligned, in `.rodata`:
//! `kallsyms_offsets` (s32 each), `kallsyms_relative_base` (u64),
//! `kallsyms_num_syms` (u32), `kallsyms_names` (length-prefixed token strings),
//! `kallsyms_markers` (u32 every 256 names), `kallsyms_token_table` (256
//! NUL-terminated strings) and `kallsyms_token_index` (256 u16). The image is
//! stripped, so nothing names these: the token table is found by the digits,
//! which stay single-character tokens ("0\0" "1\0" … "9\0" at indices
//! 0x30–0x39), and every other table is found from it and checked against it.

use std::collections::HashSet;

/// A symbol: its address, a size (the distance to the next symbol: kallsyms
/// keeps none) and its name.
pub type Entry = (u64, u64, String);

/// The largest size a symbol is given (Linux's largest tables are well below).
const MAX_SIZE: u64 = 1 << 20;

/// No kernel has more symbols than this (Debian's has ~150 000).
const MAX_SYMS: u32 = 4_000_000;

/// Reads the kallsyms tables of `image`, or None when it has none (or they do
/// not check out).
pub fn read(image: &[u8]) -> Option<Vec<Entry>> {
    let digits: Vec<u8> = (b'0'..=b'9').flat_map(|d| [d, 0]).collect();
    let mut from = 0;
    while let Some(at) = find(&image[from..], &digits) {
        let at = from + at;
        if let Some(t) = Tables::around(image, at) {
            return t.symbols(image);
        }
        from = at + 1;
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn align8(x: usize) -> usize {
    (x + 7) & !7
}

/// Where each table starts in the image.
struct Tables {
    tokens: Vec<Vec<u8>>,
    names: usize,
    num_syms: u32,
    offsets: usize,
    relative_base: u64,
}

impl Tables {
    /// The tables, given where the "0\01\0…9\0" run is.
    fn around(b: &[u8], digits: usize) -> Option<Tables> {
        // Walk back over tokens 0x2f..1 before '0': each ends with a NUL.
        let mut token1 = digits;
        for _ in 0..0x2f {
            let prev_nul = b[..token1.checked_sub(1)?].iter().rposition(|&c| c == 0)?;
            token1 = prev_nul + 1;
            if digits - token1 > 0x30 * 64 {
                return None;
            }
        }
        // Token 0 ends with the NUL just before token 1 and starts on an
        // 8-byte boundary. What precedes it need not be a NUL: when the table
        // before (`kallsyms_seqs_of_names`) ends exactly on that boundary, as
        // in Debian's PREEMPT_RT 6.1 kernel, token 0 follows its last byte.
        // So each aligned start with no NUL up to token 1 is tried, nearest
        // first; the index check refuses a start too early.
        let end0 = token1.checked_sub(1)?;
        let mut start = end0.checked_sub(1)? & !7;
        loop {
            if let Some(t) = Self::at(b, start) {
                return Some(t);
            }
            start = start.checked_sub(8)?;
            if end0 - start > 64 || b[start..end0].contains(&0) {
                return None;
            }
        }
    }

    /// The tables, given that the token table starts at `start`.
    fn at(b: &[u8], start: usize) -> Option<Tables> {
        let mut tokens = Vec::with_capacity(256);
        let mut at = start;
        for _ in 0..256 {
            let len = b.get(at..)?.iter().position(|&c| c == 0)?;
            tokens.push(b[at..at + len].to_vec());
            at += len + 1;
        }
        // The index follows: token i starts at index[i] in the table.
        let index = align8(at);
        let mut off = 0u16;
        for (i, t) in tokens.iter().enumerate() {
            if u16_at(b, index + 2 * i)? != off {
                return None;
            }
            off = off.checked_add(t.len() as u16 + 1)?;
        }
        let (names, num_syms) = Self::names_before(b, start)?;
        let num_pos = names.checked_sub(8)?;
        let relative_base = u64_at(b, num_pos.checked_sub(8)?)?;
        let offsets = (num_pos - 8).checked_sub(align8(4 * num_syms as usize))?;
        Some(Tables {
            tokens,
            names,
            num_syms,
            offsets,
            relative_base,
        })
    }

    /// Finds `kallsyms_num_syms` and `kallsyms_names` before the token table
    /// at `tokens`: a count N at an aligned spot whose N names, decoded, end
    /// where ceil(N/256) markers begin, with those markers' offsets. The
    /// markers end at the token table (aligned), or — with the 3-byte
    /// `kallsyms_seqs_of_names` that newer kernels (and 6.1 stable) add —
    /// 3N bytes before it.
    fn names_before(b: &[u8], tokens: usize) -> Option<(usize, u32)> {
        let mut pos = tokens & !7;
        let lowest = tokens.saturating_sub(64 << 20);
        while pos >= lowest + 8 {
            pos -= 8;
            let n = u32_at(b, pos)?;
            if n == 0 || n > MAX_SYMS || u32_at(b, pos + 4) != Some(0) {
                continue;
            }
            let markers = 4 * n.div_ceil(256) as usize;
            let seqs = tokens.checked_sub(3 * n as usize).map(|s| s & !7);
            let ends = [
                Some(tokens),
                tokens.checked_sub(4),
                seqs,
                seqs.and_then(|s| s.checked_sub(4)),
            ];
            let names = pos + 8;
            for end in ends.into_iter().flatten() {
                let Some(markers_start) = end.checked_sub(markers) else {
                    continue;
                };
                if markers_start > names
                    && u32_at(b, markers_start) == Some(0)
                    && Self::names_fit(b, names, n, markers_start)
                {
                    return Some((names, n));
                }
            }
        }
        None
    }

    /// Whether `n` names from `names` end (aligned) at `markers_start`, every
    /// 256th where its marker says.
    fn names_fit(b: &[u8], names: usize, n: u32, markers_start: usize) -> bool {
        let mut at = names;
        for i in 0..n as usize {
            if i % 256 == 0 && u32_at(b, markers_start + 4 * (i / 256)) != Some((at - names) as u32)
            {
                return false;
            }
            let Some((len, head)) = name_len(b, at) else {
                return false;
            };
            at += head + len;
            if at > markers_start {
                return false;
            }
        }
        align8(at) == markers_start || at == markers_start
    }

    fn symbols(&self, b: &[u8]) -> Option<Vec<Entry>> {
        let mut out = Vec::with_capacity(self.num_syms as usize);
        let mut at = self.names;
        let mut seen = HashSet::new();
        for i in 0..self.num_syms as usize {
            let (len, head) = name_len(b, at)?;
            let mut name = Vec::new();
            for &t in b.get(at + head..at + head + len)? {
                name.extend(&self.tokens[t as usize]);
            }
            at += head + len;
            let off = u32_at(b, self.offsets + 4 * i)? as i32;
            // KALLSYMS_ABSOLUTE_PERCPU: non-negative offsets are absolute (the
            // per-CPU symbols); negative ones count down from the base.
            let addr = if off >= 0 {
                off as u64
            } else {
                self.relative_base
                    .wrapping_sub(1)
                    .wrapping_sub(off as i64 as u64)
            };
            // The first character is the symbol's type letter.
            let name = String::from_utf8_lossy(name.get(1..).unwrap_or_default()).into_owned();
            if !name.is_empty() && seen.insert((addr, name.clone())) {
                out.push((addr, 0, name));
            }
        }
        Some(sized_by_neighbours(out))
    }
}

/// Sorts `out` and gives each symbol the distance to the next higher one as
/// its size: neither kallsyms nor a System.map keeps sizes, and the policies
/// need them (a writer is allowed when its RIP is inside a function of the
/// kernel's own text patching), whichever of the two named it.
fn sized_by_neighbours(mut out: Vec<Entry>) -> Vec<Entry> {
    out.sort();
    let next: Vec<u64> = out.iter().map(|e| e.0).collect();
    for (i, e) in out.iter_mut().enumerate() {
        let n = next[i + 1..].iter().find(|a| **a > e.0);
        // A longer distance is a gap between regions (per-CPU offsets,
        // then the kernel image), not a size: unknown.
        let distance = n.map_or(0, |n| n - e.0);
        e.1 = if distance > MAX_SIZE { 0 } else { distance };
    }
    out
}

/// A name's length and the bytes its length takes: one, or two when the
/// first has bit 7 set (Linux 6.1's "big" symbols).
fn name_len(b: &[u8], at: usize) -> Option<(usize, usize)> {
    let first = *b.get(at)?;
    if first & 0x80 == 0 {
        return Some((first as usize, 1));
    }
    let second = *b.get(at + 1)?;
    Some(((first & 0x7f) as usize | (second as usize) << 7, 2))
}

/// Reads a System.map ("ADDR TYPE NAME" per line); None when the text is not
/// one (Debian's placeholder among them).
pub fn parse_system_map(text: &str) -> Option<Vec<Entry>> {
    let mut out = vec![];
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let (Some(addr), Some(_kind), Some(name)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            return None;
        };
        if addr != u64::MAX {
            out.push((addr, 0, name.to_string()));
        }
    }
    if out.len() < 16 {
        return None;
    }
    Some(sized_by_neighbours(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds kallsyms tables the way scripts/kallsyms lays them out.
    fn tables(syms: &[(u64, &str)], base: u64) -> Vec<u8> {
        tables_with(syms, base, false)
    }

    /// With `seqs`, the 3-byte `kallsyms_seqs_of_names` entries (none of
    /// them zero) come between the markers and the token table.
    fn tables_with(syms: &[(u64, &str)], base: u64, seqs: bool) -> Vec<u8> {
        let mut b = vec![0xaau8; 64];
        // Tokens: every byte stands for itself.
        let offsets_at = b.len();
        for (a, _) in syms {
            b.extend(((base as i64 - 1 - *a as i64) as i32).to_le_bytes());
        }
        while !b.len().is_multiple_of(8) {
            b.push(0);
        }
        let _ = offsets_at;
        b.extend(base.to_le_bytes());
        b.extend((syms.len() as u32).to_le_bytes());
        b.extend([0; 4]);
        let names = b.len();
        let mut markers = vec![];
        for (i, (_, n)) in syms.iter().enumerate() {
            if i % 256 == 0 {
                markers.push((b.len() - names) as u32);
            }
            let bytes: Vec<u8> = std::iter::once(b'T').chain(n.bytes()).collect();
            b.push(bytes.len() as u8);
            b.extend(bytes);
        }
        while !b.len().is_multiple_of(8) {
            b.push(0);
        }
        for m in markers {
            b.extend(m.to_le_bytes());
        }
        while !b.len().is_multiple_of(8) {
            b.push(0);
        }
        if seqs {
            b.extend([0x01, 0x50, 0x7a].repeat(syms.len()));
            while !b.len().is_multiple_of(8) {
                b.push(0);
            }
        }
        let mut index = vec![];
        let table = b.len();
        for t in 0..=255u8 {
            index.push((b.len() - table) as u16);
            // Token 0 is a pair, as in real kernels ("na" in the RT one).
            if t == 0 {
                b.extend(b"na");
            } else {
                b.push(t);
            }
            b.push(0);
        }
        while !b.len().is_multiple_of(8) {
            b.push(0);
        }
        for i in index {
            b.extend(i.to_le_bytes());
        }
        b
    }

    #[test]
    fn kallsyms_tables_are_found_and_decoded_in_a_stripped_image() {
        let base = 0xffff_ffff_8100_0000;
        let names: Vec<String> = (0..600).map(|i| format!("sym_{i}")).collect();
        let syms: Vec<(u64, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (base + 0x10 * i as u64, n.as_str()))
            .collect();
        let img = tables(&syms, base);
        let got = read(&img).expect("found");
        assert_eq!(got.len(), 600);
        assert_eq!(got[0], (base, 0x10, "sym_0".into()));
        assert_eq!(got[599].2, "sym_599");
        assert_eq!(got[599].0, base + 0x10 * 599);
        // An image without the tables has none, and a damaged index is refused.
        assert!(read(&img[..img.len() / 2]).is_none());
        let mut bad = img.clone();
        let n = bad.len();
        bad[n - 100] ^= 1;
        assert!(read(&bad).is_none());
    }

    /// Debian's PREEMPT_RT kernel: `kallsyms_seqs_of_names` ends exactly on
    /// the 8-byte boundary where the token table starts, so no NUL precedes
    /// token 0 (600 names: 1,800 bytes of seqs).
    #[test]
    fn a_token_table_right_after_a_table_ending_on_its_boundary_is_found() {
        let base = 0xffff_ffff_8100_0000;
        let names: Vec<String> = (0..600).map(|i| format!("rt_{i}")).collect();
        let syms: Vec<(u64, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (base + 0x20 * i as u64, n.as_str()))
            .collect();
        let img = tables_with(&syms, base, true);
        let got = read(&img).expect("found after the seqs table");
        assert_eq!(got.len(), 600);
        assert_eq!(got[42], (base + 0x20 * 42, 0x20, "rt_42".into()));
    }

    #[test]
    fn a_digit_run_at_the_start_or_alone_is_no_table_and_no_panic() {
        let digits: Vec<u8> = (b'0'..=b'9').flat_map(|d| [d, 0]).collect();
        assert!(read(&digits).is_none());
        let mut img = vec![0u8; 5];
        img.extend(&digits);
        assert!(read(&img).is_none());
    }

    #[test]
    fn system_map_lines_are_read_and_the_placeholder_is_not() {
        let text: String = (0..20)
            .map(|i| format!("ffffffff810{i:05x} T f{i}\n"))
            .collect();
        let m = parse_system_map(&text).unwrap();
        assert_eq!(m.len(), 20);
        assert_eq!(m[1].2, "f1");
        // Sized by the next symbol, as kallsyms are (the -dbg System.map
        // gave every function size 0, so no writer was ever inside one).
        assert_eq!(m[1].1, 1);
        assert!(
            parse_system_map("ffffffffffffffff B The real System.map is in the linux-image-6.1.0-57-cloud-amd64-dbg package\n").is_none()
        );
    }
}
