//! The full-screen console (ratatui + crossterm).
//!
//! Panes: registers of the selected vCPU (changed values highlighted, system
//! registers below), disassembly around RIP (breakpoint markers, follow a call
//! or jump with Enter), the stack from RSP, a memory hexdump, events, alerts,
//! hooks and the guest's serial console; a status line, a command line (with
//! history and completion) and a message line. Every pane takes the focus (Tab,
//! Shift-Tab, or a mouse click) and scrolls (↑/↓, PgUp/PgDn, Home/End, the
//! wheel). Keys: F5 continue, F7 next-event, F8 step, Enter details, a/d
//! allow/deny the stopped event (its vCPU then goes on), e alert → exception,
//! : command, ? help, F2 REPL, q quit. The screen is redrawn at most 20 times a
//! second, whatever the event rate.

use std::time::Duration;

use crossterm::event::{self, Event, KeyEventKind};

use crate::cli::Mode;
use crate::session::Session;

mod draw;
mod input;
mod keys;
mod state;
mod view;

pub use state::{PANES, Pane, Tui};

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
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::EnableMouseCapture);
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
                    if let Some(m) = t.key(s, k.code, k.modifiers) {
                        break m;
                    }
                    // Show the effect of a key at once.
                    t.refresh(s);
                }
                Ok(Event::Mouse(m)) => t.mouse(m),
                Ok(_) => {}
                Err(_) => break Mode::Quit,
            },
            Ok(false) => {}
            Err(_) => break Mode::Quit,
        }
    };
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::DisableMouseCapture);
    ratatui::restore();
    mode
}
