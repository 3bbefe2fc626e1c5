//! Run control and event stops: continue, pause, step, next-event, vcpu, quit,
//! event breakpoints, and the verdict of a stopped event.

use std::fmt::Write as _;
use std::time::Duration;

use crate::error::Error;

use vmiscope_introspect::{Class, HookId};
use vmiscope_vmm::StopReason;

use super::{Output, Session};
use crate::commands::VerdictChoice;
use crate::format::*;
use vmiscope_monitor::{BreakId, Override};

impl Session {
    pub(super) fn quit(&mut self) -> Result<Output, Error> {
        self.shared.stop(StopReason::User);
        let _ = self.control.resume(None);
        Ok(Output {
            text: "bye".into(),
            quit: true,
        })
    }

    /// `continue [--wait]`.
    pub(super) fn cont(&mut self, wait: bool) -> Result<Output, Error> {
        let n = self.control.stop_count();
        self.go();
        if wait {
            return self.wait_after(n, 10.0);
        }
        Ok(Output::text("continuing"))
    }

    /// `wait [SECS]`: the stop the guest is at, or the next one, or its end.
    pub(super) fn wait(&mut self, secs: f64) -> Result<Output, Error> {
        if self.control.stop().is_some() {
            return Ok(Output::text(self.describe_stop()?));
        }
        let n = self.control.stop_count();
        self.wait_after(n, secs)
    }

    /// Waits for a stop newer than `n` or the guest's end, up to `secs`,
    /// blocking until the session's notices say something happened.
    fn wait_after(&mut self, n: u64, secs: f64) -> Result<Output, Error> {
        let deadline = std::time::Instant::now() + Duration::from_secs_f64(secs);
        let notices = self.intro.notices().clone();
        loop {
            let seen = notices.progress(vmiscope_monitor::Wants::Notices);
            if self.control.stop_count() > n && self.control.stop().is_some() {
                return Ok(Output::text(self.describe_stop()?));
            }
            if self.ended() {
                let why = self
                    .outcome()
                    .map(|o| o.reason.to_string())
                    .unwrap_or_default();
                return Ok(Output::text(format!("the guest has ended: {why}")));
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "no stop within {secs} s (the guest runs on; `pause` stops it)"
                )
                .into());
            }
            notices.wait_past(seen, Some(deadline), vmiscope_monitor::Wants::Notices);
        }
    }

    pub(super) fn pause(&mut self) -> Result<Output, Error> {
        self.shared.pause_all();
        let ok = self.shared.wait_paused(Duration::from_secs(3));
        Ok(Output::text(if ok {
            self.where_all()
        } else {
            "some vCPU did not pause (stopped at an event?)".into()
        }))
    }

    pub(super) fn next_event(&mut self, all: bool) -> Result<Output, Error> {
        let n = self.control.stop_count();
        self.control.arm_next_event(all);
        self.go();
        self.wait_after(n, 10.0)
    }

    pub(super) fn select_vcpu(&mut self, n: u32) -> Result<Output, Error> {
        if n >= self.shared.vcpu_count() {
            return Err(
                format!("no vCPU {n} (this guest has {})", self.shared.vcpu_count()).into(),
            );
        }
        self.vcpu = n;
        Ok(Output::text(format!("vCPU {n} selected")))
    }

    pub(super) fn break_event(
        &mut self,
        class: Option<Class>,
        vcpu: Option<u32>,
    ) -> Result<Output, Error> {
        let id = self.control.add_break(class, None, vcpu);
        // A breakpoint on a class nothing watches would wait in silence: say
        // so (policies not armed yet will bring hooks of their own).
        let hooked = self
            .intro
            .hooks()
            .iter()
            .any(|h| class.is_none_or(|c| h.target.class() == c));
        let note = match (hooked, self.intro.armed()) {
            (true, _) => String::new(),
            (false, 0) => format!(
                " (nothing is hooked{} yet: it stops once a hook or a policy is)",
                class
                    .map(|c| format!(" on class {}", c.name()))
                    .unwrap_or_default()
            ),
            (false, _) => {
                " (nothing of it is hooked yet; the policies arm when the guest loads its own IDT)"
                    .into()
            }
        };
        Ok(Output::text(format!(
            "breakpoint {id}: events{}{}{note}",
            class
                .map(|c| format!(" of class {}", c.name()))
                .unwrap_or_default(),
            vcpu.map(|v| format!(" on vCPU {v}")).unwrap_or_default()
        )))
    }

    pub(super) fn break_hook(&mut self, h: HookId) -> Result<Output, Error> {
        if !self.intro.has_hook(h) {
            return Err(format!("no hook {h} (see `hooks`)").into());
        }
        let id = self.control.add_break(None, Some(h), None);
        Ok(Output::text(format!(
            "breakpoint {id}: when hook {h} fires"
        )))
    }

    pub(super) fn breaks(&mut self) -> Result<Output, Error> {
        let mut t = String::new();
        for b in self.control.breaks() {
            let _ = writeln!(
                t,
                "{:>3}  class {:<10} hook {:<6} vcpu {}",
                b.id,
                b.class.map(|c| c.name()).unwrap_or("any"),
                b.hook.map(|h| h.to_string()).unwrap_or("any".into()),
                b.vcpu.map(|v| v.to_string()).unwrap_or("any".into())
            );
        }
        Ok(Output::text(if t.is_empty() {
            "no event breakpoints".into()
        } else {
            t
        }))
    }

    pub(super) fn delete_break(&mut self, n: BreakId) -> Result<Output, Error> {
        if !self.control.delete_break(n) {
            return Err(format!("no breakpoint {n}").into());
        }
        Ok(Output::text(format!("deleted breakpoint {n}")))
    }

    pub(super) fn verdict(&mut self, v: VerdictChoice) -> Result<Output, Error> {
        let stop = self.control.stop().ok_or("not stopped at an event")?;
        if !stop.proposed.pending() {
            return Err(
                "this event's verdict is already applied (a polled register change or a step)"
                    .into(),
            );
        }
        let over = match v {
            VerdictChoice::Allow => Some(Override::Allow),
            VerdictChoice::Deny => Some(Override::Deny),
            VerdictChoice::Policy => None,
        };
        if let (Some(o), Some(ev)) = (over, &stop.event) {
            self.intro
                .journal_override(ev.event_id, ev.verdict, o == Override::Allow);
        }
        self.control.resume_and_wait(over);
        Ok(Output::text(format!(
            "verdict {}; vCPU {} goes on",
            match v {
                VerdictChoice::Allow => "allow",
                VerdictChoice::Deny => "deny",
                VerdictChoice::Policy => "as the policy said",
            },
            stop.vcpu
        )))
    }

    pub(super) fn step(&mut self) -> Result<Output, Error> {
        let n = self.control.stop_count();
        let ok = self.with_guest(|cpu| cpu.start_step())?;
        if !ok {
            return Err(
                "cannot single-step here: at CPL3 this host needs a #DB gate in the guest's IDT and a free DR slot (see `caps`)"
                    .into(),
            );
        }
        self.control.arm_step(self.vcpu);
        self.go();
        match self.control.wait_stop(n, Duration::from_secs(5)) {
            Some(s) => {
                let raw = s.raw.as_ref();
                let what = raw.map(|r| crate::format::exit_text(r, self.intro().symbols()));
                Output::text(format!("vCPU {}: {}", s.vcpu, what.unwrap_or_default())).pipe(Ok)
            }
            None => Err("the step did not complete within 5 s".into()),
        }
    }

    pub(super) fn where_all(&self) -> String {
        (0..self.shared.vcpu_count())
            .map(|c| {
                let (rip, cpl) = self.shared.last_position(c).unwrap_or_default();
                format!("vCPU {c} at {} CPL{cpl}", self.addr_name(rip))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}
