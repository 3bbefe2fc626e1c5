//! What the front ends may ask of the session and change in it, as typed
//! values. They never hold the engine: each call takes its lock for as long as
//! it copies or changes one thing, so a front end (a TUI redraw, a `json`
//! dump) cannot keep a vCPU's callback waiting while it formats.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use vmiscope_introspect::engine::Latency;
use vmiscope_introspect::{
    Alert, Class, Engine, EventRecord, Exceptions, HookError, HookId, Override, Owner, Rule,
    Target, Verdict,
};

use crate::handler::Introspection;

/// A hook as the front ends see it: a copy.
#[derive(Debug, Clone)]
pub struct HookInfo {
    pub id: HookId,
    pub target: Target,
    pub name: String,
    pub owner: Owner,
    pub enabled: bool,
    pub hits: u64,
}

/// The engine's counters, copied at one moment.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Events handled since the start (every one, not only the recent ones).
    pub events: u64,
    pub per_class: HashMap<Class, u64>,
    /// How long the handlers took.
    pub latency: Latency,
    /// The engine's clock (microseconds since it started).
    pub now_us: u64,
}

/// Every callback held off: the engine stays locked while this lives (the
/// console takes it to restore the terminal and exit on a signal, so no alert
/// is printed over the restored screen).
pub struct Quiesced<'a> {
    _engine: MutexGuard<'a, Engine>,
}

impl Introspection {
    /// The live hooks, in the order they were added.
    pub fn hooks(&self) -> Vec<HookInfo> {
        let e = self.engine.lock().unwrap();
        e.hooks()
            .iter()
            .map(|h| HookInfo {
                id: h.id,
                target: h.target.clone(),
                name: h.name.clone(),
                owner: h.owner,
                enabled: h.enabled,
                hits: h.hits,
            })
            .collect()
    }

    /// Whether hook `id` is live.
    pub fn has_hook(&self, id: HookId) -> bool {
        let e = self.engine.lock().unwrap();
        e.hooks().get(id).is_some_and(|h| !h.removed)
    }

    /// Turns hook `id` on or off (it stays in place).
    pub fn set_hook_enabled(&self, id: HookId, on: bool) -> Result<(), HookError> {
        self.engine.lock().unwrap().set_hook_enabled(id, on)
    }

    /// The newest `n` handled events (of `class`, when given), oldest first.
    pub fn recent(&self, n: usize, class: Option<Class>) -> Vec<Arc<EventRecord>> {
        let e = self.engine.lock().unwrap();
        let mut list: Vec<_> = e
            .recent()
            .iter()
            .rev()
            .filter(|r| class.is_none_or(|c| c == r.class))
            .take(n)
            .cloned()
            .collect();
        list.reverse();
        list
    }

    /// The handled events after event `id` that are still among the recent
    /// ones, oldest first.
    pub fn recent_since(&self, id: u64) -> Vec<Arc<EventRecord>> {
        let e = self.engine.lock().unwrap();
        let mut list: Vec<_> = e
            .recent()
            .iter()
            .rev()
            .take_while(|r| r.event_id > id)
            .cloned()
            .collect();
        list.reverse();
        list
    }

    /// Alert `id`.
    pub fn alert(&self, id: u64) -> Option<Alert> {
        let e = self.engine.lock().unwrap();
        e.alerts().iter().find(|a| a.id == id).cloned()
    }

    /// Verdicts an analyst replaced.
    pub fn overrides(&self) -> Vec<Override> {
        self.engine.lock().unwrap().overrides().to_vec()
    }

    /// Journals policies switched on after the start (a `protect` record).
    pub fn journal_protect(&self, policies: &[vmiscope_introspect::Policy]) {
        self.engine.lock().unwrap().journal_protect(policies);
    }

    /// Journals an analyst's verdict on a stopped event (`proposed` was the
    /// engine's).
    pub fn journal_override(&self, event_id: u64, proposed: Verdict, allow: bool) {
        self.engine
            .lock()
            .unwrap()
            .journal_override(event_id, proposed, allow);
    }

    pub fn counters(&self) -> Counters {
        let e = self.engine.lock().unwrap();
        Counters {
            events: e.event_count(),
            per_class: e.events_per_class().clone(),
            latency: e.latency().clone(),
            now_us: e.now_us(),
        }
    }

    /// The engine's clock (microseconds since it started).
    pub fn now_us(&self) -> u64 {
        self.engine.lock().unwrap().now_us()
    }

    /// The exception rules.
    pub fn exceptions(&self) -> Exceptions {
        self.engine.lock().unwrap().exceptions().clone()
    }

    /// Adds the exception rule that allows what alert `id` reported; returns
    /// its index among the rules, and the rule. None: no such alert.
    pub fn except_alert(&self, id: u64) -> Option<(usize, Rule)> {
        let mut e = self.engine.lock().unwrap();
        let rule = Rule::from_alert(e.alerts().iter().find(|a| a.id == id)?);
        let rules = &mut e.exceptions_mut().rules;
        rules.push(rule.clone());
        Some((rules.len() - 1, rule))
    }

    /// Log-only mode: every verdict is logged and then allowed.
    /// Whether policies only log (`--log-only`, `log-only on`).
    pub fn log_only(&self) -> bool {
        self.engine.lock().unwrap().log_only()
    }

    pub fn set_log_only(&self, on: bool) {
        self.engine.lock().unwrap().set_log_only(on);
    }

    /// Holds every callback off until the result is dropped (see `Quiesced`).
    /// A poisoned lock is taken anyway: this is the way out.
    pub fn quiesce(&self) -> Quiesced<'_> {
        Quiesced {
            _engine: self.engine.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmiscope_introspect::mock::MockGuest;
    use vmiscope_introspect::policy::PolicyEnv;
    use vmiscope_introspect::{Outcome, Rights};

    fn intro_with_a_hook() -> (Introspection, HookId) {
        let intro = Introspection::new(Engine::new(), vec![], PolicyEnv::default());
        let mut g = MockGuest::new();
        let target = Target::Gpa {
            gpa: 0x5000,
            len: 8,
            rights: Rights::W,
        };
        let id = intro
            .engine
            .lock()
            .unwrap()
            .add_hook(&mut g, target, "analyst", Box::new(|_| Outcome::allow()))
            .unwrap();
        (intro, id)
    }

    #[test]
    fn the_front_ends_see_copies_and_change_only_through_calls() {
        let (intro, id) = intro_with_a_hook();
        let hooks = intro.hooks();
        assert_eq!(hooks.len(), 1);
        assert_eq!((hooks[0].id, hooks[0].enabled), (id, true));
        assert_eq!(hooks[0].name, "analyst");
        assert!(intro.has_hook(id));
        assert!(!intro.has_hook(HookId(id.0 + 1)));
        intro.set_hook_enabled(id, false).unwrap();
        assert!(
            !intro.hooks()[0].enabled,
            "the copy taken before stays as it was"
        );
        assert!(hooks[0].enabled);
        assert!(intro.set_hook_enabled(HookId(99), true).is_err());
        // Nothing handled yet: empty copies, no alert to make a rule from.
        assert!(intro.recent(10, None).is_empty() && intro.recent_since(0).is_empty());
        assert!(intro.alert(1).is_none() && intro.except_alert(1).is_none());
        assert_eq!(intro.counters().events, 0);
        assert!(intro.exceptions().rules.is_empty());
    }

    #[test]
    fn quiesce_holds_the_engine_until_dropped() {
        let (intro, _) = intro_with_a_hook();
        let held = intro.quiesce();
        assert!(
            intro.engine.try_lock().is_err(),
            "callbacks wait while quiesced"
        );
        drop(held);
        assert!(intro.engine.try_lock().is_ok());
    }
}
