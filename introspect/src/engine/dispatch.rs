//! Dispatching an event to the hooks that match, and concluding it: one
//! combined verdict, at most one alert, exceptions, log-only mode, the journal and
//! the record; plus the prologue/epilogue every handler shares.

use std::sync::Arc;
use std::time::Instant;

use super::{Engine, EventRecord, RECENT};
use crate::alert::{Alert, Override, Record};
use crate::arch::{Regs, SRegs};
use crate::ctx::Ctx;
use crate::event::EventInfo;
use crate::glue::Guest;
use crate::target::{Class, HookId, Target};
use crate::verdict::{Outcome, Verdict};

impl Engine {
    /// Calls every live, enabled hook that `matches`, in insertion order, walking
    /// by position so hooks added by a callback are called in this same dispatch.
    pub(crate) fn dispatch(
        &mut self,
        guest: &mut dyn Guest,
        page: Option<u64>,
        info: &EventInfo,
        matches: &dyn Fn(&Target) -> bool,
    ) -> Vec<(HookId, Outcome)> {
        let mut fired = Vec::new();
        let mut pos = 0;
        loop {
            let id = match page {
                Some(p) => self.hooks.on_page_at(p, pos),
                None => self.hooks.at(pos),
            };
            let Some(id) = id else { break };
            pos += 1;
            let Some(h) = self.hooks.get_mut(id) else {
                continue;
            };
            if h.removed || !h.enabled || !matches(&h.target) {
                continue;
            }
            // Taken out for the call, so a hook cannot re-enter itself.
            let Some(mut cb) = h.callback.take() else {
                continue;
            };
            h.hits += 1;
            let out = cb(&mut Ctx::new(&mut *guest, info, id, &mut self.requests));
            if let Some(h) = self.hooks.get_mut(id) {
                h.callback = Some(cb);
            }
            self.add_requested_hooks(guest);
            if out.remove {
                self.hooks.flag_removed(id);
            }
            let skip = out.skip_others;
            fired.push((id, out));
            if skip {
                break;
            }
        }
        fired
    }

    /// Adds the hooks callbacks asked for (`Ctx::add_hook`): at the end of the
    /// list, so the dispatch walking it calls them too.
    fn add_requested_hooks(&mut self, guest: &mut dyn Guest) {
        for h in std::mem::take(&mut self.requests.new_hooks) {
            // A refused target is simply not added (see `Ctx::add_hook`).
            let _ = self.add_hook(guest, h.target, h.name, h.callback);
        }
    }

    /// The introcall answer a callback gave in this dispatch (`Ctx::answer_introcall`).
    pub(crate) fn take_introcall_answer(&mut self) -> Option<u64> {
        self.requests.introcall.take()
    }

    /// Dispatches a register-class event and concludes it; `Allowed` without any
    /// record when no hook matched (the common case for polled registers).
    pub(crate) fn decide(
        &mut self,
        guest: &mut dyn Guest,
        class: Class,
        info: &EventInfo,
        instruction: Option<&str>,
        matches: &dyn Fn(&Target) -> bool,
    ) -> Verdict {
        let fired = self.dispatch(guest, None, info, matches);
        if fired.is_empty() {
            return Verdict::Allowed;
        }
        self.conclude(guest, class, info, instruction, &fired)
    }

    /// Combines the hooks' answers by maximum, raises at most one alert per event
    /// (for the first hook that blocked), applies exceptions and log-only mode,
    /// and journals the event.
    pub(crate) fn conclude(
        &mut self,
        guest: &dyn Guest,
        class: Class,
        info: &EventInfo,
        instruction: Option<&str>,
        fired: &[(HookId, Outcome)],
    ) -> Verdict {
        let mut verdict = fired
            .iter()
            .map(|(_, o)| o.verdict)
            .max()
            .unwrap_or_default();
        let (mut regs, s) = (guest.regs(), guest.sregs());
        // KVM reports writes with RIP after the instruction; records name its start.
        if let Some(rip) = self.insn_rip.take() {
            regs.rip = rip;
        }
        // As for the writer: a change found by polling has no known task.
        let task = instruction
            .and(self.task_namer.as_ref())
            .and_then(|name| name(guest));
        if verdict == Verdict::NotAllowed
            && let Some((hook, out)) = fired.iter().find(|(_, o)| o.verdict == Verdict::NotAllowed)
        {
            self.next_alert += 1;
            let mut alert = self.make_alert(
                guest.vcpu(),
                class,
                info,
                instruction,
                *hook,
                out,
                &regs,
                &s,
            );
            alert.task = task.clone();
            if let Some(rule) = self.exceptions.matching(&alert) {
                verdict = Verdict::Allowed;
                self.journal(&Record::Exception {
                    alert: alert.id,
                    rule,
                    at_us: alert.at_us,
                });
            } else {
                alert.enforced = !self.log_only;
                if self.log_only {
                    verdict = Verdict::Allowed;
                }
                self.push_alert(alert);
            }
        }
        let hooks: Vec<HookId> = fired.iter().map(|(id, _)| *id).collect();
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        let record = EventRecord {
            event_id: self.event_id,
            at_us: self.started.elapsed().as_micros() as u64,
            class,
            vcpu: guest.vcpu(),
            rip: regs.rip,
            cpl: s.cpl(),
            instruction: instruction.map(str::to_string),
            task,
            event: info.clone(),
            hooks,
            verdict,
            overridden: None,
        };
        // Shared, not copied: the record is in `recent` and goes to the caller.
        let record = Arc::new(record);
        self.journal(&Record::Event(&record));
        self.handled = Some(record.clone());
        self.recent.push_back(record);
        verdict
    }

    /// The record of the event the last handler call concluded on this engine,
    /// if it concluded one (None when no hook fired). Take it under the same lock
    /// as the call: with several vCPUs, `recent`'s newest entry may be another
    /// vCPU's by the time the lock is taken again.
    pub(crate) fn take_handled(&mut self) -> Option<Arc<EventRecord>> {
        self.handled.take()
    }

    #[allow(clippy::too_many_arguments)]
    fn make_alert(
        &self,
        vcpu: u32,
        class: Class,
        info: &EventInfo,
        instruction: Option<&str>,
        hook: HookId,
        out: &Outcome,
        regs: &Regs,
        s: &SRegs,
    ) -> Alert {
        let hook_name = self
            .hooks
            .get(hook)
            .map(|h| h.name.clone())
            .unwrap_or_default();
        Alert {
            id: self.next_alert,
            event_id: self.event_id,
            at_us: self.started.elapsed().as_micros() as u64,
            class,
            vcpu,
            rip: regs.rip,
            // A change found by polling (a register compare, a hash on the
            // timer) has no known writer: RIP is wherever the vCPU was.
            writer: instruction.and(self.symbol_of(regs.rip)),
            cr3: s.cr3,
            cpl: s.cpl(),
            instruction: instruction.map(str::to_string),
            task: None,
            event: info.clone(),
            hook,
            reason: out
                .reason
                .clone()
                .unwrap_or_else(|| format!("hook {hook} ({hook_name}) denied it")),
            hook_name,
            verdict: Verdict::NotAllowed,
            enforced: true,
            repeats: 0,
            last_event_id: self.event_id,
            overridden: None,
        }
    }

    /// Journals an analyst's override of event `event_id`'s verdict.
    /// Journals policies switched on after the start (`Record::Protect`).
    pub fn journal_protect(&mut self, policies: &[crate::Policy]) {
        let at_us = self.now_us();
        self.journal(&Record::Protect { policies, at_us });
    }

    pub fn journal_override(&mut self, event_id: u64, proposed: Verdict, allow: bool) {
        let o = Override {
            event_id,
            at_us: self.now_us(),
            proposed,
            allow,
        };
        self.journal(&Record::Override(&o));
        if self.overrides.len() == RECENT {
            self.overrides.remove(0);
        }
        self.overrides.push(o);
        // The answer shows where the analyst looks: the alert (`alerts`,
        // `alert N`, and once more in the journal with the override, the
        // record a reader keyed by id keeps) and the event (`events`).
        let verdict = if allow {
            Verdict::Allowed
        } else {
            Verdict::NotAllowed
        };
        let mut changed = vec![];
        for a in self.alerts.iter_mut() {
            if a.event_id == event_id || a.last_event_id == event_id {
                a.overridden = Some(allow);
                a.enforced = !allow;
                changed.push(a.clone());
            }
        }
        for a in &changed {
            self.journal(&Record::Alert(a));
        }
        for r in self.recent.iter_mut().filter(|r| r.event_id == event_id) {
            let mut updated = (**r).clone();
            updated.verdict = verdict;
            updated.overridden = Some(allow);
            *r = std::sync::Arc::new(updated);
        }
    }

    /// Keeps an alert, folding a repeat of an earlier one (same vCPU, hook,
    /// class, RIP and reason: the same act again) into its count, so a guest
    /// that retries a denied write does not bury everything else, also when
    /// other acts come between (a hot page cycling through 7 writers gave 165
    /// lines when only consecutive repeats folded). The journal still gets
    /// every occurrence.
    fn push_alert(&mut self, alert: Alert) {
        let key = (
            alert.vcpu,
            alert.hook,
            alert.class,
            alert.rip,
            alert.reason.clone(),
        );
        if let Some(&i) = self.alert_index.get(&key)
            && let Some(first) = self.alerts.get_mut(i)
        {
            first.repeats += 1;
            first.last_event_id = alert.event_id;
            // The repeat's id was never shown: the next new alert takes it,
            // so alert ids stay 1, 2, 3 … as `alerts` lists them.
            if alert.id == self.next_alert {
                self.next_alert -= 1;
            }
            let first = first.clone();
            self.journal(&Record::Alert(&first));
            return;
        }
        self.journal(&Record::Alert(&alert));
        self.alert_index.insert(key, self.alerts.len());
        self.alerts.push(alert);
    }

    fn journal(&mut self, r: &Record<'_>) {
        if let Some(j) = self.journal.as_mut() {
            j.record(r);
        }
    }

    /// The common prologue and epilogue of every handler: a new event id,
    /// statistics and timing, then the commit of removed hooks and page rights.
    pub(crate) fn handle<R>(
        &mut self,
        guest: &mut dyn Guest,
        class: Class,
        body: impl FnOnce(&mut Self, &mut dyn Guest) -> R,
    ) -> R {
        let start = Instant::now();
        self.event_id += 1;
        *self.events_per_class.entry(class).or_default() += 1;
        let r = body(self, guest);
        if let Err(e) = self.commit(guest) {
            self.set_fatal(format!("commit failed: {e}"));
        }
        self.latency.add(start.elapsed().as_nanos() as u64);
        r
    }
}
