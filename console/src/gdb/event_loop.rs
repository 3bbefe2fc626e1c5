//! The blocking event loop: waits for a stop, gdb's Ctrl-C, or the guest's end.

use std::time::Duration;

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
        loop {
            if conn
                .peek()
                .map_err(WaitForStopReasonError::Connection)?
                .is_some()
            {
                let b = ConnectionExt::read(conn).map_err(WaitForStopReasonError::Connection)?;
                return Ok(GdbEvent::IncomingData(b));
            }
            if std::mem::take(&mut t.refused) {
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
            // Wakes as soon as a stop is recorded; the timeout bounds how late gdb's
            // Ctrl-C (incoming data) or the guest's end are noticed.
            let _ = t.s.control().wait_stop(t.seen, Duration::from_millis(1));
            if t.s.control().stop_count() > t.seen {
                t.seen = t.s.control().stop_count();
                t.all_stop();
                return Ok(GdbEvent::TargetStopped(t.stop_reason()));
            }
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
