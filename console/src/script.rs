//! `vmiscope run IMAGE --script FILE`: console commands without a UI. `expect`
//! lines assert; the exit status is 0 iff every expectation held.

use std::path::Path;
use vmiscope_monitor::os::maps;

use crate::cli::RunArgs;
use crate::commands::{self, Command};
use crate::session::Session;

pub fn run(a: &RunArgs, path: &Path) -> i32 {
    let cmds = match load(a, path) {
        Ok(c) => c,
        Err(()) => return 2,
    };
    let mut s = match Session::start(a) {
        Ok(s) => s,
        Err(e) => {
            crate::errln!("vmiscope: error: {e}");
            return 2;
        }
    };
    let (mut held, mut failed) = (0, 0);
    let mut printed = 0;
    for (line_no, line, checked) in cmds {
        // Every line was checked before the run; it is parsed again as it runs,
        // so its symbols are the running kernel's (a KASLR slide is found only
        // once the kernel loads its IDT).
        // A line naming a register (`$rsp`) is checked with a stand-in value:
        // only what it means now may run, or the error is its result.
        let cmd = match s.parse(&line) {
            Ok(Some(cmd)) => cmd,
            Err(e) if line.contains('$') => {
                failed += 1;
                crate::outln!("ERROR  {}:{line_no}: {line}: {e}", path.display());
                continue;
            }
            _ => checked,
        };
        let is_expect = matches!(cmd, Command::Expect(..));
        let quit = matches!(cmd, Command::Quit);
        let r = s.run(cmd);
        flush_serial(&s, &mut printed);
        match (is_expect, r) {
            (true, Ok(_)) => {
                held += 1;
                crate::outln!("ok     {}:{line_no}: {line}", path.display());
            }
            (true, Err(report)) => {
                failed += 1;
                crate::outln!(
                    "FAILED {}:{line_no}: {line}\n       {report}",
                    path.display()
                );
            }
            (false, Ok(out)) => {
                for l in out.text.lines() {
                    crate::outln!("       {l}");
                }
            }
            (false, Err(e)) => {
                failed += 1;
                crate::outln!("ERROR  {}:{line_no}: {line}: {e}", path.display());
            }
        }
        if quit {
            break;
        }
        if vmiscope_vmm::signals::received() > 0 {
            // The signal ends the run (now, whether or not its watchdog has seen
            // it yet, so the stop says why); the rest of the script is not run.
            let signal = vmiscope_vmm::signals::last();
            s.shared().stop(vmiscope_vmm::StopReason::Signal(signal));
            break;
        }
    }
    let state = match s.run_state() {
        crate::session::RunState::Running => "running",
        crate::session::RunState::Stopped { .. } => "held at a stop",
        _ => "paused",
    };
    let done = format!("the script's last line ran, the guest still {state}");
    let reason = s
        .finish_with(vmiscope_vmm::StopReason::Done(done))
        .map(|o| o.reason.clone());
    let outcome = reason.as_ref().map(|r| r.to_string()).unwrap_or_default();
    flush_serial(&s, &mut printed);
    crate::outln!(
        "script {}: {held} held, {failed} failed ({outcome})",
        path.display()
    );
    match reason {
        // Ended by a signal: the shell's status for it, whatever the expectations.
        Some(r @ vmiscope_vmm::StopReason::Signal(_)) => r.exit_status(),
        _ if failed == 0 => 0,
        _ => 1,
    }
}

fn flush_serial(s: &Session, printed: &mut usize) {
    let lines = s.serial_lines();
    // The last line may still be growing: print complete lines only.
    let complete = lines.len().saturating_sub(1);
    for l in &lines[(*printed).min(complete)..complete] {
        crate::outln!("guest| {l}");
    }
    *printed = complete.max(*printed);
}

/// A script written for another image (its `# image: NAME` header) would only
/// time out expectation after expectation: refused at once.
fn check_image(a: &RunArgs, path: &Path, text: &str) -> Result<(), String> {
    let Some(want) = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("# image:"))
        .map(str::trim)
    else {
        return Ok(());
    };
    let given = Path::new(&a.image)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if want == a.image || want == given {
        return Ok(());
    }
    Err(format!(
        "{} is written for image `{want}`, not `{}` (its `# image:` line)",
        path.display(),
        a.image
    ))
}

/// A script larger than this is refused unread.
const MAX_SCRIPT: u64 = 16 << 20;

/// The script's commands with their line numbers, every line parsed before
/// anything runs; a problem is printed and is `Err`.
fn load(a: &RunArgs, path: &Path) -> Result<Vec<(usize, String, Command)>, ()> {
    let text = match vmiscope_monitor::files::read_bounded(path, MAX_SCRIPT, "16 MiB")
        .map(|b| String::from_utf8_lossy(&b).into_owned())
    {
        Ok(t) => t,
        Err(e) => {
            crate::errln!(
                "vmiscope: error: cannot read script {}: {e}",
                path.display()
            );
            return Err(());
        }
    };
    if let Err(e) = check_image(a, path, &text) {
        crate::errln!("vmiscope: error: {e}");
        return Err(());
    }
    // Symbols for parsing come from the image; parse everything before running.
    let syms = match crate::launch::load_image(&a.image, a.mem)
        .and_then(|(img, _)| Ok(maps::for_image(&a.image, &img, a.symbols.as_deref())?))
    {
        Ok(s) => s,
        Err(e) => {
            crate::errln!("vmiscope: error: {e}");
            return Err(());
        }
    };
    let mut cmds = Vec::new();
    let mut bad = false;
    for (i, line) in text.lines().enumerate() {
        // `$rsp` and the like are read when the line runs: here a register's
        // name stands for 0 (an unknown one is still an error).
        let resolve = |n: &str| match n.strip_prefix('$') {
            Some(r) => crate::format::reg_by_name(
                &Default::default(),
                &Default::default(),
                &r.to_ascii_lowercase(),
            ),
            None => syms.get(n),
        };
        match commands::parse(line, &resolve) {
            Ok(Some(c)) => cmds.push((i + 1, line.trim().to_string(), c)),
            Ok(None) => {}
            Err(e) => {
                crate::errln!("{}:{}: {e}", path.display(), i + 1);
                bad = true;
            }
        }
    }
    if bad {
        return Err(());
    }
    Ok(cmds)
}
