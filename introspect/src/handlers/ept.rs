//! `handle_ept_violation`: an access to a trapped page.
//!
//! KVM reports each access to a trapped page as its own exit, with the physical
//! address, size and (for writes) the data, but with RIP *after* the instruction for
//! writes. The engine finds the instruction (decoding at RIP for reads and fetches;
//! for writes, the instruction that ends at RIP and writes that address), lists
//! every linear address it touches (`PUSH [rax]`: the read and the stack write;
//! MOVS both sides; REP: RCX elements; page-crossing pieces), and dispatches every
//! hooked page it touches. The verdict is cached for the instruction, so the second
//! exit of the same instruction (e.g. the stack write of `PUSH [rax]`) reuses it
//! instead of asking the hooks twice.
//!
//! TOCTOU: the decision is keyed to the physical effect KVM reported (address,
//! size, data), and that same effect is what the VMM applies — another vCPU
//! rewriting the instruction bytes meanwhile cannot slip a different write through.
//! If the bytes found no longer explain the access, the alert says the instruction
//! is unverified instead of naming a wrong one.

use std::collections::HashSet;

use crate::decode::{self, Decoded, split_pages};
use crate::engine::{Analysed, Engine};
use crate::event::{AccessKind, EventInfo};
use crate::glue::Guest;
use crate::hooks::{Class, HookId, Rights, Target};
use crate::paging;
use crate::verdict::{Outcome, Verdict};

/// One trapped access, as the VMM saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemExit {
    pub gpa: u64,
    pub len: u64,
    pub access: AccessKind,
    pub data: Option<u64>,
    /// As KVM reports it: at the instruction for reads/fetches, after it for writes.
    pub rip: u64,
}

/// What the VMM must do with the access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemAction {
    /// Let it happen: apply the write / serve the read from RAM / run the fetch.
    Apply,
    /// Drop the write.
    Drop,
    /// Answer the read with this value.
    Data(u64),
    /// Skip the fetched instruction (its length); the engine already moved RIP.
    Skip,
}

fn translate(g: &dyn Guest, gla: u64) -> Option<u64> {
    paging::translate(&decode::phys(g), g.sregs().paging(), gla)
        .ok()
        .map(|t| t.gpa)
}

/// The instruction behind the exit, from the cache when its bytes are unchanged.
fn instruction(e: &mut Engine, g: &dyn Guest, x: &MemExit) -> Option<Decoded> {
    let key = (g.sregs().cr3, x.rip, x.access == AccessKind::Write);
    if let Some((start, bytes)) = e.insn_cache().get(&key) {
        let mut now = vec![0u8; bytes.len()];
        let same = translate(g, *start).is_some_and(|gpa| {
            // Bytes crossing into the next page are re-read through the walk.
            (gpa & 0xfff) + bytes.len() as u64 <= 0x1000
                && g.read_phys(gpa, &mut now).is_ok()
                && now == *bytes
        });
        if same && let Ok(d) = decode::decode_bytes(bytes, *start, &g.regs(), &g.sregs()) {
            return Some(d);
        }
        e.insn_cache().remove(&key);
    }
    let d = find_instruction(g, x)?;
    if e.insn_cache().len() > 4096 {
        e.insn_cache().clear();
    }
    e.insn_cache().insert(key, (d.rip, d.bytes.clone()));
    Some(d)
}

/// The instruction behind the exit (see the module docs).
fn find_instruction(g: &dyn Guest, x: &MemExit) -> Option<Decoded> {
    let covers = |d: &Decoded, exact: bool| {
        d.accesses.iter().filter(|a| a.write).any(|a| {
            translate(g, a.gla).is_some_and(|gpa| {
                if exact {
                    gpa == x.gpa && a.size == x.len
                } else {
                    gpa & !0xfff == x.gpa & !0xfff
                }
            })
        })
    };
    if x.access != AccessKind::Write {
        return decode::decode_at(g, x.rip).ok();
    }
    // REP string writes exit with RIP still on the instruction.
    if let Ok(d) = decode::decode_at(g, x.rip)
        && d.instr.is_string_instruction()
        && covers(&d, false)
    {
        return Some(d);
    }
    // Longest first: prefixes (LOCK, operand size, segment) belong to the
    // instruction, and a stray prefix byte changes the access and fails the match.
    for exact in [true, false] {
        for k in (1..=15u64).rev() {
            if let Ok(d) = decode::decode_at(g, x.rip.wrapping_sub(k))
                && d.len() as u64 == k
                && covers(&d, exact)
            {
                return Some(d);
            }
        }
    }
    None
}

pub fn handle_ept_violation(
    engine: &mut Engine,
    guest: &mut dyn Guest,
    x: &MemExit,
) -> (Verdict, MemAction) {
    // A fetch from a page no hook watches for execution (it is trapped for a
    // hidden INT3's sake, or for reads or writes): nothing to decide, no event.
    if x.access == AccessKind::Exec && !engine.watches_exec(x.gpa) {
        return (Verdict::Allowed, MemAction::Apply);
    }
    engine.handle(guest, Class::Ept, |e, g| {
        let vcpu = g.vcpu();
        let instr = instruction(e, g, x);
        let (start, end) = match &instr {
            Some(d) => (d.rip, d.rip + d.len() as u64),
            None => (x.rip, x.rip),
        };
        // Another access of the execution just analysed (the stack write of
        // `PUSH [mem]` after its read, the next element of a REP string): the
        // analysis already covered it. The same instruction running again (a loop
        // repeating the access that triggered the analysis) is a new execution.
        let exits = e.vcpu(vcpu).exits;
        let covered = e.vcpu(vcpu).insn.as_ref().is_some_and(|a| {
            instr.is_some()
                && a.start == start
                && a.end == end
                && a.exit + 1 == exits
                && a.trigger != (x.gpa, x.access)
                && a.pieces.iter().any(|&(gpa, len, k)| {
                    k == x.access && gpa <= x.gpa && x.gpa + x.len <= gpa + len
                })
        });
        let verdict = if covered {
            let a = e.vcpu(vcpu).insn.as_mut().expect("covered");
            a.exit = exits;
            a.verdict
        } else {
            let (verdict, pieces) = dispatch_all(e, g, x, instr.as_ref());
            let trigger = (x.gpa, x.access);
            e.vcpu(vcpu).insn = Some(Analysed {
                start,
                end,
                exit: exits,
                verdict,
                trigger,
                pieces,
            });
            verdict
        };
        (verdict, action(e, g, x, verdict, instr.as_ref()))
    })
}

/// One (gpa, len, kind, gla) piece of what an instruction touches.
type Piece = (u64, u64, AccessKind, u64);

/// Every piece the instruction touches, the reported access first (unless a piece
/// of the instruction covers it).
fn pieces_of(g: &dyn Guest, x: &MemExit, instr: Option<&Decoded>) -> Vec<Piece> {
    let mut pieces: Vec<Piece> = Vec::new();
    let reported_gla = instr
        .and_then(|d| {
            d.accesses.iter().find_map(|a| {
                let gpa = translate(g, a.gla)?;
                (gpa & !0xfff == x.gpa & !0xfff).then(|| a.gla + (x.gpa - gpa))
            })
        })
        .unwrap_or(if x.access == AccessKind::Exec {
            x.rip
        } else {
            x.gpa
        });
    // A fetch touches only the instruction bytes; its data accesses fault on
    // their own when the instruction runs.
    if let Some(d) = instr.filter(|_| x.access != AccessKind::Exec) {
        for a in &d.accesses {
            let kinds = [(a.read, AccessKind::Read), (a.write, AccessKind::Write)];
            for (gla, len) in split_pages(a.gla, a.size) {
                let Some(gpa) = translate(g, gla) else {
                    continue;
                };
                for (on, k) in kinds {
                    if on {
                        pieces.push((gpa, len, k, gla));
                    }
                }
            }
        }
    }
    let covered = pieces
        .iter()
        .any(|&(gpa, len, k, _)| k == x.access && gpa <= x.gpa && x.gpa + x.len <= gpa + len);
    if !covered {
        pieces.insert(0, (x.gpa, x.len, x.access, reported_gla));
    }
    pieces
}

/// What the hooks of one piece see: the reported data belongs to the piece that
/// contains the reported access; a write shows what memory held before it.
fn piece_info(g: &dyn Guest, x: &MemExit, (gpa, len, kind, gla): Piece) -> EventInfo {
    let data = if kind == x.access && gpa <= x.gpa && x.gpa < gpa + len {
        x.data
    } else {
        None
    };
    let old = (kind == AccessKind::Write && len <= 8).then(|| {
        let mut b = [0u8; 8];
        let _ = g.read_phys(gpa, &mut b[..len as usize]);
        u64::from_le_bytes(b)
    });
    EventInfo::Mem {
        gla,
        gpa,
        size: len,
        access: kind,
        data,
        old,
    }
}

/// Dispatches every hooked (page, access) the instruction touches.
fn dispatch_all(
    e: &mut Engine,
    g: &mut dyn Guest,
    x: &MemExit,
    instr: Option<&Decoded>,
) -> (Verdict, Vec<(u64, u64, AccessKind)>) {
    let mut seen = HashSet::new();
    let mut fired_all: Vec<(HookId, Outcome)> = Vec::new();
    let mut blocking_info = None;
    let mut first_info = None;
    for piece in pieces_of(g, x, instr) {
        let (gpa, len, kind, _) = piece;
        if !seen.insert((gpa, len, kind)) {
            continue;
        }
        let info = piece_info(g, x, piece);
        let page = gpa & !0xfff;
        let want = match kind {
            AccessKind::Read => Rights::R,
            AccessKind::Write => Rights::W,
            AccessKind::Exec => Rights::X,
        };
        let fired = e.dispatch(g, Some(page), &info, &|t| {
            t.covers(gpa, len, want) && !matches!(t, Target::Breakpoint { .. })
        });
        if fired.iter().any(|(_, o)| o.verdict == Verdict::NotAllowed) && blocking_info.is_none() {
            blocking_info = Some(info.clone());
        }
        first_info.get_or_insert(info);
        fired_all.extend(fired);
    }
    let covered: Vec<(u64, u64, AccessKind)> = seen.into_iter().collect();
    // The reported access is always a piece, so there is a first one.
    let Some(info) = blocking_info.or(first_info) else {
        return (Verdict::Allowed, covered);
    };
    let text = instr
        .map(|d| d.text.clone())
        .unwrap_or_else(|| "(instruction unverified)".into());
    e.set_insn_rip(instr.map(|d| d.rip));
    (
        e.conclude(g, Class::Ept, &info, Some(&text), &fired_all),
        covered,
    )
}

fn action(
    e: &Engine,
    g: &mut dyn Guest,
    x: &MemExit,
    v: Verdict,
    instr: Option<&Decoded>,
) -> MemAction {
    match (x.access, v) {
        (AccessKind::Read, Verdict::NotAllowed) => MemAction::Data(0),
        (AccessKind::Read, _) => {
            // AllowedPatched: our hidden INT3s read as the original bytes.
            let mut buf = [0u8; 8];
            let n = x.len.min(8) as usize;
            if g.read_phys(x.gpa, &mut buf[..n]).is_err() {
                return MemAction::Data(0);
            }
            let mut patched = false;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                if let Some(orig) = e.hidden_byte(x.gpa + i as u64).as_ref() {
                    *b = *orig;
                    patched = true;
                }
            }
            if patched {
                MemAction::Data(u64::from_le_bytes(buf))
            } else {
                MemAction::Apply
            }
        }
        (AccessKind::Write, Verdict::NotAllowed) => MemAction::Drop,
        // A LOCKed RMW is applied by the engine, atomically (AllowedVirtual).
        (AccessKind::Write, _) => match (instr, x.data) {
            (Some(d), Some(data))
                if d.is_locked() && crate::atomic::apply(g, d, x.gpa, x.len, data) =>
            {
                MemAction::Drop
            }
            _ => MemAction::Apply,
        },
        (AccessKind::Exec, Verdict::NotAllowed) => match instr {
            Some(d) => {
                let mut r = g.regs();
                r.rip += d.len() as u64;
                g.set_regs(&r);
                MemAction::Skip
            }
            None => MemAction::Apply,
        },
        (AccessKind::Exec, _) => MemAction::Apply,
    }
}
