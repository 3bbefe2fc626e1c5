//! Signals and closed pipes end every mode cleanly (adversarial findings F2, F9,
//! F15): SIGINT, SIGTERM and SIGHUP stop the run with its stop line and the
//! shell's status for the signal (128 + n); the journal is complete; a REPL at
//! the end of its input exits 0; a reader that goes away does not panic vmiscope.

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{kvm_available, lines};

const LIMIT: Duration = Duration::from_secs(30);

fn vmiscope(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmiscope"));
    c.args(args)
        .env("XDG_STATE_HOME", std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn send(child: &Child, signal: i32) {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// The child's exit status, or a panic if it does not end.
fn status(child: &mut Child) -> Option<i32> {
    common::exit_within(child, LIMIT)
        .expect("vmiscope did not end after the signal")
        .code()
}

/// The first line with `text`, within the limit.
fn wait_line(rx: &Receiver<String>, text: &str) -> String {
    common::wait_line(rx, text, LIMIT)
}

fn rest(rx: &Receiver<String>) -> String {
    rx.iter().collect::<Vec<_>>().join("\n")
}

/// A batch run of the endless guest, signalled once its serial line is out.
fn batch_run_ended_by(signal: i32) -> (Option<i32>, String) {
    let mut child = vmiscope(&["run", "hang", "--batch"]).spawn().unwrap();
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    wait_line(&out, "endless");
    send(&child, signal);
    let code = status(&mut child);
    (code, rest(&err))
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn sigterm_and_sighup_end_a_batch_run_with_its_stop_line() {
    if !kvm_available() {
        return;
    }
    let (code, err) = batch_run_ended_by(libc::SIGTERM);
    assert_eq!(code, Some(143), "{err}");
    assert!(err.contains("stop: stopped by SIGTERM"), "{err}");
    assert!(err.contains("exits:"), "no exit summary: {err}");
    let (code, err) = batch_run_ended_by(libc::SIGHUP);
    assert_eq!(code, Some(129), "{err}");
    assert!(err.contains("stopped by SIGHUP"), "{err}");
    let (code, err) = batch_run_ended_by(libc::SIGINT);
    assert_eq!(code, Some(130), "{err}");
    assert!(
        err.contains("stopped by the user (Ctrl-C, SIGINT)"),
        "{err}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ctrl_c_ends_a_run_that_waits_for_gdb() {
    if !kvm_available() {
        return;
    }
    let mut child = vmiscope(&["run", "hello", "--batch", "--gdb", "0"])
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    wait_line(&err, "the guest waits at its entry");
    send(&child, libc::SIGINT);
    assert_eq!(status(&mut child), Some(130));
    assert!(rest(&err).contains("stopped by the user"));
}

/// Whether the process has a handler for `signal` (its SigCgt mask): the point
/// from which the signal no longer kills it.
fn catches(child: &Child, signal: i32) -> bool {
    let s = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (signal - 1)) != 0)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_signal_before_the_guest_runs_still_leaves_a_journal_and_a_status() {
    if !kvm_available() {
        return;
    }
    let dir = common::temp_dir("signals");
    let journal = dir.join("early.jsonl");
    let mut child = vmiscope(&[
        "run",
        "demo",
        "--batch",
        "--protect",
        "all",
        "--journal",
        journal.to_str().unwrap(),
    ])
    .spawn()
    .unwrap();
    let t = Instant::now();
    while !catches(&child, libc::SIGTERM) {
        assert!(child.try_wait().unwrap().is_none(), "ended too early");
        assert!(t.elapsed() < LIMIT, "no SIGTERM handler");
        std::thread::yield_now();
    }
    send(&child, libc::SIGTERM);
    let code = status(&mut child);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    // The demo may finish before the signal is seen; a kill by the signal would
    // have no status at all.
    assert!(matches!(code, Some(143) | Some(0)), "{code:?} {err}");
    let text = std::fs::read_to_string(&journal).expect("the journal file exists");
    assert!(text.is_empty() || text.ends_with('\n'), "{text}");
    for l in text.lines() {
        serde_json::from_str::<serde_json::Value>(l).expect("a JSON line");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn sigint_in_a_script_exits_130_after_its_summary() {
    if !kvm_available() {
        return;
    }
    let dir = common::temp_dir("sigscript");
    let script = dir.join("s.vs");
    std::fs::write(
        &script,
        "continue\nexpect serial \"endless\" timeout 30\nexpect serial \"never printed\" timeout 60\n",
    )
    .unwrap();
    let mut child = vmiscope(&["run", "hang", "--script", script.to_str().unwrap()])
        .spawn()
        .unwrap();
    let out = lines(child.stdout.take().unwrap());
    wait_line(&out, "ok ");
    send(&child, libc::SIGINT);
    assert_eq!(status(&mut child), Some(130));
    let text = rest(&out);
    assert!(
        text.contains("stopped by the user (Ctrl-C, SIGINT)"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_repl_exits_0_at_the_end_of_its_input_and_143_on_sigterm() {
    if !kvm_available() {
        return;
    }
    let out = vmiscope(&["run", "hello", "--repl"])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"regs\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "end of input");

    // With a journal: it ends with its `end` record on the signal too (the
    // REPL and the TUI exited without it).
    let dir = common::temp_dir("repl-signal");
    let journal = dir.join("j.jsonl");
    let mut child = vmiscope(&[
        "run",
        "hang",
        "--repl",
        "--journal",
        journal.to_str().unwrap(),
    ])
    .stdin(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    stdin
        .write_all(b"continue\nexpect serial \"endless\"\n")
        .unwrap();
    wait_line(&out, "endless");
    // The REPL now waits in its line editor for more input, which never comes.
    send(&child, libc::SIGTERM);
    assert_eq!(status(&mut child), Some(143));
    assert!(rest(&err).contains("stopped by SIGTERM"));
    drop(stdin);
    let text = std::fs::read_to_string(&journal).unwrap();
    let last = text.lines().last().unwrap_or_default();
    let end: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(end["type"], "end", "the journal's last record: {last}");
    assert_eq!(end["status"], 143, "{last}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_reader_that_goes_away_does_not_panic_vmiscope() {
    if !kvm_available() {
        return;
    }
    // stdout is a pipe whose reader is closed before vmiscope writes anything.
    let check = |args: &[&str], stdin: &[u8]| {
        let mut child = vmiscope(args).stdin(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let _ = child.stdin.take().unwrap().write_all(stdin);
        let code = status(&mut child);
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        code
    };
    assert_eq!(check(&["images"], b""), Some(0));
    assert_eq!(check(&["run", "hello", "--repl"], b"regs\nhelp\n"), Some(0));
    let dir = common::temp_dir("pipe");
    let script = dir.join("s.vs");
    std::fs::write(&script, "help\ncontinue\nexpect exit 0\n").unwrap();
    // The script's own result still decides the status.
    assert_eq!(
        check(&["run", "hello", "--script", script.to_str().unwrap()], b""),
        Some(0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
