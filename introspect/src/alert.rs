//! Alerts: what the analyst sees when a hook says NotAllowed.

use serde::{Deserialize, Serialize};

use crate::event::EventInfo;
use crate::hooks::{Class, HookId};
use crate::verdict::Verdict;

/// One alert, with everything needed to judge it and to turn it into an exception.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub id: u64,
    /// The event (handler invocation) that raised it.
    pub event_id: u64,
    /// Milliseconds since the engine started (for a polled change: when it was
    /// noticed, not when the guest made it).
    pub at_ms: u64,
    pub class: Class,
    pub vcpu: u32,
    pub rip: u64,
    /// The symbol at `rip` (the writer), when the image has symbols.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    pub cr3: u64,
    pub cpl: u8,
    /// The instruction, when known (polled register changes have none).
    pub instruction: Option<String>,
    /// The task the vCPU was running, when the guest's OS is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub event: EventInfo,
    pub hook: HookId,
    pub hook_name: String,
    /// What the policy decided.
    pub verdict: Verdict,
    /// What was enforced (log-only mode reports NotAllowed but allows).
    pub enforced: bool,
    pub reason: String,
}

/// A journal record: every handled event, and every alert.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Record<'a> {
    Event {
        event_id: u64,
        class: Class,
        vcpu: u32,
        rip: u64,
        cpl: u8,
        instruction: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        task: Option<&'a str>,
        event: &'a EventInfo,
        hooks: &'a [HookId],
        verdict: Verdict,
    },
    Alert(&'a Alert),
    Exception {
        alert: u64,
        rule: usize,
    },
    /// An analyst replaced a stopped event's verdict (the console's `verdict`).
    Override {
        event_id: u64,
        /// What the hooks had decided.
        proposed: Verdict,
        /// `allow` or `deny`.
        verdict: &'a str,
    },
}

/// Where records go (a JSON-lines file in the console).
pub trait Journal: Send {
    fn record(&mut self, line: &str);
}

impl Journal for Vec<String> {
    fn record(&mut self, line: &str) {
        self.push(line.to_string());
    }
}

/// Parses a journal's alert lines back (for tests and `exception add-from-alert`).
#[derive(Debug, Clone, Deserialize)]
pub struct AlertLine {
    pub id: u64,
    pub class: String,
    pub reason: String,
}
