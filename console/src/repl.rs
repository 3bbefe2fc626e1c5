//! The line console (rustyline): history, completion of commands, hook ids and
//! symbols; guest output, alerts and stops printed above the prompt as they come.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::{Context, Editor, Helper, Highlighter, Hinter, Validator};

use crate::cli::Mode;
use crate::format::alert_line;
use crate::session::Session;
use vmiscope_monitor::Notice;

#[derive(Helper, Hinter, Highlighter, Validator)]
struct Words {
    /// Completion words after the first: sub-commands, classes, symbols, hook ids.
    words: Arc<Mutex<Vec<String>>>,
}

impl Completer for Words {
    type Candidate = String;
    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        Ok(crate::complete::candidates(
            &line[..pos],
            &self.words.lock().unwrap(),
        ))
    }
}

fn history_path() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(Into::into)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".local/state"))
        })?;
    let dir = base.join("vmiscope");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join("history"))
}

/// Prints guest output, alerts and stops above the prompt as they happen, on a
/// thread of its own, until `done`: it blocks on the session's notices (one
/// channel, so they print in the order they happened) and is woken by a
/// `Notice::Wake` to look at `done`.
fn watch(
    s: &Session,
    done: Arc<AtomicBool>,
    mut print: Box<dyn FnMut(String) + Send>,
) -> std::thread::JoinHandle<()> {
    let notices = s.intro().subscribe();
    let shared = s.shared().clone();
    let intro = s.intro().clone();
    let ended_already = shared.stop_reason();
    std::thread::spawn(move || {
        let line = |n: Notice| -> Option<String> {
            Some(match n {
                Notice::Serial(l) => format!("guest| {l}"),
                Notice::Alert(a) => format!("ALERT {}", alert_line(&a)),
                Notice::Stop(st) => {
                    let (rip, _) = shared.last_position(st.vcpu).unwrap_or_default();
                    let at = crate::format::at(intro.symbols(), rip);
                    format!("stopped: vCPU {} ({}) at {at}", st.vcpu, st.cause)
                }
                Notice::End(why) => format!(
                    "the guest has ended: {why}; `regs`, `mem read`, `disasm`, `events`, `alerts` still work"
                ),
                Notice::Wake => return None,
            })
        };
        // The end, said at once if it came before this watcher did.
        if let Some(why) = ended_already
            && let Some(l) = line(Notice::End(why))
        {
            print(l);
        }
        while !done.load(Ordering::SeqCst) {
            let Ok(first) = notices.recv() else { break };
            // What else is queued goes out in the same print, in order.
            let msg: Vec<String> = std::iter::once(first)
                .chain(notices.try_iter())
                .filter_map(line)
                .collect();
            if !msg.is_empty() {
                print(msg.join("\n"));
            }
        }
    })
}

/// Runs the REPL until `quit` (Mode::Quit) or `tui` (Mode::Tui).
pub fn run(s: &mut Session) -> Mode {
    let words = Arc::new(Mutex::new(Vec::new()));
    let mut rl: Editor<Words, rustyline::history::DefaultHistory> = match Editor::new() {
        Ok(r) => r,
        Err(e) => {
            crate::errln!("vmiscope: error: cannot start the line editor: {e}");
            return Mode::Quit;
        }
    };
    rl.set_helper(Some(Words {
        words: words.clone(),
    }));
    let hist = history_path();
    if let Some(h) = &hist {
        let _ = rl.load_history(h);
    }
    // Guest output, alerts and stops, printed above the prompt.
    let done = Arc::new(AtomicBool::new(false));
    // Above the prompt on a terminal; plain lines when stdin is a pipe (scripts
    // feeding the REPL still see stops that gdb or another vCPU caused).
    let print: Box<dyn FnMut(String) + Send> = match rl.create_external_printer() {
        Ok(mut p) => Box::new(move |m| {
            use rustyline::ExternalPrinter;
            let _ = p.print(m);
        }),
        Err(_) => Box::new(|m| crate::outln!("{m}")),
    };
    let watcher = watch(s, done.clone(), print);
    let status = s.status();
    crate::outln!(
        "vmiscope console on `{}` ({status}). `help` lists commands, `tui` switches view.",
        s.image()
    );
    let mode = loop {
        *words.lock().unwrap() = crate::complete::words(s);
        match rl.readline("vmiscope> ") {
            Ok(line) => {
                let line = line.trim().to_string();
                if !line.is_empty() {
                    let _ = rl.add_history_entry(line.as_str());
                }
                if line == "tui" {
                    break Mode::Tui;
                }
                match s.exec(&line) {
                    Ok(out) => {
                        if !out.text.is_empty() {
                            crate::outln!("{}", out.text.trim_end());
                        }
                        if out.quit {
                            break Mode::Quit;
                        }
                    }
                    Err(e) => crate::outln!("error: {e}"),
                }
            }
            // Ctrl-C stops the guest, as in gdb; Ctrl-D ends the session.
            Err(ReadlineError::Interrupted) => match s.exec("pause") {
                Ok(o) => crate::outln!("{}", o.text),
                Err(e) => crate::outln!("error: {e}"),
            },
            Err(ReadlineError::Eof) => {
                let _ = s.exec("quit");
                break Mode::Quit;
            }
            Err(e) => {
                crate::errln!("vmiscope: error: {e}");
                break Mode::Quit;
            }
        }
    };
    done.store(true, Ordering::SeqCst);
    s.intro().notices().publish(Notice::Wake);
    let _ = watcher.join();
    if let Some(h) = &hist {
        let _ = rl.save_history(h);
    }
    mode
}
