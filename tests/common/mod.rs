//! Shared helpers of the integration tests (all of them boot real KVM guests).
#![allow(dead_code)]

pub mod term;

use std::sync::{Arc, Mutex};

use vmiscope_vmm::{Event, ExitHandler, Reply, RunOutcome, VcpuCtl, Vm, VmConfig};

/// Whether `tool` runs (`tool version_arg` succeeds). Under CI (`CI=true`) a
/// missing tool fails the test loudly (`.ci/run` installs it); elsewhere the
/// test says it did nothing (and the build script marks it ignored).
pub fn tool_available(tool: &str, version_arg: &str) -> bool {
    if std::process::Command::new(tool)
        .arg(version_arg)
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but {tool} is missing: these tests need it (.ci/run installs it)");
    }
    eprintln!("SKIPPED: no {tool} on this machine");
    false
}

/// Whether /dev/kvm is usable. Under CI (`CI=true`) a missing /dev/kvm fails the
/// test loudly; elsewhere the test says why it does nothing.
pub fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but /dev/kvm is missing: these tests need KVM");
    }
    eprintln!("SKIPPED: no /dev/kvm on this machine, so no guest can boot");
    false
}

pub fn image(name: &str) -> &'static [u8] {
    vmiscope_images::find(name)
        .unwrap_or_else(|| panic!("no image {name}"))
        .elf
}

/// The address of `symbol` in the built-in image `image` (its link address:
/// our images run where they were linked).
#[allow(dead_code)]
pub fn symbol(image: &str, symbol: &str) -> u64 {
    vmiscope_monitor::Symbols::parse(self::image(image))
        .get(symbol)
        .unwrap_or_else(|| panic!("{image} has no {symbol}"))
}

/// How many times a test that hunts a race repeats (`VMISCOPE_REPEAT`,
/// default 10).
#[allow(dead_code)]
pub fn repeat() -> usize {
    std::env::var("VMISCOPE_REPEAT")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10)
}

pub fn config(vcpus: u32) -> VmConfig {
    VmConfig {
        vcpus,
        timeout: Some(std::time::Duration::from_secs(60)),
        ..VmConfig::default()
    }
}

/// A handler that records every event (except kicks) and answers with `f`.
pub struct Recorder<F> {
    pub events: Mutex<Vec<(u32, Event)>>,
    f: F,
}

impl<F: Fn(&mut VcpuCtl<'_>, &Event) -> Reply + Send + Sync> Recorder<F> {
    pub fn new(f: F) -> Arc<Self> {
        Arc::new(Recorder {
            events: Mutex::new(vec![]),
            f,
        })
    }

    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }
}

impl<F: Fn(&mut VcpuCtl<'_>, &Event) -> Reply + Send + Sync> ExitHandler for Recorder<F> {
    fn on_event(&self, cpu: &mut VcpuCtl<'_>, event: &Event) -> Reply {
        if !matches!(event, Event::Kicked) {
            self.events.lock().unwrap().push((cpu.id(), event.clone()));
        }
        (self.f)(cpu, event)
    }
}

pub fn run(vm: Vm, handler: Arc<dyn ExitHandler>, cfg: &VmConfig) -> RunOutcome {
    let out = vm.run(handler, cfg);
    eprintln!("--- serial ---\n{}--- stop: {} ---", out.serial, out.reason);
    out
}

/// Runs the `vmiscope` binary: (status, stdout, stderr), echoed for failures.
pub fn vmiscope_cli(exe: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(exe).args(args).output().unwrap();
    let r = (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("{}{}", r.1, r.2);
    r
}

/// `elf` with symbol `name`'s value and/or size replaced (a hostile image).
#[allow(dead_code)]
pub fn with_symbol(elf: &[u8], name: &str, value: Option<u64>, size: Option<u64>) -> Vec<u8> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    // The symbol table (SHT_SYMTAB) and its string table (sh_link).
    let symtab = (0..shnum)
        .map(section)
        .find(|&s| u32_at(s + 4) == 2)
        .expect("a symbol table");
    let strtab = u64_at(section(u32_at(symtab + 0x28)) + 0x18);
    let (off, len) = (u64_at(symtab + 0x18), u64_at(symtab + 0x20));
    let mut out = elf.to_vec();
    // Elf64_Sym: name u32, info u8, other u8, shndx u16, value u64, size u64.
    for at in (off..off + len).step_by(24) {
        let n = strtab + u32_at(at);
        let end = n + elf[n..].iter().position(|&b| b == 0).unwrap();
        if &elf[n..end] == name.as_bytes() {
            if let Some(v) = value {
                out[at + 8..at + 16].copy_from_slice(&v.to_le_bytes());
            }
            if let Some(s) = size {
                out[at + 16..at + 24].copy_from_slice(&s.to_le_bytes());
            }
            return out;
        }
    }
    panic!("no symbol {name}");
}

/// The lines of a child's stream, as they come (read on a thread of their own,
/// so a full pipe never blocks the child).
#[allow(dead_code)]
pub fn lines(r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line containing `text` within `limit`, or a panic with what came.
#[allow(dead_code)]
pub fn wait_line(
    rx: &std::sync::mpsc::Receiver<String>,
    text: &str,
    limit: std::time::Duration,
) -> String {
    let t = std::time::Instant::now();
    let mut seen = Vec::new();
    while t.elapsed() < limit {
        match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(l) if l.contains(text) => return l,
            Ok(l) => seen.push(l),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    panic!("no line with `{text}`; got:\n{}", seen.join("\n"));
}

/// The child's exit status once it ends; None (after killing it) if it outlives
/// `limit`.
#[allow(dead_code)]
pub fn exit_within(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let t = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A fresh directory for one test's files (named by `tag` and the process).
#[allow(dead_code)]
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vmiscope-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Whether this host lacks what a test needs (`lacking`): then the test is not
/// run here, and says so where it cannot be mistaken for a pass: a line in the
/// file named by `VMISCOPE_NOT_RUN` (the nested-SVM rig's runner and `.ci/run`
/// count and list them) and on stderr. `why` names the host's limit and the
/// evidence for it.
pub fn not_run_here(lacking: bool, why: &str) -> bool {
    if !lacking {
        return false;
    }
    let name = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let line = format!("NOT RUN: {name}: {why}\n");
    eprint!("{line}");
    if let Some(path) = std::env::var_os("VMISCOPE_NOT_RUN") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
    true
}

/// QEMU's emulated SVM (the nested-SVM rig) never arms the DR7 it loads at
/// VMRUN: `helper_vmrun` assigns `env->dr[7]` without `cpu_x86_update_dr7`
/// (target/i386/tcg/sysemu/svm_helper.c), so debug-register breakpoints do not
/// fire for a nested guest. The start-up probe measures it.
pub const NO_DR_BREAKPOINTS: &str = "this host's debug-register breakpoints never fire (measured at start-up; on the nested-SVM rig: QEMU's helper_vmrun loads DR7 without arming it, target/i386/tcg/sysemu/svm_helper.c)";

/// QEMU's emulated SVM raises INT3 as a software interrupt and checks the
/// SWINT intercept, not KVM's #BP exception intercept (`raise_interrupt2`,
/// target/i386/tcg/excp_helper.c), so no INT3 reaches KVM.
pub const NO_INT3_EXITS: &str = "this host's KVM never sees an INT3 (measured at start-up; on the nested-SVM rig: QEMU checks the SWINT intercept for INT3, not the #BP one, target/i386/tcg/excp_helper.c raise_interrupt2)";

/// QEMU's emulated SVM runs a nested guest's XSETBV without checking its
/// intercept (`helper_xsetbv`, target/i386/tcg/fpu_helper.c), so KVM never sees
/// XCR0 change.
pub const NO_XSETBV: &str = "this host's KVM never sees a nested XSETBV (measured at start-up; on the nested-SVM rig: QEMU's helper_xsetbv checks no SVM intercept, target/i386/tcg/fpu_helper.c)";

/// The host's measured answers.
pub fn host() -> vmiscope_vmm::Host {
    vmiscope_vmm::Host::detect()
}
