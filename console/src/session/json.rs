//! `json CMD` (or `CMD --json`): the answers of the inspection commands as
//! JSON, in the journal's conventions (addresses and 64-bit values as `"0x…"`
//! strings, counts as numbers).

use serde_json::{Value, json};

use super::Session;
use crate::commands::Command;
use crate::error::Error;
use vmiscope_monitor::journal::{alert_json, event_json, hexify, regs_json};

impl Session {
    pub(super) fn json(&mut self, c: Command) -> Result<Value, Error> {
        use Command as C;
        Ok(match c {
            C::Regs => hexify(regs_json(&self.cpu_state()?.regs)),
            C::Sregs => {
                let s = self.cpu_state()?.sregs;
                hexify(json!({
                    "cr0": s.cr0, "cr2": s.cr2, "cr3": s.cr3, "cr4": s.cr4, "cr8": s.cr8,
                    "efer": s.efer,
                    "idtr": {"base": s.idt.base, "limit": s.idt.limit},
                    "gdtr": {"base": s.gdt.base, "limit": s.gdt.limit},
                    "cs": s.cs.selector, "ss": s.ss.selector, "ds": s.ds.selector,
                    "es": s.es.selector, "fs": s.fs.selector, "gs": s.gs.selector,
                    "tr": s.tr.selector, "ldt": s.ldt.selector,
                    "fs_base": s.fs.base, "gs_base": s.gs.base,
                }))
            }
            C::Segments => {
                let s = self.cpu_state()?.sregs;
                let seg = |n: &str, g: &kvm_bindings::kvm_segment| {
                    json!({"name": n, "selector": g.selector, "base": g.base,
                        "limit": g.limit, "type": g.type_, "dpl": g.dpl,
                        "present": g.present == 1, "l": g.l == 1, "db": g.db == 1,
                        "g": g.g == 1, "unusable": g.unusable == 1})
                };
                hexify(json!([
                    seg("cs", &s.cs),
                    seg("ss", &s.ss),
                    seg("ds", &s.ds),
                    seg("es", &s.es),
                    seg("fs", &s.fs),
                    seg("gs", &s.gs),
                    seg("tr", &s.tr),
                    seg("ldt", &s.ldt),
                ]))
            }
            C::Dregs => {
                let d = self.debugregs()?;
                hexify(json!({"dr0": d.db[0], "dr1": d.db[1], "dr2": d.db[2],
                    "dr3": d.db[3], "dr6": d.dr6, "dr7": d.dr7}))
            }
            C::Events { n, class } => Value::Array(
                self.recent_events(n, class)
                    .iter()
                    .map(|r| event_json(r, self.intro.symbols()))
                    .collect(),
            ),
            C::Alerts => Value::Array(self.intro.alerts().iter().map(alert_json).collect()),
            C::Alert(id) => {
                let a = self
                    .intro
                    .alert(id)
                    .ok_or_else(|| format!("no alert {id} (see `alerts`)"))?;
                alert_json(&a)
            }
            C::Hooks => Value::Array(
                self.intro
                    .hooks()
                    .iter()
                    .map(|h| {
                        json!({"id": h.id, "class": h.target.class().name(),
                                "name": h.name, "hits": h.hits, "enabled": h.enabled,
                                "target": crate::format::target_text(&h.target)})
                    })
                    .collect(),
            ),
            C::Stats => self.stats_json(),
            C::Caps => serde_json::to_value(crate::caps::measure()?).unwrap_or_default(),
            other => return Err(format!("`json` cannot answer {other:?}").into()),
        })
    }

    fn stats_json(&self) -> Value {
        let c = self.intro.counters();
        let per_class: serde_json::Map<String, Value> = c
            .per_class
            .iter()
            .map(|(c, n)| (c.name().to_string(), json!(n)))
            .collect();
        let (exits, per_vcpu) = self.shared.exit_counts();
        let exits: serde_json::Map<String, Value> = exits
            .iter()
            .map(|(c, n)| (c.to_string(), json!(n)))
            .collect();
        let completed: serde_json::Map<String, Value> = self
            .shared
            .completed()
            .into_iter()
            .map(|(c, n)| (c.name().to_string(), json!(n)))
            .collect();
        json!({
            "events": per_class,
            "latency": {
                "count": c.latency.count,
                "mean_ns": c.latency.total_ns / c.latency.count.max(1),
            },
            "hooks": self.intro.hooks().iter().map(|h| json!({"id": h.id, "name": h.name, "hits": h.hits})).collect::<Vec<_>>(),
            "exits": exits,
            "exits_per_vcpu": per_vcpu,
            "completed": completed,
        })
    }
}
