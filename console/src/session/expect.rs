//! `expect …`: the assertions of scripts, polled until they hold or time out.

use std::time::{Duration, Instant};

use vmiscope_vmm::VcpuCtl;

use super::Session;
use crate::commands::Expect;
use crate::format::*;

impl Session {
    /// Waits (up to `timeout` s) for an expectation; Err carries what was seen.
    pub(super) fn expect(&mut self, e: &Expect, timeout: f64) -> Result<String, String> {
        if self.at_entry && !matches!(e, Expect::Mem { .. } | Expect::Reg { .. } | Expect::NoAlert)
        {
            self.go();
        }
        let deadline = Instant::now() + Duration::from_secs_f64(timeout);
        let poll = |s: &mut Session, f: &mut dyn FnMut(&mut Session) -> bool| -> bool {
            loop {
                if f(s) {
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let alerts = |s: &Session| {
            s.intro
                .engine
                .lock()
                .unwrap()
                .alerts()
                .iter()
                .map(alert_line)
                .collect::<Vec<_>>()
                .join("; ")
        };
        match e {
            Expect::Alert { class } => {
                let ok = poll(self, &mut |s| {
                    s.intro
                        .engine
                        .lock()
                        .unwrap()
                        .alerts()
                        .iter()
                        .any(|a| class.is_none_or(|c| c == a.class))
                });
                if ok {
                    Ok("alert seen".into())
                } else {
                    Err(format!(
                        "no {} alert within {timeout} s; alerts: [{}]",
                        class.map(|c| c.name()).unwrap_or("any"),
                        alerts(self)
                    ))
                }
            }
            Expect::Event { class } => {
                let ok = poll(self, &mut |s| {
                    s.intro
                        .engine
                        .lock()
                        .unwrap()
                        .recent()
                        .iter()
                        .any(|r| class.is_none_or(|c| c == r.class))
                });
                if ok {
                    Ok("event seen".into())
                } else {
                    let seen: Vec<String> = self
                        .intro
                        .engine
                        .lock()
                        .unwrap()
                        .recent()
                        .iter()
                        .rev()
                        .take(5)
                        .map(event_line)
                        .collect();
                    Err(format!(
                        "no {} event within {timeout} s; last events: [{}]",
                        class.map(|c| c.name()).unwrap_or("any"),
                        seen.join("; ")
                    ))
                }
            }
            Expect::NoAlert => {
                let a = alerts(self);
                if a.is_empty() {
                    Ok("no alert".into())
                } else {
                    Err(format!("alerts were raised: [{a}]"))
                }
            }
            Expect::Serial { text } => {
                let ok = poll(self, &mut |s| {
                    s.serial
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|l| l.contains(text.as_str()))
                });
                if ok {
                    Ok("seen on the serial line".into())
                } else {
                    let tail: Vec<String> = self
                        .serial
                        .lock()
                        .unwrap()
                        .iter()
                        .rev()
                        .take(3)
                        .cloned()
                        .collect();
                    Err(format!(
                        "`{text}` not printed within {timeout} s; last lines: {tail:?}"
                    ))
                }
            }
            Expect::Exit { code } => {
                let ok = poll(self, &mut |s| s.outcome().is_some());
                match self.outcome() {
                    Some(o) if ok && o.reason.exit_status() == *code => Ok(format!("exit {code}")),
                    Some(o) => Err(format!(
                        "exit status {} ({}), expected {code}",
                        o.reason.exit_status(),
                        o.reason
                    )),
                    None => Err(format!(
                        "the guest was still running after {timeout} s ({})",
                        self.where_all()
                    )),
                }
            }
            Expect::Mem { addr, bytes, phys } => {
                let mut buf = vec![0u8; bytes.len()];
                self.read(*addr, &mut buf, *phys)?;
                if buf == *bytes {
                    Ok("memory matches".into())
                } else {
                    Err(format!("memory at {addr:#x} is {}", hex(&buf)))
                }
            }
            Expect::Reg { name, value } => {
                let n = name.clone();
                let pause =
                    self.control.stop().is_none() && !self.at_entry && self.outcome().is_none();
                if pause {
                    self.shared.pause_all();
                    self.shared.wait_paused(Duration::from_secs(3));
                }
                let got = self.with_guest(move |cpu| {
                    reg_by_name(&VcpuCtl::regs(cpu), &VcpuCtl::sregs(cpu), &n)
                });
                if pause {
                    self.shared.resume_all();
                }
                match got? {
                    Some(v) if v == *value => Ok(format!("{name} = {v:#x}")),
                    Some(v) => Err(format!("{name} is {v:#x}, expected {value:#x}")),
                    None => Err(format!("no register `{name}`")),
                }
            }
        }
    }
}
