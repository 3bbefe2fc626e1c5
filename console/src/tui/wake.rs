//! What the TUI's loop blocks on: the terminal (a key, the mouse, a resize) and
//! the session's notices (anything that happened: a serial line, an alert, a
//! recorded event, a stop, the end), in one epoll set. Nothing is polled.
//!
//! A watcher thread waits on the session's progress count and turns each move
//! of it into one write of an eventfd; it then waits for the TUI to take that
//! wake before it looks again, so a flood of events costs one wake per frame,
//! not one per event.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use vmiscope_monitor::{Notice, Notices, Wants};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Why `Wakes::wait` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The terminal has input.
    Terminal,
    /// Something happened in the session.
    Session,
    /// The timeout passed.
    Clock,
    /// The terminal hung up (its other end closed, with no SIGHUP to us: a
    /// tty that is not our controlling one). Reads would fail for ever.
    Gone,
}

/// The terminal and the session, as one thing to block on.
pub struct Wakes {
    /// The terminal alone (during the rest of a frame, notices wait).
    terminal: Epoll,
    /// The terminal and the eventfd.
    both: Epoll,
    fd: Arc<EventFd>,
    /// To the watcher: the last wake was taken, look again.
    taken: Option<SyncSender<()>>,
    closing: Arc<AtomicBool>,
    notices: Arc<Notices>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

const TERMINAL: u64 = 0;
const SESSION: u64 = 1;

impl Wakes {
    /// Watches `terminal` (a file descriptor) and `notices`.
    pub fn new(terminal: RawFd, notices: Arc<Notices>) -> std::io::Result<Wakes> {
        let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let add = |ep: &Epoll, fd: RawFd, tag: u64| {
            ep.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, tag),
            )
        };
        let (term_only, both) = (Epoll::new()?, Epoll::new()?);
        add(&term_only, terminal, TERMINAL)?;
        add(&both, terminal, TERMINAL)?;
        add(&both, fd.as_raw_fd(), SESSION)?;
        let (taken, look_again) = sync_channel(1);
        let closing = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (fd, closing, notices) = (fd.clone(), closing.clone(), notices.clone());
            std::thread::Builder::new()
                .name("tui-wake".into())
                .spawn(move || watch(&notices, &fd, &closing, &look_again))?
        };
        Ok(Wakes {
            terminal: term_only,
            both,
            fd,
            taken: Some(taken),
            closing,
            notices,
            watcher: Some(watcher),
        })
    }

    /// Blocks until the terminal has input, or (when `session`) something
    /// happened in the session, or `until` passes (None: no limit).
    pub fn wait(&self, session: bool, until: Option<Instant>) -> Wake {
        let ep = if session { &self.both } else { &self.terminal };
        let ms = until.map_or(-1, |u| {
            let left = u.saturating_duration_since(Instant::now()).as_millis();
            // Rounded up: a wait that ends a little early would come back at once.
            (left + 1).min(i32::MAX as u128) as i32
        });
        let mut ready = [EpollEvent::default(); 2];
        let n = match ep.wait(ms, &mut ready) {
            Ok(n) => n,
            // Interrupted (a signal): the caller looks at its state and waits again.
            Err(_) => return Wake::Clock,
        };
        let hung_up = ready[..n].iter().any(|e| {
            e.data() == TERMINAL
                && e.event_set()
                    .intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
        });
        if hung_up {
            return Wake::Gone;
        }
        let tags: Vec<u64> = ready[..n].iter().map(|e| e.data()).collect();
        if tags.contains(&SESSION) {
            let _ = self.fd.read();
            if let Some(t) = &self.taken {
                let _ = t.try_send(());
            }
        }
        if tags.contains(&TERMINAL) {
            Wake::Terminal
        } else if tags.contains(&SESSION) {
            Wake::Session
        } else {
            Wake::Clock
        }
    }
}

/// The watcher: one eventfd write per move of the session's progress, each
/// after the previous one was taken.
fn watch(notices: &Notices, fd: &EventFd, closing: &AtomicBool, look_again: &Receiver<()>) {
    let mut seen = notices.progress(Wants::Events(None));
    loop {
        seen = notices.wait_past(seen, None, Wants::Events(None));
        if closing.load(Ordering::SeqCst) || fd.write(1).is_err() {
            return;
        }
        if look_again.recv().is_err() {
            return;
        }
    }
}

impl Drop for Wakes {
    fn drop(&mut self) {
        // The watcher waits either on the progress count (a `Wake` notice
        // moves it) or on `taken` (dropping the sender ends that wait).
        self.closing.store(true, Ordering::SeqCst);
        self.taken = None;
        self.notices.publish(Notice::Wake);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_tui_wakes_for_its_terminal_and_the_session_and_at_its_clock() {
        let (rd, wr) = nix::unistd::pipe().unwrap();
        let notices = Arc::new(Notices::default());
        let w = Wakes::new(rd.as_raw_fd(), notices.clone()).unwrap();
        let soon = || Some(Instant::now() + Duration::from_millis(20));
        // Nothing: the clock.
        assert_eq!(w.wait(true, soon()), Wake::Clock);
        // A notice: the session (a missed one would hang here, no limit).
        notices.event_recorded(vmiscope_introspect::Class::Ept);
        assert_eq!(w.wait(true, None), Wake::Session);
        // Then a flood of them is one wake, not one per event…
        for _ in 0..1000 {
            notices.event_recorded(vmiscope_introspect::Class::Ept);
        }
        assert_eq!(w.wait(true, None), Wake::Session);
        // …which was taken: at most one more (the flood may have started
        // before the watcher looked again).
        let more = w.wait(true, soon());
        assert!(matches!(more, Wake::Session | Wake::Clock), "{more:?}");
        assert_eq!(w.wait(true, soon()), Wake::Clock);
        // During a frame's rest the session waits; the terminal does not.
        notices.event_recorded(vmiscope_introspect::Class::Ept);
        assert_eq!(w.wait(false, soon()), Wake::Clock);
        nix::unistd::write(&wr, b"k").unwrap();
        assert_eq!(w.wait(false, None), Wake::Terminal);
        // Dropping it ends its watcher (the test would hang otherwise).
        drop(w);
    }
}
