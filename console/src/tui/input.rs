//! The `:` command line: editing, history (↑/↓) and completion (Tab).

use crossterm::event::{KeyCode, KeyModifiers};

use super::state::Tui;
use crate::cli::Mode;
use crate::session::Session;

/// The most commands the history keeps.
const HISTORY: usize = 500;

impl Tui {
    /// A key while the command line is open. Ctrl-U and Ctrl-W edit as a
    /// shell's line does (kill the line, kill the word before the cursor).
    pub(super) fn input_key(
        &mut self,
        s: &mut Session,
        code: KeyCode,
        mods: KeyModifiers,
    ) -> Option<Mode> {
        let input = self.input.as_mut()?;
        if mods.contains(KeyModifiers::CONTROL) {
            match code {
                KeyCode::Char('u') => input.text.clear(),
                KeyCode::Char('w') => {
                    let kept = input.text.trim_end().rfind(' ').map_or(0, |i| i + 1);
                    input.text.truncate(kept);
                }
                _ => {}
            }
            input.offered.clear();
            return None;
        }
        match code {
            KeyCode::Enter => {
                let line = self.input.take().map(|c| c.text).unwrap_or_default();
                let line = line.trim().to_string();
                if line.is_empty() {
                    return None;
                }
                if self.history.last() != Some(&line) {
                    self.history.push(line.clone());
                    if self.history.len() > HISTORY {
                        self.history.remove(0);
                    }
                }
                if line == "repl" {
                    return Some(Mode::Repl);
                }
                if self.exec(s, &line) {
                    return Some(Mode::Quit);
                }
            }
            KeyCode::Esc => self.input = None,
            KeyCode::Backspace => {
                input.text.pop();
                input.offered.clear();
            }
            KeyCode::Up => {
                input.hist_pos = input.hist_pos.saturating_sub(1);
                if let Some(h) = self.history.get(input.hist_pos) {
                    input.text = h.clone();
                }
            }
            KeyCode::Down => {
                input.hist_pos = (input.hist_pos + 1).min(self.history.len());
                input.text = self
                    .history
                    .get(input.hist_pos)
                    .cloned()
                    .unwrap_or_default();
            }
            KeyCode::Tab => {
                let words = crate::complete::words(s);
                let (start, c) = crate::complete::candidates(&input.text, &words);
                let prefix = crate::complete::common_prefix(&c);
                if prefix.len() > input.text.len() - start {
                    input.text.truncate(start);
                    input.text.push_str(&prefix);
                    if c.len() == 1 {
                        input.text.push(' ');
                    }
                }
                input.offered = if c.len() > 1 { c } else { Vec::new() };
            }
            KeyCode::Char(ch) => {
                input.text.push(ch);
                input.offered.clear();
            }
            _ => {}
        }
        None
    }
}
