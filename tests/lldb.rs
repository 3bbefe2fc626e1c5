//! The gdb stub against a second real client, Debian's LLDB (batch mode): connect,
//! registers, memory, a breakpoint by name, continue, step, a watchpoint, an
//! interrupt, detach and kill, on a 1-vCPU guest and on the 2-vCPU one with the
//! breakpoint hit on vCPU 1.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{kvm_available, lines};

const LIMIT: Duration = Duration::from_secs(60);

fn lldb_available() -> bool {
    common::tool_available("lldb", "--version")
}

/// A guest under `run IMAGE --batch --gdb 0`: its process, the port the stub
/// listens on, the exported ELF for LLDB's symbols, and its output lines.
struct Guest {
    child: Child,
    port: u16,
    elf: std::path::PathBuf,
    out: Receiver<String>,
    err: Receiver<String>,
}

/// The first line with `text`, within the limit.
fn wait_line(rx: &Receiver<String>, text: &str) -> String {
    common::wait_line(rx, text, LIMIT)
}

fn guest(image: &str) -> Guest {
    let dir = common::temp_dir("lldb");
    let elf = dir.join(format!("{image}.elf"));
    std::fs::write(&elf, common::image(image)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmiscope"))
        // The timeout: a test that fails midway leaves no guest running for long.
        .args(["run", image, "--batch", "--gdb", "0", "--timeout", "300"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    let hint = wait_line(&err, "target remote 127.0.0.1:");
    let port = hint
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches(['\'', '`']).parse().ok())
        .unwrap_or_else(|| panic!("no port in {hint}"));
    Guest {
        child,
        port,
        elf,
        out,
        err,
    }
}

impl Guest {
    /// LLDB in batch mode: the ELF, `gdb-remote`, then `cmds`.
    fn lldb(&self, cmds: &[&str]) -> Child {
        let mut args = vec![
            "--batch".to_string(),
            "--no-lldbinit".into(),
            "-o".into(),
            format!("target create {}", self.elf.display()),
            "-o".into(),
            format!("gdb-remote 127.0.0.1:{}", self.port),
        ];
        for c in cmds {
            args.push("-o".into());
            args.push(c.to_string());
        }
        Command::new("lldb")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// vmiscope's exit status and stderr, once it ends by itself.
    fn finish(mut self) -> (Option<i32>, String) {
        let status = common::exit_within(&mut self.child, LIMIT).expect("vmiscope did not end");
        let err: Vec<String> = self.err.try_iter().collect();
        (status.code(), err.join("\n"))
    }
}

/// LLDB's whole output, once it ends (killed if it outlives the limit).
fn output(mut c: Child) -> String {
    let _ = common::exit_within(&mut c, LIMIT);
    let o = c.wait_with_output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    eprintln!("--- lldb ---\n{s}");
    s
}

#[test]
#[cfg_attr(any(no_kvm, no_lldb), ignore = "needs /dev/kvm and lldb")]
fn lldb_reads_breaks_steps_watches_and_detaches_on_one_vcpu() {
    if !kvm_available() || !lldb_available() {
        return;
    }
    let g = guest("ept-write");
    let out = output(g.lldb(&[
        "register read rip",
        "memory read -s8 -fx -c2 &ept_target",
        "breakpoint set -n main",
        "continue",
        "thread step-inst",
        "register read rip",
        "breakpoint delete 1",
        "watchpoint set expression -w write -s 8 -- &ept_target[0]",
        "continue",
        "register read rip",
        "watchpoint delete 1",
        "detach",
    ]));
    assert!(
        out.contains("rip = 0x0000000000100000"),
        "at the entry: {out}"
    );
    assert!(
        out.contains("0x1111111111111111 0x2222222222222222"),
        "memory: {out}"
    );
    assert!(out.contains("stop reason = breakpoint 1.1"), "{out}");
    assert!(out.contains("stop reason = instruction step into"), "{out}");
    assert!(
        out.contains("new value: 0x11111111c0ffee00"),
        "CPL0 write: {out}"
    );
    assert!(out.contains("stop reason = watchpoint 1"), "{out}");
    assert!(out.contains("Process 1 detached"), "{out}");
    // Detached, the guest runs to its own end.
    let (code, err) = g.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("gdb detached"), "{err}");
}

#[test]
#[cfg_attr(any(no_kvm, no_lldb), ignore = "needs /dev/kvm and lldb")]
fn lldb_interrupts_a_running_guest_and_kills_it() {
    if !kvm_available() || !lldb_available() {
        return;
    }
    let g = guest("hang");
    let mut lldb = g.lldb(&["continue", "register read rip cs", "process kill"]);
    let said = lines(lldb.stdout.take().unwrap());
    // Interrupt (Ctrl-C to LLDB) once the guest is in its endless CPL3 loop. A
    // Ctrl-C while LLDB is still settling into `continue` is lost, as at a
    // terminal, so it is repeated until LLDB says it interrupted.
    wait_line(&g.out, "endless");
    let mut out = String::new();
    let t = Instant::now();
    'interrupt: while t.elapsed() < LIMIT {
        // SAFETY: sending SIGINT to our own child process.
        unsafe { libc::kill(lldb.id() as i32, libc::SIGINT) };
        let wait = Instant::now();
        while wait.elapsed() < Duration::from_secs(1) {
            if let Ok(l) = said.recv_timeout(Duration::from_millis(100)) {
                out.push_str(&l);
                out.push('\n');
                if l.contains("Interrupted") {
                    break 'interrupt;
                }
            }
        }
    }
    out.push_str(&output(lldb));
    out.extend(said.iter().map(|l| l + "\n"));
    assert!(out.contains("cs = 0x00000023"), "stopped at CPL3: {out}");
    assert!(out.contains("user_hang"), "{out}");
    assert!(
        out.contains("exited with status = 9"),
        "kill's reply: {out}"
    );
    let (code, err) = g.finish();
    assert_eq!(code, Some(0), "kill ends the run: {err}");
}

#[test]
#[cfg_attr(any(no_kvm, no_lldb), ignore = "needs /dev/kvm and lldb")]
fn lldb_runs_a_two_vcpu_guest_and_sees_a_breakpoint_on_vcpu_1() {
    if !kvm_available() || !lldb_available() {
        return;
    }
    let g = guest("smp");
    let out = output(g.lldb(&[
        "thread list",
        "breakpoint set -n ap_main",
        "continue",
        "thread list",
        "breakpoint delete 1",
        "continue",
    ]));
    assert!(
        out.contains("thread #2: tid = 0x0002"),
        "two threads: {out}"
    );
    // LLDB continues every thread with a plain `c`: vCPU 1 must run.
    assert!(
        out.contains("* thread #2, stop reason = breakpoint 1.2")
            || out.contains("* thread #2, stop reason = breakpoint 1.1"),
        "the hit on vCPU 1: {out}"
    );
    assert!(out.contains("ap_main(cpu=1)"), "{out}");
    assert!(
        out.contains("exited with status = 0"),
        "ran to its end: {out}"
    );
    let (code, err) = g.finish();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
#[cfg_attr(any(no_kvm, no_lldb), ignore = "needs /dev/kvm and lldb")]
fn lldb_steps_off_a_breakpoint_on_vcpu_1_every_time() {
    if !kvm_available() || !lldb_available() {
        return;
    }
    // The same step-over as gdb's on the second vCPU (tests/gdb.rs): LLDB's
    // `thread step-inst` came back with no stop about half the time.
    for run in 0..common::repeat() {
        let g = guest("smp");
        let out = output(g.lldb(&[
            "breakpoint set -n ap_main",
            "continue",
            "thread step-inst",
            "breakpoint delete 1",
            "continue",
        ]));
        if !out.contains("ap_main(cpu=1)") {
            // vmiscope's report (a triple fault names the exit before it)
            // goes with the failure: it came once on the nested-SVM rig.
            let (code, err) = g.finish();
            panic!("run {run}: {out}\nvmiscope ({code:?}): {err}");
        }
        assert!(
            out.contains("stop reason = instruction step into"),
            "run {run}: the step never stopped: {out}"
        );
        assert!(
            out.contains("exited with status = 0"),
            "run {run}: ran to its end: {out}"
        );
        let (code, err) = g.finish();
        assert_eq!(code, Some(0), "run {run}: {err}");
    }
}
