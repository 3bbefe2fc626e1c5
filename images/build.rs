//! Builds every guest image from `guest/` with the system C compiler (gcc), as
//! freestanding ELF64 files with symbols, and generates the image table.
//!
//! Guest CPL0 code runs in KVM's instruction emulator on a PVM host, which cannot
//! execute SSE/x87/popcnt/endbr64 and friends: the flags below keep the compiler to
//! plain integer instructions.

use std::env;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

/// (name, C/asm sources besides the runtime, vCPUs, kind, summary)
const IMAGES: &[(&str, &[&str], u32, &str, &str)] = &[
    (
        "hello",
        &["hello.c"],
        1,
        "example",
        "greets on the serial line from CPL0 and CPL3",
    ),
    (
        "ept-write",
        &["ept_write.c"],
        1,
        "event",
        "writes to `ept_target` at CPL0 and CPL3",
    ),
    (
        "ept-read",
        &["ept_read.c"],
        1,
        "event",
        "reads `ept_secret` at CPL0 and CPL3",
    ),
    (
        "ept-exec",
        &["ept_exec.c"],
        1,
        "event",
        "executes `exec_target` (alone on its page) at CPL0 and CPL3",
    ),
    (
        "msr",
        &["msr.c"],
        1,
        "event",
        "writes and reads back LSTAR and SYSENTER_EIP",
    ),
    (
        "cr",
        &["cr.c"],
        1,
        "event",
        "writes CR0.WP, CR4.PGE and CR3",
    ),
    (
        "dtr",
        &["dtr.c"],
        1,
        "event",
        "loads another IDT and GDT (LIDT/LGDT) and back",
    ),
    (
        "xcr",
        &["xcr.c"],
        1,
        "event",
        "enables OSXSAVE and writes XCR0 (XSETBV), valid and invalid",
    ),
    (
        "introcall",
        &["introcall.c"],
        1,
        "event",
        "rings the introcall doorbell at CPL0 and CPL3",
    ),
    (
        "int3",
        &["int3.c"],
        1,
        "event",
        "calls `bp_target` 3x, then its own INT3 at CPL0 and CPL3",
    ),
    (
        "step",
        &["step.c"],
        1,
        "event",
        "a labelled CPL0 instruction run (`step_start`..`step_end`)",
    ),
    (
        "smp",
        &["smp.c"],
        2,
        "example",
        "every vCPU checks in; vCPU 0 waits for the others",
    ),
    (
        "spin",
        &["spin.c"],
        1,
        "bench",
        "benchmark loops (`spin_mode`, `spin_count`)",
    ),
    (
        "demo",
        &["demo.c"],
        1,
        "example",
        "rootkit-like acts: IDT, syscall table, LSTAR, CR4, IDTR, user page",
    ),
    (
        "multiboot",
        &["mb.S", "mb.c"],
        1,
        "example",
        "a multiboot v1 kernel that enters long mode itself",
    ),
    (
        "multiboot-low",
        &["mb.S", "mb.c"],
        1,
        "test",
        "the multiboot kernel linked at 0x8000, in low memory",
    ),
    (
        "hang",
        &["hang.c"],
        1,
        "test",
        "a CPL3 loop that never exits (watchdog/interrupt tests)",
    ),
    (
        "triple-fault",
        &["triple_fault.c"],
        1,
        "test",
        "loads an empty IDT and faults",
    ),
    (
        "vmcall",
        &["vmcall.c"],
        1,
        "test",
        "executes VMCALL at CPL0",
    ),
    (
        "port-garbage",
        &["port_garbage.c"],
        1,
        "test",
        "writes garbage to every I/O port",
    ),
    (
        "toctou",
        &["toctou.c"],
        2,
        "test",
        "vCPU 1 rewrites the store vCPU 0 executes (TOCTOU)",
    ),
];

const CFLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-std=gnu11",
    "-fno-strict-aliasing",
    "-Wall",
    "-Werror",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mno-sse",
    "-mno-mmx",
    "-mno-80387",
    "-mno-popcnt",
    "-march=x86-64",
    "-mtune=generic",
    "-fcf-protection=none",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-fno-builtin",
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,--no-warn-rwx-segments",
];

fn main() {
    let guest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("guest");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let cc = env::var("VMISCOPE_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    println!("cargo:rerun-if-changed=guest");
    println!("cargo:rerun-if-env-changed=VMISCOPE_GUEST_CC");
    let mut table = String::from("pub static IMAGES: &[Image] = &[\n");
    for (name, sources, vcpus, kind, summary) in IMAGES {
        let elf = out.join(format!("{name}.elf"));
        // The multiboot image is loaded linearly (a.out kludge): one contiguous segment.
        let multiboot = sources.contains(&"mb.S");
        let script = match (multiboot, *name) {
            (true, "multiboot-low") => "link-mb-low.ld",
            (true, _) => "link-mb.ld",
            _ => "link.ld",
        };
        let mut cmd = Command::new(&cc);
        cmd.args(CFLAGS)
            .args(multiboot.then_some("-Wl,-N"))
            .arg(format!("-T{}", guest.join(script).display()))
            .arg(format!("-I{}", guest.display()))
            .arg(guest.join("rt/start.S"))
            .arg(guest.join("rt/rt.c"));
        for s in *sources {
            cmd.arg(guest.join(s));
        }
        cmd.arg("-o").arg(&elf);
        let status = cmd.status().unwrap_or_else(|e| {
            panic!("cannot run `{cc}` to build the guest images ({e}); install gcc (apt-get install gcc)")
        });
        assert!(
            status.success(),
            "building guest image `{name}` failed: {cmd:?}"
        );
        let kind = match *kind {
            "example" => "Kind::Example",
            "event" => "Kind::EventClass",
            "bench" => "Kind::Bench",
            _ => "Kind::Test",
        };
        writeln!(
            table,
            "    Image {{ name: {name:?}, summary: {summary:?}, vcpus: {vcpus}, kind: {kind}, \
             elf: include_bytes!({:?}) }},",
            elf.display().to_string()
        )
        .unwrap();
    }
    table.push_str("];\n");
    std::fs::write(out.join("images.rs"), table).unwrap();
}
