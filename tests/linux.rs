//! Debian's stock cloud kernel (`linux-image-*-cloud-amd64`, unpacked by
//! `.ci/run` under `target/linux` with apt, no other source): its symbols from
//! the kernel alone, and a protected boot on this host.
//!
//! Ignored where the package is not unpacked (outside CI); under `CI=true`
//! nothing is ignored. On a PVM host the kernel runs in KVM's emulator: the
//! boot test waits at most 120 s for the banner and 400 s for each later
//! milestone (measured here: the banner ~25 s, when the console registers; the
//! final IDT ~35 s; SMEP/SMAP ~45 s).

mod common;

use std::path::PathBuf;
use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_vmiscope");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/linux")
}

/// The unpacked package's bzImage.
fn kernel() -> PathBuf {
    vmlinuz_in(&root().join("boot"))
        .expect("no vmlinuz-* in target/linux/boot (run .ci/run to unpack Debian's kernel)")
}

/// The `vmlinuz-*` in a package's unpacked `boot` directory.
fn vmlinuz_in(boot: &std::path::Path) -> Option<PathBuf> {
    std::fs::read_dir(boot).ok()?.find_map(|e| {
        let p = e.ok()?.path();
        let name = p.file_name()?.to_string_lossy().into_owned();
        name.starts_with("vmlinuz-").then_some(p)
    })
}

/// The -dbg package's System.map (the reference; vmiscope does not use it).
fn debug_map() -> PathBuf {
    let v = kernel()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace("vmlinuz-", "");
    root().join(format!("dbg/usr/lib/debug/boot/System.map-{v}"))
}

/// `vmiscope symbols IMAGE [--symbols MAP]` as (name, address) pairs.
fn symbols(args: &[&str]) -> Vec<(String, u64)> {
    let out = Command::new(EXE)
        .arg("symbols")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (a, n) = l.split_once(' ')?;
            Some((n.to_string(), u64::from_str_radix(a, 16).ok()?))
        })
        .collect()
}

fn address(syms: &[(String, u64)], name: &str) -> u64 {
    syms.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no symbol {name}"))
        .1
}

#[test]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn kallsyms_from_the_kernel_alone_agree_with_the_debug_packages_system_map() {
    let k = kernel();
    let ours = symbols(&[k.to_str().unwrap()]);
    let map = std::fs::read_to_string(debug_map()).expect("the -dbg System.map");
    let mut reference = std::collections::HashMap::<&str, Vec<u64>>::new();
    for l in map.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if let [a, _, n] = w[..] {
            reference
                .entry(n)
                .or_default()
                .push(u64::from_str_radix(a, 16).unwrap());
        }
    }
    // Every name kallsyms keeps is in the map at the same address.
    assert!(ours.len() > 50_000, "only {} symbols", ours.len());
    let wrong: Vec<_> = ours
        .iter()
        .filter(|(n, a)| !reference.get(n.as_str()).is_some_and(|v| v.contains(a)))
        .take(10)
        .collect();
    assert!(wrong.is_empty(), "disagree with System.map: {wrong:x?}");
    for name in [
        "start_kernel",
        "entry_SYSCALL_64",
        "sys_call_table",
        "idt_table",
        "init_task",
    ] {
        assert!(reference[name].contains(&address(&ours, name)), "{name}");
    }
    // And a System.map given with --symbols is read as is.
    let given = symbols(&[
        k.to_str().unwrap(),
        "--symbols",
        debug_map().to_str().unwrap(),
    ]);
    assert!(given.len() >= ours.len());
}

/// Every Debian flavour's kallsyms are found in the kernel alone: cloud,
/// generic and PREEMPT_RT (whose tables are laid out differently: in 6.1.0-48
/// its token table followed the previous table with no padding, and none was
/// found). Each gives the symbols the policies and `ps` need, in the kernel's
/// text and data, in order.
#[test]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn every_debian_flavours_kallsyms_are_read_from_the_kernel_alone() {
    let mut kernels = vec![kernel()];
    kernels.extend(["generic", "rt"].into_iter().filter_map(flavour));
    for k in kernels {
        let ours = symbols(&[k.to_str().unwrap()]);
        let at = |name: &str| {
            ours.iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{}: no symbol {name}", k.display()))
                .1
        };
        assert!(
            ours.len() > 50_000,
            "{}: {} symbols",
            k.display(),
            ours.len()
        );
        let (text, etext) = (at("_stext"), at("_etext"));
        for name in ["entry_SYSCALL_64", "native_write_idt_entry"] {
            assert!((text..etext).contains(&at(name)), "{}: {name}", k.display());
        }
        let init = at("_sinittext")..at("_einittext");
        assert!(init.contains(&at("start_kernel")), "{}", k.display());
        for name in ["idt_table", "sys_call_table", "init_task"] {
            assert!(at(name) > etext, "{}: {name}", k.display());
        }
    }
}

/// A newc cpio archive with only its trailer: an initramfs with nothing in it.
/// A journal's JSON records, one per line.
/// The options of a protected boot: the memory Debian's kernel wants, every
/// policy, and room for a boot in KVM's emulator.
const PROTECTED: [&str; 6] = ["--mem", "512", "--protect", "all", "--timeout", "900"];

/// `vmiscope run KERNEL ARGS… --script SCRIPT` to its end: stdout and stderr
/// together, once the run held every expectation (exit 0; on failure the text
/// shows each expectation and the serial tail it saw).
fn run_script(args: &[&str], script: &std::path::Path) -> String {
    run_script_on(&kernel(), args, script)
}

/// `run_script` on another kernel.
fn run_script_on(kernel: &std::path::Path, args: &[&str], script: &std::path::Path) -> String {
    let out = Command::new(EXE)
        .arg("run")
        .arg(kernel)
        .args(args)
        .args(["--script", script.to_str().unwrap()])
        .output()
        .unwrap();
    let mut text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(0)
        && let Some(j) = args.iter().position(|a| *a == "--journal")
        && let Ok(journal) = std::fs::read_to_string(args[j + 1])
    {
        // The journal lives in a temporary directory (on the rig, inside
        // it): its last records go with the failure.
        let lines: Vec<&str> = journal.lines().collect();
        text += "\nlast journal records:\n";
        text += &lines[lines.len().saturating_sub(20)..].join("\n");
    }
    assert_eq!(out.status.code(), Some(0), "{text}");
    text
}

fn journal_records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn empty_cpio() -> Vec<u8> {
    cpio(&[])
}

/// A newc archive (what the kernel unpacks as its initramfs) of `(path, mode,
/// contents)`; directories have mode 0o040755 and no contents.
fn cpio(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let entries = files.iter().copied().chain([("TRAILER!!!", 0, &[][..])]);
    for (ino, (name, mode, data)) in entries.enumerate() {
        let head = format!(
            "070701{:08X}{mode:08X}{}{:08X}{:08X}{:08X}{}{:08X}",
            ino + 1,
            "00000000".repeat(2), // uid, gid
            1,                    // nlink
            0,                    // mtime
            data.len(),
            "00000000".repeat(4), // dev and rdev
            name.len() + 1,
        );
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(b"00000000"); // check
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    while out.len() % 512 != 0 {
        out.push(0);
    }
    out
}

/// A Linux kernel whose symbols are not found is said loudly, and the
/// policies that need them are not armed: before, they fell back to the
/// generic guest's rules, denied the kernel's own `lidt` of `idt_table`, and
/// Debian's PREEMPT_RT kernel (whose kallsyms were not found) triple-faulted.
/// A System.map that names none of the kernel's entry points stands in for
/// missing symbols here.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn a_linux_kernel_without_symbols_is_said_and_its_policies_do_not_kill_it() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::temp_dir("linux-no-symbols");
    let map = dir.join("System.map");
    let junk: String = (0..32)
        .map(|i| format!("ffffffff9000{i:04x} T unrelated_{i}\n"))
        .collect();
    std::fs::write(&map, junk).unwrap();
    let script = dir.join("boot.vms");
    // `Memory:` comes after setup_arch's switch to idt_table.
    std::fs::write(
        &script,
        "expect serial \"Linux version\" timeout 120\n\
         expect serial \"Memory:\" timeout 300\n\
         expect no-alert\n",
    )
    .unwrap();
    let extra = ["--symbols", map.to_str().unwrap()];
    let text = run_script(&[&PROTECTED[..], &extra].concat(), &script);
    assert!(
        text.contains("WARNING: no symbols found for this Linux kernel")
            && text.contains("syscall-msrs, kernel-code"),
        "{text}"
    );
    assert!(
        !text.contains("user-page"),
        "`all` leaves it out on Linux: {text}"
    );
}

/// The policies know the kernel's own code whichever source named its
/// symbols: with the -dbg package's System.map instead of the kallsyms, the
/// protected boot passes its text patching (alternatives) and IDT set-up
/// with no alert. The map keeps no sizes, and before they were taken from
/// the neighbours every writer was outside its (empty) function: 86,000
/// alerts in 120 s, `kernel code modified` by `memcpy_orig+0xec`.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn with_the_debug_packages_system_map_the_policies_raise_nothing_either() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::temp_dir("linux-system-map");
    let script = dir.join("boot.vms");
    std::fs::write(
        &script,
        "expect serial \"Linux version\" timeout 120\n\
         expect event dtr timeout 400\n\
         expect serial \"Freeing SMP alternatives\" timeout 400\n\
         expect no-alert\n",
    )
    .unwrap();
    let map = debug_map();
    let extra = ["--symbols", map.to_str().unwrap()];
    let text = run_script(&[&PROTECTED[..], &extra].concat(), &script);
    assert!(!text.contains("ALERT"), "{text}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn debian_kernel_boots_protected_and_a_syscall_table_patch_is_caught() {
    if !common::kvm_available() {
        return;
    }
    let k = kernel();
    let syms = symbols(&[k.to_str().unwrap()]);
    let dir = common::temp_dir("linux");
    let script = dir.join("boot.vms");
    let journal = dir.join("journal.jsonl");
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, empty_cpio()).unwrap();
    // Each milestone is the kernel's own: the banner, its LSTAR write
    // (syscall_init), its move of IDTR to the read-only alias (the last step of
    // its IDT set-up), then CPU feature set-up (SMEP/SMAP come with
    // identify_boot_cpu, just before alternatives are applied). None may be an
    // alert under every policy. Then a write to sys_call_table[1] from outside
    // the guest is caught on the next tick. The kernel also reports the initrd
    // it was given (an empty newc archive) where the e820 map put it.
    std::fs::write(
        &script,
        "expect serial \"Linux version\" timeout 120\n\
         expect serial \"RAMDISK: [mem\" timeout 120\n\
         expect event msr timeout 400\n\
         expect event dtr timeout 400\n\
         expect serial \"Freeing SMP alternatives\" timeout 400\n\
         expect no-alert\n\
         sregs\n\
         ps\n\
         lsmod\n\
         mem write sys_call_table+8 41 41 41 41 41 41 41 41\n\
         expect alert timeout 5\n\
         alerts\n",
    )
    .unwrap();
    let extra = [
        "--journal",
        journal.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ];
    let text = run_script(&[&PROTECTED[..], &extra].concat(), &script);
    assert!(
        text.contains("vmiscope added: console=ttyS0") || !text.contains("PVM"),
        "{text}"
    );
    // One vCPU gets a MADT too: the kernel sets up its IOAPIC (and later its
    // local APIC timer), not virtual-wire mode with the PIT as its only tick.
    assert!(
        !text.contains("MADT or MP tables are not detected") && !text.contains("virtual wire mode"),
        "a single vCPU without ACPI tables: {text}"
    );
    assert!(
        text.contains("sys_call_table[1] modified (sys_call_table+0x8)"),
        "{text}"
    );
    let records = journal_records(&journal);
    let event = |class: &str| {
        records
            .iter()
            .filter(|r| r["type"] == "event" && r["event"]["class"] == class)
            .collect::<Vec<_>>()
    };
    // The LSTAR write is the kernel's, to entry_SYSCALL_64, and allowed.
    let lstar = event("msr")
        .into_iter()
        .find(|r| r["event"]["index"] == "0xc0000082")
        .unwrap_or_else(|| panic!("no LSTAR write in the journal: {text}"));
    // Journal addresses are "0x…" strings (jq reads numbers as doubles).
    assert_eq!(
        lstar["event"]["write"],
        format!("{:#x}", address(&syms, "entry_SYSCALL_64"))
    );
    assert_eq!(lstar["verdict"], "allowed");
    // ... by the boot task, named from the kernel's BTF (before the scheduler
    // renames it swapper/0).
    let task = lstar["task"].as_str().unwrap_or_default();
    assert!(
        task.starts_with("swapper") && task.ends_with("[0]"),
        "{lstar}"
    );
    // IDTR moved from idt_table to the CPU entry area's read-only alias.
    let idt = event("dtr");
    assert!(
        idt.iter().any(|r| r["event"]["old"]["base"]
            == format!("{:#x}", address(&syms, "idt_table"))
            && r["event"]["new"]["base"] == "0xfffffe0000000000"),
        "{idt:?}"
    );
    // CR4 on the booted kernel: SMEP (bit 20) and SMAP (21) set.
    let cr4 = text
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "cr4")
                .nth(1)
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no cr4 in `sregs`: {text}"));
    let cr4 = u64::from_str_radix(cr4.trim_start_matches("0x"), 16).unwrap();
    assert_eq!(cr4 & (3 << 20), 3 << 20, "cr4 {cr4:#x}");
    // `ps` walks the task list with offsets from the kernel's BTF: the boot
    // task, init_task, is pid 0 and the scheduler has named it swapper/0.
    let init_task = format!("{:#x}", address(&syms, "init_task"));
    assert!(
        text.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.first() == Some(&"0")
                && w.contains(&init_task.as_str())
                && w.last() == Some(&"swapper/0")
        }),
        "{text}"
    );
    // `lsmod` walks the `modules` list by BTF: nothing is loaded this early
    // (modules come from user space, which cannot run on this host).
    assert!(text.contains("0 modules"), "{text}");
    let alerts: Vec<_> = records.iter().filter(|r| r["type"] == "alert").collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// On PVM a guest's SYSCALL stays at CPL3 (`images/guest/rt/rt.h`), so no user
/// space runs there: the user-space tests need hardware KVM (the rig, in CI).
fn user_space_cannot_run_here() -> bool {
    common::not_run_here(
        common::host().kind() == vmiscope_vmm::HostKind::Pvm,
        "user space cannot run on a PVM host (a guest's SYSCALL stays at CPL3: images/guest/rt/rt.h, kvm-host-probe.md); runs on the nested-SVM rig in CI",
    )
}

/// Debian's static busybox (`busybox-static`, which .ci/run installs).
fn static_busybox() -> Option<Vec<u8>> {
    let b = std::fs::read("/bin/busybox").ok();
    let ok = b.as_ref().is_some_and(|b| {
        b.starts_with(b"\x7fELF") && !b.windows(15).any(|w| w == b"/lib64/ld-linux")
    });
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but /bin/busybox is not the static busybox (busybox-static)");
    }
    let why = "no static /bin/busybox here (apt-get install busybox-static)";
    (!common::not_run_here(!ok, why)).then(|| b.unwrap())
}

/// The README's busybox recipe as a test, on a host where user space runs:
/// Debian's cloud kernel starts busybox as init from an initramfs made here,
/// under every policy. Its shell forks and reaps a child (exit status 3) and
/// leaves a `sleep` running; `ps` lists init and that child with the CR3 of
/// their page tables; a hidden breakpoint on `entry_SYSCALL_64` is hit from
/// user space (RCX holds the user RIP SYSCALL saved). No policy raises an
/// alert. Before the hypervisor bit the kernel spun in calibrate_delay here;
/// before TF went into R11 for a stepped SYSRET, the breakpoint never fired.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn busybox_runs_as_init_under_every_policy_and_its_syscalls_reach_the_entry() {
    if user_space_cannot_run_here() || !common::kvm_available() {
        return;
    }
    busybox_as_init(&kernel());
}

/// The same on Debian's generic kernel (`linux-image-amd64`, which .ci/run
/// unpacks under `target/linux/generic`): the flavour most users boot, with
/// every driver built in or as a module.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn the_generic_kernel_runs_busybox_as_init_too() {
    if user_space_cannot_run_here() || !common::kvm_available() {
        return;
    }
    let Some(generic) = generic_kernel() else {
        return;
    };
    busybox_as_init(&generic);
}

/// Debian's generic kernel, if .ci/run unpacked it (required under CI=true).
fn generic_kernel() -> Option<PathBuf> {
    flavour("generic")
}

/// The kernel of another Debian flavour (`generic`, `rt`), if .ci/run
/// unpacked its package's `boot/` under `target/linux/FLAVOUR` (required
/// under CI=true).
fn flavour(name: &str) -> Option<PathBuf> {
    let boot = root().join(name).join("boot");
    let found = vmlinuz_in(&boot);
    if found.is_none() && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "CI=true but {} holds no vmlinuz (.ci/run unpacks it)",
            boot.display()
        );
    }
    let why = format!(
        "Debian's {name} kernel is not unpacked under target/linux/{name} (.ci/run does it)"
    );
    if common::not_run_here(found.is_none(), &why) {
        return None;
    }
    found
}

/// Boots `kernel` with busybox as init under every policy (see the cloud
/// kernel's test) and checks its user space, its syscalls and `ps`.
fn busybox_as_init(kernel: &std::path::Path) {
    let Some(busybox) = static_busybox() else {
        return;
    };
    let flavour = kernel.file_name().unwrap().to_string_lossy();
    let dir = common::temp_dir(&format!("linux-busybox-{flavour}"));
    let init = "#!/bin/busybox sh\n\
                /bin/busybox --install -s /bin\n\
                mount -t proc proc /proc\n\
                echo \"init: user space up\"\n\
                cat /proc/version\n\
                sh -c 'exit 3'; echo \"init: child status $?\"\n\
                sleep 100000 &\n\
                echo \"init: looping\"\n\
                while :; do read x < /proc/uptime; done\n";
    let dirs = ["bin", "proc", "dev", "sys"].map(|d| (d, 0o040755, &[][..]));
    let mut files: Vec<(&str, u32, &[u8])> = dirs.to_vec();
    files.push(("bin/busybox", 0o100755, &busybox));
    files.push(("init", 0o100755, init.as_bytes()));
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, cpio(&files)).unwrap();
    let script = dir.join("busybox.vms");
    std::fs::write(
        &script,
        "expect serial \"Run /init\" timeout 600\n\
         expect serial \"init: child status 3\" timeout 300\n\
         expect serial \"init: looping\" timeout 300\n\
         expect no-alert\n\
         hook bp entry_SYSCALL_64\n\
         break event breakpoint\n\
         continue\n\
         expect event breakpoint timeout 120\n\
         expect reg rip = entry_SYSCALL_64\n\
         expect reg cpl = 0\n\
         regs\n\
         ps\n\
         expect no-alert\n",
    )
    .unwrap();
    let initrd = ["--initrd", initrd.to_str().unwrap()];
    let text = run_script_on(kernel, &[&PROTECTED[..], &initrd].concat(), &script);
    assert!(
        text.contains("guest| Linux version"),
        "cat /proc/version: {text}"
    );
    // One vCPU gets a MADT too: the kernel uses its IOAPIC and local APIC
    // timer, not the PIT through the 8259 in virtual-wire mode for good.
    assert!(
        !text.contains("MADT or MP tables are not detected") && !text.contains("virtual wire mode"),
        "a single vCPU without ACPI tables: {text}"
    );
    // SYSCALL saved the user RIP in RCX: a user address.
    let rcx = text
        .lines()
        .find_map(|l| l.split_whitespace().skip_while(|w| *w != "rcx").nth(1))
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .unwrap_or_else(|| panic!("no rcx in `regs`: {text}"));
    assert!(rcx < 0x0000_8000_0000_0000, "rcx {rcx:#x}: {text}");
    // `ps`: PID S CR3 TASK COMM; user tasks have a CR3, kernel threads `-`.
    // Busybox runs `sleep` in a forked shell without an exec, so the child is
    // another `init` (comm is the exec'd file's name).
    let tasks: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 5 && w[0].parse::<u32>().is_ok() && w[3].starts_with("0x"))
        .collect();
    let task = |comm: &str| {
        tasks
            .iter()
            .find(|w| w[4] == comm)
            .unwrap_or_else(|| panic!("no task {comm} in `ps`: {text}"))
    };
    assert_eq!(task("init")[0], "1", "{text}");
    let user: Vec<_> = tasks.iter().filter(|w| w[2].starts_with("0x")).collect();
    assert!(
        user.len() >= 2 && user.iter().all(|w| w[4] == "init"),
        "init and its child, each with a CR3: {user:?}"
    );
    assert_eq!(task("kthreadd")[2], "-", "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Debian's kernel under `--gdb 0`, waiting at its entry: the process, the
/// stub's port and the guest's serial lines (for failure messages).
struct Debuggee {
    child: std::process::Child,
    port: u16,
    serial: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// vmiscope's own lines (alerts) after the port.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Debuggee {
    fn start() -> Debuggee {
        Debuggee::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Debuggee {
        let mut child = Command::new(EXE)
            .args(["run", kernel().to_str().unwrap(), "--mem", "512", "--batch"])
            .args(["--timeout", "300", "--gdb", "0"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let rx = common::lines(child.stderr.take().unwrap());
        let line = common::wait_line(&rx, "target remote", std::time::Duration::from_secs(60));
        let port = line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches(['\'', '`']).parse().ok())
            .unwrap_or_else(|| panic!("no port in {line}"));
        // Keep draining both pipes so the child never blocks on them.
        let log = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let keep = log.clone();
        std::thread::spawn(move || rx.iter().for_each(|l| keep.lock().unwrap().push(l)));
        let serial = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let lines = common::lines(child.stdout.take().unwrap());
        let keep = serial.clone();
        std::thread::spawn(move || lines.iter().for_each(|l| keep.lock().unwrap().push(l)));
        Debuggee {
            child,
            port,
            serial,
            log,
        }
    }

    /// The debugger's output and the guest's last serial lines: what a
    /// failure shows (a kernel that died says why there).
    fn why(&self, debugger: &str) -> String {
        let s = self.serial.lock().unwrap();
        let tail = s[s.len().saturating_sub(15)..].join("\n");
        let log = self.log.lock().unwrap().join("\n");
        format!("{debugger}\n--- guest serial, last lines ---\n{tail}\n--- vmiscope ---\n{log}")
    }

    fn ends(mut self) {
        let limit = std::time::Duration::from_secs(30);
        assert!(common::exit_within(&mut self.child, limit).is_some());
    }
}

/// The debugger's output must show a stop at `start_kernel` by name, a
/// backtrace into the kernel's start-up code and RIP at the symbol.
fn assert_stopped_in_start_kernel(out: &str, syms: &[(String, u64)], why: &str) {
    let at = format!("{:x}", address(syms, "start_kernel"));
    assert!(out.contains("start_kernel"), "{why}");
    assert!(out.contains(&at), "{why}");
    assert!(out.contains("secondary_startup_64"), "no backtrace: {why}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_gdb, ignore = "needs gdb")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn plain_gdb_breaks_on_start_kernel_by_the_kernels_own_symbols() {
    if !common::kvm_available() || !common::tool_available("gdb", "--version") {
        return;
    }
    let syms = symbols(&[kernel().to_str().unwrap()]);
    let g = Debuggee::start();
    let port = g.port;
    // No symbol file is given: the stub serves one made of the kallsyms
    // names, and the breakpoint (on a page the kernel has not mapped yet)
    // goes into a debug register. start_kernel is reached in about a second.
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-ex", "set remotetimeout 30"])
        .args(["-ex", &format!("target remote 127.0.0.1:{port}")])
        .args(["-ex", "break start_kernel", "-ex", "continue", "-ex", "bt"])
        .args(["-ex", "info registers rip", "-ex", "monitor ps"])
        .args(["-ex", "info threads", "-ex", "kill"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let why = g.why(&text);
    assert_stopped_in_start_kernel(&text, &syms, &why);
    assert!(text.contains("Breakpoint 1, "), "{why}");
    // `info threads`: the vCPU runs the boot task, named from BTF.
    assert!(text.contains("CPL0, swapper[0]"), "{why}");
    // `monitor ps` at start_kernel: only the boot task, not yet renamed.
    let init_task = format!("{:#x}", address(&syms, "init_task"));
    assert!(
        text.lines()
            .any(|l| l.contains(&init_task) && l.trim_end().ends_with(" swapper")),
        "{why}"
    );
    g.ends();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_lldb, ignore = "needs lldb")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn lldb_breaks_on_start_kernel_with_the_symbol_file_vmiscope_writes() {
    if !common::kvm_available() || !common::tool_available("lldb", "--version") {
        return;
    }
    let k = kernel();
    let syms = symbols(&[k.to_str().unwrap()]);
    // LLDB does not fetch the stub's file: `vmiscope symbols --elf` writes it.
    let dir = common::temp_dir("linux-lldb");
    let elf = dir.join("kernel.elf");
    let made = Command::new(EXE)
        .args([
            "symbols",
            k.to_str().unwrap(),
            "--elf",
            elf.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(made.success());
    let g = Debuggee::start();
    let port = g.port;
    let out = Command::new("lldb")
        .args(["--no-lldbinit", "--batch", elf.to_str().unwrap()])
        .args(["-o", &format!("gdb-remote 127.0.0.1:{port}")])
        .args(["-o", "breakpoint set -n start_kernel", "-o", "continue"])
        .args(["-o", "bt", "-o", "register read rip", "-o", "kill"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let why = g.why(&text);
    assert_stopped_in_start_kernel(&text, &syms, &why);
    assert!(text.contains("stop reason = breakpoint 1.1"), "{why}");
    g.ends();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn bench_linux_boots_both_ways_to_the_banner() {
    if !common::kvm_available() {
        return;
    }
    // Both boot paths reach the kernel's banner (the bzImage's own decompressor
    // takes ~40 s here); the figure is reported, not judged: speed is shown by
    // `vmiscope bench`, never asserted by a test.
    let out = Command::new(EXE)
        .args(["bench", "--json", "--linux", kernel().to_str().unwrap()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &report["figures"][0];
    assert!(f["value"].as_f64().unwrap() > 0.0, "{text}");
    assert!(f["baseline"].as_f64().unwrap() > 0.0, "{text}");
    assert_eq!(report["baseline"], "decompressor");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn two_vcpus_come_up_through_the_madt_under_every_policy() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::temp_dir("linux-smp");
    let script = dir.join("smp.vms");
    // The AP is started by the kernel itself (INIT/SIPI, found in the MADT
    // vmiscope builds), ~30 s in here; it sets up its own LSTAR and IDT, which
    // no policy may call an attack. By then kernel_init (pid 1) and kthreadd
    // exist, and `ps` reads them through BTF.
    std::fs::write(
        &script,
        "expect serial \"Brought up 1 node, 2 CPUs\" timeout 300\n\
         expect no-alert\n\
         ps\n",
    )
    .unwrap();
    let text = run_script(
        &[
            "--vcpus",
            "2",
            "--mem",
            "512",
            "--protect",
            "all",
            "--timeout",
            "600",
        ],
        &script,
    );
    assert!(
        text.contains("ACPI: Using ACPI (MADT) for SMP configuration"),
        "{text}"
    );
    let pids: Vec<(i64, String)> = text
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some((w.first()?.parse().ok()?, w.last()?.to_string()))
        })
        .collect();
    assert!(pids.iter().any(|(p, _)| *p == 1), "{text}");
    assert!(
        pids.iter().any(|(p, c)| *p == 2 && c == "kthreadd"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_tmux, ignore = "needs tmux")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn the_tui_status_line_names_the_task_a_stopped_vcpu_runs() {
    if !common::kvm_available() || !common::term::tmux_available() {
        return;
    }
    use std::time::Duration;
    let args = format!(
        "run {} --mem 512 --protect syscall-msrs",
        kernel().display()
    );
    let t = common::term::Term::start(200, 40, &args);
    t.wait_for_within("paused at entry", Duration::from_secs(60));
    t.type_line("break event msr");
    t.keys(&["F5"]);
    // The kernel's first syscall-MSR write (syscall_init), ~25 s in here: the
    // status line names the boot task from the per-CPU current_task and BTF.
    let s = t.wait_for_within(
        "stopped: vCPU 0 in swapper[0] at msr",
        Duration::from_secs(300),
    );
    assert!(s.contains("wrmsr"), "{s}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn kaslr_the_slide_is_found_from_the_running_kernel() {
    if !common::kvm_available() {
        return;
    }
    // The bzImage's own decompressor places the kernel at a random base
    // (KASLR; ~40 s here). vmiscope finds the slide from the first IDT the
    // kernel loads, moves every symbol by it and arms the policies with the
    // moved addresses: the kernel's own LSTAR write (~60 s later) resolves to
    // entry_SYSCALL_64 and is no alert.
    let k = kernel();
    let syms = symbols(&[k.to_str().unwrap()]);
    let dir = common::temp_dir("linux-kaslr");
    let script = dir.join("kaslr.vms");
    let journal = dir.join("journal.jsonl");
    std::fs::write(
        &script,
        "expect serial \"Linux version\" timeout 300\n\
         expect event msr timeout 500\n\
         expect no-alert\n\
         sym entry_SYSCALL_64\n\
         kaslr\n",
    )
    .unwrap();
    let extra = ["--own-decompressor", "--journal", journal.to_str().unwrap()];
    let text = run_script(&[&PROTECTED[..], &extra].concat(), &script);
    assert!(!text.contains("nokaslr"), "KASLR is left on: {text}");
    let slide = text
        .split("KASLR: the kernel runs ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("no slide found: {text}"));
    let lstar = journal_records(&journal)
        .into_iter()
        .find(|r| r["type"] == "event" && r["event"]["index"] == "0xc0000082")
        .unwrap_or_else(|| panic!("no LSTAR write in the journal: {text}"));
    assert_eq!(
        lstar["event"]["write"],
        format!("{:#x}", address(&syms, "entry_SYSCALL_64") + slide),
        "{text}"
    );
    assert_eq!(lstar["verdict"], "allowed");
    assert!(text.contains(&format!("slide {slide:#x}: ")), "{text}");
    // A script's symbols are the moved ones too (resolved as each line runs).
    let moved = address(&syms, "entry_SYSCALL_64") + slide;
    assert!(
        text.contains(&format!("{moved:#x} is entry_SYSCALL_64")),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_gdb, ignore = "needs gdb")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn kernel_code_catches_a_text_write_that_is_not_the_kernels_own_patching() {
    if !common::kvm_available() || !common::tool_available("gdb", "--version") {
        return;
    }
    // `kernel-code` is armed once the kernel runs on idt_table (before
    // start_kernel). At start_kernel gdb sends the vCPU into `memset` with a
    // byte of kernel text as its target: memset is one of the helpers the
    // kernel's text patching stores through, but its caller (the return address
    // on the stack) is start-up code, not a patcher, so the store is an alert.
    let syms = symbols(&[kernel().to_str().unwrap()]);
    let target = address(&syms, "_stext") + 0x1000;
    let g = Debuggee::start_with(&["--protect", "kernel-code"]);
    let port = g.port;
    let set = |reg: &str, v: u64| format!("set ${reg} = {v:#x}");
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-ex", "set remotetimeout 30"])
        .args(["-ex", &format!("target remote 127.0.0.1:{port}")])
        .args(["-ex", "break start_kernel", "-ex", "continue"])
        .args(["-ex", &set("rdi", target), "-ex", &set("rsi", 0xcc)])
        .args(["-ex", &set("rdx", 1)])
        .args(["-ex", &set("rip", address(&syms, "memset"))])
        .args(["-ex", "stepi 40", "-ex", "monitor alerts", "-ex", "kill"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let why = g.why(&text);
    assert!(text.contains("Breakpoint 1, "), "{why}");
    let alert = text
        .lines()
        .find(|l| l.contains("kernel code modified"))
        .unwrap_or_else(|| panic!("no alert: {why}"));
    assert!(
        alert.contains("<memset"),
        "the alert names the writer: {why}"
    );
    // With --batch, vmiscope also prints it as it is raised (read from its
    // stderr by another thread: waited for, up to 10 s).
    let printed = || {
        g.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("kernel code modified"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !printed() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(printed(), "{}", g.why(&text));
    g.ends();
}

/// A `--cmdline` too long for the kernel is refused with the user's own
/// budget (vmiscope's additions are not theirs to count), and a newline in
/// it is shown escaped, not cutting the note.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_linux, ignore = "needs Debian's kernel package unpacked by .ci/run")]
fn a_long_command_line_is_refused_with_the_users_budget() {
    if !common::kvm_available() {
        return;
    }
    let k = kernel();
    let run = |cmdline: &str| {
        Command::new(EXE)
            .args(["run", k.to_str().unwrap(), "--batch", "--timeout", "0.5"])
            .args(["--cmdline", cmdline])
            .output()
            .unwrap()
    };
    let out = run(&"a".repeat(2047));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the command line is 2047 bytes") && err.contains("give at most"),
        "{err}"
    );
    let out = run("quiet\nloglevel=3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kernel command line: quiet\\nloglevel=3 "),
        "{err}"
    );
}

/// memtest86+ is a bzImage with no compressed kernel in it: refused without
/// `--own-decompressor` with what to do (it said "the compressed payload is
/// empty", which read like a truncated file), and entered at its own 64-bit
/// code with it. It then runs until the timeout, or on a PVM host until KVM's
/// emulator meets its first x87 instruction at CPL0 (a host limit: CPL0 runs
/// in the emulator there).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(no_linux, ignore = "needs Debian's packages unpacked by .ci/run")]
fn memtest86_plus_is_entered_at_its_own_code() {
    if !common::kvm_available() {
        return;
    }
    let bin = root().join("memtest/boot/memtest86+x64.bin");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        bin.exists() || !ci,
        "CI=true but {} is missing",
        bin.display()
    );
    if common::not_run_here(
        !bin.exists(),
        "memtest86+ is not unpacked under target/linux/memtest (.ci/run does it)",
    ) {
        return;
    }
    let run = |extra: &[&str]| {
        let out = Command::new(EXE)
            .arg("run")
            .arg(&bin)
            .args(["--batch", "--timeout", "20"])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, text) = run(&[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("no compressed payload") && text.contains("--own-decompressor"),
        "{text}"
    );
    let (_, text) = run(&["--own-decompressor"]);
    assert!(
        text.contains("bzImage with no payload (its own code)"),
        "{text}"
    );
    // Its own code ran: it clears the serial console's screen first.
    assert!(text.contains("\x1b[2J"), "{text}");
    assert!(
        text.contains("timeout:") || text.contains("KVM cannot emulate the instruction"),
        "{text}"
    );
}
