//! The command-line contract: `images`, `run --batch` for every image, multiboot
//! with modules, `caps` and `bench`.

mod common;

use std::process::Command;

use common::kvm_available;

fn vmiscope(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmiscope")).args(args).output().unwrap();
    let r = (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    eprintln!("{}{}", r.1, r.2);
    r
}

#[test]
fn images_lists_and_exports_every_image() {
    let (code, out, _) = vmiscope(&["images"]);
    assert_eq!(code, Some(0));
    for name in ["hello", "ept-write", "ept-read", "ept-exec", "msr", "cr", "dtr", "xcr", "introcall", "int3", "step", "smp", "spin", "demo"] {
        assert!(out.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing");
    }
    let dir = std::env::temp_dir().join(format!("vmiscope-export-{}", std::process::id()));
    let (code, _, _) = vmiscope(&["images", "--export", dir.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    let elf = std::fs::read(dir.join("int3.elf")).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_batch_exits_zero_for_hello_and_every_event_image() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = vmiscope(&["run", "hello", "--batch"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("Hello from the vmiscope guest"));
    assert!(err.contains("[vmiscope] exits: io="), "per-class summary: {err}");
    assert!(err.contains("[vmiscope] stop: guest exited with status 0"));
    for i in vmiscope_images::IMAGES.iter().filter(|i| i.kind == vmiscope_images::Kind::EventClass) {
        let (code, _, err) = vmiscope(&["run", i.name, "--batch", "--timeout", "60"]);
        assert_eq!(code, Some(0), "{}: {err}", i.name);
    }
}

#[test]
fn multiboot_gets_its_command_line_modules_and_fw_cfg() {
    if !kvm_available() {
        return;
    }
    let m = std::env::temp_dir().join(format!("vmiscope-mod-{}", std::process::id()));
    std::fs::write(&m, b"initrd payload from the host").unwrap();
    let (code, out, _) = vmiscope(&[
        "run", "multiboot", "--batch", "--vcpus", "2", "--mem", "64", "--cmdline", "console=ttyS0 quiet",
        "--module", m.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&m);
    assert_eq!(code, Some(0));
    assert!(out.contains("magic 2badb002 (ok)"));
    assert!(out.contains("cmdline 'console=ttyS0 quiet'"));
    assert!(out.contains("1 module(s)") && out.contains("'initrd payload from the host'"), "{out}");
    assert!(out.contains("mem_upper 64512 KiB"));
    assert!(out.contains("fw_cfg signature QEMU, 2 cpu(s), 64 MiB"), "{out}");
}
