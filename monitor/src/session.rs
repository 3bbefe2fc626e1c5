//! The VMM's exit handler in a session: the engine's decision, then the event
//! stops (`stops`) before the VMM applies it.

use std::sync::Arc;

use vmiscope_vmm::{Event, ExitHandler, HandlerStop, Reply, VcpuCtl};

use crate::handler::Introspection;
use crate::stops::{Control, Override, Proposed, Stop, StopCause};

/// The engine plus event breakpoints: the VMM's exit handler in a session.
pub struct SessionHandler {
    intro: Arc<Introspection>,
    control: Arc<Control>,
}

impl SessionHandler {
    pub fn new(intro: Arc<Introspection>, control: Arc<Control>) -> Self {
        SessionHandler { intro, control }
    }
}

impl ExitHandler for SessionHandler {
    fn on_event(&self, cpu: &mut VcpuCtl<'_>, event: &Event) -> Reply {
        // A hardware execute breakpoint (gdb's `hbreak`): stop there.
        if let Event::HwBreakpoint { slot, .. } = event {
            let cause = StopCause::HwBreak { slot: *slot };
            let stop = Stop::new(cpu, cause, Some(event.clone()), Proposed::Nothing);
            self.control.hold(cpu, stop);
            return Reply::Continue;
        }
        // A requested single-step completed on this vCPU.
        if let Event::SingleStep { .. } = event
            && self.control.end_step(cpu.id())
        {
            cpu.set_single_step(false);
            let stop = Stop::new(cpu, StopCause::Step, Some(event.clone()), Proposed::Nothing);
            self.control.hold(cpu, stop);
            return Reply::Continue;
        }
        let (reply, rec) = self.intro.decide(cpu, event);
        let Some(rec) = rec else {
            return reply;
        };
        let Some((cause, after_write)) = self.control.should_stop(&rec) else {
            return reply;
        };
        // A watchpoint-style stop: let the allowed write land first, like a data
        // breakpoint (a trap), so the debugger sees the new value.
        if after_write
            && let (Event::Mem(m), Reply::Continue) = (event, &reply)
            && m.write
        {
            cpu.apply_write(m);
            let stop = Stop::new(cpu, cause, Some(event.clone()), Proposed::WriteLanded).at(rec);
            self.control.hold(cpu, stop);
            return Reply::Drop;
        }
        let stop = Stop::new(
            cpu,
            cause,
            Some(event.clone()),
            Proposed::Reply(reply.clone()),
        )
        .at(rec);
        match self.control.hold(cpu, stop) {
            None => reply,
            // An allowed read returns what memory holds.
            Some(Override::Allow) => Reply::Continue,
            Some(Override::Deny) => match event {
                Event::Mem(m) if !m.write => Reply::Data(0),
                _ => Reply::Drop,
            },
        }
    }

    fn on_exit(&self, cpu: &mut VcpuCtl<'_>) -> Result<(), HandlerStop> {
        // Polled register changes are decided (and undone) inside the poll: the
        // stop comes after the verdict, and says so.
        let Some(rec) = self.intro.poll(cpu)? else {
            return Ok(());
        };
        if let Some((cause, _)) = self.control.should_stop(&rec) {
            let stop = Stop::new(cpu, cause, None, Proposed::Polled(rec.verdict)).at(rec);
            self.control.hold(cpu, stop);
        }
        Ok(())
    }
}
