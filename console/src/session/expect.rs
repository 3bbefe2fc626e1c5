//! `expect …`: the assertions of scripts, waited for until they hold or time out.
//! One function per kind of expectation; Err carries what was seen instead.

use std::time::{Duration, Instant};

use vmiscope_introspect::Class;
use vmiscope_monitor::Wants;
use vmiscope_vmm::VcpuCtl;

use super::Session;
use crate::commands::Expect;
use crate::format::{alert_line, event_line, hex, reg_by_name};

impl Session {
    /// Waits (up to `timeout` s) for an expectation; Err carries what was seen.
    pub(super) fn expect(&mut self, e: &Expect, timeout: f64) -> Result<String, String> {
        if self.at_entry && !matches!(e, Expect::Mem { .. } | Expect::Reg { .. } | Expect::NoAlert)
        {
            self.go();
        }
        // The parser bounds the timeout; a caller that did not gets the default.
        let wait = crate::commands::seconds(timeout).unwrap_or(Duration::from_secs(10));
        let deadline = Instant::now() + wait;
        match e {
            Expect::Alert { class } => self.expect_seen(true, *class, deadline, timeout),
            Expect::Event { class } => self.expect_seen(false, *class, deadline, timeout),
            Expect::NoAlert => match self.alert_lines() {
                a if a.is_empty() => Ok("no alert".into()),
                a => Err(format!("alerts were raised: [{a}]")),
            },
            Expect::Serial { text } => self.expect_serial(text, deadline, timeout),
            Expect::Exit { code } => self.expect_exit(*code, deadline, timeout),
            Expect::Mem { addr, bytes, phys } => {
                let mut buf = vec![0u8; bytes.len()];
                self.read(*addr, &mut buf, *phys)
                    .map_err(|e| e.to_string())?;
                if buf == *bytes {
                    Ok("memory matches".into())
                } else {
                    Err(format!("memory at {addr:#x} is {}", hex(&buf)))
                }
            }
            Expect::Reg { name, value } => self.expect_reg(name, *value),
        }
    }

    /// Whether `f` holds by `deadline`: looked at again each time something
    /// happens in the session (a serial line, an alert, a recorded event, a
    /// stop, the end), blocking in between.
    /// `wants`: whether recorded events (of which class) can make `f` hold.
    fn wait_until(
        &mut self,
        deadline: Instant,
        wants: Wants,
        mut f: impl FnMut(&mut Session) -> bool,
    ) -> bool {
        let notices = self.intro.notices().clone();
        loop {
            let seen = notices.progress(wants);
            if f(self) {
                return true;
            }
            // Once the run has ended nothing more can come.
            if Instant::now() >= deadline || self.outcome().is_some() {
                return f(self);
            }
            notices.wait_past(seen, Some(deadline), wants);
        }
    }

    /// How long the wait lasted, for failure messages: the timeout, or the end
    /// of the run if it came first.
    fn waited(&mut self, t: f64) -> String {
        match self.outcome() {
            Some(o) => format!("before the run ended ({})", o.reason),
            None => format!("within {t} s"),
        }
    }

    fn alert_lines(&self) -> String {
        self.intro
            .alerts()
            .iter()
            .map(alert_line)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// An alert (`alerts`) or a handled event of `class` (any when None).
    fn expect_seen(
        &mut self,
        alerts: bool,
        class: Option<Class>,
        deadline: Instant,
        t: f64,
    ) -> Result<String, String> {
        let of_class = move |c: Class| class.is_none_or(|want| want == c);
        // With an event breakpoint on the class, the event is seen once its
        // vCPU is held at the stop: the event is recorded just before, and a
        // command after the expectation (`expect reg`, `regs`) must find the
        // vCPU there, not still on its way.
        let breaks = !alerts
            && self.control.breaks().iter().any(|b| {
                b.hook.is_none() && (b.class.is_none() || class.is_none() || b.class == class)
            });
        let seen = move |s: &mut Session| {
            if alerts {
                s.intro.alerts().iter().any(|a| of_class(a.class))
            } else {
                // Counted per class (every record is counted), not looked for
                // among the recent records: a flood of other events (a kernel
                // patching its own text under `kernel-code`) pushes a record
                // out of that window.
                let counters = s.intro.counters();
                let recorded = match class {
                    Some(c) => counters.per_class.get(&c).is_some_and(|n| *n > 0),
                    None => counters.events > 0,
                };
                recorded && (!breaks || s.control.is_held() || s.ended())
            }
        };
        let what = if alerts { "alert" } else { "event" };
        let wants = if alerts {
            Wants::Notices
        } else {
            Wants::Events(class)
        };
        if self.wait_until(deadline, wants, seen) {
            return Ok(format!("{what} seen"));
        }
        let detail = if alerts {
            format!("alerts: [{}]", self.alert_lines())
        } else {
            let last: Vec<String> = self
                .intro
                .recent(5, None)
                .iter()
                .map(|r| event_line(r, self.intro.symbols()))
                .collect();
            format!("last events: [{}]", last.join("; "))
        };
        Err(format!(
            "no {} {what} {}; {detail}",
            class.map(|c| c.name()).unwrap_or("any"),
            self.waited(t)
        ))
    }

    fn expect_serial(&mut self, text: &str, deadline: Instant, t: f64) -> Result<String, String> {
        let seen = |s: &mut Session| s.serial_lines().iter().any(|l| l.contains(text));
        if self.wait_until(deadline, Wants::Notices, seen) {
            return Ok("seen on the serial line".into());
        }
        let tail: Vec<String> = {
            let l = self.serial_lines();
            l[l.len().saturating_sub(3)..].to_vec()
        };
        Err(format!(
            "`{text}` not printed {}; last lines: {tail:?}",
            self.waited(t)
        ))
    }

    fn expect_exit(&mut self, code: i32, deadline: Instant, t: f64) -> Result<String, String> {
        let ended = self.wait_until(deadline, Wants::Notices, |s| s.outcome().is_some());
        match self.outcome() {
            Some(o) if ended && o.reason.exit_status() == code => Ok(format!("exit {code}")),
            Some(o) => Err(format!(
                "exit status {} ({}), expected {code}",
                o.reason.exit_status(),
                o.reason
            )),
            None => Err(format!(
                "the guest was still running after {t} s ({})",
                self.where_all()
            )),
        }
    }

    /// A register of the selected vCPU; a running guest is paused for the read.
    fn expect_reg(&mut self, name: &str, value: u64) -> Result<String, String> {
        let n = name.to_string();
        // After the end: the final registers (post-mortem), as `regs` shows.
        if self.ended() {
            let st = self.cpu_state().map_err(|e| e.to_string())?;
            return match reg_by_name(&st.regs, &st.sregs, &n) {
                Some(v) if v == value => Ok(format!("{name} = {v:#x}")),
                Some(v) => Err(format!("{name} is {v:#x}, expected {value:#x}")),
                None => Err(format!("no register `{name}`")),
            };
        }
        let pause = self.control.stop().is_none() && !self.at_entry && self.outcome().is_none();
        if pause {
            self.shared.pause_all();
            self.shared.wait_paused(Duration::from_secs(3));
        }
        let got =
            self.with_guest(move |cpu| reg_by_name(&VcpuCtl::regs(cpu), &VcpuCtl::sregs(cpu), &n));
        if pause {
            self.shared.resume_all();
        }
        match got.map_err(|e| e.to_string())? {
            Some(v) if v == value => Ok(format!("{name} = {v:#x}")),
            Some(v) => Err(format!("{name} is {v:#x}, expected {value:#x}")),
            None => Err(format!("no register `{name}`")),
        }
    }
}
