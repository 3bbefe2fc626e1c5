//! Interactive front ends over one session: the TUI and the REPL, one key apart.

use crate::cli::RunArgs;
use crate::session::Session;

pub use crate::cli::Mode;

/// Opens the console on `a.image` (paused at entry) and runs until `quit`.
pub fn interactive(a: &RunArgs, mode: Mode) -> i32 {
    match Session::start(a) {
        Ok(s) => run_session(s, mode),
        Err(e) => {
            crate::errln!("vmiscope: error: {e}");
            2
        }
    }
}

/// Runs the console on a session until `quit`.
pub fn run_session(mut s: Session, mut mode: Mode) -> i32 {
    exit_on_signal(&s);
    while mode != Mode::Quit {
        mode = match mode {
            Mode::Tui => crate::tui::run(&mut s),
            Mode::Repl => crate::repl::run(&mut s),
            Mode::Quit => Mode::Quit,
        };
    }
    let code = s.finish().map(|o| o.reason.exit_status()).unwrap_or(0);
    if let Some(o) = s.finish() {
        crate::errln!("vmiscope: {}", o.reason);
    }
    // A signal that came as the console was ending (`exit_on_signal` had no time).
    if vmiscope_vmm::signals::received() > 0 {
        return vmiscope_vmm::StopReason::Signal(vmiscope_vmm::signals::last()).exit_status();
    }
    code
}

/// Ends the process when SIGTERM, SIGHUP or a SIGINT from outside arrives (at a
/// terminal Ctrl-C is a key). The run itself is stopped by its watchdog; this
/// thread ends the console, because the front ends may be blocked in a read that
/// never returns (the line editor on a pipe; crossterm on a terminal that hung
/// up spins inside its poll). It takes the engine's lock first, so no journal
/// record is half written, gives the terminal back as it was, and exits with
/// 128 + the signal's number.
fn exit_on_signal(s: &Session) {
    let intro = s.intro().clone();
    let end = s.run_end().clone();
    let terminal = SavedTerminal::now();
    std::thread::spawn(move || {
        vmiscope_vmm::signals::wait();
        // The watchdog stops the run on the signal; the VM thread then writes
        // the journal's `end`. Waited for (bounded: a vCPU stuck in the host
        // must not keep the process), before the engine is quiesced.
        end.wait(std::time::Duration::from_secs(5));
        let _quiet = intro.quiesce();
        let reason = vmiscope_vmm::StopReason::Signal(vmiscope_vmm::signals::last());
        terminal.restore();
        crate::errln!("\nvmiscope: {reason}");
        std::process::exit(reason.exit_status());
    });
}

/// The terminal's settings when the console started (raw mode and the TUI's
/// alternate screen undone on a signal).
struct SavedTerminal(Option<nix::sys::termios::Termios>);

impl SavedTerminal {
    fn now() -> Self {
        // None when stdin is not a terminal.
        SavedTerminal(nix::sys::termios::tcgetattr(std::io::stdin()).ok())
    }

    fn restore(&self) {
        if let Some(t) = &self.0 {
            // Leave the TUI's alternate screen and show the cursor (harmless
            // when the REPL had the terminal).
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(b"\x1b[?1049l\x1b[?25h");
            let _ = std::io::stdout().flush();
            use nix::sys::termios::{SetArg, tcsetattr};
            let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, t);
        }
    }
}
