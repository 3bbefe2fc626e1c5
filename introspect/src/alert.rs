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
    /// Microseconds since the engine started (for a polled change: when it was
    /// noticed, not when the guest made it).
    pub at_us: u64,
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
    /// How many more times the same act was seen right after (folded).
    pub repeats: u64,
    /// The event of the newest repeat (`event_id` when none).
    pub last_event_id: u64,
    /// An analyst replaced the verdict at a stop (`verdict allow|deny`):
    /// allowed (true) or denied; `enforced` then says what happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overridden: Option<bool>,
}

/// A journal record: every handled event, every alert, every exception that
/// matched and every analyst override, typed; the journal's owner decides the
/// schema it writes.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    Event(&'a crate::event::EventRecord),
    Alert(&'a Alert),
    /// An alert an exception rule allowed.
    Exception {
        alert: u64,
        rule: usize,
        at_us: u64,
    },
    Override(&'a Override),
    /// Policies switched on after the start (the console's or gdb's
    /// `protect`): the journal's header, written at the start, cannot say so.
    Protect {
        policies: &'a [crate::Policy],
        at_us: u64,
    },
}

/// An analyst replaced a stopped event's verdict (the console's `verdict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Override {
    pub event_id: u64,
    pub at_us: u64,
    /// What the hooks had decided.
    pub proposed: Verdict,
    /// Allow (true) or deny.
    pub allow: bool,
}

/// Where records go (a JSON-lines file in the console).
pub trait Journal: Send {
    fn record(&mut self, r: &Record<'_>);
}

impl Journal for Vec<String> {
    fn record(&mut self, r: &Record<'_>) {
        self.push(format!("{r:?}"));
    }
}

/// Parses a journal's alert lines back (for tests and `exception add-from-alert`).
#[derive(Debug, Clone, Deserialize)]
pub struct AlertLine {
    pub id: u64,
    pub class: String,
    pub reason: String,
}
