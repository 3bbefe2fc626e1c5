//! Watchpoints: page hooks of the engine, any number, at any CPL.

use gdbstub::target::TargetResult;
use gdbstub::target::ext::breakpoints::{HwWatchpoint, WatchKind};
use vmiscope_introspect::{Rights, Target as HookTarget};

use super::*;

/// The largest range one watchpoint may cover: a page hook per page.
const MAX_WATCH: u64 = 1 << 20;

impl HwWatchpoint for GdbTarget {
    /// A page hook on the range: any number, invisible, at any CPL.
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let rights = match kind {
            WatchKind::Write => Rights::W,
            WatchKind::Read => Rights::R,
            WatchKind::ReadWrite => Rights {
                read: true,
                write: true,
                exec: false,
            },
        };
        // Checked before anything is built: an empty or wrapping range, or one
        // larger than MAX_WATCH (a page hook per page), is refused.
        if len == 0 || len > MAX_WATCH || addr.checked_add(len).is_none() {
            crate::errln!(
                "[vmiscope] gdb: watch {addr:#x}+{len:#x} refused (1 to {MAX_WATCH:#x} bytes)"
            );
            return Ok(false);
        }
        // A watched page that a vCPU uses by itself (its current stack: a
        // watched local variable) would break the guest here (see
        // `session::cpu_pages`): refused unless `monitor watch force`.
        match self
            .s
            .check_gva_cpu_pages(addr, len, rights, self.force_watch)
        {
            Ok(Some(warning)) => crate::errln!("[vmiscope] gdb: watch {addr:#x}: {warning}"),
            Ok(None) => {}
            Err(why) => {
                crate::errln!(
                    "[vmiscope] gdb: watch {addr:#x} refused: {why} (gdb: `monitor watch force`)"
                );
                return Ok(false);
            }
        }
        let mut pieces = Vec::new();
        for (va, n) in vmiscope_introspect::decode::split_pages(addr, len) {
            let Some(p) = self.add_engine_hook(HookTarget::Gva {
                gva: va,
                len: n,
                rights,
                cr3: 0,
                gpa: None,
            }) else {
                // All or nothing: gdb cannot remove a watchpoint it was told failed.
                for p in pieces {
                    self.remove_engine_hook(p);
                }
                return Ok(false);
            };
            pieces.push(p);
        }
        // A range that crosses a page has a hook per page; all go with it.
        let key = GdbKey::Watch(addr, len, kind_code(kind));
        self.keep(key, GdbStop::Watch(kind, addr), pieces);
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        Ok(self.forget(GdbKey::Watch(addr, len, kind_code(kind))))
    }
}
