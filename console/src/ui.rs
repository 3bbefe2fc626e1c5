//! Interactive front ends over one session: the TUI and the REPL, one key apart.

use crate::cli::RunArgs;
use crate::session::Session;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tui,
    Repl,
    Quit,
}

/// Opens the console on `a.image` (paused at entry) and runs until `quit`.
pub fn interactive(a: &RunArgs, mut mode: Mode) -> i32 {
    let mut s = match Session::start(a) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmiscope: {e}");
            return 2;
        }
    };
    while mode != Mode::Quit {
        mode = match mode {
            Mode::Tui => crate::tui::run(&mut s),
            Mode::Repl => crate::repl::run(&mut s),
            Mode::Quit => Mode::Quit,
        };
    }
    let code = s.finish().map(|o| o.reason.exit_status()).unwrap_or(0);
    if let Some(o) = s.finish() {
        eprintln!("vmiscope: {}", o.reason);
    }
    code
}
