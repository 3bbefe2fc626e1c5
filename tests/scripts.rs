//! Every example script in scripts/ passes on real KVM; a failing `expect` makes the
//! run fail with a report of what was seen instead; a malformed script is refused.

mod common;

use common::{host, kvm_available, not_run_here, vmiscope_cli};

fn vmiscope(args: &[&str]) -> (Option<i32>, String, String) {
    vmiscope_cli(env!("CARGO_BIN_EXE_vmiscope"), args)
}

fn run_example(image: &str, path: &std::path::Path) {
    let (code, out, _) = vmiscope(&["run", image, "--script", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{}: {out}", path.display());
    assert!(out.contains(" 0 failed"), "{out}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_xcr_script_passes() {
    if !kvm_available() || not_run_here(!host().debug().xsetbv, common::NO_XSETBV) {
        return;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/xcr.vms");
    run_example("xcr", &path);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn every_script_in_scripts_passes() {
    if !kvm_available() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "vms") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let image = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# image: "))
            .expect("first line names the image");
        n += 1;
        if image == "xcr" {
            continue; // its own test: not every host sees XSETBV
        }
        run_example(image, &path);
    }
    assert!(
        n >= 12,
        "one script per event class and the demo ({n} found)"
    );
}

/// Runs `text` as a script on `image` (from a temporary file): status, stdout, stderr.
fn run_script(image: &str, name: &str, text: &str) -> (Option<i32>, String, String) {
    let p = std::env::temp_dir().join(format!("vmiscope-{name}-{}.vms", std::process::id()));
    std::fs::write(&p, text).unwrap();
    let r = vmiscope(&["run", image, "--script", p.to_str().unwrap()]);
    let _ = std::fs::remove_file(&p);
    r
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_failing_expectation_fails_the_run_with_a_report() {
    if !kvm_available() {
        return;
    }
    let (code, out, _) = run_script(
        "msr",
        "fail",
        "hook msr 0xc0000082 w log\nexpect alert msr timeout 2\nexpect exit 3\n",
    );
    assert_eq!(code, Some(1));
    assert!(
        out.contains("FAILED")
            && out.contains("no msr alert before the run ended (guest exited with status 0)"),
        "{out}"
    );
    assert!(
        out.contains("exit status 0 (guest exited with status 0), expected 3"),
        "{out}"
    );
    assert!(out.contains("0 held, 2 failed"), "{out}");
    let (code, _, err) = run_script("msr", "bad", "hooks\nhook msr\nfrobnicate\n");
    assert_eq!(code, Some(2), "a malformed script runs nothing");
    assert!(err.contains(":2: `hook msr` expects an MSR index"), "{err}");
    assert!(err.contains(":3: unknown command `frobnicate`"), "{err}");
    // A script for another image is refused before it runs (it would time
    // out expectation after expectation).
    let (code, _, err) = run_script("hello", "other", "# image: demo\nexpect alert msr\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("is written for image `demo`, not `hello`"),
        "{err}"
    );
}

/// Registers work where numbers go in a script as in the REPL: `$rsp`,
/// `$rsp-8`, `$rip+1` (the README's `x/4gx $rsp` exited 2 in a script, and
/// `$reg-N` was refused everywhere); an unknown one is refused before the run.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn registers_stand_for_numbers_in_scripts_with_an_offset_either_way() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = run_script(
        "hello",
        "regs",
        "x/2gx $rsp\n\
         mem write $rsp-8 11 22 33 44 55 66 77 88\n\
         expect mem $rsp-8 = 1122334455667788\n\
         expect mem $rsp-0x7 = 22334455\n\
         disasm $rip+0 1\n",
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("2 held, 0 failed"), "{out}");
    // The script ends with its real reason (it said "stopped by the user").
    assert!(
        out.contains("(the script's last line ran, the guest still paused)"),
        "{out}"
    );
    let (code, _, err) = run_script("hello", "badreg", "x/2gx $nosuch-8\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`$nosuch-8` is not a register"), "{err}");
}

/// The console follows the vCPU that stopped, as gdb does: after vCPU 1
/// hits a breakpoint in `ap_main` (only the APs run it), `expect reg`,
/// `regs` and `step` act on vCPU 1. They acted on vCPU 0 before.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_console_follows_the_vcpu_that_stopped() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = run_script(
        "smp",
        "follow",
        "hook bp ap_main\n\
         break event breakpoint\n\
         continue\n\
         expect event breakpoint timeout 30\n\
         expect reg rip = ap_main\n\
         regs\n\
         step\n\
         expect reg cpl = 0\n\
         vcpu 0\n\
         regs\n",
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("3 held, 0 failed"), "{out}");
    // `regs` after the stop names vCPU 1 and its RIP in ap_main.
    assert!(out.contains("vCPU 1") || out.contains("vcpu 1"), "{out}");
}

/// `mem find` takes integers and pointers as pwndbg's `search` does: `-q`
/// a little-endian quadword, `-p` a pointer named by a symbol, `-d`/`-w`/`-b`
/// narrower ones; a value too wide for its flag is refused.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn mem_find_takes_integers_and_pointers() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = run_script(
        "demo",
        "find",
        "mem write 0x300008 20 02 10 00 00 00 00 00 phys\n\
         mem find -p kprintf 0x2ff000 0x2000 phys\n\
         mem find -q 0x100220 0x300000 0x100 phys\n\
         mem find -w 0x220 0x300000 0x100 phys\n\
         mem find -q 0x100221 0x300000 0x100 phys\n",
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.matches("       0x300008").count(), 3, "{out}");
    assert!(out.contains("not found"), "{out}");
    let (code, _, err) = run_script("demo", "find-bad", "mem find -b 0x1ff\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not fit in 1 byte"), "{err}");
}

/// `tele ADDR [N]` follows each slot as a pointer chain, as pwndbg's
/// telescope: links named by their symbols, a string shown, a loop said,
/// small values not taken for pointers.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn tele_follows_pointer_chains_with_symbols_strings_and_loops() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = run_script(
        "demo",
        "tele",
        "hook bp kprintf\n\
         break event breakpoint\n\
         continue\n\
         expect event breakpoint timeout 20\n\
         tele $rsp 1\n\
         mem write 0x300000 10 00 30 00 00 00 00 00 00 00 30 00 00 00 00 00 phys\n\
         mem write 0x300010 48 65 6c 6c 6f 21 00 00 00 00 00 00 00 00 00 00 phys\n\
         tele 0x300000 3\n\
         mem write 0x300000 08 00 30 00 00 00 00 00 phys\n\
         tele 0x300000 1\n",
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("00:0000│ 0x"), "{out}");
    assert!(out.contains(" <main+0x"), "the return address: {out}");
    assert!(out.contains("0x300000 —▸ 0x300010 \"Hello!\""), "{out}");
    assert!(out.contains("02:0010│ 0x300010 ◂— 0x216f6c6c6548"), "{out}");
    assert!(
        out.contains("0x300000 —▸ 0x300008 —▸ 0x300000 (loop)"),
        "{out}"
    );
}

/// One rule for debug-register breakpoints: on a kernel that maps its own
/// text U/S=1 (the multiboot image), a hidden breakpoint takes a debug
/// register as `hbreak` does. It took the trapped-page path: thousands of
/// exec faults and kicks, and on 2 vCPUs 3 of kprintf's 8 calls were seen.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_hidden_breakpoint_on_a_small_kernels_user_mapped_text_takes_a_debug_register() {
    if !kvm_available() || not_run_here(!host().dr_breakpoints_at(0), common::NO_DR_BREAKPOINTS) {
        return;
    }
    let p = std::env::temp_dir().join(format!("vmiscope-mbbp-{}.vms", std::process::id()));
    std::fs::write(&p, "hook bp kprintf\ncontinue\nexpect exit 0\nstats\n").unwrap();
    let (code, out, err) = vmiscope(&[
        "run",
        "multiboot",
        "--vcpus",
        "2",
        "--script",
        p.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&p);
    assert_eq!(code, Some(0), "{out}{err}");
    let exits = out
        .lines()
        .find(|l| l.trim_start().starts_with("exits:"))
        .unwrap_or_else(|| panic!("no exit counts: {out}"));
    let calls = out.matches("multiboot: ").count().min(8);
    assert!(
        exits.contains(" breakpoint=8 "),
        "every kprintf call seen ({calls}): {exits}"
    );
    assert!(!exits.contains("exec-fault"), "no trapped page: {exits}");
}

/// `mem write` over one of our INT3s changes the byte the breakpoint will put
/// back, and the INT3 stays; deleting the hook then leaves the written byte.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_memory_write_under_a_breakpoint_keeps_it_and_updates_the_original() {
    if !kvm_available() {
        return;
    }
    let (code, out, _) = run_script(
        "hello",
        "bpw",
        "hook bp rt_ncpus visible\n\
         expect mem rt_ncpus = cc\n\
         mem write rt_ncpus 05\n\
         expect mem rt_ncpus = cc\n\
         hook delete 1\n\
         expect mem rt_ncpus = 05\n\
         continue\n\
         expect exit 0\n",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("4 held, 0 failed"), "{out}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn hooks_on_pages_the_cpu_itself_uses_need_force() {
    if !kvm_available() {
        return;
    }
    // At entry vCPU 0 runs on the VMM's page tables (root 0x1000) and stack
    // (0x7ff0). A read/write hook on the root used to be accepted and the
    // guest triple-faulted on its first instruction with no word.
    let (code, out, _) = run_script(
        "hello",
        "cpu-pages",
        "hook ept 0x1000 0x1000 rw log\nhook gva 0x7fe0 16 w log\nhook ept 0x300000 0x1000 x log\ncontinue\nexpect exit 0\n",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("gpa 0x1000 is vCPU 0's live page-table root (CR3)") && out.contains("force"),
        "{out}"
    );
    assert!(
        out.contains("gpa 0x7000 is vCPU 0's current stack"),
        "{out}"
    );
    // A page beside them is fine: the guest runs.
    assert!(out.contains("hook 1 added"), "{out}");
    assert!(out.contains("1 held, 2 failed"), "{out}");
    // `force` hooks it anyway, with the warning.
    let (_, out, _) = run_script(
        "hello",
        "cpu-force",
        "hook ept 0x1000 0x1000 rw log force\n",
    );
    assert!(out.contains("warning (forced): gpa 0x1000"), "{out}");
    assert!(out.contains("hook 1 added"), "{out}");
    // A range as wide as RAM holds pages the guest takes later (stacks, page
    // tables): warned about (it was accepted in silence, and crawled or
    // killed the guest); a small one is not.
    let (_, out, _) = run_script(
        "hello",
        "cpu-wide",
        "hook ept 0x400000 0x7c00000 w log\nhook ept 0x300000 0x1000 w log\n",
    );
    assert!(out.contains("warning: this hook spans 124 MiB"), "{out}");
    assert_eq!(out.matches("warning").count(), 1, "{out}");
}
