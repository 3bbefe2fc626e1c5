//! What the panes show, copied out of the session at most 20 times a second
//! (cheap and bounded: the panes never hold the engine's lock while drawing).

use crate::format::{alert_line, event_line};
use crate::session::{CpuState, DisLine, RunState, Session};

/// How many events and serial lines the panes keep.
pub(super) const KEEP: usize = 500;
/// Stack slots and memory rows read per refresh.
const STACK_SLOTS: usize = 64;
const MEM_ROWS: usize = 64;

#[derive(Default)]
pub struct View {
    pub status: String,
    pub state: Option<RunState>,
    pub cpu: Option<CpuState>,
    pub prev_cpu: Option<CpuState>,
    pub disasm: Vec<DisLine>,
    /// `(address, value, symbol)` from RSP up.
    pub stack: Vec<(u64, Option<u64>, Option<String>)>,
    /// Hexdump lines of the memory pane.
    pub memory: Vec<String>,
    pub events: Vec<String>,
    pub alerts: Vec<(u64, String)>,
    pub hooks: Vec<String>,
    pub serial: Vec<String>,
    /// (stop count, status) at the last register fetch.
    regs_key: Option<(u64, String)>,
}

/// Where the disassembly and memory panes look.
#[derive(Debug, Clone, Copy, Default)]
pub struct Focus {
    /// None: follow RIP; Some: the analyst followed a call or jump there.
    pub disasm_at: Option<u64>,
    /// The memory pane's first address (None: the stack pointer).
    pub memory_at: Option<u64>,
}

impl View {
    pub fn refresh(&mut self, s: &mut Session, at: Focus) {
        self.status = s.status();
        let state = s.run_state();
        self.state = Some(state);
        let sym = s.intro().symbols();
        let recent = s.intro().recent(KEEP, None);
        self.events = recent.iter().map(|r| event_line(r, sym)).collect();
        let alerts = s.intro().alerts();
        self.alerts = alerts.iter().map(|a| (a.id, alert_line(a))).collect();
        self.hooks = s.hooks_text().lines().map(str::to_string).collect();
        {
            let l = s.serial_lines();
            // The last line is the one still being written: empty after a newline.
            let n = l.len() - usize::from(l.last().is_some_and(|x| x.is_empty()));
            self.serial = l[n.saturating_sub(KEEP)..n].to_vec();
        }
        self.refresh_cpu(s, state);
        self.disasm = s.disasm_lines(at.disasm_at, 64).unwrap_or_default();
        self.refresh_stack(s);
        let mem = at.memory_at.or_else(|| self.cpu.map(|c| c.regs.rsp & !0xf));
        self.memory = match mem {
            Some(a) => {
                let mut buf = vec![0u8; MEM_ROWS * 16];
                match s.read_mem(a, &mut buf, false) {
                    Ok(()) => crate::format::hexdump(a, &buf)
                        .lines()
                        .map(str::to_string)
                        .collect(),
                    Err(e) => vec![format!("{a:#x}: {e}")],
                }
            }
            None => vec![],
        };
    }

    /// Registers when the vCPU is held (stopped, paused) or the guest has
    /// ended (its final ones): a running vCPU keeps showing the last ones.
    fn refresh_cpu(&mut self, s: &mut Session, state: RunState) {
        let key = (s.control().stop_count(), self.status.clone());
        let readable = state.is_held() || state == RunState::Ended;
        if self.regs_key.as_ref() == Some(&key) || !readable {
            return;
        }
        // Held at another vCPU's stop, this one may be running: no fetch.
        if matches!(state, RunState::Stopped { vcpu } if vcpu != s.vcpu()) {
            return;
        }
        self.regs_key = Some(key);
        if let Ok(c) = s.cpu_state() {
            self.prev_cpu = self.cpu.replace(c);
        }
    }

    fn refresh_stack(&mut self, s: &Session) {
        let Some(c) = self.cpu else {
            self.stack.clear();
            return;
        };
        let sym = s.intro().symbols();
        // One read for the whole window (a slot at a time only if part of it is
        // unmapped): this runs at every frame.
        let mut all = [0u8; STACK_SLOTS * 8];
        let whole = s.read_mem(c.regs.rsp, &mut all, false).is_ok();
        self.stack = (0..STACK_SLOTS)
            .map(|i| {
                let a = c.regs.rsp.wrapping_add(i as u64 * 8);
                let mut b = [0u8; 8];
                let v = if whole {
                    b.copy_from_slice(&all[i * 8..i * 8 + 8]);
                    Some(u64::from_le_bytes(b))
                } else {
                    s.read_mem(a, &mut b, false)
                        .ok()
                        .map(|_| u64::from_le_bytes(b))
                };
                (
                    a,
                    v,
                    v.and_then(|v| vmiscope_monitor::journal::symbol_of(sym, v)),
                )
            })
            .collect();
    }
}
