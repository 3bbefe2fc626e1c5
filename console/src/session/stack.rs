//! Reading the guest like a debugger: `x/FMT` (gdb's examine), `bt` (frame
//! pointers, with symbols), `sym` and `addr`.

use std::fmt::Write as _;

use super::Session;
use crate::commands::{XFormat, XKind};
use crate::error::Error;

/// The longest string `x/s` reads.
const STRING_MAX: usize = 256;

/// How far `tele` follows a pointer chain from each slot.
const TELE_DEPTH: usize = 4;

impl Session {
    /// `tele ADDR [N]`: N 8-byte slots from ADDR, each followed as a pointer
    /// chain (pwndbg's `telescope`): every link is named by its symbol, a
    /// chain ends at a value that is no readable address, at a string
    /// (shown), or after `TELE_DEPTH` links (a loop is said).
    pub(super) fn telescope(&mut self, addr: u64, n: usize) -> Result<String, Error> {
        let mut out = String::new();
        for i in 0..n as u64 {
            let slot = addr.wrapping_add(8 * i);
            let Some(v) = self.read_u64(slot).ok() else {
                if i == 0 {
                    return Err(format!("cannot read {slot:#x}").into());
                }
                let _ = writeln!(out, "{:02}:{:04x}│ {slot:#x}: (unreadable)", i, 8 * i);
                break;
            };
            let mut line = format!("{:02}:{:04x}│ {}", i, 8 * i, self.addr_name(slot));
            let mut seen = vec![slot];
            let mut cur = v;
            for depth in 0..=TELE_DEPTH {
                if seen.contains(&cur) {
                    let _ = write!(line, " —▸ {cur:#x} (loop)");
                    break;
                }
                // The first page is nobody's pointer (null, small counts).
                match self.read_u64(cur).ok().filter(|_| cur >= 0x1000) {
                    Some(next) if depth < TELE_DEPTH => {
                        let _ = write!(line, " —▸ {}", self.addr_name(cur));
                        if let Some(s) = self.string_at(cur) {
                            let _ = write!(line, " \"{s}\"");
                            break;
                        }
                        seen.push(cur);
                        cur = next;
                    }
                    _ => {
                        let _ = write!(line, " ◂— {cur:#x}");
                        break;
                    }
                }
            }
            out.push_str(&line);
            out.push('\n');
        }
        Ok(out)
    }

    /// The printable string at `a`, if at least 4 characters are.
    fn string_at(&self, a: u64) -> Option<String> {
        let mut b = [0u8; 48];
        self.read(a, &mut b, false).ok()?;
        let n = b
            .iter()
            .take_while(|c| c.is_ascii_graphic() || **c == b' ')
            .count();
        (n >= 4 && (n == b.len() || b[n] == 0 || b[n] == b'\n')).then(|| {
            String::from_utf8_lossy(&b[..n]).into_owned() + if n == b.len() { "…" } else { "" }
        })
    }

    /// `x/FMT ADDR`.
    pub(super) fn examine(&mut self, f: XFormat, addr: u64) -> Result<String, Error> {
        match f.kind {
            XKind::Instruction => self.disasm(Some(addr), f.count.min(200)),
            XKind::String => self.strings(addr, f.count.min(64)),
            _ => self.units(f, addr),
        }
    }

    fn units(&self, f: XFormat, addr: u64) -> Result<String, Error> {
        let size = f.size as usize;
        let mut buf = vec![0u8; f.count * size];
        self.read(addr, &mut buf, false)?;
        let per_line = (16 / size).max(1);
        let mut out = String::new();
        for (row, chunk) in buf.chunks(per_line * size).enumerate() {
            let a = addr + (row * per_line * size) as u64;
            let _ = write!(out, "{}:", self.addr_name(a));
            for u in chunk.chunks(size) {
                let mut b = [0u8; 8];
                b[..size].copy_from_slice(u);
                let v = u64::from_le_bytes(b);
                let _ = write!(out, "  {}", unit_text(v, f.size, f.kind));
            }
            out.push('\n');
        }
        Ok(out)
    }

    fn strings(&self, mut addr: u64, count: usize) -> Result<String, Error> {
        let mut out = String::new();
        for _ in 0..count {
            let mut s = Vec::new();
            let mut b = [0u8; 1];
            while s.len() < STRING_MAX {
                self.read(addr + s.len() as u64, &mut b, false)?;
                if b[0] == 0 {
                    break;
                }
                s.push(b[0]);
            }
            let _ = writeln!(
                out,
                "{}:  \"{}\"{}",
                self.addr_name(addr),
                s.escape_ascii(),
                if s.len() == STRING_MAX { "…" } else { "" }
            );
            addr += s.len() as u64 + 1;
        }
        Ok(out)
    }

    /// `bt [N]`: RIP, then the return addresses the saved-RBP chain gives (the
    /// guest's own frames: a function built without frame pointers is skipped
    /// over, as in gdb without unwind tables).
    pub(super) fn backtrace(&mut self, n: usize) -> Result<String, Error> {
        let st = self.cpu_state()?;
        let r = st.regs;
        let mut out = format!("#0  {}\n", self.addr_name(r.rip));
        let mut frames = 1;
        // At a function's first instruction its frame is not built yet: the
        // return address is at RSP.
        if self
            .intro
            .symbols()
            .lookup(r.rip)
            .is_some_and(|(_, o)| o == 0)
            && let Ok(ret) = self.read_u64(r.rsp)
        {
            let _ = writeln!(out, "#1  {}", self.addr_name(ret));
            frames += 1;
        }
        let mut fp = r.rbp;
        while frames < n && fp != 0 {
            let (Ok(saved), Ok(ret)) = (self.read_u64(fp), self.read_u64(fp.wrapping_add(8)))
            else {
                break;
            };
            if ret == 0 {
                break;
            }
            let _ = writeln!(out, "#{frames:<2} {}", self.addr_name(ret));
            frames += 1;
            // Frames are at higher addresses as the chain goes up; anything
            // else is not a frame chain (or a hostile one).
            if saved <= fp {
                break;
            }
            fp = saved;
        }
        Ok(out)
    }

    fn read_u64(&self, a: u64) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.read(a, &mut b, false)?;
        Ok(u64::from_le_bytes(b))
    }

    /// `kaslr`: the slide, once known, and how gdb takes it (its symbol file is
    /// made when it attaches).
    pub(super) fn kaslr(&self) -> String {
        match self.intro.symbols().slide() {
            Some(0) => "no slide: the kernel runs at its link addresses".into(),
            Some(d) => format!(
                "slide {d:#x}: every symbol is moved by it; a gdb attached before it was found: `symbol-file -o {d:#x} FILE` (FILE from `vmiscope symbols IMAGE --elf FILE`)"
            ),
            None => {
                "not known yet: found when the kernel loads its IDT (KASLR by its own decompressor)"
                    .into()
            }
        }
    }

    /// `sym ADDR`.
    pub(super) fn sym_of(&self, a: u64) -> Result<String, Error> {
        match self.intro.symbols().lookup(a) {
            Some((n, 0)) => Ok(format!("{a:#x} is {n}")),
            Some((n, off)) => Ok(format!("{a:#x} is {n}+{off:#x}")),
            None => Err(format!("no symbol at or below {a:#x}").into()),
        }
    }

    /// `addr SYMBOL`.
    pub(super) fn addr_of(&self, name: &str) -> Result<String, Error> {
        self.intro
            .symbols()
            .get(name)
            .map(|a| format!("{name} = {a:#x}"))
            .ok_or_else(|| format!("no symbol `{name}` in the image").into())
    }
}

fn unit_text(v: u64, size: u8, kind: XKind) -> String {
    let bits = size as u32 * 8;
    match kind {
        XKind::Signed => {
            let shift = 64 - bits;
            (((v << shift) as i64) >> shift).to_string()
        }
        XKind::Unsigned => v.to_string(),
        XKind::Char => format!("{:>3} '{}'", v, (v as u8).escape_ascii()),
        _ => format!("{v:#0w$x}", w = size as usize * 2 + 2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_as_gdb_shows_them() {
        assert_eq!(unit_text(0xff, 1, XKind::Signed), "-1");
        assert_eq!(unit_text(0xff, 1, XKind::Unsigned), "255");
        assert_eq!(unit_text(0x41, 1, XKind::Char), " 65 'A'");
        assert_eq!(unit_text(0x1234, 8, XKind::Hex), "0x0000000000001234");
        assert_eq!(unit_text(0xfffe, 2, XKind::Signed), "-2");
    }
}
