//! A guest sees what it would see without vmiscope: the CPU's own faults and
//! checks come first, policies leave a kernel's own set-up alone on every vCPU,
//! and the VMM's boot structures stay where the kernel is not.

mod common;

use common::kvm_available;

fn vmiscope(args: &[&str]) -> (Option<i32>, String, String) {
    common::vmiscope_cli(env!("CARGO_BIN_EXE_vmiscope"), args)
}

#[test]
fn a_denied_wrmsr_of_a_value_the_cpu_rejects_still_raises_gp() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = vmiscope(&["run", "msr", "--batch", "--protect", "syscall-msrs"]);
    assert_eq!(code, Some(0), "{err}");
    // The policy denies LSTAR writes by dropping them; a non-canonical LSTAR is
    // a #GP on the CPU before any policy (it used to be a silent "ok").
    assert!(
        out.contains("LSTAR-noncanonical (c0000082) before ffffffff81c00000, wrmsr 800000000000: #GP, reads back ffffffff81c00000"),
        "{out}"
    );
}
