//! The address space as a whole: `vmmap` (every mapping of the selected vCPU's
//! page tables, with permissions) and `mem find` (a byte or text search over
//! those mappings, a given range, or guest-physical RAM).

use std::fmt::Write as _;

use vmiscope_introspect::paging::{self, Mapping};

use super::Session;
use crate::error::Error;

/// Page-table entries a `vmmap` walk may visit: the guest owns its tables, and a
/// table that points at itself would fan out without end.
const WALK_BUDGET: u64 = 1 << 24;
/// At most this many bytes are searched by one `mem find`.
const FIND_MAX: u64 = 4 << 30;
/// At most this many hits are listed.
const FIND_HITS: usize = 64;
/// Mappings listed by `vmmap` before it says how many more there are.
const VMMAP_LINES: usize = 2000;

fn size_text(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n => format!("{} KiB", n >> 10),
    }
}

impl Session {
    /// The selected vCPU's mappings, coalesced (also after the guest's end).
    fn mappings(&self) -> Result<(Vec<Mapping>, bool), Error> {
        let mode = self.paging()?;
        if !mode.paging {
            return Err("paging is off on this vCPU: virtual addresses are physical".into());
        }
        Ok(paging::mappings(self.shared.ram(), mode, WALK_BUDGET))
    }

    /// `vmmap`.
    pub(super) fn vmmap(&self) -> Result<String, Error> {
        let (maps, cut) = self.mappings()?;
        let mut out = format!(
            "{:<18} {:<18} {:>8} perm {:<18} what\n",
            "start", "end", "size", "gpa"
        );
        for m in maps.iter().take(VMMAP_LINES) {
            let _ = writeln!(
                out,
                "{:#018x} {:#018x} {:>8} r{}{}{} {:#018x} {}",
                m.gva,
                m.gva.wrapping_add(m.len),
                size_text(m.len),
                if m.writable { "w" } else { "-" },
                if m.no_exec { "-" } else { "x" },
                if m.user { "u" } else { "s" },
                m.gpa,
                vmiscope_monitor::journal::symbol_of(self.intro.symbols(), m.gva)
                    .unwrap_or_default()
            );
        }
        if maps.len() > VMMAP_LINES {
            let _ = writeln!(out, "… {} more mappings", maps.len() - VMMAP_LINES);
        }
        if cut {
            out.push_str("(the walk stopped early: the tables hold more entries than it visits)\n");
        }
        Ok(out)
    }

    /// `mem find`: where `pattern` occurs.
    pub(super) fn mem_find(
        &self,
        pattern: &[u8],
        range: Option<(u64, u64)>,
        phys: bool,
    ) -> Result<String, Error> {
        // (address shown, gpa, length) pieces, each guest-physically contiguous.
        let pieces: Vec<(u64, u64, u64)> = if phys {
            let (start, len) = range.unwrap_or((0, self.shared.ram().size()));
            vec![(start, start, len)]
        } else {
            let (maps, _) = self.mappings()?;
            let (lo, hi) = match range {
                Some((a, l)) => (a, a.saturating_add(l)),
                None => (0, u64::MAX),
            };
            maps.iter()
                .filter_map(|m| {
                    let s = m.gva.max(lo);
                    let e = m.gva.saturating_add(m.len).min(hi);
                    (s < e).then(|| (s, m.gpa + (s - m.gva), e - s))
                })
                .collect()
        };
        let total: u64 = pieces.iter().map(|p| p.2).sum();
        if total > FIND_MAX {
            return Err(format!(
                "that is {} to search; give a range of at most {} (`mem find … ADDR LEN`)",
                size_text(total),
                size_text(FIND_MAX)
            )
            .into());
        }
        let mut hits = Vec::new();
        for (shown, gpa, len) in pieces {
            self.find_in(pattern, shown, gpa, len, &mut hits);
            if hits.len() >= FIND_HITS {
                break;
            }
        }
        if hits.is_empty() {
            return Ok(format!(
                "not found ({} searched)",
                size_text(total.max(1024))
            ));
        }
        let mut out = String::new();
        for a in hits.iter().take(FIND_HITS) {
            let _ = writeln!(out, "{}", self.addr_name(*a));
        }
        if hits.len() >= FIND_HITS {
            let _ = writeln!(out, "(the first {FIND_HITS} hits)");
        }
        Ok(out)
    }

    /// Searches `len` bytes of RAM at `gpa` (shown as `shown`), chunk by chunk
    /// with an overlap so a match across chunks is found.
    fn find_in(&self, pattern: &[u8], shown: u64, gpa: u64, len: u64, hits: &mut Vec<u64>) {
        const CHUNK: u64 = 1 << 20;
        let overlap = pattern.len() as u64 - 1;
        let mut off = 0;
        let mut buf = Vec::new();
        while off < len && hits.len() < FIND_HITS {
            let n = (CHUNK + overlap).min(len - off);
            buf.resize(n as usize, 0);
            if self.shared.ram().read(gpa + off, &mut buf).is_ok() {
                for (i, w) in buf.windows(pattern.len()).enumerate() {
                    if w == pattern {
                        hits.push(shown + off + i as u64);
                        if hits.len() >= FIND_HITS {
                            return;
                        }
                    }
                }
            }
            off += CHUNK;
        }
    }
}
