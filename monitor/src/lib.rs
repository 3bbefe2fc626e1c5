//! vmiscope's introspection session, between the VMM and the front ends: the
//! VMM's exit handler (the engine adapter, `handler`, and the event stops,
//! `stops`) and what it knows of the guest's OS (`os`). The console's front
//! ends (REPL, TUI, scripts, gdb) reach the guest through it; no exit passes
//! through them.

mod api;
pub mod files;
pub mod handler;
mod hooks;
pub mod journal;
pub mod notices;
pub mod os;
mod session;
pub mod stops;

pub use api::{Counters, HookInfo, Quiesced};
pub use handler::{AlertSink, Introspection, OnReady, per_exit, respond};
pub use notices::{LineSplitter, Notice, Notices, Wants};
/// A line to stderr for the user (`[vmiscope] …`), dropped when stderr is
/// closed: `eprintln!` would panic there.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub use os::{OsKnowledge, Symbols, policy_env};
pub use session::SessionHandler;
pub use stops::{BreakId, Control, EventBreak, Override, Proposed, Snapshot, Stop, StopCause};
