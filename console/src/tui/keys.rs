//! Keys, mouse and the actions they take: running the guest, deciding a stop,
//! moving the focus and scrolling, following a call, the details popups.

use crossterm::event::{KeyCode, KeyModifiers, MouseButton, MouseEvent, MouseEventKind};

use super::state::{CmdLine, PANES, Pane, Popup, Tui, register_count};
use crate::cli::Mode;
use crate::commands::{self, Command};
use crate::session::{RunState, Session};

fn key_help() -> String {
    "Keys\n\
     F5 continue   F7 next-event   F8 step   F2 line console (REPL)   q quit\n\
     Tab / Shift-Tab or a click   focus a pane      ↑↓ PgUp PgDn Home End, wheel   scroll it\n\
     Enter   details of an event or alert; in Disassembly, follow a call or jump\n\
     Esc     in Disassembly, back to RIP; in Memory, back to RSP\n\
     a / d   allow / deny the stopped event (its vCPU then goes on)\n\
     e       the selected alert becomes an exception\n\
     :       a console command (↑↓ history, Tab completes, Ctrl-U/W erase); `mem read ADDR` and\n\
             `x/FMT ADDR` also point the Memory pane there\n\
     ?       this help (↑↓ scroll it, Esc closes)\n\n\
     Commands\n"
        .to_string()
        + &commands::HELP
            .iter()
            .map(|e| format!("{:<38} {}\n", e.usage, e.what))
            .collect::<String>()
}

impl Tui {
    /// Copies what the panes show out of the session (cheap, bounded), and says
    /// in the message line when the guest stops or ends.
    pub fn refresh(&mut self, s: &mut Session) {
        self.view.refresh(s, self.at);
        let state = self.view.state;
        if state != self.last_state {
            match state {
                Some(RunState::Ended) => {
                    self.message = format!("{}: its final state stays readable", self.view.status)
                }
                Some(RunState::Stopped { .. }) => self.message = self.view.status.clone(),
                _ => {}
            }
            self.last_state = state;
        }
    }

    pub(super) fn exec(&mut self, s: &mut Session, line: &str) -> bool {
        // `mem read ADDR` and `x/FMT ADDR` also point the memory pane there.
        if let Ok(Some(
            Command::MemRead {
                addr, phys: false, ..
            }
            | Command::Examine { addr, .. },
        )) = commands::parse(line, &|n| s.intro().symbols().get(n))
        {
            self.at.memory_at = Some(addr);
        }
        match s.exec(line) {
            Ok(o) => {
                let text = o.text.trim_end().to_string();
                if text.lines().count() > 1 {
                    self.popup = Some(Popup {
                        title: line.to_string(),
                        text,
                        scroll: 0,
                    });
                } else {
                    self.message = text;
                }
                o.quit
            }
            Err(e) => {
                self.message = format!("error: {e}");
                false
            }
        }
    }

    /// How many lines the pane holds now.
    fn pane_len(&self, p: Pane) -> usize {
        match p {
            Pane::Registers => register_count().div_ceil(self.reg_per_line),
            Pane::Disassembly => self.view.disasm.len(),
            Pane::Stack => self.view.stack.len(),
            Pane::Memory => self.view.memory.len(),
            Pane::Events => self.view.events.len(),
            Pane::Alerts => self.view.alerts.len(),
            Pane::Hooks => self.view.hooks.len(),
            Pane::Serial => self.view.serial.len(),
        }
    }

    /// Moves the focused pane's selection by `delta` lines (clamped).
    fn scroll(&mut self, p: Pane, delta: isize) {
        let len = self.pane_len(p);
        let i = p.index();
        if len == 0 {
            return;
        }
        let cur = self.sel[i].unwrap_or(if p.follows_tail() { len - 1 } else { 0 });
        let next = (cur as isize + delta).clamp(0, len as isize - 1) as usize;
        self.sel[i] = Some(next);
    }

    fn selected(&self, pane: Pane) -> Option<usize> {
        self.sel[pane.index()]
    }

    /// Enter: details of an event or alert; follow a call in the disassembly.
    /// With nothing selected in Events or Alerts, Enter opens the newest
    /// (the line the pane follows), not a hint to press ↑ first.
    fn enter(&mut self, s: &mut Session) {
        if matches!(self.focus, Pane::Events | Pane::Alerts) && self.selected(self.focus).is_none()
        {
            self.scroll(self.focus, 0);
        }
        let detail = match self.focus {
            Pane::Events => self.selected(Pane::Events).and_then(|i| {
                let recent = s.intro().recent(super::view::KEEP, None);
                recent
                    .get(i)
                    .map(|r| crate::format::event_detail(r, s.intro().symbols()))
            }),
            Pane::Alerts => self
                .selected(Pane::Alerts)
                .and_then(|i| self.view.alerts.get(i))
                .map(|(id, _)| {
                    s.exec(&format!("alert {id}"))
                        .map(|o| o.text)
                        .unwrap_or_else(|e| format!("error: {e}"))
                }),
            Pane::Disassembly => {
                let line = self
                    .selected(Pane::Disassembly)
                    .and_then(|i| self.view.disasm.get(i));
                match line.and_then(|l| l.target) {
                    Some(t) => {
                        self.at.disasm_at = Some(t);
                        self.sel[Pane::Disassembly.index()] = None;
                        self.message = format!("following {} (Esc: back to RIP)", s.addr_name(t));
                    }
                    None => self.message = "select a call or jump (↑/↓) to follow it".into(),
                }
                return;
            }
            _ => return,
        };
        match detail {
            Some(d) => {
                self.popup = Some(Popup {
                    title: "details".into(),
                    text: d,
                    scroll: 0,
                })
            }
            None => self.message = "no event or alert here yet".into(),
        }
    }

    fn popup_key(&mut self, code: KeyCode) {
        let Some(p) = self.popup.as_mut() else {
            return;
        };
        match code {
            KeyCode::Esc | KeyCode::Enter | KeyCode::Char('q') | KeyCode::Char('?') => {
                self.popup = None
            }
            KeyCode::Up => p.scroll = p.scroll.saturating_sub(1),
            KeyCode::Down => p.scroll = p.scroll.saturating_add(1),
            KeyCode::PageUp => p.scroll = p.scroll.saturating_sub(10),
            KeyCode::PageDown => p.scroll = p.scroll.saturating_add(10),
            KeyCode::Home => p.scroll = 0,
            _ => {}
        }
    }

    pub(super) fn key(
        &mut self,
        s: &mut Session,
        code: KeyCode,
        mods: KeyModifiers,
    ) -> Option<Mode> {
        if self.input.is_some() {
            return self.input_key(s, code, mods);
        }
        if self.popup.is_some() {
            self.popup_key(code);
            return None;
        }
        let page = 10;
        match code {
            KeyCode::Char('q') => {
                let _ = s.exec("quit");
                return Some(Mode::Quit);
            }
            KeyCode::F(2) => return Some(Mode::Repl),
            KeyCode::F(5) => {
                self.exec(s, "continue");
            }
            KeyCode::F(7) => {
                // Arm and run; the stop shows up in the status line (no waiting here).
                s.control().arm_next_event(false);
                s.go();
                self.message = "running to the next event a hook or policy asked for".into();
            }
            KeyCode::F(8) => {
                self.exec(s, "step");
            }
            KeyCode::Char('a') => {
                self.exec(s, "verdict allow");
            }
            KeyCode::Char('d') => {
                self.exec(s, "verdict deny");
            }
            KeyCode::Char('e') => match self
                .selected(Pane::Alerts)
                .and_then(|i| self.view.alerts.get(i))
            {
                Some((id, _)) => {
                    let id = *id;
                    self.exec(s, &format!("exception add-from-alert {id}"));
                }
                None => self.message = "select an alert first (Tab to the alerts pane, ↑/↓)".into(),
            },
            KeyCode::Char(':') => self.input = Some(CmdLine::new(self.history.len())),
            KeyCode::Char('?') => {
                self.popup = Some(Popup {
                    title: "help".into(),
                    text: key_help(),
                    scroll: 0,
                })
            }
            KeyCode::Tab | KeyCode::BackTab => {
                let back = code == KeyCode::BackTab || mods.contains(KeyModifiers::SHIFT);
                let i = self.focus.index();
                let n = PANES.len();
                self.focus = PANES[if back { (i + n - 1) % n } else { (i + 1) % n }];
            }
            KeyCode::Up => self.scroll_focused(-1),
            KeyCode::Down => self.scroll_focused(1),
            KeyCode::PageUp => self.scroll_focused(-page),
            KeyCode::PageDown => self.scroll_focused(page),
            KeyCode::Home => self.sel[self.focus.index()] = Some(0),
            KeyCode::End => self.sel[self.focus.index()] = None,
            KeyCode::Esc => match self.focus {
                Pane::Disassembly => {
                    self.at.disasm_at = None;
                    self.sel[Pane::Disassembly.index()] = None;
                    self.message = "disassembly follows RIP".into();
                }
                Pane::Memory => {
                    self.at.memory_at = None;
                    self.message = "memory follows RSP".into();
                }
                p => self.sel[p.index()] = None,
            },
            KeyCode::Enter => self.enter(s),
            _ => {}
        }
        None
    }

    /// Scrolls the focused pane; the memory pane moves its address instead
    /// (it shows a window of the guest's memory, not a fixed list).
    fn scroll_focused(&mut self, delta: isize) {
        self.scroll_pane(self.focus, delta);
    }

    fn scroll_pane(&mut self, p: Pane, delta: isize) {
        if p == Pane::Memory {
            let base = self
                .at
                .memory_at
                .or_else(|| self.view.cpu.map(|c| c.regs.rsp & !0xf))
                .unwrap_or(0);
            self.at.memory_at = Some(base.wrapping_add_signed(delta as i64 * 16));
            return;
        }
        self.scroll(p, delta);
    }

    /// A click focuses the pane under it; the wheel scrolls it.
    pub(super) fn mouse(&mut self, m: MouseEvent) {
        let hit = self
            .rects
            .iter()
            .find(|(_, r)| {
                m.column >= r.x
                    && m.column < r.x + r.width
                    && m.row >= r.y
                    && m.row < r.y + r.height
            })
            .map(|(p, _)| *p);
        let Some(p) = hit else {
            return;
        };
        match m.kind {
            MouseEventKind::Down(MouseButton::Left) => self.focus = p,
            MouseEventKind::ScrollUp => self.scroll_pane(p, -3),
            MouseEventKind::ScrollDown => self.scroll_pane(p, 3),
            _ => {}
        }
    }
}
