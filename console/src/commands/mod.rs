//! The command language, shared by the REPL, the TUI's command line, scripts and
//! gdb's `monitor`. `parse` turns a line into a `Command` or a one-line error that
//! says what was expected; nothing here touches the VM.

mod help;
mod parse;
mod types;

pub use help::{HELP, HelpEntry, command_words};
pub use parse::{number, parse, seconds};
pub use types::*;

#[cfg(test)]
mod tests;
