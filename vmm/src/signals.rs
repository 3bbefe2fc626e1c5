//! The signals that end a run: SIGINT (Ctrl-C), SIGTERM and SIGHUP.
//!
//! The handlers only count and remember the signal (async-signal-safe atomics);
//! each run's watchdog compares the count with its baseline and ends the run with
//! `StopReason::Signal`, so the stop summary is printed and the journal closed as
//! for any other stop. Installed first thing in `main`, so no signal can kill the
//! process between its start and the first run (the journal file then always
//! exists and ends with a complete line).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Signals received by the process. A count, not a flag: a run compares it with
/// the count it was told belongs to earlier runs (`VmConfig::signals_seen`), so
/// one Ctrl-C ends the runs it interrupted and not the VMs a process (`caps`,
/// `bench`) builds after it.
static RECEIVED: AtomicU64 = AtomicU64::new(0);
/// The number of the latest of them.
static LAST: AtomicI32 = AtomicI32::new(0);
/// Written by the handler (write(2) is async-signal-safe), so a thread can block
/// in `wait` instead of polling the count.
static WAKE: OnceLock<EventFd> = OnceLock::new();

/// The signals that end a run instead of killing the process.
pub const HANDLED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_signal(signo: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST.store(signo, Ordering::SeqCst);
    RECEIVED.fetch_add(1, Ordering::SeqCst);
    if let Some(wake) = WAKE.get() {
        let _ = wake.write(1);
    }
}

/// Makes SIGINT, SIGTERM and SIGHUP stop a running VM cleanly instead of killing
/// the process.
pub fn install() {
    if let Ok(wake) = EventFd::new(0) {
        let _ = WAKE.set(wake);
    }
    for s in HANDLED {
        let _ = vmm_sys_util::signal::register_signal_handler(s, on_signal);
    }
}

/// How many of those signals arrived so far.
pub fn received() -> u64 {
    RECEIVED.load(Ordering::SeqCst)
}

/// Blocks until one of those signals has arrived (at once if one already did).
pub fn wait() {
    while received() == 0 {
        match WAKE.get() {
            // A signal between the check and the read leaves the counter set:
            // the read returns at once.
            Some(wake) => {
                let _ = wake.read();
            }
            // Not installed (or no eventfd): look again now and then.
            None => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// The latest signal that arrived (0 before any).
pub fn last() -> i32 {
    LAST.load(Ordering::SeqCst)
}

/// The signal's name, for stop lines.
pub fn name(signo: i32) -> &'static str {
    match signo {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
