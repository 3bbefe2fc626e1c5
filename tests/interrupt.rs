//! Ctrl-C ends the run it interrupted, not every later run in the process (`caps`
//! and `bench` build several VMs in one process). Its own test binary: a SIGINT
//! reaches every VM running in the process, so no other test may share it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{config, image, kvm_available};
use vmiscope_vmm::{PassThrough, StopReason, Vm};

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_ctrl_c_ends_the_running_vm_and_not_the_next_one() {
    if !kvm_available() {
        return;
    }
    vmiscope_vmm::signals::install();
    // The first VM spins until Ctrl-C.
    let cfg = config(1);
    let vm = Vm::new(&cfg, image("hang")).unwrap();
    let shared = vm.shared().clone();
    let runner = std::thread::spawn(move || vm.run(Arc::new(PassThrough), &cfg));
    // Wait until it runs its endless loop (its serial line), not a fixed time.
    while !shared.serial().text().contains("endless") && !runner.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: raising a signal whose handler is installed (it only sets a flag).
    unsafe { libc::raise(libc::SIGINT) };
    let first = runner.join().unwrap();
    assert_eq!(first.reason, StopReason::Signal(libc::SIGINT));
    // The second VM must run until its own end: here its timeout (it outlives
    // several watchdog rounds, which is where a stale Ctrl-C would stop it).
    let mut cfg = config(1);
    cfg.timeout = Some(Duration::from_millis(300));
    let out = Vm::new(&cfg, image("hang"))
        .unwrap()
        .run(Arc::new(PassThrough), &cfg);
    assert!(
        matches!(out.reason, StopReason::Timeout { .. }),
        "the second run ended with: {}",
        out.reason
    );
}
