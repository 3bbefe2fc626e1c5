//! `monitor …`: any console command, plus `monitor breakpoints visible|hidden`
//! and `monitor watch force|safe`.

use crate::error::Error;

use gdbstub::outputln;
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd};

use super::*;

impl MonitorCmd for GdbTarget {
    /// Any console command; `phys ADDR LEN` reads guest-physical memory;
    /// `breakpoints visible|hidden` chooses how `break` patches the guest.
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), Error> {
        let line = String::from_utf8_lossy(cmd).to_string();
        if let Some(how) = line.strip_prefix("breakpoints") {
            match how.trim() {
                "visible" => self.visible_breakpoints = true,
                "hidden" => self.visible_breakpoints = false,
                "" => {}
                _ => {
                    outputln!(out, "error: expected `breakpoints [visible|hidden]`");
                    return Ok(());
                }
            }
            let how = if self.visible_breakpoints {
                "visible (plain INT3s the guest can read; fast)"
            } else {
                "hidden (the guest reads the original byte; other code on the page exits too)"
            };
            outputln!(out, "gdb breakpoints inserted from now on: {how}");
            return Ok(());
        }
        if let Some(how) = line.strip_prefix("watch") {
            match how.trim() {
                "force" => self.force_watch = true,
                "safe" => self.force_watch = false,
                _ => {
                    outputln!(out, "error: expected `watch force|safe`");
                    return Ok(());
                }
            }
            let how = if self.force_watch {
                "force (also on a page a vCPU uses by itself, such as its current stack: the guest may break)"
            } else {
                "safe (refused on a page a vCPU uses by itself)"
            };
            outputln!(out, "gdb watchpoints from now on: {how}");
            return Ok(());
        }
        if line.trim() == "help" {
            outputln!(out, "{}", monitor_help());
            return Ok(());
        }
        let line = match line.strip_prefix("phys ") {
            Some(rest) => format!("mem read {rest} phys"),
            None => line,
        };
        match self.s.exec(&line) {
            Ok(o) => outputln!(out, "{}", o.text.trim_end()),
            Err(e) => outputln!(out, "error: {e}"),
        }
        Ok(())
    }
}

/// `monitor help`: the gdb-only commands, then every console command.
fn monitor_help() -> String {
    let mut t = String::from(
        "gdb only:\n\
         phys ADDR [LEN]                        read guest-physical memory\n\
         breakpoints [visible|hidden]           how `break` patches the guest from now on\n\
         watch force|safe                       allow watchpoints on pages a vCPU uses itself\n\n\
         console commands (`monitor CMD`):\n",
    );
    for e in crate::commands::HELP {
        t.push_str(&format!("{:<38} {}\n", e.usage, e.what));
    }
    t
}
