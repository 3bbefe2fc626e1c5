//! Completion for the REPL and the TUI's command line: the command first, then
//! what fits where the cursor is (policy names after `protect`, classes after
//! `break event`, sub-commands, hook ids, the image's symbols).

use vmiscope_introspect::Policy;

use crate::commands::command_words;
use crate::session::Session;

/// Words that follow a command (sub-commands, options, classes).
const SUBWORDS: &[&str] = &[
    "event",
    "hook",
    "allow",
    "deny",
    "policy",
    "ept",
    "gva",
    "msr",
    "cr",
    "dtr",
    "xcr",
    "bp",
    "introcall",
    "enable",
    "disable",
    "delete",
    "read",
    "write",
    "find",
    "phys",
    "add-from-alert",
    "save",
    "on",
    "off",
    "log",
    "visible",
    "force",
    "idtr",
    "gdtr",
    "breakpoint",
    "timer",
    "vcpu",
    "list",
    "all",
    "--wait",
    "--json",
];

const CLASSES: &[&str] = &[
    "ept",
    "msr",
    "cr",
    "dtr",
    "xcr",
    "breakpoint",
    "introcall",
    "timer",
    "vcpu",
];

/// What the session offers after the first word: sub-words, hook ids, symbols.
pub fn words(s: &Session) -> Vec<String> {
    let mut w: Vec<String> = SUBWORDS.iter().map(|x| x.to_string()).collect();
    w.extend(s.intro().symbols().iter().map(|(n, _)| n.to_string()));
    w.extend(s.intro().hooks().iter().map(|h| h.id.to_string()));
    w
}

/// Where the word under the cursor starts in `before` (the line up to the
/// cursor), and the candidates for it, sorted.
pub fn candidates(before: &str, words: &[String]) -> (usize, Vec<String>) {
    let start = before.rfind(' ').map(|i| i + 1).unwrap_or(0);
    let part = &before[start..];
    let first = before.split_whitespace().next().unwrap_or("");
    let mut out: Vec<String> = if start == 0 {
        let mut v: Vec<String> = command_words().into_iter().map(str::to_string).collect();
        v.extend(["tui", "repl"].map(str::to_string));
        v
    } else if matches!(first, "protect" | "unprotect") {
        let mut v: Vec<String> = Policy::ALL.iter().map(|p| p.name().to_string()).collect();
        v.extend(["list", "all"].map(str::to_string));
        v
    } else if before.starts_with("break event ") || before.starts_with("events ") {
        CLASSES.iter().map(|c| c.to_string()).collect()
    } else {
        words.to_vec()
    };
    out.retain(|w| w.starts_with(part));
    out.sort();
    out.dedup();
    (start, out)
}

/// The longest common prefix of `c` (what Tab can fill in at once).
pub fn common_prefix(c: &[String]) -> String {
    let Some(first) = c.first() else {
        return String::new();
    };
    let mut n = first.len();
    for w in &c[1..] {
        n = n.min(
            first
                .bytes()
                .zip(w.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    first[..n].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_by_position() {
        let syms = vec!["kprintf".to_string(), "kmain".to_string()];
        let (_, c) = candidates("pro", &syms);
        assert_eq!(c, vec!["protect"]);
        let (start, c) = candidates("protect sys", &syms);
        assert_eq!(start, 8);
        assert_eq!(c, vec!["syscall-msrs", "syscall-table"]);
        let (_, c) = candidates("break event m", &syms);
        assert_eq!(c, vec!["msr"]);
        let (_, c) = candidates("disasm k", &syms);
        assert_eq!(c, vec!["kmain", "kprintf"]);
        assert_eq!(common_prefix(&c), "k");
    }
}
