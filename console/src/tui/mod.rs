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
//! : command, ? help, F2 REPL, q quit. The screen is redrawn when something
//! happens (a key, or a notice from the session: see `wake`), at most 20 times
//! a second whatever the event rate.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyEventKind};

use crate::cli::Mode;
use crate::session::{RunState, Session};
pub(crate) use wake::{Wake, Wakes};

mod draw;
mod input;
mod keys;
mod state;
mod view;
mod wake;

/// The shortest time between two draws (at most 20 a second).
const FRAME: Duration = Duration::from_millis(50);
/// How often a running vCPU's sampled registers are drawn again.
const SAMPLE: Duration = Duration::from_secs(1);

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
            crate::errln!("vmiscope: cannot start the TUI ({e}); the REPL instead");
            return Mode::Repl;
        }
        None => {
            crate::errln!(
                "vmiscope: the TUI needs a terminal on stdin and stdout; the REPL instead"
            );
            return Mode::Repl;
        }
    };
    let wakes = match Wakes::new(std::io::stdin().as_raw_fd(), s.intro().notices().clone()) {
        Ok(w) => w,
        Err(e) => {
            ratatui::restore();
            crate::errln!("vmiscope: cannot start the TUI ({e}); the REPL instead");
            return Mode::Repl;
        }
    };
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::EnableMouseCapture);
    let mut t = Tui::new();
    t.refresh(s);
    let mode = loop {
        if terminal.draw(|f| t.draw(f, s)).is_err() {
            break Mode::Quit;
        }
        match next_wake(&wakes, &t) {
            Wake::Terminal => {
                if let Some(m) = terminal_input(&mut t, s) {
                    break m;
                }
            }
            Wake::Session | Wake::Clock => {}
            // Nobody can type or see anything any more: the run ends, as a
            // REPL's does at the end of its input.
            Wake::Gone => break Mode::Quit,
        }
        t.refresh(s);
    };
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::DisableMouseCapture);
    ratatui::restore();
    mode
}

/// The screen is drawn at most once a frame: for the rest of the frame after
/// a draw only the terminal is answered; then the terminal and the session.
/// While a vCPU runs, its registers are a sample (its last exit's), drawn again
/// each second even when nothing else happens.
pub(crate) fn next_wake(wakes: &Wakes, t: &Tui) -> Wake {
    let drawn = Instant::now();
    let w = wakes.wait(false, Some(drawn + FRAME));
    if w != Wake::Clock {
        return w;
    }
    let running = matches!(t.view.state, Some(RunState::Running));
    wakes.wait(true, running.then(|| drawn + SAMPLE))
}

/// Handles the terminal's input (every event crossterm has, not only the one
/// that woke the loop); Some when a key leaves the TUI.
fn terminal_input(t: &mut Tui, s: &mut Session) -> Option<Mode> {
    loop {
        match event::read() {
            Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => {
                if let Some(m) = t.key(s, k.code, k.modifiers) {
                    return Some(m);
                }
            }
            Ok(Event::Mouse(m)) => t.mouse(m),
            Ok(_) => {}
            Err(_) => return Some(Mode::Quit),
        }
        // More already read from the terminal? (A zero timeout: no wait.)
        match event::poll(Duration::ZERO) {
            Ok(true) => continue,
            Ok(false) => return None,
            Err(_) => return Some(Mode::Quit),
        }
    }
}
