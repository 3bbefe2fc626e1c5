//! The blocking event loop: waits for a stop, gdb's Ctrl-C, or the guest's end.

use crate::error::Error;

use gdbstub::common::Signal;
use gdbstub::conn::ConnectionExt;
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event as GdbEvent, WaitForStopReasonError};

use super::*;
use crate::gdb::conn::GdbConn;

pub(super) enum EventLoop {}

impl BlockingEventLoop for EventLoop {
    type Target = GdbTarget;
    type Connection = GdbConn;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(
        t: &mut GdbTarget,
        conn: &mut GdbConn,
    ) -> Result<GdbEvent<Self::StopReason>, WaitForStopReasonError<Error, std::io::Error>> {
        // A step (or a continue to a near breakpoint) stops within microseconds:
        // look for it awake before sleeping (see HANDOFF_SPIN). gdb's input is
        // looked at right after, so a Ctrl-C waits at most that long.
        let seen = t.seen;
        vmiscope_vmm::spin_for(|| (t.s.control().stop_count() > seen || t.s.ended()).then_some(()));
        loop {
            if conn
                .has_input()
                .map_err(WaitForStopReasonError::Connection)?
            {
                let b = ConnectionExt::read(conn).map_err(WaitForStopReasonError::Connection)?;
                return Ok(GdbEvent::IncomingData(b));
            }
            if std::mem::take(&mut t.refused) {
                return Ok(GdbEvent::TargetStopped(t.stop_reason()));
            }
            if t.s.control().stop_count() > t.seen {
                t.seen = t.s.control().stop_count();
                t.all_stop();
                return Ok(GdbEvent::TargetStopped(t.stop_reason()));
            }
            if t.s.ended() {
                // The stub's session is attached (it does not own the run): the
                // reason comes from the VM itself.
                let code =
                    t.s.shared()
                        .stop_reason()
                        .map(|r| r.exit_status())
                        .unwrap_or(0);
                return Ok(GdbEvent::TargetStopped(MultiThreadStopReason::Exited(
                    code.clamp(0, 255) as u8,
                )));
            }
            // Sleep until gdb sends something (Ctrl-C) or a vCPU stops; the
            // timeout bounds how late the guest's end is noticed.
            wait_readable(conn.fd(), t.s.control().stop_fd(), 100);
            t.s.control().clear_stop_signal();
        }
    }

    /// Ctrl-C: stop every vCPU.
    fn on_interrupt(t: &mut GdbTarget) -> Result<Option<Self::StopReason>, Error> {
        t.all_stop();
        Ok(Some(MultiThreadStopReason::SignalWithThread {
            tid: tid(0),
            signal: Signal::SIGINT,
        }))
    }
}

/// Blocks until `a` or `b` is readable, or `ms` milliseconds pass.
fn wait_readable(a: std::os::fd::RawFd, b: std::os::fd::RawFd, ms: i32) {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a live array of two initialised pollfds, its length is
    // passed with it, and poll only writes their `revents`.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}
