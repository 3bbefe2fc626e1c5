//! The TUI in a real terminal (tmux), and the REPL over pipes: stopping at an event,
//! overriding its verdict, and turning an alert into an exception, from both.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::kvm_available;
use common::term::{Term, tmux_available};

#[test]
#[cfg_attr(any(no_kvm, no_tmux), ignore = "needs /dev/kvm and tmux")]
fn every_pane_is_visible_at_80x24_and_grows_with_the_terminal() {
    if !kvm_available() || !tmux_available() {
        return;
    }
    // Bare `vmiscope` (what `cargo run --release` runs): the demo, every policy on.
    for (cols, rows) in [(80u16, 24u16), (120, 40)] {
        let t = Term::start(cols, rows, "");
        t.wait_for("paused at entry");
        // Each pane fills in as the first frames draw (a loaded machine may
        // capture the screen between two of them).
        for pane in [
            "Registers vCPU 0",
            "Disassembly",
            "Events",
            "Alerts",
            "Hooks",
            "Serial",
            "Stack",
            "Memory",
            ": command",
        ] {
            t.wait_for(pane);
        }
        // The entry RIP is shown.
        let s = t.wait_for("rip 0000000000100000");
        let widest = s.lines().map(|l| l.chars().count()).max().unwrap();
        assert_eq!(widest, cols as usize, "the layout fills the terminal");
        t.keys(&["F5"]);
        t.wait_for("ended: guest exited with status 0");
        // The serial pane shows the guest's last line (it may be drawn a frame
        // after the status line on a loaded machine).
        let s = t.wait_for("summary: 0 succeeded, 6 blocked");
        assert!(s.contains("alerts 6"), "{s}");
        t.keys(&["q"]);
    }
}

#[test]
#[cfg_attr(any(no_kvm, no_tmux), ignore = "needs /dev/kvm and tmux")]
fn tui_stop_at_an_event_and_deny_it() {
    if !kvm_available() || !tmux_available() {
        return;
    }
    let j = std::env::temp_dir().join(format!("vmiscope-tui-{}.jsonl", std::process::id()));
    // Wide enough for the guest's longest line in the half-width serial pane.
    let t = Term::start(200, 30, &format!("run msr --journal {}", j.display()));
    t.wait_for("paused at entry");
    t.type_line("hook msr 0x176 w log");
    t.type_line("break event msr");
    t.keys(&["F5"]);
    let s = t.wait_for("stopped: vCPU 0 at msr");
    assert!(
        s.contains("wrmsr"),
        "the disassembly shows the stopped instruction:\n{s}"
    );
    // The hook only logs; deny it here anyway.
    t.keys(&["d"]);
    let s = t.wait_for("ended: guest exited with status 0");
    assert!(
        s.contains("SYSENTER_EIP (176) before 0, wrmsr ffffffff81c00100: ok, reads back 0"),
        "denied from the TUI:\n{s}"
    );
    let text = std::fs::read_to_string(&j).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("\"class\":\"msr\"") && l.contains("\"type\":\"event\"")),
        "journal: {text}"
    );
    assert!(
        text.lines().any(|l| l.contains("\"type\":\"override\"")
            && l.contains("\"proposed\":\"allowed\"")
            && l.contains("\"verdict\":\"deny\"")),
        "the journal records the analyst's deny: {text}"
    );
    // Enter with nothing selected opens the newest event, its time in seconds.
    t.keys(&["Enter"]);
    let s = t.wait_for("s into the run)");
    assert!(
        s.contains("class msr") && !s.contains("µs into"),
        "the newest event's details:\n{s}"
    );
    t.keys(&["Escape"]);
    t.keys(&["q"]);
    let _ = std::fs::remove_file(&j);
}

#[test]
#[cfg_attr(any(no_kvm, no_tmux), ignore = "needs /dev/kvm and tmux")]
fn tui_alert_to_exception_with_the_e_key() {
    if !kvm_available() || !tmux_available() {
        return;
    }
    let t = Term::start(100, 30, "run demo --protect syscall-msrs");
    t.wait_for("paused at entry");
    t.keys(&["F5"]);
    t.wait_for("alerts 1");
    t.keys(&["Tab", "Down", "e"]);
    let s = t.wait_for("exception 0 added");
    assert!(s.contains("\"msr\":\"0xc0000082\""), "{s}");
    t.type_line("exceptions");
    // (Not "0xc0000082": the line of the `e` key shows it already.)
    let s = t.wait_for("from alert 1");
    assert!(s.contains("0xc0000082"), "{s}");
    t.keys(&["Escape", "q"]);
}

/// The REPL over pipes, its input written at once: the resuming commands
/// (`next-event`, `continue --wait`, `wait`) return when the guest stops, so
/// no command races the guest.
fn repl(image: &str, script: &[&str]) -> String {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmiscope"))
        .args(["run", image, "--repl"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for line in script {
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let s =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{s}");
    s
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn repl_stop_override_and_exception() {
    if !kvm_available() {
        return;
    }
    let out = repl(
        "msr",
        &[
            "hook msr 0xc0000082 w deny",
            "break event msr",
            "next-event",
            "event",
            "verdict allow",
            "alerts",
            "exception add-from-alert 1",
            "exceptions",
            "quit",
        ],
    );
    assert!(
        out.contains("vCPU 0 stopped (next-event)")
            || out.contains("vCPU 0 stopped (breakpoint 1)"),
        "{out}"
    );
    assert!(
        out.contains("verdict: deny (dropped)  (`verdict allow|deny|policy`)"),
        "the proposed verdict: {out}"
    );
    assert!(out.contains("verdict allow; vCPU 0 goes on"), "{out}");
    assert!(out.contains("alert 1 msr"), "{out}");
    assert!(out.contains("exception 0 added"), "{out}");
    assert!(out.contains("\"msr\": \"0xc0000082\""), "{out}");
    // Bad input: a one-line error, the session goes on.
    let out = repl("hello", &["frobnicate", "mem read", "hooks", "quit"]);
    assert!(
        out.contains("error: unknown command `frobnicate` (try `help`)"),
        "{out}"
    );
    assert!(
        out.contains("error: expected `mem read ADDR [LEN] [phys]`"),
        "{out}"
    );
    assert!(out.contains("no hooks"), "{out}");
}

/// A terminal that hangs up (its tmux server killed: SIGHUP) ends the TUI and
/// its run. With SIGHUP handled, crossterm spun on the dead terminal instead and
/// the process lived on at full speed.
#[test]
#[cfg_attr(any(no_kvm, no_tmux), ignore = "needs /dev/kvm and tmux")]
fn the_tui_ends_when_its_terminal_hangs_up() {
    if !kvm_available() || !tmux_available() {
        return;
    }
    let t = Term::start(100, 30, "run hang");
    t.wait_for("paused at entry");
    let pane = t
        .tmux()
        .args(["display", "-p", "-t", &t.name, "#{pane_pid}"])
        .output()
        .unwrap();
    let shell = String::from_utf8_lossy(&pane.stdout).trim().to_string();
    let children =
        std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap_or_default();
    let pid = children
        .split_whitespace()
        .next()
        .expect("vmiscope runs")
        .to_string();
    let _ = t.tmux().args(["kill-server"]).status();
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "vmiscope {pid} outlived its terminal"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[cfg_attr(any(no_kvm, no_tmux), ignore = "needs /dev/kvm and tmux")]
fn every_pane_takes_the_focus_and_scrolls_and_the_command_line_completes() {
    if !kvm_available() || !tmux_available() {
        return;
    }
    let t = Term::start(200, 50, "");
    t.wait_for("paused at entry");
    // Tab reaches every pane: from Events, five presses land on Disassembly.
    t.keys(&["Tab", "Tab", "Tab", "Tab", "Tab"]);
    t.wait_for("Disassembly (* breakpoint) *");
    // Select `_start`'s `call rt_entry` (its 9th line) and follow it.
    for _ in 0..8 {
        t.keys(&["Down"]);
    }
    t.keys(&["Enter"]);
    t.wait_for("Disassembly at 0x1005e0 (Esc: RIP)");
    // The status line says so too (maybe a frame later on a loaded machine).
    t.wait_for("following 0x1005e0 <rt_entry>");
    t.keys(&["Escape"]);
    t.wait_for("disassembly follows RIP");
    // The help scrolls to its end.
    t.keys(&["?"]);
    let s = t.wait_for("help (↑↓ scroll, Esc closes)");
    assert!(
        !s.contains("end the session"),
        "the help is longer than the screen:\n{s}"
    );
    t.keys(&["PageDown", "PageDown", "PageDown", "PageDown"]);
    t.wait_for("end the session");
    t.keys(&["Escape"]);
    // The `:` line completes, and keeps a history.
    t.keys(&[":"]);
    t.literal("disa");
    t.keys(&["Tab"]);
    t.wait_for(":disasm █");
    t.literal("_start 2");
    t.keys(&["Enter"]);
    t.wait_for("disasm _start 2 (↑↓ scroll, Esc closes)");
    t.keys(&["Escape", ":", "Up"]);
    t.wait_for(":disasm _start 2█");
    // Ctrl-W kills the word before the cursor, Ctrl-U the line, as in a shell.
    t.keys(&["C-w"]);
    t.wait_for(":disasm _start █");
    t.keys(&["C-u"]);
    t.literal("ok");
    t.wait_for(":ok█");
    t.keys(&["Escape"]);
    // A click focuses the pane under it (the serial pane, bottom right).
    t.click(150, 46);
    t.wait_for("Serial *");
    // The wheel over the memory pane (bottom left) moves its window: from RSP
    // (0x7ff0 at the entry) three rows of 16 bytes on.
    t.wheel_down(50, 46);
    t.wait_for("Memory at 0x8020 (Esc: RSP)");
    // `mem read` points the memory pane at its address.
    t.type_line("mem read user_secret 16");
    t.wait_for("Memory at 0x207000 (Esc: RSP)");
    t.keys(&["q"]);
}

#[test]
#[cfg_attr(any(no_kvm, no_tmux), ignore = "needs /dev/kvm and tmux")]
fn at_80x24_the_registers_scroll_and_grow_when_focused() {
    if !kvm_available() || !tmux_available() {
        return;
    }
    let t = Term::start(80, 24, "");
    let s = t.wait_for("paused at entry");
    assert!(
        !s.contains("gsb "),
        "not every register fits at first:\n{s}"
    );
    // Events → Alerts → Hooks → Serial → Registers.
    t.keys(&["Tab", "Tab", "Tab", "Tab"]);
    let s = t.wait_for("Registers vCPU 0 *");
    assert!(
        s.contains("gsb ") && s.contains("r15 "),
        "every register while focused:\n{s}"
    );
    t.keys(&["F5"]);
    let s = t.wait_for("its final state stays readable");
    assert!(s.contains("ended: guest exited with status 0"), "{s}");
    assert!(
        s.contains("rip 0000000000100530"),
        "the final registers:\n{s}"
    );
    t.keys(&["q"]);
}

#[test]
#[cfg_attr(any(no_kvm, no_tmux), ignore = "needs /dev/kvm and tmux")]
fn after_a_step_at_cpl3_the_disassembly_shows_the_user_code() {
    if !kvm_available() || !tmux_available() {
        return;
    }
    let t = Term::start(120, 40, "run hang --tui");
    t.wait_for("paused at entry");
    t.keys(&["F5"]);
    t.wait_for("running");
    t.keys(&["F8"]);
    let s = t.wait_for("stopped: vCPU 0 at step");
    let current = s
        .lines()
        .find(|l| l.contains("=> "))
        .unwrap_or_else(|| panic!("no current line:\n{s}"));
    assert!(
        current.contains("user_hang") && !current.contains("<isr"),
        "the user code, not the guest's #DB entry: {current}\n{s}"
    );
    t.keys(&["q"]);
}

/// A TUI whose terminal goes away without a SIGHUP (a pty that is not its
/// controlling terminal, its other end closed) ends, instead of waiting on
/// a terminal nobody can type into (the review saw such TUIs busy for good).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_tui_whose_terminal_is_gone_ends() {
    use std::os::fd::FromRawFd;
    if !common::kvm_available() {
        return;
    }
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the given ints and reads
    // the window size; no name or termios is passed.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(r, 0, "openpty");
    // The child must not inherit the master (openpty does not set
    // close-on-exec): holding it, it would keep its own terminal alive.
    // SAFETY: F_SETFD on the descriptor openpty just returned.
    let cloexec = unsafe { libc::fcntl(master, libc::F_SETFD, libc::FD_CLOEXEC) };
    assert_eq!(cloexec, 0);
    // SAFETY: fresh descriptors from openpty, each owned once from here.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmiscope"))
        .args(["run", "demo", "--tui"])
        .env("TERM", "xterm")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The TUI is up once it has drawn its first screen.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut m = master;
    while !String::from_utf8_lossy(&seen).contains("demo") {
        use std::io::Read;
        let n = m.read(&mut buf).unwrap();
        assert!(n > 0, "the terminal closed before the TUI drew");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(m);
    let status = common::exit_within(&mut child, std::time::Duration::from_secs(20))
        .expect("the TUI kept running after its terminal was gone");
    assert!(status.code().is_some(), "ended by a signal: {status:?}");
}
