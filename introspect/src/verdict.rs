//! HVMI's INTRO_ACTION: one verdict type, combined by maximum.

use serde::{Deserialize, Serialize};

/// What happens to the guest's operation. Variants are ordered by precedence: when
/// several hooks answer, the largest wins (HVMI's `MAX(action, finalAction)`; its
/// MSR handler let the last callback win instead, which this engine does not copy).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The operation happens and changes the real guest state.
    #[default]
    Allowed,
    /// Allowed, but the engine already produced its effect (e.g. emulated it).
    AllowedVirtual,
    /// Allowed, but a read returns substituted bytes (hidden breakpoints, hidden memory).
    AllowedPatched,
    /// Blocked: the guest state stays unchanged and the instruction is skipped.
    NotAllowed,
}
// HVMI's Ignore and Retry are not here: no hook needs them and no host action
// implements them (a trapped write on KVM arrives after its instruction ran, so
// "retry" cannot re-run it). A hook that wants a write retried lifts its trap and
// answers Allowed.

/// A hook callback's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Remove this hook when the dispatch ends (flag now, delete at commit).
    pub remove: bool,
    /// Do not call the remaining hooks for this event.
    pub skip_others: bool,
    /// Why: goes into the alert.
    pub reason: Option<String>,
}

impl Outcome {
    pub fn allow() -> Self {
        Outcome::default()
    }

    pub fn verdict(verdict: Verdict) -> Self {
        Outcome {
            verdict,
            ..Outcome::default()
        }
    }

    pub fn block(reason: impl Into<String>) -> Self {
        Outcome {
            verdict: Verdict::NotAllowed,
            reason: Some(reason.into()),
            ..Outcome::default()
        }
    }

    pub fn and_remove(mut self) -> Self {
        self.remove = true;
        self
    }

    pub fn and_skip_others(mut self) -> Self {
        self.skip_others = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_hvmis() {
        use Verdict::*;
        let order = [Allowed, AllowedVirtual, AllowedPatched, NotAllowed];
        assert!(order.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            [Allowed, NotAllowed, AllowedPatched].into_iter().max(),
            Some(NotAllowed)
        );
        assert_eq!(
            serde_json::to_string(&AllowedPatched).unwrap(),
            "\"allowed-patched\""
        );
    }
}
