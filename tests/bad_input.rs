//! Bad input gets a clear error and a non-zero status, never a hang or a panic:
//! malformed images, guests that triple-fault, spin, livelock or write garbage.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmiscope_vmm::{LoadError, Vm, VmError};

fn vmiscope() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmiscope"))
}

fn load_err(image: &[u8]) -> LoadError {
    match Vm::new(&config(1), image) {
        Err(VmError::Image(e)) => e,
        Err(e) => panic!("expected an image error, got {e}"),
        Ok(_) => panic!("expected an image error, got a VM"),
    }
}

fn patched(name: &str, at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut v = image(name).to_vec();
    v[at..at + bytes.len()].copy_from_slice(bytes);
    v
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn malformed_images_are_refused_with_a_reason() {
    if !kvm_available() {
        return;
    }
    assert_eq!(load_err(b""), LoadError::Empty);
    assert!(matches!(
        load_err(b"MZ\x90\x00 this is not an ELF file"),
        LoadError::UnknownFormat(_)
    ));
    assert!(
        matches!(load_err(&image("hello")[..100]), LoadError::Malformed(_)),
        "truncated"
    );
    // e_machine = AArch64
    assert!(matches!(
        load_err(&patched("hello", 18, &183u16.to_le_bytes())),
        LoadError::WrongMachine(_)
    ));
    // e_ident[EI_CLASS] = ELFCLASS32, no multiboot header
    assert!(matches!(
        load_err(&patched("hello", 4, &[1])),
        LoadError::UnknownFormat(_)
    ));
    // e_entry far outside every segment
    assert_eq!(
        load_err(&patched("hello", 24, &0x7000_0000u64.to_le_bytes())),
        LoadError::EntryOutside(0x7000_0000)
    );
    // First program header's p_paddr beyond RAM (program headers start at 64).
    let e = load_err(&patched("hello", 64 + 24, &0xf000_0000u64.to_le_bytes()));
    assert!(matches!(e, LoadError::TooBig { .. }), "{e}");
    assert!(
        e.to_string().contains("--mem"),
        "the message says what to do: {e}"
    );
    // ... and into the VMM's boot area.
    assert!(matches!(
        load_err(&patched("hello", 64 + 24, &0x1000u64.to_le_bytes())),
        LoadError::OverlapsBootArea(..)
    ));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_cli_reports_bad_images_and_options_without_panicking() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmiscope-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("empty.elf", vec![], "the image is empty"),
        (
            "trunc.elf",
            image("hello")[..200].to_vec(),
            "truncated or malformed",
        ),
        (
            "big.elf",
            patched("hello", 64 + 32 + 8, &0x4000_0000u64.to_le_bytes()),
            "beyond the",
        ),
    ];
    for (name, data, want) in cases {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let out = vmiscope()
            .args(["run", p.to_str().unwrap(), "--batch"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = vmiscope()
        .args(["run", "no-such-image", "--batch"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vmiscope images"));
    let out = vmiscope()
        .args(["run", "hello", "--batch", "--vcpus", "9"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vcpus must be"));
    let out = vmiscope()
        .args(["run", "multiboot", "--batch", "--module", "/nonexistent"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read module"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_cli(args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let t = Instant::now();
    let out = vmiscope().args(args).output().unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("{o}{e}");
    (out.status.code(), o, e, t.elapsed())
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_triple_fault_is_a_clear_stop() {
    if !kvm_available() {
        return;
    }
    let (code, _, err, _) = run_cli(&["run", "triple-fault", "--batch"]);
    assert_eq!(code, Some(4));
    assert!(err.contains("triple-faulted"), "{err}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_cpl3_spin_is_stopped_by_the_timeout() {
    if !kvm_available() {
        return;
    }
    // (Ctrl-C and the other signals: tests/signals.rs.)
    let (code, _, err, took) = run_cli(&["run", "hang", "--batch", "--timeout", "1"]);
    assert_eq!(code, Some(124), "{err}");
    assert!(err.contains("timeout") && err.contains("CPL3"), "{err}");
    assert!(took < Duration::from_secs(10));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn vmcall_at_cpl0_is_a_ud_or_a_detected_livelock() {
    if !kvm_available() {
        return;
    }
    // Default: the fix-hypercall quirk is off, so the guest gets #UD and says so.
    let (code, out, _, _) = run_cli(&["run", "vmcall", "--batch", "--timeout", "20"]);
    if vmiscope_vmm::HostKind::detect() == vmiscope_vmm::HostKind::Pvm {
        assert_eq!(code, Some(253), "guest exit 0x7e");
        assert!(out.contains("FATAL exception 6"), "{out}");
        // With the quirk kept, the vCPU livelocks and the watchdog stops it.
        let (code, _, err, took) = run_cli(&[
            "run",
            "vmcall",
            "--batch",
            "--hypercall-quirk",
            "--timeout",
            "30",
        ]);
        assert_eq!(code, Some(8), "{err}");
        assert!(err.contains("livelocked"), "{err}");
        assert!(took < Duration::from_secs(15), "{took:?}");
    } else {
        // Hardware KVM completes the hypercall (ENOSYS) and the guest reports it.
        assert!(
            out.contains("vmcall: returned") || out.contains("FATAL exception 6"),
            "{out}"
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn garbage_on_every_port_does_not_hurt_the_vmm() {
    if !kvm_available() {
        return;
    }
    let (code, out, err, _) = run_cli(&["run", "port-garbage", "--batch", "--timeout", "120"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("port-garbage: survived"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn timeouts_too_large_for_the_clock_are_refused_not_a_panic() {
    if !kvm_available() {
        return;
    }
    for t in ["1e300", "inf", "nan", "0"] {
        let out = vmiscope()
            .args(["run", "hello", "--batch", "--timeout", t])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--timeout {t}: {err}");
        assert!(err.contains("--timeout must be"), "--timeout {t}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // The same bound in a script's `expect … timeout`: a parse error, exit 2.
    let script = std::env::temp_dir().join(format!("vmiscope-inf-{}.vms", std::process::id()));
    std::fs::write(&script, "expect exit 0 timeout inf\n").unwrap();
    let out = vmiscope()
        .args(["run", "hello", "--script", script.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&script);
    let all =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!all.contains("panicked"), "{all}");
    assert!(all.contains("timeout SECS"), "{all}");
    assert_ne!(out.status.code(), Some(0), "{all}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_tui_without_a_terminal_falls_back_to_the_repl() {
    if !kvm_available() {
        return;
    }
    use std::io::Write as _;
    // `--tui` with stdin a pipe, and `tui` typed into that REPL: both used to
    // panic inside the terminal library.
    let mut child = vmiscope()
        .args(["run", "hello", "--tui"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"tui\nregs\nquit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let all =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!all.contains("panicked"), "{all}");
    assert_eq!(all.matches("the TUI needs a terminal").count(), 2, "{all}");
    assert!(all.contains("rip"), "the REPL ran the commands: {all}");
    assert_eq!(out.status.code(), Some(0), "quit ends the run: {all}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn endless_image_and_module_files_are_refused_not_read_whole() {
    if !kvm_available() {
        return;
    }
    for args in [
        &["run", "/dev/zero", "--batch"][..],
        &["run", "multiboot", "--batch", "--module", "/dev/zero"][..],
    ] {
        let mut child = vmiscope()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Reading stops one byte past the guest's RAM: an error in well under a
        // second. The old code read until memory ran out.
        let t = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if t.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("larger than the guest's 128 MiB"),
            "{args:?}: {err}"
        );
    }
}

/// Runs `vmiscope ARGS…` on `elf` written to a file, under a memory limit (a
/// length from the image that reached an allocation would abort or eat the host).
fn run_image(elf: &[u8], tag: &str, args: &[&str]) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!("vmiscope-img-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("image.elf");
    std::fs::write(&path, elf).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -v 4000000; exec "$@""#)
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_vmiscope"))
        .args(["run", path.to_str().unwrap(), "--batch", "--timeout", "20"])
        .args(args)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{tag}: {err}");
    (out.status.code(), err)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn sizes_and_ranges_from_image_symbols_are_checked_before_use() {
    if !kvm_available() {
        return;
    }
    let demo = image("demo");
    // A sys_table "size" of 2^63-1 used to abort the process (a 9 EB allocation)
    // for `integrity`, and to grow a Vec until memory ran out for `syscall-table`.
    let huge = common::with_symbol(demo, "sys_table", None, Some(i64::MAX as u64));
    for policy in ["integrity", "syscall-table"] {
        let (code, err) = run_image(&huge, policy, &["--protect", policy]);
        assert_eq!(code, Some(2), "{policy}: {err}");
        assert!(
            err.contains(&format!(
                "policy {policy}: the image gives no valid address"
            )) && err.contains("sys_table")
                && err.contains("larger than guest RAM"),
            "{policy}: {err}"
        );
    }
    // Kernel text ending below its start used to install no hook and say nothing.
    let bent = common::with_symbol(demo, "__ktext_end", Some(0x1000), None);
    let (code, err) = run_image(&bent, "ktext", &["--protect", "kernel-code"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("__ktext_end ends below its start"), "{err}");
    // `all` on the same image refuses too: it names kernel text, wrongly.
    let (code, _) = run_image(&bent, "all", &["--protect", "all"]);
    assert_eq!(code, Some(2));
    // Without the policies that need them the image runs.
    let (code, err) = run_image(&bent, "none", &["--protect", "syscall-msrs"]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn program_headers_counted_by_pn_xnum_are_refused() {
    if !kvm_available() {
        return;
    }
    // hello with its program headers moved to the end of the file, one PT_LOAD
    // more onto the boot page tables (0x1000), padded with PT_NULLs to 0xffff
    // entries, e_phnum = PN_XNUM and section 0's sh_info = the original count.
    // The checks (object) saw the original headers, the load (linux-loader) all
    // of them, so the extra segment used to land unchecked.
    let elf = image("hello");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (phoff, phnum, shoff) = (u64_at(0x20) as usize, u16_at(0x38) as usize, u64_at(0x28));
    let mut out = elf.to_vec();
    while !out.len().is_multiple_of(8) {
        out.push(0);
    }
    let table = out.len();
    out.extend_from_slice(&elf[phoff..phoff + phnum * 56]);
    let mut extra = [0u8; 56];
    extra[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    extra[4..8].copy_from_slice(&4u32.to_le_bytes()); // PF_R
    extra[16..24].copy_from_slice(&0x1000u64.to_le_bytes()); // p_vaddr
    extra[24..32].copy_from_slice(&0x1000u64.to_le_bytes()); // p_paddr
    extra[32..40].copy_from_slice(&0x100u64.to_le_bytes()); // p_filesz
    extra[40..48].copy_from_slice(&0x100u64.to_le_bytes()); // p_memsz
    out.extend_from_slice(&extra);
    out.resize(table + 0xffff * 56, 0);
    out[0x20..0x28].copy_from_slice(&(table as u64).to_le_bytes());
    out[0x38..0x3a].copy_from_slice(&0xffffu16.to_le_bytes());
    // Section 0's sh_info (offset 44 in its header).
    let sh0 = shoff as usize + 44;
    out[sh0..sh0 + 4].copy_from_slice(&(phnum as u32).to_le_bytes());
    let e = load_err(&out);
    assert!(
        matches!(&e, LoadError::Malformed(m) if m.contains("PN_XNUM")),
        "{e}"
    );
}

/// A reader that goes away from stdout and stderr both does not panic the run
/// (`vmiscope run hello --batch 2>&1 | grep -m1 Hello` exited 101:
/// `eprintln!` on the closed stderr). The run still ends with its own status.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_closed_stderr_is_no_panic() {
    if !common::kvm_available() {
        return;
    }
    let exe = env!("CARGO_BIN_EXE_vmiscope");
    for args in ["run hello --batch", "run demo --protect all --batch"] {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{exe} {args} 2>&1 | grep -m1 -q 'vmiscope\\|Hello'; echo \"status ${{PIPESTATUS[0]}}\""
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("status 0"), "{args}: {text}");
    }
}

/// A journal that cannot be written is the run's failure, said at once: one
/// that cannot take its header is refused before the run (`/dev/full`), and a
/// write that fails later (a file-size limit standing in for a full disk)
/// ends the run with the reason. Before, both ran to exit 0, every record lost.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_journal_write_error_ends_the_run_as_its_failure() {
    if !common::kvm_available() {
        return;
    }
    let (code, _, err, _) = run_cli(&["run", "demo", "--batch", "--journal", "/dev/full"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cannot create /dev/full: No space left"),
        "{err}"
    );
    let dir = common::temp_dir("journal-full");
    let j = dir.join("j.jsonl");
    let exe = env!("CARGO_BIN_EXE_vmiscope");
    // SIGXFSZ ignored: the write past the limit fails with EFBIG instead.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 4; exec {exe} run demo --protect all --batch --journal {}",
            j.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be written: File too large") && err.contains("the run ends"),
        "{err}"
    );
    assert_ne!(out.status.code(), Some(0), "{err}");
}
