//! Per-vCPU exit counters, one atomic per event class (no allocation per exit).

use std::sync::atomic::{AtomicU64, Ordering};

pub const CLASSES: [&str; 17] = [
    "io",
    "mmio",
    "mem-read",
    "mem-write",
    "msr-read",
    "msr-write",
    "port",
    "introcall",
    "breakpoint",
    "single-step",
    "hw-breakpoint",
    "exec-fault",
    "emulation-failure",
    "halt",
    "shutdown",
    "kick",
    "fixup",
];

#[derive(Default)]
pub struct ExitCounters([AtomicU64; 17]);

impl ExitCounters {
    pub fn bump(&self, class: &str) {
        if let Some(i) = CLASSES.iter().position(|c| *c == class) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        CLASSES
            .iter()
            .zip(&self.0)
            .map(|(c, n)| (*c, n.load(Ordering::Relaxed)))
            .collect()
    }
}
