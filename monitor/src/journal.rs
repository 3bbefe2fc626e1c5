//! The journal: one JSON-lines schema for `run --journal` (written as events
//! happen) and the console's `journal save` (written from the engine's memory),
//! and for the console's `json` answers.
//!
//! Every line is an object with `type` and `t_us` (microseconds since the run
//! started). The first line is a `header` (image, vCPUs, policies, host kind,
//! version, wall-clock start); then `event`, `alert`, `exception` and `override`
//! records; the last is `end` (the stop reason, exit status and each vCPU's final
//! registers). Addresses and 64-bit values are `"0x…"` strings, because jq and
//! JavaScript read JSON numbers as doubles and round anything above 2^53; counts,
//! ids, sizes and vCPU numbers stay numbers. The README documents each record.

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use crate::os::Symbols;
use serde_json::{Value, json};
use vmiscope_introspect::{Alert, EventRecord, Journal, Override, Record};
use vmiscope_vmm::{RunOutcome, VmShared};

/// Keys whose numbers are counts, ids or sizes: kept as numbers.
const NUMBER_KEYS: &[&str] = &[
    "t_us",
    "event_id",
    "last_event_id",
    "id",
    "vcpu",
    "vcpus",
    "cpl",
    "size",
    "len",
    "hooks",
    "hook",
    "alert",
    "rule",
    "repeats",
    "mem_mib",
    "status",
    "events",
    "alerts",
    "start_unix_ms",
    "hits",
    "count",
    "slot",
];

/// Turns every number that is not a count into a `"0x…"` string, recursively.
pub fn hexify(v: Value) -> Value {
    hexify_under(v, None)
}

fn hexify_under(v: Value, key: Option<&str>) -> Value {
    match v {
        Value::Number(n) if !key.is_some_and(|k| NUMBER_KEYS.contains(&k)) => match n.as_u64() {
            Some(u) => Value::String(format!("{u:#x}")),
            None => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(|x| hexify_under(x, key)).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, x)| {
                    let x = hexify_under(x, Some(&k));
                    (k, x)
                })
                .collect(),
        ),
        other => other,
    }
}

/// `symbol+0xoff` for an address, when the image names it.
pub fn symbol_of(sym: &Symbols, addr: u64) -> Option<String> {
    match sym.lookup(addr) {
        Some((n, 0)) => Some(n.to_string()),
        Some((n, off)) if off < 0x10000 => Some(format!("{n}+{off:#x}")),
        _ => None,
    }
}

/// A value's JSON object with `type` and `t_us` first and `at_us` dropped.
fn typed(kind: &str, t_us: u64, v: Value) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("type".into(), kind.into());
    out.insert("t_us".into(), t_us.into());
    if let Value::Object(o) = v {
        for (k, x) in o {
            if k != "at_us" {
                out.insert(k, x);
            }
        }
    }
    hexify(Value::Object(out))
}

pub fn event_json(r: &EventRecord, sym: &Symbols) -> Value {
    let mut v = typed(
        "event",
        r.at_us,
        serde_json::to_value(r).unwrap_or_default(),
    );
    if let Some(s) = symbol_of(sym, r.rip) {
        v["rip_sym"] = s.into();
    }
    v
}

pub fn alert_json(a: &Alert) -> Value {
    // `writer` is already the RIP's symbol: named as in events.
    let mut v = typed(
        "alert",
        a.at_us,
        serde_json::to_value(a).unwrap_or_default(),
    );
    if let Some(o) = v.as_object_mut()
        && let Some(w) = o.remove("writer")
    {
        o.insert("rip_sym".into(), w);
    }
    v
}

pub fn override_json(o: &Override) -> Value {
    typed(
        "override",
        o.at_us,
        json!({
            "event_id": o.event_id,
            "proposed": o.proposed,
            "verdict": if o.allow { "allow" } else { "deny" },
        }),
    )
}

pub fn record_json(r: &Record<'_>, sym: &Symbols) -> Value {
    match r {
        Record::Event(e) => event_json(e, sym),
        Record::Alert(a) => alert_json(a),
        Record::Exception { alert, rule, at_us } => {
            typed("exception", *at_us, json!({"alert": alert, "rule": rule}))
        }
        Record::Override(o) => override_json(o),
        Record::Protect { policies, at_us } => {
            let names: Vec<&str> = policies.iter().map(|p| p.name()).collect();
            json!({"type": "protect", "t_us": at_us, "policies": names})
        }
    }
}

/// What the header says about the run.
pub struct RunInfo {
    pub image: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub policies: Vec<String>,
    pub host: String,
}

pub fn header_json(info: &RunInfo) -> Value {
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    json!({
        "type": "header",
        "t_us": 0,
        "version": env!("CARGO_PKG_VERSION"),
        "image": info.image,
        "vcpus": info.vcpus,
        "mem_mib": info.mem_mib,
        "policies": info.policies,
        "host": info.host,
        "start_unix_ms": start,
    })
}

/// The general registers by name (numbers: `hexify` makes them strings).
pub fn regs_json(r: &kvm_bindings::kvm_regs) -> Value {
    json!({
        "rax": r.rax, "rbx": r.rbx, "rcx": r.rcx, "rdx": r.rdx,
        "rsi": r.rsi, "rdi": r.rdi, "rbp": r.rbp, "rsp": r.rsp,
        "r8": r.r8, "r9": r.r9, "r10": r.r10, "r11": r.r11,
        "r12": r.r12, "r13": r.r13, "r14": r.r14, "r15": r.r15,
        "rip": r.rip, "rflags": r.rflags,
    })
}

/// The last record: why the run ended and where each vCPU was.
pub fn end_json(shared: &VmShared, symbols: &Symbols, out: &RunOutcome, t_us: u64) -> Value {
    let vcpus: Vec<Value> = (0..shared.vcpu_count())
        .map(|c| match shared.final_state(c) {
            Some(f) => {
                let mut v = regs_json(&f.regs);
                v["vcpu"] = c.into();
                v["rip_sym"] = symbol_of(symbols, f.regs.rip).into();
                v["cpl"] = (f.sregs.cs.selector & 3).into();
                v["cr0"] = f.sregs.cr0.into();
                v["cr3"] = f.sregs.cr3.into();
                v["cr4"] = f.sregs.cr4.into();
                v
            }
            None => json!({"vcpu": c}),
        })
        .collect();
    hexify(json!({
        "type": "end",
        "t_us": t_us,
        "reason": out.reason.to_string(),
        "status": out.reason.exit_status(),
        "vcpus": vcpus,
    }))
}

/// A journal file, written line by line as records come (nothing buffered away
/// if the process dies). Cloned handles share the file: the engine writes
/// records, the front end writes the header and the end. A write that fails
/// (a full disk, `/dev/full`) ends the run with the reason: a journal that
/// silently loses its records is no audit trail.
#[derive(Clone)]
pub struct JournalFile {
    out: Arc<Mutex<std::io::LineWriter<std::fs::File>>>,
    path: Arc<std::path::Path>,
    symbols: Arc<Symbols>,
    ended: Arc<std::sync::atomic::AtomicBool>,
    failed: Arc<std::sync::atomic::AtomicBool>,
    run: Option<Arc<VmShared>>,
}

impl JournalFile {
    /// Creates the file and writes the header (an error if it cannot be
    /// written). `run`: the VM whose run a later write failure ends.
    pub fn create(
        path: &std::path::Path,
        info: &RunInfo,
        symbols: &Symbols,
        run: Option<Arc<VmShared>>,
    ) -> std::io::Result<Self> {
        let j = JournalFile {
            out: Arc::new(Mutex::new(std::io::LineWriter::new(
                crate::files::create_output(path)?,
            ))),
            path: path.into(),
            symbols: Arc::new(symbols.clone()),
            ended: Arc::default(),
            failed: Arc::default(),
            run,
        };
        writeln!(j.out.lock().unwrap(), "{}", header_json(info))?;
        Ok(j)
    }

    fn line(&self, v: &Value) {
        let Err(err) = writeln!(self.out.lock().unwrap(), "{v}") else {
            return;
        };
        if self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let why = format!(
            "the journal {} cannot be written: {err}",
            self.path.display()
        );
        crate::say!("[vmiscope] error: {why}; the run ends");
        if let Some(vm) = &self.run {
            vm.stop(vmiscope_vmm::StopReason::Error(why));
        }
    }

    /// Whether a write has failed (the records since are lost).
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes the `end` record, once.
    pub fn end(&self, shared: &VmShared, out: &RunOutcome, t_us: u64) {
        if !self.ended.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.line(&end_json(shared, &self.symbols, out, t_us));
        }
    }
}

impl Journal for JournalFile {
    fn record(&mut self, r: &Record<'_>) {
        self.line(&record_json(r, &self.symbols));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_hex_strings_and_counts_stay_numbers() {
        let v = hexify(json!({
            "rip": 0xffff_ffff_8bad_c0de_u64,
            "vcpu": 1,
            "event": {"class": "msr", "index": 0xc000_0082_u32, "write": 18_446_744_071_758_004_446_u64},
            "hooks": [3, 4],
            "t_us": 12,
        }));
        assert_eq!(v["rip"], "0xffffffff8badc0de");
        assert_eq!(v["vcpu"], 1);
        assert_eq!(v["event"]["index"], "0xc0000082");
        assert_eq!(v["event"]["write"], "0xffffffff8badc0de");
        assert_eq!(v["hooks"], json!([3, 4]));
        assert_eq!(v["t_us"], 12);
    }
}
