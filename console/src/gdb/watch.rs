//! Watchpoints: page hooks of the engine, any number, at any CPL.

use gdbstub::target::TargetResult;
use gdbstub::target::ext::breakpoints::{HwWatchpoint, WatchKind};
use vmiscope_introspect::{Rights, Target as HookTarget};

use super::*;

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
        let mut pieces = Vec::new();
        for (va, n) in vmiscope_introspect::decode::split_pages(addr, len) {
            let Some(p) = self.add_engine_hook(HookTarget::Gva {
                gva: va,
                len: n,
                rights,
                cr3: 0,
                gpa: None,
            }) else {
                return Ok(false);
            };
            self.stops.insert(p.1, GdbStop::Watch(kind, addr));
            pieces.push(p);
        }
        // Ranges that cross a page get one hook per page; the first one is the key.
        if let Some(first) = pieces.first() {
            self.watches.insert((addr, len, kind_code(kind)), *first);
        }
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let Some((hook, brk)) = self.watches.remove(&(addr, len, kind_code(kind))) else {
            return Ok(false);
        };
        self.remove_engine_hook(hook, brk);
        Ok(true)
    }
}
