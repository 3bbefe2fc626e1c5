//! Drawing: the layout (two columns on a wide terminal; registers across the
//! top and the focused pane enlarged on a small one, 80×24 included), each pane
//! as a scrollable list, the command line and the popups.

use ratatui::Frame;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

use super::state::{Pane, Tui, register_count};
use crate::session::Session;

/// One register cell: `rax 0000000000000000` and its separator.
const CELL: u16 = 22;

impl Tui {
    pub fn draw(&mut self, f: &mut Frame<'_>, s: &Session) {
        let area = f.area();
        let rows = Layout::default()
            .direction(Direction::Vertical)
            .constraints([
                Constraint::Length(1),
                Constraint::Min(6),
                Constraint::Length(1),
                Constraint::Length(1),
            ])
            .split(area);
        let status = format!(
            " vmiscope | {} | {} | vCPU {} | alerts {} | F5 cont F7 next F8 step : cmd ? help q quit",
            s.image(),
            self.view.status,
            s.vcpu(),
            self.view.alerts.len()
        );
        f.render_widget(
            Paragraph::new(status).style(Style::default().bg(Color::Blue).fg(Color::White)),
            rows[0],
        );
        self.rects.clear();
        self.layout_body(rows[1]);
        let rects = self.rects.clone();
        for (p, r) in rects {
            self.draw_pane(f, p, r, s.vcpu());
        }
        let cmd = match &self.input {
            Some(t) if !t.offered.is_empty() => {
                format!(":{}█   ({})", t.text, t.offered.join(" "))
            }
            Some(t) => format!(":{}█", t.text),
            None => String::from(": command   Tab: next pane   ?: help"),
        };
        f.render_widget(Paragraph::new(cmd), rows[2]);
        f.render_widget(
            Paragraph::new(self.message.clone()).style(Style::default().fg(Color::Cyan)),
            rows[3],
        );
        self.draw_popup(f, area);
    }

    /// Places every pane in `body` (recorded in `self.rects`).
    fn layout_body(&mut self, body: Rect) {
        let wide = body.width >= 120;
        let reg_width = if wide { body.width / 2 } else { body.width };
        self.reg_per_line = ((reg_width.saturating_sub(2)) / CELL).max(1) as usize;
        let reg_lines = register_count().div_ceil(self.reg_per_line) as u16 + 2;
        // Each pane's share of its column; the focused one's is doubled.
        let weight = |p: Pane, me: &Tui| {
            let base = match p {
                Pane::Disassembly | Pane::Events | Pane::Serial => 3,
                Pane::Alerts | Pane::Hooks => 2,
                _ => 1,
            };
            Constraint::Fill(if me.focus == p { base * 2 + 1 } else { base })
        };
        let split = |area: Rect, c: Vec<Constraint>, dir: Direction| {
            Layout::default().direction(dir).constraints(c).split(area)
        };
        let (regs, left, right) = if wide {
            let cols = split(
                body,
                vec![Constraint::Percentage(50), Constraint::Percentage(50)],
                Direction::Horizontal,
            );
            let left = split(
                cols[0],
                vec![
                    Constraint::Length(reg_lines.min(body.height * 45 / 100)),
                    Constraint::Min(3),
                ],
                Direction::Vertical,
            );
            (left[0], left[1], cols[1])
        } else {
            // The registers take a third, or two thirds while focused (they
            // scroll either way).
            let cap = if self.focus == Pane::Registers {
                body.height * 2 / 3
            } else {
                body.height / 3
            }
            .max(3);
            let v = split(
                body,
                vec![Constraint::Length(reg_lines.min(cap)), Constraint::Min(3)],
                Direction::Vertical,
            );
            let cols = split(
                v[1],
                vec![Constraint::Percentage(50), Constraint::Percentage(50)],
                Direction::Horizontal,
            );
            (v[0], cols[0], cols[1])
        };
        self.rects.push((Pane::Registers, regs));
        let lp = [Pane::Disassembly, Pane::Stack, Pane::Memory];
        let l = split(
            left,
            lp.iter().map(|p| weight(*p, self)).collect(),
            Direction::Vertical,
        );
        for (p, r) in lp.iter().zip(l.iter()) {
            self.rects.push((*p, *r));
        }
        let rp = [Pane::Events, Pane::Alerts, Pane::Hooks, Pane::Serial];
        let r = split(
            right,
            rp.iter().map(|p| weight(*p, self)).collect(),
            Direction::Vertical,
        );
        for (p, a) in rp.iter().zip(r.iter()) {
            self.rects.push((*p, *a));
        }
    }

    fn draw_pane(&mut self, f: &mut Frame<'_>, p: Pane, area: Rect, vcpu: u32) {
        let (title, lines): (String, Vec<Line<'static>>) = match p {
            Pane::Registers => (
                format!(" Registers vCPU {vcpu} "),
                register_lines(self, self.reg_per_line),
            ),
            Pane::Disassembly => (
                match self.at.disasm_at {
                    Some(a) => format!(" Disassembly at {a:#x} (Esc: RIP) "),
                    None => " Disassembly (* breakpoint) ".into(),
                },
                self.view
                    .disasm
                    .iter()
                    .map(|l| {
                        let st = if l.current {
                            Style::default()
                                .add_modifier(Modifier::BOLD)
                                .fg(Color::Green)
                        } else {
                            Style::default()
                        };
                        Line::styled(l.to_string(), st)
                    })
                    .collect(),
            ),
            Pane::Stack => (
                " Stack (RSP up) ".into(),
                self.view
                    .stack
                    .iter()
                    .enumerate()
                    .map(|(i, (a, v, sym))| {
                        let v = v.map_or("??".to_string(), |v| format!("{v:#018x}"));
                        let sym = sym
                            .as_deref()
                            .map(|n| format!("  <{n}>"))
                            .unwrap_or_default();
                        Line::raw(format!("{a:#x} rsp+{:<#5x} {v}{sym}", i * 8))
                    })
                    .collect(),
            ),
            Pane::Memory => (
                match self.at.memory_at {
                    Some(a) => format!(" Memory at {a:#x} (Esc: RSP) "),
                    None => " Memory at RSP (`:mem read ADDR` moves it) ".into(),
                },
                self.view.memory.iter().cloned().map(Line::raw).collect(),
            ),
            Pane::Events => (" Events ".into(), raw(&self.view.events)),
            Pane::Alerts => (
                " Alerts ".into(),
                self.view
                    .alerts
                    .iter()
                    .map(|a| Line::raw(a.1.clone()))
                    .collect(),
            ),
            Pane::Hooks => (" Hooks (hits) ".into(), raw(&self.view.hooks)),
            Pane::Serial => (" Serial ".into(), raw(&self.view.serial)),
        };
        self.draw_list(f, p, area, title, lines);
    }

    /// A pane as a list: it follows its tail (events, alerts, serial) or its top
    /// until a line is selected; the selection stays in view.
    fn draw_list(
        &mut self,
        f: &mut Frame<'_>,
        p: Pane,
        area: Rect,
        title: String,
        mut lines: Vec<Line<'static>>,
    ) {
        let focused = self.focus == p;
        let block = Block::default()
            .borders(Borders::ALL)
            .title(if focused { format!("{title}* ") } else { title })
            .border_style(if focused {
                Style::default().fg(Color::Yellow)
            } else {
                Style::default()
            });
        let height = area.height.saturating_sub(2) as usize;
        let n = lines.len();
        let i = p.index();
        let offset = match self.sel[i] {
            None if p.follows_tail() => n.saturating_sub(height),
            None => 0,
            Some(s) => {
                let s = s.min(n.saturating_sub(1));
                let o = self.offset[i];
                if s < o {
                    s
                } else if height > 0 && s >= o + height {
                    s + 1 - height
                } else {
                    o
                }
            }
        };
        self.offset[i] = offset;
        if let Some(s) = self.sel[i]
            && focused
            && let Some(l) = lines.get_mut(s)
        {
            *l = l
                .clone()
                .patch_style(Style::default().add_modifier(Modifier::REVERSED));
        }
        let shown: Vec<Line<'static>> = lines.into_iter().skip(offset).take(height).collect();
        f.render_widget(Paragraph::new(shown).block(block), area);
    }

    /// The details or help popup, if one is open.
    fn draw_popup(&self, f: &mut Frame<'_>, area: Rect) {
        if let Some(p) = &self.popup {
            let w = area.width.saturating_sub(4).min(110);
            let h = area.height.saturating_sub(3);
            let r = Rect {
                x: (area.width - w) / 2,
                y: 1,
                width: w,
                height: h,
            };
            f.render_widget(Clear, r);
            f.render_widget(
                Paragraph::new(p.text.clone())
                    .wrap(Wrap { trim: false })
                    .scroll((p.scroll, 0))
                    .block(
                        Block::default()
                            .borders(Borders::ALL)
                            .title(format!(" {} (↑↓ scroll, Esc closes) ", p.title)),
                    ),
                r,
            );
        }
    }
}

fn raw(v: &[String]) -> Vec<Line<'static>> {
    v.iter().cloned().map(Line::raw).collect()
}

/// The registers the pane shows, general ones first.
fn register_cells(c: &crate::session::CpuState) -> [(&'static str, u64); 27] {
    let (r, s) = (&c.regs, &c.sregs);
    [
        ("rip", r.rip),
        ("rfl", r.rflags),
        ("rax", r.rax),
        ("rbx", r.rbx),
        ("rcx", r.rcx),
        ("rdx", r.rdx),
        ("rsi", r.rsi),
        ("rdi", r.rdi),
        ("rbp", r.rbp),
        ("rsp", r.rsp),
        ("r8", r.r8),
        ("r9", r.r9),
        ("r10", r.r10),
        ("r11", r.r11),
        ("r12", r.r12),
        ("r13", r.r13),
        ("r14", r.r14),
        ("r15", r.r15),
        ("cr0", s.cr0),
        ("cr2", s.cr2),
        ("cr3", s.cr3),
        ("cr4", s.cr4),
        ("efr", s.efer),
        ("cs", s.cs.selector as u64),
        ("ss", s.ss.selector as u64),
        ("fsb", s.fs.base),
        ("gsb", s.gs.base),
    ]
}

/// The registers, `per_line` to a line, changed values highlighted.
pub fn register_lines(t: &Tui, per_line: usize) -> Vec<Line<'static>> {
    let Some(c) = t.view.cpu else {
        return vec![Line::raw("(running: pause, or stop at an event)")];
    };
    let now = register_cells(&c);
    let before = t.view.prev_cpu.map(|p| register_cells(&p));
    now.chunks(per_line.max(1))
        .enumerate()
        .map(|(ci, regs)| {
            let mut spans = Vec::new();
            for (j, (n, v)) in regs.iter().enumerate() {
                let changed = before.is_some_and(|b| b[ci * per_line.max(1) + j].1 != *v);
                let style = if changed {
                    Style::default().fg(Color::Black).bg(Color::Yellow)
                } else {
                    Style::default()
                };
                spans.push(Span::raw(format!("{n:>3} ")));
                spans.push(Span::styled(format!("{v:016x}"), style));
                spans.push(Span::raw("  "));
            }
            Line::from(spans)
        })
        .collect()
}
