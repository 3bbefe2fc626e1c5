//! Kicking a vCPU out of KVM_RUN: a real-time signal whose handler sets
//! `immediate_exit` in the kvm_run page of the thread it lands on. A kick that
//! arrives just before KVM_RUN is not lost: KVM_RUN then returns EINTR at once.

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::kvm_run;

thread_local! {
    static RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: `run` is this thread's mapped kvm_run page, registered by
        // `register_thread` and cleared before the mapping goes away; a volatile
        // byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick handler once per process.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .expect("cannot install the vCPU kick signal handler");
    });
}

/// Makes kicks of the calling thread set `immediate_exit` in `run`.
pub fn register_thread(run: *mut kvm_run) {
    RUN.with(|r| r.set(run));
}

pub fn unregister_thread() {
    RUN.with(|r| r.set(std::ptr::null_mut()));
}

/// Sends a kick to `thread`.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill only sends a signal; `thread` is a joinable vCPU thread
    // that has not been joined yet (the VM joins its threads after the last kick).
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}
