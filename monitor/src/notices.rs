//! What happened, for the front ends that show it as it happens: the guest's
//! serial lines, alerts, stops and the end, in the order they happened, on one
//! channel per subscriber. A front end blocks on its receiver instead of
//! polling the session's state.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use vmiscope_introspect::{Alert, Class};
use vmiscope_vmm::StopReason;

use crate::stops::Stop;

/// One thing that happened.
#[derive(Debug, Clone)]
pub enum Notice {
    /// A complete line the guest printed on its serial port.
    Serial(String),
    /// An alert, as it was raised.
    Alert(Alert),
    /// A vCPU stopped for the analyst.
    Stop(Stop),
    /// The guest's run ended.
    End(StopReason),
    /// Nothing happened: a subscriber's own thread is asked to look at its
    /// state (a front end that is closing wakes its watcher with it).
    Wake,
}

/// The subscribers, each with its own channel; and a count of everything that
/// happened (each notice, each recorded event) that a front end can block on
/// without a channel: one that waits for a condition on the session's state
/// (a script's `expect`, a TUI frame) sleeps until the count moves.
#[derive(Default)]
pub struct Notices {
    subscribers: Mutex<Vec<Sender<Notice>>>,
    progress: Progress,
}

/// What a waiter on the session's progress is woken for, besides notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wants {
    /// Notices only (serial lines, alerts, stops, the end).
    Notices,
    /// Recorded events too: of one class, or of any (None).
    Events(Option<Class>),
}

/// How many event classes there are (`Class as usize` indexes them).
const CLASSES: usize = 8;

/// Counts that threads can wait on: one of notices, one of events per class
/// and one of all events. A waiter compares only what it `wants` (a count of
/// everything moved with each of a policy's thousands of events, so a script
/// waiting for a serial line woke at once every time it looked, and spun).
/// Moving a count costs an atomic add or two while nobody waits for it: every
/// recorded event moves two, so the exit path takes no lock unless a waiter
/// wants events (of its class).
#[derive(Default)]
struct Progress {
    notices: AtomicU64,
    events: AtomicU64,
    class_events: [AtomicU64; CLASSES],
    /// Every waiter (each wants notices).
    waiters: AtomicUsize,
    /// Waiters that want events of any class.
    any_event: AtomicUsize,
    /// Waiters that want events of one class.
    class: [AtomicUsize; CLASSES],
    lock: Mutex<()>,
    moved: Condvar,
}

impl Progress {
    /// Wakes the waiters if `wake` says one of them wants what just moved.
    fn wake_if(&self, wake: bool) {
        // SeqCst on both sides: a waiter counts itself before it reads the
        // counts under `lock`; so either it sees the new count, or this sees
        // the waiter and takes `lock`, which it can only get once the waiter
        // sleeps.
        if wake {
            let _held = self.lock.lock().unwrap();
            self.moved.notify_all();
        }
    }

    fn notice(&self) {
        self.notices.fetch_add(1, Ordering::SeqCst);
        self.wake_if(self.waiters.load(Ordering::SeqCst) > 0);
    }

    fn event(&self, class: Class) {
        let slot = class as usize;
        self.events.fetch_add(1, Ordering::SeqCst);
        if let Some(n) = self.class_events.get(slot) {
            n.fetch_add(1, Ordering::SeqCst);
        }
        let wanted = self.any_event.load(Ordering::SeqCst) > 0
            || self
                .class
                .get(slot)
                .is_some_and(|n| n.load(Ordering::SeqCst) > 0);
        self.wake_if(wanted);
    }

    /// What `wants` compares: the notices, plus the events it wants.
    fn count(&self, wants: Wants) -> u64 {
        let notices = self.notices.load(Ordering::SeqCst);
        let events = match wants {
            Wants::Notices => 0,
            Wants::Events(None) => self.events.load(Ordering::SeqCst),
            Wants::Events(Some(c)) => self
                .class_events
                .get(c as usize)
                .map_or(0, |n| n.load(Ordering::SeqCst)),
        };
        notices.wrapping_add(events)
    }

    fn interest(&self, wants: Wants) -> Option<&AtomicUsize> {
        match wants {
            Wants::Notices => None,
            Wants::Events(None) => Some(&self.any_event),
            Wants::Events(Some(c)) => self.class.get(c as usize),
        }
    }

    fn wait_past(&self, seen: u64, deadline: Option<Instant>, wants: Wants) -> u64 {
        let mut held = self.lock.lock().unwrap();
        let interest = self.interest(wants);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        interest.map(|i| i.fetch_add(1, Ordering::SeqCst));
        let now = loop {
            let now = self.count(wants);
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if now != seen || left.is_some_and(|l| l.is_zero()) {
                break now;
            }
            held = match left {
                Some(l) => self.moved.wait_timeout(held, l).unwrap().0,
                None => self.moved.wait(held).unwrap(),
            };
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        interest.map(|i| i.fetch_sub(1, Ordering::SeqCst));
        now
    }
}

impl Notices {
    /// A new receiver of every notice from now on.
    pub fn subscribe(&self) -> Receiver<Notice> {
        let (tx, rx) = channel();
        self.subscribers.lock().unwrap().push(tx);
        rx
    }

    /// Sends `notice` to every subscriber; one whose receiver is gone is dropped.
    pub fn publish(&self, notice: Notice) {
        self.subscribers
            .lock()
            .unwrap()
            .retain(|tx| tx.send(notice.clone()).is_ok());
        self.progress.notice();
    }

    /// Counts something that is not worth a notice but may end a wait: the
    /// guest printed part of a line (a prompt with no newline yet, which a
    /// script's `expect serial` may be waiting for).
    pub fn touch(&self) {
        self.progress.notice();
    }

    /// How many things a waiter that `wants` so much has seen happen so far
    /// (notices, and the events it wants): the `seen` to give `wait_past`.
    pub fn progress(&self, wants: Wants) -> u64 {
        self.progress.count(wants)
    }

    /// Counts one recorded event of `class` (no notice: events come too fast
    /// to queue); wakes only the waiters that want such events.
    pub fn event_recorded(&self, class: Class) {
        self.progress.event(class);
    }

    /// Blocks until something this waiter `wants` happened after `seen` (a
    /// `progress(wants)` value), or `deadline` passed; returns the count then.
    /// Read the count, then the state, then wait past the count: nothing that
    /// happens in between is missed, and nothing unwanted ends the wait.
    pub fn wait_past(&self, seen: u64, deadline: Option<Instant>, wants: Wants) -> u64 {
        self.progress.wait_past(seen, deadline, wants)
    }
}

/// Turns serial output chunks into complete lines (`Notice::Serial`).
#[derive(Default)]
pub struct LineSplitter {
    partial: String,
}

impl LineSplitter {
    /// The lines `chunk` completes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut done = Vec::new();
        for ch in String::from_utf8_lossy(chunk).chars() {
            if ch == '\n' {
                done.push(std::mem::take(&mut self.partial));
            } else {
                self.partial.push(ch);
            }
        }
        done
    }

    /// The line being printed, not yet complete.
    pub fn partial(&self) -> &str {
        &self.partial
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subscriber_gets_every_notice_in_order_and_a_gone_one_is_dropped() {
        let n = Notices::default();
        let a = n.subscribe();
        let b = n.subscribe();
        n.publish(Notice::Serial("one".into()));
        drop(b);
        n.publish(Notice::Wake);
        assert!(matches!(a.try_recv(), Ok(Notice::Serial(l)) if l == "one"));
        assert!(matches!(a.try_recv(), Ok(Notice::Wake)));
        assert_eq!(n.subscribers.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_waiter_wakes_when_something_happens_and_not_before_its_deadline_otherwise() {
        use std::sync::Arc;
        let n = Arc::new(Notices::default());
        let seen = n.progress(Wants::Notices);
        // Nothing happens: it waits until the deadline, then returns the same count.
        let t = Instant::now();
        let d = t + std::time::Duration::from_millis(30);
        assert_eq!(n.wait_past(seen, Some(d), Wants::Notices), seen);
        assert!(Instant::now() >= d);
        // An event is not a notice: a notice waiter's count stays; one that
        // wants events sees it, at once since it came before the wait.
        let before = n.progress(Wants::Events(None));
        n.event_recorded(Class::Ept);
        assert_eq!(n.progress(Wants::Notices), seen);
        assert_eq!(n.wait_past(before, None, Wants::Events(None)), before + 1);
        // Something wanted that happens during the wait ends it (no deadline:
        // a missed wake-up would hang the test).
        let waiting = |n: &Arc<Notices>, wants| {
            let m = n.clone();
            let seen = n.progress(wants);
            let w = std::thread::spawn(move || m.wait_past(seen, None, wants));
            while n.progress.waiters.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            (w, seen)
        };
        let (w, seen) = waiting(&n, Wants::Notices);
        n.publish(Notice::Wake);
        assert_eq!(w.join().unwrap(), seen + 1);
        // Events of another class neither wake nor end the wait of one who
        // waits for MSR events (the wait would return at once on any moved
        // count); an MSR event does.
        let (w, seen) = waiting(&n, Wants::Events(Some(Class::Msr)));
        n.event_recorded(Class::Ept);
        n.event_recorded(Class::Ept);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!w.is_finished(), "woken by an event it does not want");
        n.event_recorded(Class::Msr);
        assert_eq!(w.join().unwrap(), seen + 1);
        // Any class: the first event.
        let (w, seen) = waiting(&n, Wants::Events(None));
        n.event_recorded(Class::Timer);
        assert_eq!(w.join().unwrap(), seen + 1);
    }

    #[test]
    fn serial_chunks_become_complete_lines() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"hel").is_empty());
        assert_eq!(s.push(b"lo\nwor"), ["hello"]);
        assert_eq!(s.push(b"ld\n\n"), ["world", ""]);
    }
}
