//! The TUI's state: its panes, the focus and scroll of each, the command line,
//! the popup, and what the panes show.

use ratatui::layout::Rect;

use super::view::{Focus, View};
use crate::session::RunState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pane {
    Registers,
    Disassembly,
    Stack,
    Memory,
    Events,
    Alerts,
    Hooks,
    Serial,
}

pub const PANES: [Pane; 8] = [
    Pane::Registers,
    Pane::Disassembly,
    Pane::Stack,
    Pane::Memory,
    Pane::Events,
    Pane::Alerts,
    Pane::Hooks,
    Pane::Serial,
];

impl Pane {
    pub(super) fn index(self) -> usize {
        PANES.iter().position(|p| *p == self).unwrap_or(0)
    }

    /// Lists that follow their newest entry until the analyst selects one.
    pub(super) fn follows_tail(self) -> bool {
        matches!(self, Pane::Events | Pane::Alerts | Pane::Serial)
    }
}

/// A popup (details, help, a command's multi-line answer), scrollable.
pub(super) struct Popup {
    pub(super) title: String,
    pub(super) text: String,
    pub(super) scroll: u16,
}

/// How many registers the registers pane shows.
pub(super) fn register_count() -> usize {
    27
}

/// A command being typed.
pub struct CmdLine {
    pub text: String,
    /// Where ↑/↓ are in the history (its length: the new line).
    pub(super) hist_pos: usize,
    /// What Tab offered last, when there was more than one candidate.
    pub offered: Vec<String>,
}

impl CmdLine {
    pub fn new(hist_len: usize) -> Self {
        CmdLine {
            text: String::new(),
            hist_pos: hist_len,
            offered: Vec::new(),
        }
    }
}

/// The TUI's state (pub for `vmiscope bench`, which renders it off screen).
pub struct Tui {
    pub(super) focus: Pane,
    /// Per pane: the selected line (None: follow the tail or the top).
    pub(super) sel: [Option<usize>; 8],
    /// Per pane: the first line shown.
    pub(super) offset: [usize; 8],
    pub(super) input: Option<CmdLine>,
    pub(super) history: Vec<String>,
    pub(super) message: String,
    pub(super) popup: Option<Popup>,
    pub(super) view: View,
    pub(super) at: Focus,
    /// Where each pane was drawn (mouse focus and wheel).
    pub(super) rects: Vec<(Pane, Rect)>,
    pub(super) last_state: Option<RunState>,
    /// Register cells per line at the last draw.
    pub(super) reg_per_line: usize,
}

impl Tui {
    pub fn new() -> Self {
        Tui {
            focus: Pane::Events,
            sel: [None; 8],
            offset: [0; 8],
            input: None,
            history: Vec::new(),
            message: "paused at entry: F5 continue, F7 next event, : command, ? help".into(),
            popup: None,
            view: View::default(),
            at: Focus::default(),
            rects: Vec::new(),
            last_state: None,
            reg_per_line: 1,
        }
    }
}

impl Default for Tui {
    fn default() -> Self {
        Tui::new()
    }
}
