//! What happened, for the front ends that show it as it happens: the guest's
//! serial lines, alerts, stops and the end, in the order they happened, on one
//! channel per subscriber. A front end blocks on its receiver instead of
//! polling the session's state.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};

use vmiscope_introspect::Alert;
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

/// The subscribers, each with its own channel.
#[derive(Default)]
pub struct Notices {
    subscribers: Mutex<Vec<Sender<Notice>>>,
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
    fn serial_chunks_become_complete_lines() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"hel").is_empty());
        assert_eq!(s.push(b"lo\nwor"), ["hello"]);
        assert_eq!(s.push(b"ld\n\n"), ["world", ""]);
    }
}
