//! The full-screen console (ratatui + crossterm).
//!
//! Panes: registers of the selected vCPU (changed values highlighted), disassembly
//! around RIP (breakpoint markers), events, alerts, hooks, the guest's serial
//! console, a status line and a command line. Keys: F5 continue, F7 next-event,
//! F8 step, Tab focus, ↑/↓ select, Enter details, a/d allow/deny the stopped event,
//! e alert → exception, : command, ? help, F2 REPL, q quit. The screen is redrawn at
//! most 20 times a second, whatever the event rate.

use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::Frame;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, List, ListItem, ListState, Paragraph, Wrap};

use crate::cli::Mode;
use crate::format::{alert_line, event_line};
use crate::session::{RunState, Session};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pane {
    Events,
    Alerts,
    Hooks,
    Serial,
}

const PANES: [Pane; 4] = [Pane::Events, Pane::Alerts, Pane::Hooks, Pane::Serial];

struct View {
    status: String,
    state: RunState,
    regs: Option<kvm_bindings::kvm_regs>,
    prev_regs: Option<kvm_bindings::kvm_regs>,
    disasm: Vec<String>,
    events: Vec<String>,
    alerts: Vec<(u64, String)>,
    hooks: Vec<String>,
    serial: Vec<String>,
    /// (stop count, status) at the last register fetch.
    regs_key: (u64, String),
}

/// The TUI's state (pub for `vmiscope bench`, which renders it off screen).
pub struct Tui {
    focus: Pane,
    sel: [ListState; 4],
    input: Option<String>,
    message: String,
    popup: Option<(String, String)>,
    view: View,
    last_refresh: Instant,
}

fn key_help() -> String {
    "F5 continue   F7 next-event   F8 step   Tab focus   ↑↓ select   Enter details\n\
     a / d   allow / deny the stopped event      e   alert -> exception\n\
     :   type a command (any console command)    ?   this help\n\
     F2  switch to the line console (REPL)       q   quit\n\n"
        .to_string()
        + &crate::commands::HELP
            .iter()
            .map(|(u, d)| format!("{u:<38} {d}\n"))
            .collect::<String>()
}

impl Tui {
    pub fn new() -> Self {
        Tui {
            focus: Pane::Events,
            sel: Default::default(),
            input: None,
            message: "paused at entry: F5 continue, F7 next event, : command, ? help".into(),
            popup: None,
            view: View {
                status: String::new(),
                state: RunState::PausedAtEntry,
                regs: None,
                prev_regs: None,
                disasm: vec![],
                events: vec![],
                alerts: vec![],
                hooks: vec![],
                serial: vec![],
                regs_key: (u64::MAX, String::new()),
            },
            last_refresh: Instant::now() - Duration::from_secs(1),
        }
    }

    /// Copies what the panes show out of the session (cheap, bounded).
    pub fn refresh(&mut self, s: &mut Session) {
        let v = &mut self.view;
        v.status = s.status();
        v.state = s.run_state();
        {
            let e = s.intro().engine.lock().unwrap();
            let n = e.recent().len();
            v.events = e
                .recent()
                .iter()
                .skip(n.saturating_sub(500))
                .map(|r| event_line(r))
                .collect();
            v.alerts = e.alerts().iter().map(|a| (a.id, alert_line(a))).collect();
        }
        v.hooks = s.hooks_text().lines().map(str::to_string).collect();
        {
            let l = s.serial_lines();
            v.serial = l
                .iter()
                .skip(l.len().saturating_sub(500))
                .cloned()
                .collect();
        }
        // Registers only when the vCPU is held (stopped or paused): then the fetch
        // is immediate; a running vCPU shows its last RIP.
        let key = (s.control().stop_count(), v.status.clone());
        if key != v.regs_key && v.state.is_held() {
            v.regs_key = key;
            let cpu = s.vcpu();
            // Held at another vCPU's stop, this one may be running: no fetch.
            let r = if !matches!(v.state, RunState::Stopped { vcpu } if vcpu != cpu) {
                s.on_vcpu(cpu, |c| vmiscope_vmm::VcpuCtl::regs(c)).ok()
            } else {
                None
            };
            if r.is_some() {
                v.prev_regs = v.regs.take();
                v.regs = r;
            }
        }
        v.disasm = s
            .disasm(None, 24)
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default();
        self.last_refresh = Instant::now();
    }

    fn exec(&mut self, s: &mut Session, line: &str) -> bool {
        match s.exec(line) {
            Ok(o) => {
                let text = o.text.trim_end().to_string();
                if text.lines().count() > 1 {
                    self.popup = Some((line.to_string(), text));
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

    fn selected(&self, pane: Pane) -> Option<usize> {
        self.sel[PANES.iter().position(|p| *p == pane).unwrap()].selected()
    }

    /// A key while the command line is open.
    fn input_key(&mut self, s: &mut Session, code: KeyCode) -> Option<Mode> {
        let input = self.input.as_mut()?;
        match code {
            KeyCode::Enter => {
                let line = self.input.take().unwrap_or_default();
                if line.trim() == "repl" {
                    return Some(Mode::Repl);
                }
                if self.exec(s, &line) {
                    return Some(Mode::Quit);
                }
            }
            KeyCode::Esc => self.input = None,
            KeyCode::Backspace => {
                input.pop();
            }
            KeyCode::Char(c) => input.push(c),
            _ => {}
        }
        None
    }

    /// ↑/↓ in the focused pane.
    fn move_selection(&mut self, up: bool) {
        let i = PANES.iter().position(|p| *p == self.focus).unwrap();
        let len = match self.focus {
            Pane::Events => self.view.events.len(),
            Pane::Alerts => self.view.alerts.len(),
            Pane::Hooks => self.view.hooks.len(),
            Pane::Serial => self.view.serial.len(),
        };
        if len > 0 {
            let cur = self.sel[i].selected().unwrap_or(len - 1);
            let next = if up {
                cur.saturating_sub(1)
            } else {
                (cur + 1).min(len - 1)
            };
            self.sel[i].select(Some(next));
        }
    }

    /// Enter on an event or alert: its details in a popup.
    fn show_details(&mut self, s: &mut Session) {
        let detail = match self.focus {
            Pane::Events => self.selected(Pane::Events).and_then(|i| {
                let e = s.intro().engine.lock().unwrap();
                let skip = e.recent().len().saturating_sub(500);
                e.recent()
                    .get(skip + i)
                    .map(|r| serde_json::to_string_pretty(&**r).unwrap_or_default())
            }),
            Pane::Alerts => self
                .selected(Pane::Alerts)
                .and_then(|i| self.view.alerts.get(i))
                .map(|(id, _)| {
                    s.exec(&format!("alert {id}"))
                        .map(|o| o.text)
                        .unwrap_or_else(|e| e.to_string())
                }),
            _ => None,
        };
        match detail {
            Some(d) => self.popup = Some(("details".into(), d)),
            None => self.message = "select an event or alert first (↑/↓)".into(),
        }
    }

    fn key(&mut self, s: &mut Session, code: KeyCode) -> Option<Mode> {
        if self.input.is_some() {
            return self.input_key(s, code);
        }
        if self.popup.is_some() {
            if matches!(
                code,
                KeyCode::Esc | KeyCode::Enter | KeyCode::Char('q') | KeyCode::Char('?')
            ) {
                self.popup = None;
            }
            return None;
        }
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
                s.control().arm_next_event();
                s.go();
                self.message = "running to the next handled event".into();
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
            KeyCode::Char(':') => self.input = Some(String::new()),
            KeyCode::Char('?') => self.popup = Some(("help".into(), key_help())),
            KeyCode::Tab => {
                let i = PANES.iter().position(|p| *p == self.focus).unwrap();
                self.focus = PANES[(i + 1) % PANES.len()];
            }
            KeyCode::Up | KeyCode::Down => self.move_selection(code == KeyCode::Up),
            KeyCode::Enter => self.show_details(s),
            _ => {}
        }
        None
    }

    pub fn draw(&mut self, f: &mut Frame<'_>, s: &Session) {
        let area = f.area();
        let rows = Layout::default()
            .direction(Direction::Vertical)
            .constraints([
                Constraint::Length(1),
                Constraint::Min(8),
                Constraint::Length(1),
                Constraint::Length(1),
            ])
            .split(area);
        let alerts = self.view.alerts.len();
        let status = format!(
            " vmiscope | {} | {} | vCPU {} | alerts {} | F5 cont F7 next F8 step : cmd ? help q quit",
            s.image(),
            self.view.status,
            s.vcpu(),
            alerts
        );
        f.render_widget(
            Paragraph::new(status).style(Style::default().bg(Color::Blue).fg(Color::White)),
            rows[0],
        );
        let cols = Layout::default()
            .direction(Direction::Horizontal)
            .constraints([Constraint::Percentage(50), Constraint::Percentage(50)])
            .split(rows[1]);
        let left = Layout::default()
            .direction(Direction::Vertical)
            .constraints([Constraint::Length(7), Constraint::Min(3)])
            .split(cols[0]);
        self.draw_regs(f, left[0], s.vcpu());
        self.draw_disasm(f, left[1]);
        let right = Layout::default()
            .direction(Direction::Vertical)
            .constraints([
                Constraint::Percentage(35),
                Constraint::Percentage(20),
                Constraint::Percentage(20),
                Constraint::Percentage(25),
            ])
            .split(cols[1]);
        self.draw_lists(f, &right);
        let cmd = match &self.input {
            Some(t) => format!(":{t}█"),
            None => String::from(": to type a command"),
        };
        f.render_widget(Paragraph::new(cmd), rows[2]);
        f.render_widget(
            Paragraph::new(self.message.clone()).style(Style::default().fg(Color::Cyan)),
            rows[3],
        );
        self.draw_popup(f, area);
    }

    /// The disassembly around RIP (the current line reversed).
    fn draw_disasm(&self, f: &mut Frame<'_>, area: Rect) {
        let dis: Vec<Line<'_>> = self
            .view
            .disasm
            .iter()
            .map(|l| {
                let style = if l.starts_with("=>") {
                    Style::default().add_modifier(Modifier::REVERSED)
                } else {
                    Style::default()
                };
                Line::styled(l.clone(), style)
            })
            .collect();
        f.render_widget(
            Paragraph::new(dis).block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(" Disassembly (* breakpoint) "),
            ),
            area,
        );
    }

    /// The events, alerts, hooks and serial panes, following their newest
    /// entries unless one is selected.
    fn draw_lists(&mut self, f: &mut Frame<'_>, right: &[Rect]) {
        let lists: [(Pane, &str, Vec<String>); 4] = [
            (Pane::Events, " Events ", self.view.events.clone()),
            (
                Pane::Alerts,
                " Alerts ",
                self.view.alerts.iter().map(|a| a.1.clone()).collect(),
            ),
            (Pane::Hooks, " Hooks (hits) ", self.view.hooks.clone()),
            (Pane::Serial, " Serial ", self.view.serial.clone()),
        ];
        for (i, (pane, title, items)) in lists.into_iter().enumerate() {
            let focused = pane == self.focus;
            let block = Block::default()
                .borders(Borders::ALL)
                .title(title)
                .border_style(if focused {
                    Style::default().fg(Color::Yellow)
                } else {
                    Style::default()
                });
            let n = items.len();
            let list = List::new(items.into_iter().map(ListItem::new).collect::<Vec<_>>())
                .block(block)
                .highlight_style(Style::default().add_modifier(Modifier::REVERSED));
            // Follow the newest entries unless the analyst has selected one.
            let state = &mut self.sel[i];
            if state.selected().is_none() && n > 0 {
                *state.offset_mut() = n.saturating_sub(right[i].height.saturating_sub(2) as usize);
            }
            f.render_stateful_widget(list, right[i], state);
        }
    }

    /// The details or help popup, if one is open.
    fn draw_popup(&self, f: &mut Frame<'_>, area: Rect) {
        if let Some((title, text)) = &self.popup {
            let w = area.width.saturating_sub(4).min(100);
            let h = area.height.saturating_sub(4);
            let r = Rect {
                x: (area.width - w) / 2,
                y: 2,
                width: w,
                height: h,
            };
            f.render_widget(Clear, r);
            f.render_widget(
                Paragraph::new(text.clone())
                    .wrap(Wrap { trim: false })
                    .block(
                        Block::default()
                            .borders(Borders::ALL)
                            .title(format!(" {title} (Esc closes) ")),
                    ),
                r,
            );
        }
    }

    fn draw_regs(&self, f: &mut Frame<'_>, area: Rect, vcpu: u32) {
        let block = Block::default()
            .borders(Borders::ALL)
            .title(format!(" Registers vCPU {vcpu} "));
        let Some(r) = self.view.regs else {
            f.render_widget(
                Paragraph::new("(running: pause, or stop at an event)").block(block),
                area,
            );
            return;
        };
        let p = self.view.prev_regs;
        let vals = |r: &kvm_bindings::kvm_regs| {
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
            ]
        };
        let now = vals(&r);
        let before = p.map(|p| vals(&p));
        let per_line = (area.width.saturating_sub(2) / 22).max(1) as usize;
        let mut lines = Vec::new();
        for chunk in now.chunks(per_line).enumerate() {
            let (ci, regs) = chunk;
            let mut spans = Vec::new();
            for (j, (n, v)) in regs.iter().enumerate() {
                let changed = before.is_some_and(|b| b[ci * per_line + j].1 != *v);
                let style = if changed {
                    Style::default().fg(Color::Black).bg(Color::Yellow)
                } else {
                    Style::default()
                };
                spans.push(Span::raw(format!("{n:>3} ")));
                spans.push(Span::styled(format!("{v:016x}"), style));
                spans.push(Span::raw("  "));
            }
            lines.push(Line::from(spans));
        }
        f.render_widget(Paragraph::new(lines).block(block), area);
    }
}

impl Default for Tui {
    fn default() -> Self {
        Tui::new()
    }
}

/// Runs the TUI until `q` (Mode::Quit) or F2 (Mode::Repl).
pub fn run(s: &mut Session) -> Mode {
    use std::io::IsTerminal;
    // Without a terminal ratatui cannot start (it would panic): say so and stay
    // in the REPL, which works on pipes.
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let mut terminal = match tty.then(ratatui::try_init) {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            eprintln!("vmiscope: cannot start the TUI ({e}); the REPL instead");
            return Mode::Repl;
        }
        None => {
            eprintln!("vmiscope: the TUI needs a terminal on stdin and stdout; the REPL instead");
            return Mode::Repl;
        }
    };
    let mut t = Tui::new();
    let frame = Duration::from_millis(50);
    let mode = loop {
        if t.last_refresh.elapsed() >= frame {
            t.refresh(s);
        }
        if terminal.draw(|f| t.draw(f, s)).is_err() {
            break Mode::Quit;
        }
        match event::poll(frame) {
            Ok(true) => match event::read() {
                Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => {
                    if let Some(m) = t.key(s, k.code) {
                        break m;
                    }
                    // Show the effect of a key at once.
                    t.refresh(s);
                }
                Ok(_) => {}
                Err(_) => break Mode::Quit,
            },
            Ok(false) => {}
            Err(_) => break Mode::Quit,
        }
    };
    ratatui::restore();
    mode
}
