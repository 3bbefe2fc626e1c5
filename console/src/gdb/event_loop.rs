//! The stub's loop over gdbstub's state machine: gdb's packets, the wait for a
//! stop (or gdb's Ctrl-C, or the guest's end), and the stop reply, which carries
//! the stopped vCPU's frame pointer, stack pointer and program counter
//! (`EXPEDITED`), as gdbserver's does: with them gdb shows where a `stepi`
//! ended without reading the registers (one exchange per step, not two).

use crate::error::Error;

use gdbstub::common::Signal;
use gdbstub::conn::ConnectionExt;
use gdbstub::stub::state_machine::{GdbStubStateMachine, GdbStubStateMachineInner, state};
use gdbstub::stub::{DisconnectReason, GdbStub, GdbStubError, MultiThreadStopReason};

use super::*;
use crate::gdb::arch::EXPEDITED;
use crate::gdb::conn::GdbConn;

/// Why a gdb session ended other than by gdb's choice.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error(transparent)]
    Stub(#[from] GdbStubError<Error, std::io::Error>),
    #[error("reading from gdb: {0}")]
    Connection(std::io::Error),
}

/// What ended a wait for a stop.
enum Wake {
    Stopped(MultiThreadStopReason<u64>),
    /// A byte from gdb (Ctrl-C, or a packet gdbstub takes while running).
    Data(u8),
}

/// Serves one gdb connection until gdb detaches or kills, or it breaks.
pub(super) fn run(
    stub: GdbStub<'_, GdbTarget, GdbConn>,
    t: &mut GdbTarget,
) -> Result<DisconnectReason, SessionError> {
    let mut gdb = stub.run_state_machine(t)?;
    loop {
        gdb = match gdb {
            GdbStubStateMachine::Idle(mut g) => {
                let b = g.borrow_conn().read().map_err(SessionError::Connection)?;
                g.incoming_data(t, b)?
            }
            GdbStubStateMachine::Disconnected(g) => return Ok(g.get_reason()),
            // Ctrl-C: stop every vCPU.
            GdbStubStateMachine::CtrlCInterrupt(g) => {
                t.all_stop();
                let reason = MultiThreadStopReason::SignalWithThread {
                    tid: tid(0),
                    signal: Signal::SIGINT,
                };
                g.interrupt_handled(t, Some(reason))?
            }
            GdbStubStateMachine::Running(mut g) => match wait(t, g.borrow_conn())? {
                Wake::Stopped(reason) => report(g, t, reason)?,
                Wake::Data(b) => g.incoming_data(t, b)?,
            },
        }
    }
}

/// The stop reply, with the expedited registers when the stopped vCPU's copy of
/// them is at hand (it is held at its stop).
fn report<'a>(
    g: GdbStubStateMachineInner<'a, state::Running, GdbTarget, GdbConn>,
    t: &mut GdbTarget,
    reason: MultiThreadStopReason<u64>,
) -> Result<GdbStubStateMachine<'a, GdbTarget, GdbConn>, SessionError> {
    let thread = match reason {
        MultiThreadStopReason::SignalWithThread { tid, .. }
        | MultiThreadStopReason::SwBreak(tid)
        | MultiThreadStopReason::HwBreak(tid)
        | MultiThreadStopReason::Watch { tid, .. } => Some(tid),
        _ => None,
    };
    let snapshot = thread
        .and_then(|tid| t.cpu(tid))
        .and_then(|cpu| t.s.control().snapshot(cpu));
    let Some(sn) = snapshot else {
        return Ok(g.report_stop(t, reason)?);
    };
    let values = [sn.regs.rbp, sn.regs.rsp, sn.regs.rip].map(u64::to_le_bytes);
    let mut regs = EXPEDITED.iter().zip(&values).map(|(id, v)| (*id, &v[..]));
    Ok(g.report_stop_with_regs(t, reason, &mut regs)?)
}

/// Waits for a stop, gdb's Ctrl-C, or the guest's end.
fn wait(t: &mut GdbTarget, conn: &mut GdbConn) -> Result<Wake, SessionError> {
    // A step (or a continue to a near breakpoint) stops within microseconds:
    // look for it awake before sleeping (see HANDOFF_SPIN). gdb's input is
    // looked at right after, so a Ctrl-C waits at most that long.
    let seen = t.seen;
    // The VM's stop reason is set before the run returns and `notify_end`
    // wakes this loop (the session's own `ended` waits for the run's thread).
    let ended = |t: &mut GdbTarget| t.s.ended() || t.s.shared().stop_reason().is_some();
    vmiscope_vmm::spin_for(|| (t.s.control().stop_count() > seen || ended(t)).then_some(()));
    loop {
        if conn.has_input().map_err(SessionError::Connection)? {
            let b = ConnectionExt::read(conn).map_err(SessionError::Connection)?;
            return Ok(Wake::Data(b));
        }
        if std::mem::take(&mut t.refused) {
            return Ok(Wake::Stopped(t.stop_reason()));
        }
        if t.s.control().stop_count() > t.seen {
            t.seen = t.s.control().stop_count();
            t.all_stop();
            return Ok(Wake::Stopped(t.stop_reason()));
        }
        if ended(t) {
            // The stub's session is attached (it does not own the run): the
            // reason comes from the VM itself.
            let code =
                t.s.shared()
                    .stop_reason()
                    .map(|r| r.exit_status())
                    .unwrap_or(0);
            return Ok(Wake::Stopped(MultiThreadStopReason::Exited(
                code.clamp(0, 255) as u8,
            )));
        }
        // Sleep until gdb sends something (Ctrl-C), a vCPU stops or the guest
        // ends (`Control::notify_end`): no timeout, nothing polled.
        wait_readable(conn.fd(), t.s.control().stop_fd(), -1);
        t.s.control().clear_stop_signal();
    }
}

/// Blocks until `a` or `b` is readable, or `ms` milliseconds pass (-1: no
/// limit; epoll, through vmm-sys-util: no `unsafe` here).
fn wait_readable(a: std::os::fd::RawFd, b: std::os::fd::RawFd, ms: i32) {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let Ok(ep) = Epoll::new() else {
        // Out of file descriptors: the caller looks again after a while.
        let ms = if ms < 0 { 100 } else { ms };
        std::thread::sleep(std::time::Duration::from_millis(ms as u64));
        return;
    };
    for (i, fd) in [a, b].into_iter().enumerate() {
        let _ = ep.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, i as u64),
        );
    }
    let mut ready = [EpollEvent::default(); 2];
    let _ = ep.wait(ms, &mut ready);
}
