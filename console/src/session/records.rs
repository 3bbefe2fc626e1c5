//! History and insight: events, alerts, exceptions, log-only, the journal, stats,
//! caps, help.

use std::fmt::Write as _;

use crate::error::Error;

use vmiscope_introspect::Class;

use super::{Output, Session};
use crate::commands::{self};
use crate::format::*;

impl Session {
    /// The newest `n` handled events of `class` (any when None), oldest first.
    pub(super) fn recent_events(
        &self,
        n: usize,
        class: Option<Class>,
    ) -> Vec<std::sync::Arc<vmiscope_introspect::EventRecord>> {
        self.intro.recent(n, class)
    }

    pub(super) fn events(&mut self, n: usize, class: Option<Class>) -> Result<Output, Error> {
        let mut t = String::new();
        for r in self.recent_events(n, class) {
            let _ = writeln!(t, "{}", event_line(&r, self.intro.symbols()));
        }
        Ok(Output::text(if t.is_empty() {
            "no handled events yet".into()
        } else {
            t
        }))
    }

    pub(super) fn alerts(&mut self) -> Result<Output, Error> {
        let t: String = self
            .intro
            .alerts()
            .iter()
            .map(|a| format!("{}\n", alert_line(a)))
            .collect();
        Ok(Output::text(if t.is_empty() {
            "no alerts".into()
        } else {
            t
        }))
    }

    pub(super) fn alert(&mut self, id: u64) -> Result<Output, Error> {
        let a = &self
            .intro
            .alert(id)
            .ok_or_else(|| format!("no alert {id} (see `alerts`)"))?;
        let sym = self.intro.symbols();
        Ok(Output::text(format!(
            "{}\n  event #{}{}: {}\n  vCPU {} cpl{} rip {} cr3 {:#x}{}\n  instruction: {}\n  hook {} ({}), verdict {}, {}\n  `exception add-from-alert {id}` allows it from now on; `json alert {id}` gives it as JSON",
            alert_line(a),
            a.event_id,
            if a.repeats > 0 {
                format!(
                    " (and {} repeats, the last at event #{})",
                    a.repeats, a.last_event_id
                )
            } else {
                String::new()
            },
            info_text(&a.event, sym),
            a.vcpu,
            a.cpl,
            at(sym, a.rip),
            a.cr3,
            a.task
                .as_deref()
                .map(|t| format!(" task {t}"))
                .unwrap_or_default(),
            a.instruction.as_deref().unwrap_or("(unknown: polled)"),
            a.hook,
            a.hook_name,
            verdict_name(a.verdict),
            if a.enforced {
                "enforced"
            } else {
                "log-only: allowed"
            },
        )))
    }

    pub(super) fn exception_from_alert(&mut self, id: u64) -> Result<Output, Error> {
        let (index, rule) = self
            .intro
            .except_alert(id)
            .ok_or_else(|| format!("no alert {id} (see `alerts`)"))?;
        let text = serde_json::to_string(&rule).unwrap_or_default();
        Ok(Output::text(format!("exception {index} added: {text}")))
    }

    pub(super) fn exceptions(&mut self) -> Result<Output, Error> {
        let x = self.intro.exceptions();
        Ok(Output::text(if x.rules.is_empty() {
            "no exception rules".into()
        } else {
            x.to_json()
        }))
    }

    /// Refuses host-file writes where they are not allowed (gdb's `monitor`).
    fn may_write(&self, f: &str) -> Result<(), Error> {
        if self.host_writes {
            return Ok(());
        }
        Err(format!(
            "not writing {f}: host files are not written from gdb's monitor unless vmiscope runs with --gdb-host-writes"
        )
        .into())
    }

    pub(super) fn save_exceptions(&mut self, f: String) -> Result<Output, Error> {
        self.may_write(&f)?;
        let json = self.intro.exceptions().to_json();
        write_file(&f, json.as_bytes())?;
        Ok(Output::text(format!("saved to {f}")))
    }

    pub(super) fn log_only(&mut self, on: bool) -> Result<Output, Error> {
        self.intro.set_log_only(on);
        Ok(Output::text(format!(
            "log-only {}",
            if on { "on" } else { "off" }
        )))
    }

    pub(super) fn caps(&mut self) -> Result<Output, Error> {
        let c = crate::caps::measure()?;
        Ok(Output::text(
            c.rows
                .iter()
                .map(|r| {
                    format!(
                        "{:<22} CPL0 {:<12} CPL3 {}\n",
                        r.mechanism,
                        r.cpl0.label(),
                        r.cpl3.label()
                    )
                })
                .collect::<String>(),
        ))
    }

    /// `journal save FILE`: the session in `--journal`'s schema, from the
    /// engine's memory (its recent events, every alert and override), records
    /// in time order between the header and, once the guest has ended, `end`.
    pub(super) fn save_journal(&mut self, f: String) -> Result<Output, Error> {
        use vmiscope_monitor::journal;
        self.may_write(&f)?;
        let (shared, intro) = (self.shared.clone(), self.intro.clone());
        let ended = self.ended_us();
        let end = self
            .outcome()
            .map(|o| journal::end_json(&shared, intro.symbols(), o, ended));
        let sym = self.intro.symbols();
        let (events, alerts, overrides) = (
            self.intro.recent(usize::MAX, None),
            self.intro.alerts(),
            self.intro.overrides(),
        );
        let mut records: Vec<serde_json::Value> = events
            .iter()
            .map(|r| journal::event_json(r, sym))
            .chain(alerts.iter().map(journal::alert_json))
            .chain(overrides.iter().map(journal::override_json))
            .collect();
        records.sort_by_key(|r| r["t_us"].as_u64().unwrap_or(0));
        let mut out = format!("{}\n", journal::header_json(&self.info.lock().unwrap()));
        for r in &records {
            let _ = writeln!(out, "{r}");
        }
        if let Some(end) = &end {
            let _ = writeln!(out, "{end}");
        }
        write_file(&f, out.as_bytes())?;
        Ok(Output::text(format!(
            "saved {} events, {} alerts and {} overrides to {f}",
            events.len(),
            alerts.len(),
            overrides.len()
        )))
    }

    pub(super) fn stats(&self) -> String {
        let c = self.intro.counters();
        let mut t = String::from("events per class:");
        let mut classes: Vec<_> = c.per_class.iter().collect();
        classes.sort();
        for (c, n) in classes {
            let _ = write!(t, " {}={n}", c.name());
        }
        let _ = write!(
            t,
            "\nhandler latency: {} events, mean {:.2} us\n",
            c.latency.count,
            c.latency.total_ns as f64 / c.latency.count.max(1) as f64 / 1e3
        );
        for (i, n) in c
            .latency
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
        {
            let _ = writeln!(t, "  {:>8} ns .. {:>8} ns  {n}", 1u64 << i, 1u64 << (i + 1));
        }
        let completed: Vec<String> = self
            .shared
            .completed()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| format!("{}={n}", c.name()))
            .collect();
        if !completed.is_empty() {
            let _ = writeln!(t, "completed by the VMM: {}", completed.join(" "));
        }
        t.push_str("hook hits:\n");
        for r in super::hooks::hook_rows(
            &self.intro.hooks(),
            self.intro.log_only(),
            &self.hook_actions(),
        ) {
            let _ = writeln!(t, "  hook {:>3} {:<22} {}", r.ids, r.name, r.hits);
        }
        let (exits, per) = self.shared.exit_counts();
        let per: Vec<String> = per
            .iter()
            .enumerate()
            .map(|(c, n)| format!("vCPU {c}: {n}"))
            .collect();
        let _ = write!(
            t,
            "exits: {} ({})",
            if exits.is_empty() {
                "none yet".to_string()
            } else {
                exits
                    .iter()
                    .map(|(c, n)| format!("{c}={n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
            per.join(", ")
        );
        t
    }

    /// `help` (every command) or `help CMD`.
    pub(super) fn help(&mut self, c: Option<String>) -> Result<Output, Error> {
        let lines = commands::HELP
            .iter()
            .filter(|e| {
                c.as_deref()
                    .is_none_or(|c| e.usage.split(['/', ' ']).next() == Some(c))
            })
            .map(|e| {
                if c.is_some() {
                    format!("{}\n  {}\n  example: {}\n", e.usage, e.what, e.example)
                } else {
                    format!("{:<38} {}\n", e.usage, e.what)
                }
            })
            .collect::<String>();
        if lines.is_empty() {
            return Err(format!("no command `{}` (try `help`)", c.unwrap_or_default()).into());
        }
        Ok(Output::text(lines))
    }
}

/// Writes a host file a command names (never waiting on a FIFO with no reader).
fn write_file(f: &str, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write as _;
    vmiscope_monitor::files::create_output(std::path::Path::new(f))
        .and_then(|mut file| file.write_all(bytes))
        .map_err(|e| format!("cannot write {f}: {e}").into())
}
