//! A real terminal for the TUI tests: a tmux session per test, driven with
//! `send-keys` and read with `capture-pane`.
#![allow(dead_code)]

use std::process::Command;
use std::time::{Duration, Instant};

pub fn tmux_available() -> bool {
    super::tool_available("tmux", "-V")
}

pub struct Term {
    pub name: String,
}

impl Term {
    pub fn start(cols: u16, rows: u16, args: &str) -> Term {
        // Unique per terminal: tests of one process run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("vmiscope-{}-{cols}-{n}", std::process::id());
        let exe = env!("CARGO_BIN_EXE_vmiscope");
        // A tmux server per terminal (`-L`): tests run in parallel, and a shared
        // server that exits with its last session races the next `new-session`
        // ("server exited unexpectedly").
        let st = Command::new("tmux")
            .args([
                "-L",
                &name,
                "new-session",
                "-d",
                "-s",
                &name,
                "-x",
                &cols.to_string(),
                "-y",
                &rows.to_string(),
            ])
            .arg(format!("{exe} {args}; sleep 60"))
            .status()
            .unwrap();
        assert!(st.success());
        Term { name }
    }

    /// tmux on this terminal's own server.
    pub fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.name]);
        c
    }

    pub fn screen(&self) -> String {
        let o = self
            .tmux()
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn keys(&self, keys: &[&str]) {
        for k in keys {
            self.tmux()
                .args(["send-keys", "-t", &self.name, k])
                .status()
                .unwrap();
        }
    }

    pub fn type_line(&self, text: &str) {
        self.keys(&[":"]);
        self.tmux()
            .args(["send-keys", "-t", &self.name, "-l", text])
            .status()
            .unwrap();
        self.keys(&["Enter"]);
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Sends `text` as typed (no key names), e.g. a mouse report.
    pub fn literal(&self, text: &str) {
        self.tmux()
            .args(["send-keys", "-t", &self.name, "-l", text])
            .status()
            .unwrap();
    }

    /// A left click at the 0-based cell (`col`, `row`), as an xterm SGR mouse
    /// report (what the terminal sends with mouse capture on).
    pub fn click(&self, col: u16, row: u16) {
        let (c, r) = (col + 1, row + 1);
        self.literal(&format!("\x1b[<0;{c};{r}M\x1b[<0;{c};{r}m"));
    }

    /// The mouse wheel turned down once over the 0-based cell (`col`, `row`).
    pub fn wheel_down(&self, col: u16, row: u16) {
        self.literal(&format!("\x1b[<65;{};{}M", col + 1, row + 1));
    }

    /// Waits (up to 15 s) until the screen contains `what`.
    pub fn wait_for(&self, what: &str) -> String {
        self.wait_for_within(what, Duration::from_secs(15))
    }

    /// Waits until the screen contains `what`, failing with the screen after
    /// `limit`.
    pub fn wait_for_within(&self, what: &str, limit: Duration) -> String {
        let t = Instant::now();
        loop {
            let s = self.screen();
            if s.contains(what) {
                return s;
            }
            assert!(t.elapsed() < limit, "`{what}` never appeared; screen:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        let _ = self
            .tmux()
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}
