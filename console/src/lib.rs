//! The vmiscope console: the front ends (command line, batch runs, REPL, TUI,
//! scripts, gdb), caps and bench, over the session in `vmiscope-monitor`.

pub mod batch;
pub mod bench;
pub mod caps;
pub mod cli;
pub mod commands;
pub mod complete;
pub mod error;
pub mod format;
pub mod gdb;

pub mod launch;
pub mod out;
pub mod repl;
pub mod script;
pub mod session;
pub mod stats;

pub mod symbols_cmd;
pub mod tui;
pub mod ui;
