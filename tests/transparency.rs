//! A guest sees what it would see without vmiscope: the CPU's own faults and
//! checks come first, policies leave a kernel's own set-up alone on every vCPU,
//! and the VMM's boot structures stay where the kernel is not.

mod common;

use common::kvm_available;

fn vmiscope(args: &[&str]) -> (Option<i32>, String, String) {
    common::vmiscope_cli(env!("CARGO_BIN_EXE_vmiscope"), args)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
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

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_multiboot_kernel_in_low_memory_gets_its_information_elsewhere() {
    if !kvm_available() {
        return;
    }
    // Linked at 0x8000, where the VMM used to keep the multiboot information
    // (the run was refused: "overlaps the VMM's boot area below 0x10000"). The
    // information now goes after the kernel and its modules, as QEMU puts it.
    let m = std::env::temp_dir().join(format!("vmiscope-lowmod-{}", std::process::id()));
    std::fs::write(&m, b"low module").unwrap();
    let (code, out, err) = vmiscope(&[
        "run",
        "multiboot-low",
        "--batch",
        "--cmdline",
        "console=ttyS0",
        "--module",
        m.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&m);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("magic 2badb002 (ok)"), "{out}");
    assert!(out.contains("cmdline 'console=ttyS0'"), "{out}");
    assert!(
        out.contains("1 module(s)") && out.contains("'low module'"),
        "{out}"
    );
    // What the VMM really uses is still guarded: the GDT and TSS page.
    assert!(out.contains("multiboot: done"), "{out}");
}
