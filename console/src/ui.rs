//! Interactive front ends over one session: the TUI and the REPL, one key apart.

use crate::cli::RunArgs;
use crate::session::Session;

pub use crate::cli::Mode;

/// Opens the console on `a.image` (paused at entry) and runs until `quit`.
pub fn interactive(a: &RunArgs, mode: Mode) -> i32 {
    match Session::start(a) {
        Ok(s) => run_session(s, mode),
        Err(e) => {
            eprintln!("vmiscope: {e}");
            2
        }
    }
}

/// Runs the console on a session until `quit`.
pub fn run_session(mut s: Session, mut mode: Mode) -> i32 {
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
    let signal = vmiscope_vmm::signals::last();
    if vmiscope_vmm::signals::received() > 0 {
        // A signal ends the console even after the guest itself had ended.
        return vmiscope_vmm::StopReason::Signal(signal).exit_status();
    }
    code
}
